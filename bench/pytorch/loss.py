"""PyTorch baseline for bench/loss.ts: CE + KL(teacher || student) over the vocabulary, one JSON row per measurement.

Same shapes and byte counts as bench/loss.ts (N = 2048 tokens, V = 128256): forward reads student and teacher
logits once (2 N V elements); forward + backward counts 7 N V (PyTorch materialises softmax tensors, so its real
traffic is higher; the count is the fused kernel's, to compare times on equal terms).

Usage: python3 bench/pytorch/loss.py [--quick]
"""

import json
import sys
import time

import torch
import torch.nn.functional as F


def time_ms(fn, warmup_s, min_s):
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
        total += start.elapsed_time(stop)
        calls += n
        n *= 2
    return total / calls


def main():
    quick = "--quick" in sys.argv
    N, V = (64, 4096) if quick else (2048, 128256)
    warmup_s, min_s = (0.1, 0.1) if quick else (1.5, 1.0)
    common = {"bench": "loss", "provider": "pytorch", "torch": torch.__version__,
              "adapter": torch.cuda.get_device_name(), "N": N, "V": V}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        el = 4 if dtype == torch.float32 else 2
        s = (torch.randn(N, V, device="cuda") * 4).to(dtype).requires_grad_(True)
        t = (torch.randn(N, V, device="cuda") * 4).to(dtype)
        labels = torch.randint(0, V, (N,), device="cuda")

        def loss_fn():
            ce = F.cross_entropy(s.float(), labels)
            kl = F.kl_div(F.log_softmax(s.float(), -1), F.softmax(t.float(), -1), reduction="batchmean")
            return ce + 0.1 * kl

        def fwd():
            with torch.no_grad():
                loss_fn()

        ms = time_ms(fwd, warmup_s, min_s)
        print(json.dumps({**common, "op": "distill_forward", "dtype": name, "ms": ms,
                          "gbps": 2 * N * V * el / ms / 1e6}), flush=True)

        def fwd_bwd():
            s.grad = None
            loss_fn().backward()

        ms = time_ms(fwd_bwd, warmup_s, min_s)
        print(json.dumps({**common, "op": "distill_forward_backward", "dtype": name, "ms": ms,
                          "gbps": 7 * N * V * el / ms / 1e6}), flush=True)


if __name__ == "__main__":
    main()
