/**
 * Where the time of one batch-1 decode step goes: each op of a Llama-3.2-1B-shape decode step timed alone at its
 * decode shape (many copies recorded back to back, one read at the end), next to a whole step.
 *
 *   deno run -A bench/decode_profile.ts --gpu dawn [--quick]
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { llama32OneB } from "./model.ts";
import { linear } from "../runtime/ops/matmul.ts";
import { rmsNorm } from "../runtime/ops/norm.ts";
import { rope } from "../runtime/ops/rope.ts";
import { appendKv, decodeAttention, KvCache } from "../runtime/ops/attention.ts";
import { embedding } from "../runtime/ops/embedding.ts";
import { greedyArgmax } from "../runtime/ops/loss.ts";
import { sampleTokens } from "../runtime/ops/sampling.ts";
import { add, swiglu } from "../runtime/ops/elementwise.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { flag, timeRecorded } from "./harness.ts";

const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
const quick = Deno.args.includes("--quick");
const rt = new Runtime(await createDevice({ gpu }));
const cfg = llama32OneB(quick);
const lm = CausalLM.random(rt, cfg, null, { seed: 3 });
const D = cfg.hiddenSize, H = cfg.numHeads, Hkv = cfg.numKvHeads, hd = cfg.headDim;
const reps = quick ? 4 : 200;

async function time(name: string, record: () => Tensor | void): Promise<void> {
  const { ms, recordMs } = await timeRecorded(rt, record, reps, { warmup: 3 });
  console.log(
    JSON.stringify({
      bench: "decode_profile",
      provider: rt.dev.provider,
      op: name,
      us: +(ms * 1000).toFixed(1),
      record_us: +(recordMs * 1000).toFixed(1),
    }),
  );
}

const x = rt.full([1, D], 0.01).keep();
const cache = new KvCache(rt, 1, 512, Hkv, hd);
rt.scope(() => appendKv(cache, rt.full([1, 256, Hkv, hd], 0.1), rt.full([1, 256, Hkv, hd], 0.1)));
const ids = rt.tensor([5], [1], "i32").keep();
const W = lm.param("model.layers.0.self_attn.q_proj.weight");
const Wup = lm.param("model.layers.0.mlp.up_proj.weight");
const Wdown = lm.param("model.layers.0.mlp.down_proj.weight");
const norm = lm.param("model.layers.0.input_layernorm.weight");
await time("linear 2048->2048 (gemv)", () => linear(x, W));
await time("linear 2048->8192 (gemv)", () => linear(x, Wup));
const h8 = rt.full([1, cfg.intermediateSize], 0.01).keep();
await time("linear 8192->2048 (gemv)", () => linear(h8, Wdown));
await time("lm_head 2048->vocab (gemv)", () => linear(x, lm.param("model.embed_tokens.weight")));
const logits = rt.full([1, cfg.vocabSize], 0.5).keep();
await time("greedyArgmax over vocab", () => greedyArgmax(logits).ids);
// sampling sees untied, spread logits (equal ones would send every select through the index digits too)
const spread = rt.tensor(Float32Array.from({ length: cfg.vocabSize }, (_, i) => 4 * Math.sin(i * 12.9898)), [
  1,
  cfg.vocabSize,
]).keep();
const streams = rt.tensor([0], [1], "u32").keep();
const sampled = { temperature: 0.7, topK: 50, topP: 0.9 };
await time(
  "sampleTokens over vocab (top-k 50, top-p 0.9)",
  () => sampleTokens(spread, sampled, { seed: 1, streams, step: 0 }),
);
await time(
  "sampleTokens over vocab (top-p 0.95 alone)",
  () => sampleTokens(spread, { temperature: 1, topP: 0.95 }, { seed: 1, streams, step: 0 }),
);
await time("rmsNorm 1x2048", () => rmsNorm(x, norm, 1e-5));
const q = rt.full([1, 1, H, hd], 0.1).keep();
await time("rope q", () => rope(q, lm.invFreq, { start: 300 }));
await time("decodeAttention len 257", () => {
  const out = decodeAttention(q, cache);
  return out;
});
await time("embedding (GPU id)", () => embedding(lm.param("model.embed_tokens.weight"), ids));
await time("add 1x2048", () => add(x, x));
await time("swiglu 1x8192", () => swiglu(h8, h8));
const st = lm.newDecodeState(1, 2 * reps + 64);
rt.scope(() => lm.step(st, Int32Array.from({ length: 32 }, (_, i) => i + 5), 32));
const cur = rt.tensor([7], [1], "i32").keep();
await time(
  "whole decode step (argmax fed back)",
  () => rt.copyInto(cur, greedyArgmax(lm.step(st, cur, 1)).ids),
);
await time(
  "whole decode step (top-k 50 / top-p 0.9 sample fed back)",
  () => rt.copyInto(cur, sampleTokens(lm.step(st, cur, 1), sampled, { seed: 1, streams, step: 0 })),
);
