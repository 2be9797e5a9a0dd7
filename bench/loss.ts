/**
 * Vocabulary-loss benchmarks: the fused distillation loss (CE + KL to teacher logits, forward and backward) and
 * the log-prob gather, in GB/s of logits traffic, at Llama-3's vocabulary (V = 128256) for 2048 tokens.
 *
 * Bytes counted: forward reads student and teacher logits once; backward reads both again and writes dlogits.
 * These kernels are memory-bound, so GB/s against the device's copy bandwidth is the figure of merit.
 *
 * Run alone with `deno run -A bench/loss.ts [--quick] [--gpu dawn|builtin]`; `bench/main.ts` calls
 * {@linkcode bench}.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import { acquireRuntime } from "../runtime/runtime.ts";
import { distillLoss, tokenLogprobs } from "../runtime/ops/loss.ts";
import type { Tensor } from "../runtime/tensor.ts";
import type { DType } from "../kernels/kernel.ts";

/** Options of {@linkcode bench}. */
export interface BenchOptions {
  /** Tiny shapes for a smoke run on the CPU adapter. */
  quick: boolean;
}

function randomTensor(rt: Runtime, shape: number[], dtype: DType, scale: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  let x = 0x9e3779b9;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    data[i] = ((x >>> 0) / 4294967296 - 0.5) * scale;
  }
  return rt.tensor(data, shape, dtype).keep();
}

async function timeSteps(rt: Runtime, step: () => void, warmupMs: number, minMs: number): Promise<number> {
  const run = async (n: number) => {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) rt.scope(step);
    await rt.dev.sync();
    return performance.now() - t0;
  };
  let n = 1;
  await run(1);
  const warmEnd = performance.now() + warmupMs;
  while (performance.now() < warmEnd) if ((await run(n)) < 200) n *= 2;
  let total = 0, steps = 0;
  while (total < minMs) {
    const ms = await run(n);
    total += ms;
    steps += n;
    if (ms < 100) n *= 2;
  }
  return total / steps;
}

/** Runs the loss benchmarks and logs one row per measurement. */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: BenchOptions = { quick: false },
): Promise<void> {
  const [N, V] = opts.quick ? [64, 4096] : [2048, 128256];
  const warmupMs = opts.quick ? 0 : 1500;
  const minMs = opts.quick ? 50 : 1000;
  const common = { bench: "loss", provider: rt.dev.provider, adapter: rt.dev.adapterName, N, V };
  for (const dtype of (rt.dev.features.f16 && !opts.quick ? ["f32", "f16"] : ["f32"]) as DType[]) {
    const el = dtype === "f16" ? 2 : 4;
    const student = randomTensor(rt, [N, V], dtype, 8);
    const teacher = randomTensor(rt, [N, V], dtype, 8);
    const labels = rt.tensor(Int32Array.from({ length: N }, (_, i) => (i * 7919) % V), [N], "i32").keep();
    student.requiresGrad = true;
    const fwdMs = await timeSteps(
      rt,
      () => {
        rt.noGrad(() => distillLoss(student, { labels, teacher, beta: 0.1, temperature: 1 }));
      },
      warmupMs,
      minMs,
    );
    log({ ...common, op: "distill_forward", dtype, ms: fwdMs, gbps: (2 * N * V * el) / fwdMs / 1e6 });
    const fbMs = await timeSteps(
      rt,
      () => {
        const { loss } = distillLoss(student, { labels, teacher, beta: 0.1, temperature: 1 });
        rt.backward(loss);
        student.grad?.dispose();
        student.grad = null;
      },
      warmupMs,
      minMs,
    );
    // forward reads 2 N V, backward reads 2 N V and writes N V (plus the copy into .grad: N V read + write)
    log({ ...common, op: "distill_forward_backward", dtype, ms: fbMs, gbps: (7 * N * V * el) / fbMs / 1e6 });
    const lpMs = await timeSteps(
      rt,
      () => {
        rt.noGrad(() => tokenLogprobs(student, labels));
      },
      warmupMs,
      minMs,
    );
    log({ ...common, op: "logprobs_forward", dtype, ms: lpMs, gbps: (N * V * el) / lpMs / 1e6 });
    for (const t of [student, teacher, labels]) t.dispose();
  }
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gi = Deno.args.indexOf("--gpu");
  const gpu = gi >= 0 ? Deno.args[gi + 1] as "dawn" | "builtin" | "auto" : undefined;
  const rt = await acquireRuntime({ gpu });
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick });
  rt.dev.destroy();
}
