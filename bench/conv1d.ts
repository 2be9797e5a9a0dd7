/**
 * Benchmark of the causal depthwise conv1d (fused SiLU): training-shaped forward and forward+backward, batch-1
 * prefill (time segments), and the decode step. Channels follow a Mamba2 hybrid of an 8B Llama: conv over
 * x, B and C = d_xb + d_xb + d_inner = 1024 + 1024 + 4096 channels.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { causalConv1d, causalConv1dStep } from "../runtime/ops/conv1d.ts";
import { randomTensor, timeLoop } from "./harness.ts";

/** Benchmark entry point (see KERNELS.md): logs one row per measured configuration. */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: { quick: boolean } = { quick: false },
): Promise<void> {
  const q = opts.quick;
  const C = q ? 96 : 6144;
  const w = randomTensor(rt, [C, 4], -0.5, 0.5), bias = randomTensor(rt, [C], -0.2, 0.2);
  const owned: Tensor[] = [w, bias];
  try {
    for (const [B, L] of q ? [[2, 64], [1, 64]] : [[8, 2048], [1, 2048]]) {
      const x = randomTensor(rt, [B, L, C], -2, 2);
      owned.push(x);
      const bytes = B * L * C * 4;
      const fwd = await timeLoop(rt, () => {
        rt.noGrad(() => causalConv1d(x, w, bias, { silu: true }));
      }, opts);
      // reads x, writes out
      log({ kernel: "conv1d", pass: "forward", B, L, C, ms: fwd, GB_per_s: (2 * bytes) / fwd / 1e6 });
      x.requiresGrad = w.requiresGrad = bias.requiresGrad = true;
      const both = await timeLoop(rt, () => {
        const { out } = causalConv1d(x, w, bias, { silu: true });
        rt.backward(out, out);
        for (const l of [x, w, bias]) {
          l.grad?.dispose();
          l.grad = null;
        }
      }, opts);
      x.requiresGrad = w.requiresGrad = bias.requiresGrad = false;
      // forward 2 passes over [B, L, C]; backward reads x and gout, writes gx
      log({
        kernel: "conv1d",
        pass: "forward+backward",
        B,
        L,
        C,
        ms: both,
        GB_per_s: (5 * bytes) / both / 1e6,
      });
    }
    const B = 1, steps = 32;
    const x1 = randomTensor(rt, [B, C], -2, 2), state = rt.zeros([B, C, 3]).keep();
    owned.push(x1, state);
    const perStep = await timeLoop(rt, () => {
      for (let i = 0; i < steps; i++) causalConv1dStep(x1, w, bias, state, { silu: true });
    }, opts) / steps;
    log({ kernel: "conv1d", pass: "decode step", B, C, us_per_token: perStep * 1e3 });
  } finally {
    for (const t of owned) t.dispose();
  }
}

if (import.meta.main) {
  const { acquireRuntime } = await import("../runtime/runtime.ts");
  const rt = await acquireRuntime();
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick: Deno.args.includes("--quick") });
}
