/**
 * Model-level throughput: prefill tokens/s (batch 1, 2048 tokens, full logits) and batch-1 greedy decode
 * tokens/s (128-token prompt, 256 new tokens, wall time of the whole generation including the prefill, as in
 * fixtures/reference/perf_baselines.md; median of 3), for a random-init Llama-3.2-1B-shape teacher and its 50% Mamba2 hybrid;
 * optionally training steps of the hybrid (forward + backward + AdamW, Mamba parameters trainable, batch 4 x
 * 2048): `train_step` with the cross-entropy loss only (the PyTorch baseline's step), and `distill_step` which also
 * runs the teacher forward (no gradients) and adds the KL term (alpha 1, beta 0.1, temperature 1: method.md stage
 * 2). Both use the fused, chunked lm_head + loss (`runtime/ops/head_loss.ts`) on `CausalLM.hidden`, so the
 * [8192, 128256] logits (4.2 GB f32) are never materialised. `peak_gib` is the buffer pool's high-water mark.
 *
 *   deno run -A bench/model.ts --gpu dawn [--models teacher,hybrid] [--train [--profile] [--reps N]] [--dtype f16]
 *     [--quick] [--out rows.jsonl]
 *
 * `--reps N`: training steps timed for each median (the first is dropped; default 4).
 *
 * `--profile` adds the kernels of one decode step, and (with `--train`) for the CE-only and the distill step a GPU
 * timeline and the 60 most expensive kernels with each dispatch timed in the stream (`--profile-alone`: also the 20
 * most expensive with each dispatch timed alone).
 *
 * `--dtype f16` stores weights and activations in f16 (f32 accumulation; on Dawn with subgroup matrices the
 * large matmuls run on the matrix units), the counterpart of the PyTorch bf16 rows.
 *
 * Decode uses the GPU-resident greedy loop (models/generate.ts greedyResident), so the CPU reads token ids once
 * per chunk. `bench/pytorch/model.py` measures the teacher with Hugging Face transformers on the same shapes.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { makeMamba2Config, parseTransformerConfig, type TransformerConfig } from "../models/config.ts";
import { greedyResident } from "../models/generate.ts";
import { headLoss } from "../runtime/ops/head_loss.ts";
import { LM_HEAD } from "../models/weights.ts";
import { AdamW } from "../runtime/optim.ts";
import {
  flag,
  gpuTimeline,
  hostCpu,
  type KernelTime,
  profileDispatches,
  profileInStream,
  timelineRow,
} from "./harness.ts";
import { sampleTokens } from "../runtime/ops/sampling.ts";
import { GREEDY } from "../models/sampling.ts";

/** Llama-3.2-1B shapes (config.json of meta-llama/Llama-3.2-1B), as used by the PyTorch baselines. */
export function llama32OneB(quick: boolean): TransformerConfig {
  return parseTransformerConfig(
    quick
      ? {
        model_type: "llama",
        hidden_size: 128,
        intermediate_size: 512,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        vocab_size: 1000,
        rope_theta: 500000,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
      }
      : {
        model_type: "llama",
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 64,
        vocab_size: 128256,
        rope_theta: 500000,
        rope_scaling: {
          rope_type: "llama3",
          factor: 32,
          low_freq_factor: 1,
          high_freq_factor: 4,
          original_max_position_embeddings: 8192,
        },
        rms_norm_eps: 1e-5,
        max_position_embeddings: 131072,
        tie_word_embeddings: true,
      },
    "llama-3.2-1b-shape",
  );
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function timePrefill(lm: CausalLM, T: number, reps: number): Promise<number[]> {
  const rt = lm.rt;
  const ids = Int32Array.from({ length: T }, (_, i) => (i * 7919 + 13) % lm.config.vocabSize);
  const times: number[] = [];
  for (let r = 0; r < reps; r++) {
    await rt.scope(async () => {
      const t0 = performance.now();
      const { logits } = rt.noGrad(() => lm.forward(ids, 1, T));
      await rt.dev.read(logits.buffer, 0, 4);
      times.push(performance.now() - t0);
    });
  }
  return times;
}

async function timeDecode(lm: CausalLM, promptLen: number, n: number, chunk: number): Promise<number> {
  const prompt = Int32Array.from({ length: promptLen }, (_, i) => (i * 104729 + 7) % lm.config.vocabSize);
  const t0 = performance.now();
  const out = await greedyResident(lm, prompt, { maxNewTokens: n, chunk });
  if (out.length !== n) throw new Error(`decode produced ${out.length} tokens, expected ${n}`);
  return performance.now() - t0;
}

/**
 * One training step of `lm` on B x T tokens, as a closure: hidden states, fused head + loss (CE, plus KL to
 * `teacher`'s distribution when given; the teacher runs without gradients inside the step), backward, AdamW,
 * and a read of the loss (the step's one wait). `dispose` frees the labels and the optimizer.
 */
function makeTrainStep(
  lm: CausalLM,
  B: number,
  T: number,
  teacher: CausalLM | null,
): { step: () => Promise<void>; dispose: () => void } {
  const rt = lm.rt;
  const params = lm.trainableParams();
  const opt = new AdamW(rt, params, { lr: 1e-5, betas: [0.9, 0.98], weightDecay: 0, maxGradNorm: 0.1 });
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 7919 + 13) % lm.config.vocabSize);
  const labels = rt.tensor(Int32Array.from(ids, (_, i) => ids[(i + 1) % ids.length]), [B * T], "i32").keep();
  const step = () =>
    rt.scope(async () => {
      const th = teacher ? rt.noGrad(() => teacher.hidden(ids, B, T)) : undefined;
      const h = lm.hidden(ids, B, T);
      const { loss } = headLoss(h, lm.param(LM_HEAD), {
        labels,
        teacherHidden: th,
        teacherW: teacher?.param(LM_HEAD),
        alpha: 1,
        beta: teacher ? 0.1 : 0,
        temperature: 1,
      });
      rt.backward(loss);
      opt.step();
      opt.zeroGrad();
      await rt.dev.read(loss.buffer, 0, 4);
    });
  return {
    step,
    dispose: () => {
      labels.dispose();
      opt.dispose();
    },
  };
}

/** Wall times of `reps` training steps (see {@linkcode makeTrainStep}) and the pool's peak bytes. */
async function timeTrainStep(
  lm: CausalLM,
  B: number,
  T: number,
  reps: number,
  teacher: CausalLM | null,
): Promise<{ times: number[]; peakBytes: number }> {
  const { step, dispose } = makeTrainStep(lm, B, T, teacher);
  const times: number[] = [];
  try {
    for (let r = 0; r < reps; r++) {
      const t0 = performance.now();
      await step();
      times.push(performance.now() - t0);
    }
  } finally {
    dispose();
  }
  return { times, peakBytes: lm.rt.pool.stats.peakBytes };
}

/**
 * Rows of a kernel profile (`profileDispatches`): `<what>_kernels` with the dispatch count and the summed GPU time,
 * then one `<what>_kernel` row for each of the `top` most expensive kernels, times to `digits` decimals.
 */
function logKernels(
  log: (row: Record<string, unknown>) => void,
  model: string,
  what: string,
  kernels: KernelTime[] | undefined,
  top: number,
  digits: number,
): void {
  const ks = kernels ?? [];
  const total = ks.reduce((a, k) => a + k.ms, 0);
  const dispatches = ks.reduce((a, k) => a + k.dispatches, 0);
  log({ model, what: `${what}_kernels`, dispatches, kernel_ms_total: +total.toFixed(digits - 1) });
  for (const k of ks.slice(0, top)) log({ model, what: `${what}_kernel`, ...k, ms: +k.ms.toFixed(digits) });
}

/**
 * `--profile`: where one training step's time goes (`what` is `train_step` for CE only, `distill_step` with the
 * teacher). A timeline row (GPU busy time and span against wall time), then the kernels that take the most GPU
 * time with each dispatch timed where it runs in the stream, and (with `--profile-alone`) with each timed alone.
 */
async function profileTrainStep(
  lm: CausalLM,
  B: number,
  T: number,
  teacher: CausalLM | null,
  what: "train_step" | "distill_step",
  log: (row: Record<string, unknown>) => void,
): Promise<void> {
  const rt = lm.rt;
  const { step, dispose } = makeTrainStep(lm, B, T, teacher);
  try {
    await step(); // warm: the same buffers and bind groups as the timed steps
    const tl = await gpuTimeline(rt, step);
    if (tl) log({ model: "hybrid", what: `${what}_timeline`, batch: B, seq: T, ...timelineRow(tl) });
    if (Deno.args.includes("--profile-alone")) {
      logKernels(log, "hybrid", what, await profileDispatches(rt, step), 20, 3);
    }
    // the whole step, each dispatch in a timed pass of its own
    const inStream = await profileInStream(rt, step, 32768);
    if (inStream) {
      log({ model: "hybrid", what: `${what}_in_stream_untimed`, dispatches: inStream.untimed });
      logKernels(log, "hybrid", `${what}_in_stream`, inStream.kernels, 60, 3);
    }
  } finally {
    dispose();
  }
}

/**
 * `--profile`: the kernels of one batch-1 decode step after a 128-token prompt, each dispatch timed alone. Their
 * sum against the step's GPU busy time in `decode_timeline` tells slow kernels from gaps between dispatches.
 */
async function profileDecodeStep(
  lm: CausalLM,
  which: string,
  log: (row: Record<string, unknown>) => void,
): Promise<void> {
  const rt = lm.rt;
  const s = lm.newDecodeState(1, 180);
  try {
    const prompt = Int32Array.from({ length: 128 }, (_, i) => (i * 104729 + 7) % lm.config.vocabSize);
    await rt.scope(async () => void await lm.step(s, prompt, 128, { lastOnly: true }).read());
    const tok = Int32Array.of(11);
    for (let i = 0; i < 2; i++) await rt.scope(async () => void await lm.step(s, tok, 1).read()); // warm
    // cold: in a decode step every weight comes from memory once (see profileDispatches)
    const kernels = await profileDispatches(rt, () => rt.scope(() => void lm.step(s, tok, 1)), 1, true);
    logKernels(log, which, "decode_step", kernels, 12, 4);
    // in the stream: 16 steps chained through the GPU as the decode loop runs them (sampling included), each
    // dispatch in a timed pass of its own; per step
    const steps = 16;
    const streams = rt.tensor(Uint32Array.of(0), [1], "u32").keep();
    const draw = (step: number) => ({ seed: 0, streams, step });
    let cur = rt.scope(() => sampleTokens(lm.step(s, tok, 1), GREEDY, draw(0))).keep();
    const inStream = await profileInStream(rt, async () => {
      for (let i = 0; i < steps; i++) {
        const next = rt.scope(() => sampleTokens(lm.step(s, cur, 1), GREEDY, draw(i + 1)))
          .keep();
        cur.dispose();
        cur = next;
      }
      await rt.dev.sync();
    });
    cur.dispose();
    streams.dispose();
    if (inStream) {
      const perStep = inStream.kernels.map((k) => ({
        ...k,
        dispatches: k.dispatches / steps,
        ms: k.ms / steps,
      }));
      logKernels(log, which, "decode_step_in_stream", perStep, 16, 4);
    }
  } finally {
    lm.disposeState(s);
  }
}

if (import.meta.main) {
  const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
  const quick = Deno.args.includes("--quick");
  const models = (flag("models") ?? "teacher,hybrid").split(",");
  const outPath = flag("out");
  const dtype = flag("dtype") ?? "f32";
  if (dtype !== "f32" && dtype !== "f16") throw new Error(`--dtype must be f32 or f16, got ${dtype}`);
  const rows: string[] = [];
  const rt = new Runtime(await createDevice({ gpu }));
  const log = (row: Record<string, unknown>) => {
    const line = JSON.stringify({ bench: "model", provider: rt.dev.provider, ...row });
    console.log(line);
    rows.push(line);
  };
  log({ device: rt.dev.describe(), host: hostCpu(), date: new Date().toISOString(), dtype });
  const cfg = llama32OneB(quick);
  const T = quick ? 64 : 2048;
  for (const which of models) {
    const mamba = which === "hybrid"
      ? makeMamba2Config(cfg, Array.from({ length: cfg.numLayers / 2 }, (_, i) => 2 * i + 1))
      : null;
    const lm = CausalLM.random(rt, cfg, mamba, {
      seed: 7,
      dtype,
      chunkSize: quick ? 16 : 64,
      trainable: Deno.args.includes("--train") ? (n) => n.includes(".mamba.") : undefined,
    });
    try {
      // warm-up: compiles every pipeline and lets the GPU clock ramp up
      await timePrefill(lm, T, 2);
      const pre = await timePrefill(lm, T, quick ? 2 : 5);
      log({
        model: which,
        what: "prefill",
        tokens: T,
        median_ms: +median(pre).toFixed(2),
        tokens_per_s: Math.round(T / (median(pre) / 1000)),
        dtype: lm.dtype,
      });
      // one more prefill with every compute pass timestamped: GPU busy time against wall time
      const pt = await gpuTimeline(rt, async () => void await timePrefill(lm, T, 1));
      if (pt) log({ model: which, what: "prefill_timeline", tokens: T, ...timelineRow(pt) });
      const n = quick ? 16 : 256;
      await timeDecode(lm, quick ? 8 : 128, quick ? 4 : 16, 32);
      // three runs each: single runs of the same decode differed up to 2x on the H200 (BENCHMARKS.md)
      for (const chunk of [1, 32]) {
        const runs: number[] = [];
        const st = rt.dev.stats, before = { ...st }, pooled = rt.pool.stats.created;
        for (let r = 0; r < 3; r++) runs.push(await timeDecode(lm, quick ? 8 : 128, n, chunk));
        const ms = median(runs);
        // what the provider was asked to create or run per token: steady-state decoding should create nothing
        const perToken = (d: number) => +(d / (3 * n)).toFixed(3);
        log({
          model: which,
          what: "decode",
          prompt: quick ? 8 : 128,
          new_tokens: n,
          chunk,
          wall_ms: +ms.toFixed(1),
          tokens_per_s: +(n / (ms / 1000)).toFixed(1),
          runs_ms: runs.map((x) => +x.toFixed(1)),
          per_token: {
            dispatches: perToken(st.dispatches - before.dispatches),
            submits: perToken(st.submits - before.submits),
            bind_groups: perToken(st.bindGroups - before.bindGroups),
            pipelines: perToken(st.pipelines - before.pipelines),
            buffers: perToken(rt.pool.stats.created - pooled),
          },
        });
      }
      const dt = await gpuTimeline(rt, async () => void await timeDecode(lm, quick ? 8 : 128, n, 32));
      if (dt) log({ model: which, what: "decode_timeline", new_tokens: n, chunk: 32, ...timelineRow(dt) });
      if (Deno.args.includes("--profile")) await profileDecodeStep(lm, which, log);
      if (Deno.args.includes("--train") && which === "hybrid") {
        const B = quick ? 2 : 4;
        const reps = Number(flag("reps") ?? (quick ? 2 : 4));
        if (!Number.isInteger(reps) || reps < 2) {
          throw new Error(`--reps must be an integer >= 2, got ${reps}`);
        }
        const tr = await timeTrainStep(lm, B, T, reps, null);
        const m = median(tr.times.slice(1));
        log({
          model: which,
          what: "train_step",
          loss: "ce (fused head)",
          batch: B,
          seq: T,
          median_ms: +m.toFixed(1),
          tokens_per_s: Math.round(B * T / (m / 1000)),
          runs_ms: tr.times.slice(1).map((x) => +x.toFixed(1)),
          peak_gib: +(tr.peakBytes / 2 ** 30).toFixed(2),
        });
        if (Deno.args.includes("--profile")) await profileTrainStep(lm, B, T, null, "train_step", log);
        // stage-2 distillation: the teacher (same shapes, all attention) runs inside the step without gradients
        const teacher = CausalLM.random(rt, cfg, null, { seed: 11, dtype });
        try {
          const ds = await timeTrainStep(lm, B, T, reps, teacher);
          const md = median(ds.times.slice(1));
          log({
            model: which,
            what: "distill_step",
            loss: "ce + 0.1 kl (fused head), teacher forward included",
            batch: B,
            seq: T,
            median_ms: +md.toFixed(1),
            tokens_per_s: Math.round(B * T / (md / 1000)),
            peak_gib: +(ds.peakBytes / 2 ** 30).toFixed(2),
          });
          if (Deno.args.includes("--profile")) await profileTrainStep(lm, B, T, teacher, "distill_step", log);
        } finally {
          teacher.dispose();
        }
      }
    } catch (e) {
      log({ model: which, error: String(e) });
    } finally {
      lm.dispose();
      rt.pool.trim();
    }
  }
  if (outPath) await Deno.writeTextFile(outPath, rows.join("\n") + "\n", { append: true });
}
