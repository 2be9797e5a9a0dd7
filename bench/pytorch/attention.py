"""PyTorch baseline for bench/attention.ts: torch sdpa on the same shapes, one JSON row per measurement.

Causal GQA attention forward and backward at H=32, Hkv=8, hd=64, T=2048, B=1..4 (bf16 and fp32), and decode
attention (1 and 5 new queries) against a 2048-long KV cache. FLOPs and bytes are counted exactly as in
bench/attention.ts: forward 4*B*H*T^2*hd/2, backward 2.5x forward; decode bytes = K and V of the cache + q + out.

Usage: python3 bench/pytorch/attention.py [--quick]   (CUDA events; warm-up >= 1 s before each timing)
"""

import json
import sys
import time

import torch
import torch.nn.functional as F


def time_ms(fn, warmup_s, min_s):
    """Milliseconds per call: warm up for warmup_s, then time batches with CUDA events until min_s has passed."""
    fn()
    torch.cuda.synchronize()
    end = time.time() + warmup_s
    while time.time() < end:
        fn()
    torch.cuda.synchronize()
    total, calls, n = 0.0, 0, 1
    while total < min_s * 1e3:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        stop.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(stop)
        total += ms
        calls += n
        if ms < 100:
            n *= 2
    return total / calls


def main():
    quick = "--quick" in sys.argv
    dev = "cuda"
    H, Hkv, hd = (4, 2, 64) if quick else (32, 8, 64)
    T = 128 if quick else 2048
    batches = [1, 2] if quick else [1, 2, 3, 4]
    warmup_s, min_s = (0.1, 0.1) if quick else (1.5, 1.0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    common = {"bench": "attention", "provider": "pytorch", "torch": torch.__version__,
              "adapter": torch.cuda.get_device_name()}
    for dtype_name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
        for B in batches:
            q = torch.randn(B, H, T, hd, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hkv, T, hd, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, T, hd, device=dev, dtype=dtype, requires_grad=True)
            flops = 4 * B * H * T * T * hd / 2

            def fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            ms = time_ms(fwd, warmup_s, min_s)
            print(json.dumps({**common, "op": "forward", "dtype": dtype_name, "B": B, "T": T, "H": H, "Hkv": Hkv,
                              "hd": hd, "ms": ms, "tflops": flops / ms / 1e9}), flush=True)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            g = torch.randn_like(out)

            def fwd_bwd():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                torch.autograd.grad(o, (q, k, v), g)

            # backward alone = (forward + backward) - forward, as sdpa does not expose its saved statistics
            ms_fb = time_ms(fwd_bwd, warmup_s, min_s)
            ms_b = ms_fb - ms
            print(json.dumps({**common, "op": "backward", "dtype": dtype_name, "B": B, "T": T, "H": H, "Hkv": Hkv,
                              "hd": hd, "ms": ms_b, "tflops": 2.5 * flops / ms_b / 1e9}), flush=True)
            del q, k, v, out, g
        cache_len = 256 if quick else 2048
        for n in [1, 5]:
            L = cache_len + n
            kc = torch.randn(1, Hkv, L, hd, device=dev, dtype=dtype)
            vc = torch.randn(1, Hkv, L, hd, device=dev, dtype=dtype)
            q = torch.randn(1, H, n, hd, device=dev, dtype=dtype)
            # new query i sits at position cache_len + i and sees keys 0..cache_len + i
            mask = torch.arange(L, device=dev)[None, :] <= (cache_len + torch.arange(n, device=dev))[:, None]

            def dec():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask if n > 1 else None, enable_gqa=True)

            ms = time_ms(dec, warmup_s, min_s)
            el = 2 if dtype == torch.bfloat16 else 4
            nbytes = 2 * L * Hkv * hd * el + 2 * n * H * hd * el
            print(json.dumps({**common, "op": "decode", "dtype": dtype_name, "B": 1, "cache": L, "queries": n,
                              "H": H, "Hkv": Hkv, "hd": hd, "ms": ms, "gbps": nbytes / ms / 1e6}), flush=True)


if __name__ == "__main__":
    main()
