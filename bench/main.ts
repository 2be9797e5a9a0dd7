/**
 * Benchmark entry point: `deno task bench <name> [options]`. Results go into BENCHMARKS.md by hand, with the
 * device, date and command printed by each benchmark.
 *
 * | name     | what                                                                              |
 * | -------- | --------------------------------------------------------------------------------- |
 * | `noop`   | no-op re-run of a recipe with 1 GiB of artifacts (bench/noop_rerun.ts)            |
 * | `gpu`    | every kernel family: matmul, GEMV, copy, attention, loss, SSD, scans (gpu_suite)  |
 * | `model`  | 1B-shape teacher and 50% hybrid: prefill, decode, train step (bench/model.ts)     |
 * | `fit`    | Zephyr-7B-shape distill step: memory plan, peak memory, tokens/s (distill_fit.ts) |
 * | `decode` | per-op profile of a batch-1 decode step (bench/decode_profile.ts)                  |
 * | `prefill`| per-op profile of a 2048-token hybrid prefill (bench/prefill_profile.ts)          |
 * | `generate`| batched generation of the fixture teacher: tokens/s per batch and sampling, per-kernel profile |
 * | `overhead`| CPU cost per dispatch of a decode step (tiny widths; bench/decode_overhead.ts)   |
 * | `decode-kernels`| the decode step's small kernels alone: attention by cache length, SSD step (decode_kernels.ts) |
 * | `stress` | Dawn stability: thousands of training steps through a sync pattern               |
 * | `probe`  | what each WebGPU provider offers here (bench/probe.ts)                            |
 * | `spec`   | speculative decoding on a 1B-shape hybrid: fused vs unfused verify, speedup        |
 * | `rows`   | few-row kernels (decode, verification): GEMV vs matmul, decode-attention tiles    |
 * | `latency`| GPU->CPU round-trip latency of a provider                                         |
 * | `sgm`    | f16 matmul on the matrix units (subgroup matrices): checks, sweep, vs PyTorch bf16 |
 * | `distill`| distillation quality of stories260K hybrids vs the teacher (bench/distill_quality.ts) |
 * | `dpo`    | DPO on cloze pairs: held-out reward accuracy and acc_norm (bench/dpo_quality.ts)   |
 *
 * GPU benchmarks take `--gpu dawn|builtin|auto`; the PyTorch twins are under bench/pytorch/.
 *
 * @module
 */
import { noopRerun } from "./noop_rerun.ts";
import { specBench } from "./spec.ts";

/** Runs a benchmark script in its own process (each GPU benchmark owns its device). */
function script(file: string): (args: string[]) => Promise<unknown> {
  return async (args) => {
    const url = new URL(file, import.meta.url).pathname;
    const p = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", url, ...args],
      stdout: "inherit",
      stderr: "inherit",
    });
    const { code } = await p.output();
    if (code !== 0) Deno.exit(code);
  };
}

/** Benchmarks by name. */
export const BENCHMARKS: Record<string, { doc: string; run: (args: string[]) => Promise<unknown> }> = {
  noop: { doc: "no-op re-run of a recipe whose artifacts total 1 GiB (target: under 1 s)", run: noopRerun },
  gpu: {
    doc: "all kernel families on one provider (--gpu, --only, --quick, --out)",
    run: script("./gpu_suite.ts"),
  },
  model: {
    doc: "1B-shape teacher/hybrid prefill, decode and train step (--gpu, --train, --quick)",
    run: script("./model.ts"),
  },
  fit: {
    doc:
      "7B-shape teacher + 50% hybrid distill step at 2048 tokens: memory and tokens/s (--gpu, --shape, --out)",
    run: script("./distill_fit.ts"),
  },
  decode: {
    doc: "per-op profile of one batch-1 decode step (--gpu, --quick)",
    run: script("./decode_profile.ts"),
  },
  prefill: {
    doc: "per-op profile of a 2048-token prefill of the 1B-shape hybrid, and whole forwards (--gpu, --quick)",
    run: script("./prefill_profile.ts"),
  },
  generate: {
    doc: "batched generation of the fixture teacher (pseudo_label's workload), per-kernel profile " +
      "(--gpu, --batches, --new, --text)",
    run: script("./generate_throughput.ts"),
  },
  overhead: {
    doc: "CPU cost per dispatch of the GPU-resident decode loop, tiny widths (--gpu, --tokens)",
    run: script("./decode_overhead.ts"),
  },
  "decode-kernels": {
    doc: "the decode step's small kernels timed alone: attention by cache length and workgroup, SSD step " +
      "(--gpu, --dtype, --iters)",
    run: script("./decode_kernels.ts"),
  },
  stress: {
    doc: "Dawn stability: --step train --steps 20000 --sync-every 10",
    run: script("./dawn_stress.ts"),
  },
  probe: {
    doc: "adapters, features, limits and subgroup-matrix configs of each provider",
    run: script("./probe.ts"),
  },
  spec: {
    doc: "speculative decoding on a random-init 1B-shape hybrid (--gpu dawn, --quick)",
    run: specBench,
  },
  rows: {
    doc: "GEMV vs tiled matmul and decode-attention tiles at 1..16 tokens (--gpu, --quick)",
    run: script("./few_rows.ts"),
  },
  latency: {
    doc: "GPU->CPU round trip: device read, raw mapAsync, onSubmittedWorkDone (--gpu, --n)",
    run: script("./read_latency.ts"),
  },
  sgm: {
    doc: "subgroup-matrix f16 matmul: checks, config sweep at 4096/8192, vs PyTorch bf16 (--gpu dawn, --out)",
    run: script("./matmul_sgm.ts"),
  },
  distill: {
    doc:
      "distillation quality of stories260K hybrids: perplexity vs the teacher (--gpu, --variants, --steps)",
    run: script("./distill_quality.ts"),
  },
  dpo: {
    doc: "DPO on cloze pairs: held-out reward accuracy and cloze acc_norm before/after (--gpu)",
    run: script("./dpo_quality.ts"),
  },
};

if (import.meta.main) {
  const [name, ...rest] = Deno.args;
  const bench = name ? BENCHMARKS[name] : undefined;
  if (!bench) {
    console.error(
      `usage: deno task bench <name> [options]\n` +
        Object.entries(BENCHMARKS).map(([n, b]) => `  ${n.padEnd(8)} ${b.doc}`).join("\n"),
    );
    Deno.exit(name ? 2 : 0);
  }
  await bench.run(rest);
}
