"""Plain-PyTorch baseline for bench/ssd.ts: the chunked Mamba2 scan (the "minimal SSD" formulation: einsums per
chunk, a decay mask from segment sums, chunk states, a pass over chunks) forward and forward+backward through
autograd, on the same Llama-3.2-1B-shaped layer (B=4, L=2048, H=32, 8 groups for x and B, P=N=64), in fp32 with
TF32 off, fp32 with TF32 on, and bf16. Prints one JSON row per measurement, like the Deno benchmark.

Usage on the GPU machine: python3 bench/pytorch/ssd.py [--quick] [--check]
--check first compares the chunked form with the sequential recurrence on a small problem (float64).
"""

import argparse
import json
import time

import torch


def segsum_exp(cs: torch.Tensor) -> torch.Tensor:
    """exp(cs[..., i] - cs[..., j]) for j <= i, 0 above the diagonal, without ever exponentiating a positive number
    (differences are masked to -inf before exp)."""
    q = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(q, q, dtype=torch.bool, device=cs.device))
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def ssd_chunked(x, delta, A, B, C, D, chunk, init=None):
    """x [b, l, h, p], delta [b, l, h] (> 0), A [h] (< 0), B and C [b, l, h, n], D [h]; l % chunk == 0.
    Returns y [b, l, h, p] and the final state [b, h, p, n]."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    c = l // chunk
    xs = x.reshape(b, c, chunk, h, p)
    Bs = B.reshape(b, c, chunk, h, n)
    Cs = C.reshape(b, c, chunk, h, n)
    dl = delta.reshape(b, c, chunk, h)
    la = (dl * A).permute(0, 3, 1, 2)  # [b, h, c, q]
    cs = torch.cumsum(la, dim=-1)
    # intra-chunk: y_q = sum_{s<=q} (C_q . B_s) exp(cs_q - cs_s) delta_s x_s
    decay = segsum_exp(cs)  # [b, h, c, q, s]
    cb = torch.einsum("bcqhn,bcshn->bhcqs", Cs, Bs) * decay
    y = torch.einsum("bhcqs,bcsh,bcshp->bcqhp", cb, dl, xs)
    # each chunk's own end state, then the pass over chunks
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, h, c, q]
    states = torch.einsum("bcshn,bhcs,bcsh,bcshp->bchpn", Bs, to_end, dl, xs)
    chunk_decay = torch.exp(cs[..., -1])  # [b, h, c]
    S = init if init is not None else torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device)
    entering = []
    for k in range(c):
        entering.append(S)
        S = chunk_decay[:, :, k, None, None] * S + states[:, k]
    Sin = torch.stack(entering, dim=1)  # [b, c, h, p, n]
    y = y + torch.einsum("bcqhn,bchpn,bhcq->bcqhp", Cs, Sin, torch.exp(cs))
    y = y.reshape(b, l, h, p) + D[:, None] * x
    return y, S


def ssd_sequential(x, delta, A, B, C, D, init=None):
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = init.clone() if init is not None else torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(l):
        a = torch.exp(delta[:, t] * A)  # [b, h]
        S = a[..., None, None] * S + (delta[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), S


def check(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, l, h, p, n = 2, 24, 3, 5, 7
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, l, h, p, generator=g, **f64)
    B = torch.randn(b, l, h, n, generator=g, **f64)
    C = torch.randn(b, l, h, n, generator=g, **f64)
    delta = torch.nn.functional.softplus(torch.rand(b, l, h, generator=g, **f64) * 5 - 4)
    A = -(torch.rand(h, generator=g, **f64) * 1.5 + 0.5)
    D = torch.rand(h, generator=g, **f64) + 0.5
    init = torch.randn(b, h, p, n, generator=g, **f64)
    args = [t.to(device) for t in (x, delta, A, B, C, D)]
    y0, s0 = ssd_sequential(*args, init=init.to(device))
    for chunk in (1, 4, 8, 24):
        y1, s1 = ssd_chunked(*args, chunk, init=init.to(device))
        err = max((y1 - y0).abs().max().item(), (s1 - s0).abs().max().item())
        assert err < 1e-10, f"chunked SSD differs from the recurrence by {err} at chunk {chunk}"
    print(json.dumps({"bench": "ssd-pytorch", "check": "chunked == sequential (float64)", "ok": True}))


def timed(fn, quick):
    """ms per call: warm-up of a second (GPU clocks ramp up), then CUDA events over enough calls for ~0.5 s."""
    warm_s = 0.0 if quick else 1.0
    t0 = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= warm_s and calls >= 2:
            break
    per = (time.perf_counter() - t0) / calls
    n = max(3, min(200, int(0.5 / max(per, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    dev = "cuda"
    if a.check:
        check(dev)
    b, l, h, g, p = (1, 128, 4, 2, 16) if a.quick else (4, 2048, 32, 8, 64)
    n = p
    for mode in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        dt = torch.bfloat16 if mode == "bf16" else torch.float32
        gen = torch.Generator(device=dev).manual_seed(1)
        xg = torch.rand(b, l, g, p, device=dev, generator=gen).mul_(2).sub_(1).to(dt)
        Bg = torch.rand(b, l, g, n, device=dev, generator=gen).mul_(2).sub_(1).to(dt)
        C = torch.rand(b, l, h, n, device=dev, generator=gen).mul_(2).sub_(1).to(dt)
        dtr = torch.rand(b, l, h, device=dev, generator=gen).mul_(4).sub_(4).to(dt)
        bias = torch.rand(h, device=dev, generator=gen).sub_(1).to(dt)
        A = -(torch.rand(h, device=dev, generator=gen) * 1.5 + 0.5).to(dt)
        D = (torch.rand(h, device=dev, generator=gen) + 0.5).to(dt)
        gy = torch.rand(b, l, h, p, device=dev, generator=gen).to(dt)
        leaves = [xg, Bg, C, dtr, bias, A, D]

        def fwd(chunk):
            # the caller's work, as the Deno kernels fuse it: repeat the groups, softplus(dt + bias)
            x = xg.repeat_interleave(h // g, dim=2)
            B = Bg.repeat_interleave(h // g, dim=2)
            delta = torch.nn.functional.softplus(dtr + bias)
            return ssd_chunked(x, delta, A, B, C, D, chunk)

        for chunk in ((32, 64) if a.quick else (64, 128, 256)):
            row = dict(bench="ssd-pytorch", torch=torch.__version__, mode=mode, B=b, L=l, H=h, groups=g, P=p, N=n,
                       chunk=chunk)
            try:
                with torch.no_grad():
                    ms = timed(lambda: fwd(chunk), a.quick)
                print(json.dumps({**row, "op": "scan_forward", "ms": ms, "tokens_per_s": b * l / (ms / 1000)}))
                for t in leaves:
                    t.requires_grad_(True)

                def fb():
                    y, _ = fwd(chunk)
                    torch.autograd.grad(y, leaves, gy)

                ms = timed(fb, a.quick)
                print(json.dumps({**row, "op": "scan_forward_backward", "ms": ms, "tokens_per_s": b * l / (ms / 1000)}))
                for t in leaves:
                    t.requires_grad_(False)
            except torch.cuda.OutOfMemoryError as e:
                print(json.dumps({**row, "error": f"out of memory: {e}"[:200]}))
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
