/**
 * Benchmark of the gated grouped RMSNorm: forward and forward+backward at training shape (head_dim groups of
 * 128 over d_inner 4096, as in a Mamba2 hybrid of an 8B Llama).
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { gatedRmsNorm } from "../runtime/ops/gated_norm.ts";
import { randomTensor, timeLoop } from "./harness.ts";

/** Benchmark entry point (see KERNELS.md): logs one row per measured configuration. */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: { quick: boolean } = { quick: false },
): Promise<void> {
  const q = opts.quick;
  const rows = q ? 256 : 16384, D = q ? 256 : 4096;
  const owned: Tensor[] = [];
  try {
    for (const dtype of rt.dev.features.f16 ? ["f32", "f16"] as const : ["f32"] as const) {
      for (const group of [128, 64]) {
        const y = randomTensor(rt, [rows, D], -2, 2), z = randomTensor(rt, [rows, D], -2, 2);
        const w = randomTensor(rt, [D], 0.5, 1.5);
        owned.push(y, z, w);
        const [ty, tz, tw] = dtype === "f32" ? [y, z, w] : await Promise.all([y, z, w].map(async (t) => {
          const h = rt.tensor(await t.read(), t.shape, "f16").keep();
          owned.push(h);
          return h;
        }));
        const bytes = rows * D * (dtype === "f16" ? 2 : 4);
        const fwd = await timeLoop(rt, () => {
          rt.noGrad(() => gatedRmsNorm(ty, tz, tw, { group }));
        }, opts);
        log({
          kernel: "gated_rmsnorm",
          pass: "forward",
          dtype,
          rows,
          D,
          group,
          ms: fwd,
          GB_per_s: 3 * bytes / fwd / 1e6,
        });
        ty.requiresGrad = tz.requiresGrad = tw.requiresGrad = true;
        const both = await timeLoop(rt, () => {
          const out = gatedRmsNorm(ty, tz, tw, { group });
          rt.backward(out, out);
          for (const l of [ty, tz, tw]) {
            l.grad?.dispose();
            l.grad = null;
          }
        }, opts);
        ty.requiresGrad = tz.requiresGrad = tw.requiresGrad = false;
        // forward 3 passes; backward reads y, z, gout twice and writes gy, gz
        log({
          kernel: "gated_rmsnorm",
          pass: "forward+backward",
          dtype,
          rows,
          D,
          group,
          ms: both,
          GB_per_s: 11 * bytes / both / 1e6,
        });
      }
    }
  } finally {
    for (const t of owned) t.dispose();
  }
}

if (import.meta.main) {
  const { acquireRuntime } = await import("../runtime/runtime.ts");
  const rt = await acquireRuntime();
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick: Deno.args.includes("--quick") });
}
