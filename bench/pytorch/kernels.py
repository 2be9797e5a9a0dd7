"""PyTorch baselines for bench/kernels.ts: the same shapes on the same GPU, one JSON row per line.

matmul C = A @ B.T at 4096^3 and 8192^3 in fp32 (TF32 off, the issue's reference), fp32 with TF32, fp16 and bf16;
GEMV y = x @ W.T for x [1, 4096], W [14336, 4096] in fp32/fp16/bf16; device copy of 1 GiB (bytes read + written).
Timing: at least one second of warm-up per shape (clocks ramp up after idle), then CUDA events around `iters`
back-to-back launches sized to about a second.

Run: python bench/pytorch/kernels.py [--quick]
"""

import json
import sys
import time

import torch


def timed(fn, warmup_s: float, target_s: float) -> tuple[float, int]:
    """Milliseconds per call of fn, after warm-up, with CUDA events around a calibrated number of calls."""
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < warmup_s or calls < 3:
        fn()
        calls += 1
        if calls % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / calls
    iters = max(3, min(100_000, round(target_s / max(per_call, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, iters


def main() -> None:
    quick = "--quick" in sys.argv
    warmup_s, target_s = (0.05, 0.05) if quick else (1.0, 1.0)
    dev = torch.device("cuda")
    print(json.dumps({
        "bench": "device", "provider": "pytorch", "torch": torch.__version__,
        "adapter": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }), flush=True)

    dtypes = [("f32", torch.float32, False), ("f32_tf32", torch.float32, True),
              ("f16", torch.float16, False), ("bf16", torch.bfloat16, False)]
    for size in ([256] if quick else [4096, 8192]):
        for name, dtype, tf32 in dtypes:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            a = torch.rand(size, size, device=dev, dtype=dtype) - 0.5
            b = torch.rand(size, size, device=dev, dtype=dtype) - 0.5
            c = torch.empty(size, size, device=dev, dtype=dtype)
            ms, iters = timed(lambda: torch.matmul(a, b.T, out=c), warmup_s, target_s)
            print(json.dumps({
                "bench": "matmul", "provider": "pytorch", "layout": "A B^T", "dtype": name,
                "m": size, "n": size, "k": size,
                "tflops": round(2 * size**3 / (ms * 1e-3) / 1e12, 3), "ms": round(ms, 4), "iters": iters,
            }), flush=True)
            del a, b, c
    torch.backends.cuda.matmul.allow_tf32 = False

    n, k = (1024, 512) if quick else (14336, 4096)
    for name, dtype in [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]:
        x = torch.rand(1, k, device=dev, dtype=dtype) - 0.5
        w = torch.rand(n, k, device=dev, dtype=dtype) - 0.5
        y = torch.empty(1, n, device=dev, dtype=dtype)
        ms, iters = timed(lambda: torch.matmul(x, w.T, out=y), warmup_s, target_s)
        nbytes = (n * k + k + n) * x.element_size()
        print(json.dumps({
            "bench": "gemv", "provider": "pytorch", "dtype": name, "m": 1, "k": k, "n": n,
            "gbps": round(nbytes / (ms * 1e-3) / 1e9, 1), "us": round(ms * 1e3, 2), "iters": iters,
        }), flush=True)
        del x, w, y

    nbytes = (1 << 22) if quick else (1 << 30)
    src = torch.rand(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    ms, iters = timed(lambda: dst.copy_(src), warmup_s, target_s)
    print(json.dumps({
        "bench": "copy", "provider": "pytorch", "method": "Tensor.copy_", "bytes": nbytes,
        "gbps": round(2 * nbytes / (ms * 1e-3) / 1e9, 1), "iters": iters,
    }), flush=True)


if __name__ == "__main__":
    main()
