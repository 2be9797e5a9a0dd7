/**
 * Benchmark of the Mamba1 selective scan: training-shaped forward and forward+backward, small-batch prefill
 * (parallel chunks), and decode (one token per call, and the speculative verify of K + 1 tokens).
 * Shapes follow a Mamba1 hybrid of an 8B Llama: d_inner 4096, d_state 16, B un-repeated (d_xb / 16 = 64 groups),
 * C in d_inner / 16 = 256 groups.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { selectiveScan, selectiveScanStep, selectiveScanVerify } from "../runtime/ops/selective_scan.ts";
import { randomTensor, timeLoop } from "./harness.ts";

/** Benchmark entry point (see KERNELS.md): logs one row per measured configuration. */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: { quick: boolean } = { quick: false },
): Promise<void> {
  const q = opts.quick;
  const Dn = q ? 128 : 4096, N = 16, GB = Dn / 64, GC = Dn / 16;
  const A = randomTensor(rt, [Dn, N], -16, -1), D = randomTensor(rt, [Dn], 0.5, 1.5);
  const owned: Tensor[] = [A, D];
  const inputs = (B: number, L: number) => {
    const t = {
      x: randomTensor(rt, [B, L, Dn], -1, 1),
      delta: randomTensor(rt, [B, L, Dn], 0.001, 0.1),
      Bm: randomTensor(rt, [B, L, GB, N], -1, 1),
      Cm: randomTensor(rt, [B, L, GC, N], -1, 1),
    };
    owned.push(t.x, t.delta, t.Bm, t.Cm);
    return t;
  };
  try {
    for (const [B, L] of q ? [[2, 64], [1, 64]] : [[8, 2048], [1, 2048]]) {
      const t = inputs(B, L);
      const tokens = B * L;
      const fwd = await timeLoop(rt, () => {
        rt.noGrad(() => selectiveScan(t.x, t.delta, A, t.Bm, t.Cm, D, { finalState: true }));
      }, opts);
      log({
        kernel: "selective_scan",
        pass: "forward",
        B,
        L,
        Dn,
        N,
        ms: fwd,
        tokens_per_s: tokens / fwd * 1e3,
      });
      for (const l of [t.x, t.delta, t.Bm, t.Cm]) l.requiresGrad = true;
      const both = await timeLoop(rt, () => {
        const { y } = selectiveScan(t.x, t.delta, A, t.Bm, t.Cm, D);
        rt.backward(y, y);
        for (const l of [t.x, t.delta, t.Bm, t.Cm]) {
          l.grad?.dispose();
          l.grad = null;
        }
      }, opts);
      for (const l of [t.x, t.delta, t.Bm, t.Cm]) l.requiresGrad = false;
      log({
        kernel: "selective_scan",
        pass: "forward+backward",
        B,
        L,
        Dn,
        N,
        ms: both,
        tokens_per_s: tokens / both * 1e3,
      });
    }
    // decode: 32 single-token steps per timed run, and a K = 4 verify (5 new tokens, 3 re-applied)
    const B = 1, steps = 32;
    const step = inputs(B, 1);
    const state = rt.zeros([B, Dn, N]).keep();
    owned.push(state);
    const x1 = step.x.view([B, Dn]), d1 = step.delta.view([B, Dn]);
    owned.push(x1, d1);
    const perStep = await timeLoop(rt, () => {
      for (let i = 0; i < steps; i++) selectiveScanStep(x1, d1, A, step.Bm, step.Cm, D, state);
    }, opts) / steps;
    log({ kernel: "selective_scan", pass: "decode step", B, Dn, N, us_per_token: perStep * 1e3 });
    const v = inputs(B, 5);
    const kept = rt.tensor([3], [B], "u32").keep();
    owned.push(kept);
    const verify = await timeLoop(rt, () => {
      for (let i = 0; i < steps; i++) {
        selectiveScanVerify(A, D, state, { cache: { x: v.x, delta: v.delta, B: v.Bm }, kept }, {
          x: v.x,
          delta: v.delta,
          B: v.Bm,
          C: v.Cm,
        });
      }
    }, opts) / steps;
    log({ kernel: "selective_scan", pass: "verify K=4", B, Dn, N, us_per_call: verify * 1e3 });
  } finally {
    for (const t of owned) t.dispose();
  }
}

if (import.meta.main) {
  const { acquireRuntime } = await import("../runtime/runtime.ts");
  const rt = await acquireRuntime();
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick: Deno.args.includes("--quick") });
}
