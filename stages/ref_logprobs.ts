/**
 * `ref_logprobs`: the reference policy's summed completion log-probabilities of every preference pair, computed
 * once and cached as its own artifact (the dpo stage reads them instead of keeping a second model on the GPU).
 *
 * @module
 */
import { join } from "node:path";
import { defineStage } from "../pipelines/stage.ts";
import { BatchIterator } from "../data/batches.ts";
import { openSafetensors, writeSafetensors } from "../models/safetensors.ts";
import { loadModelInput, stageRuntime, toGpu } from "./shared/models.ts";
import { openTrainingData } from "./shared/training.ts";
import { pairLogprobs, writeRefLogprobs } from "./shared/preference.ts";

/** The ref_logprobs stage kind. */
export const refLogprobsStage = defineStage({
  kind: "ref_logprobs",
  version: 1,
  doc:
    "Scores preference pairs with the reference policy: for each pair, the summed log-probability of the " +
    "chosen and of the rejected completion given the prompt (TRL's reference log-probs for DPO). Resumable.",
  usesDevice: true,
  params: {
    per_device_batch_size: {
      type: "number",
      integer: true,
      min: 1,
      default: 8,
      doc: "Pairs per forward pass (2x as many sequences).",
    },
    max_length: {
      type: "number",
      integer: true,
      min: 2,
      nullable: true,
      doc: "Cut longer sequences to this many tokens; must equal the dpo stage's max_length.",
    },
    save_steps: {
      type: "number",
      integer: true,
      min: 1,
      default: 200,
      inKey: false,
      doc: "Save a resumable checkpoint every N batches.",
    },
  },
  inputs: {
    model: { doc: "The reference policy (paper: the teacher; official code: the SFT model)." },
    pairs: { doc: "Preference pairs from the tokenize stage (format: preference).", type: "dir" },
  },
  outputs: {
    ref: {
      type: "dir",
      doc: "logprobs.safetensors (F32 chosen [pairs], rejected [pairs]) and summary.json (pairs, digest of " +
        "the pairs' tokens, max_length, means).",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    const { model: cpu } = await loadModelInput(ctx.inputs.model, "model");
    const rt = await stageRuntime(ctx.settings);
    const data = await openTrainingData(ctx.inputs.pairs, {
      port: "pairs",
      layout: "pairs",
      vocabSize: cpu.config.vocabSize,
      maxLength: p.max_length,
      log: ctx.log,
    });
    const lm = toGpu(rt, cpu, ctx.settings);
    const P = data.reader.numPairs;
    const acc = rt.zeros([2 * P], "f32").keep();
    try {
      const opts = { batchSize: p.per_device_batch_size, seed: 0, shuffle: false, pairs: true, epochs: 1 };
      let batches = new BatchIterator(data.source, { ...opts, seqLen: data.seqLen });
      const latest = ctx.checkpoints.latest();
      if (latest) {
        const state = JSON.parse(await Deno.readTextFile(join(latest.dir, "state.json")));
        const f = await openSafetensors(join(latest.dir, "partial.safetensors"));
        rt.dev.write(acc.buffer, 0, await f.readFloat32("logprobs"));
        batches = new BatchIterator(data.source, { ...opts, seqLen: data.seqLen }, state.position);
        ctx.log.info(`resuming after ${state.done} of ${P} pairs`);
      }
      const total = Math.ceil(P / p.per_device_batch_size);
      ctx.progress.start(total, "batch", "ref_logprobs");
      let done = batches.position().order.index;
      let tokens = batches.position().tokensSeen;
      for (let ts = batches.next(); ts; ts = batches.next()) {
        if (ctx.signal.aborted) throw ctx.signal.reason;
        const mb = ts.micro[0];
        const B = mb.rows / 2;
        rt.scope(() =>
          rt.noGrad(() => {
            const lp = pairLogprobs(lm, mb);
            rt.dev.copyBuffer(lp.buffer, 0, acc.buffer, done * 4, B * 4);
            rt.dev.copyBuffer(lp.buffer, B * 4, acc.buffer, (P + done) * 4, B * 4);
          })
        );
        done += B;
        tokens += ts.tokens;
        ctx.progress.update(ts.step + 1, { tokens });
        if ((ts.step + 1) % p.save_steps === 0 && done < P) {
          const values = new Float32Array(await rt.dev.read(acc.buffer, 0, 2 * P * 4));
          const position = batches.position();
          await ctx.checkpoints.save(ts.step + 1, async (dir) => {
            await writeSafetensors(join(dir, "partial.safetensors"), {
              logprobs: { shape: [2 * P], data: values },
            });
            await Deno.writeTextFile(join(dir, "state.json"), JSON.stringify({ done, position }));
          });
        }
      }
      const values = new Float32Array(await rt.dev.read(acc.buffer, 0, 2 * P * 4));
      const chosen = values.slice(0, P), rejected = values.slice(P);
      const bad = values.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) {
        throw new Error(`ref_logprobs: non-finite log-probability for pair ${bad % P}`);
      }
      await writeRefLogprobs(ctx.outputs.ref, {
        chosen,
        rejected,
        tokensSha256: data.reader.header.payload_sha256,
        maxLength: p.max_length,
      });
      const mean = (a: Float32Array) => a.reduce((x, y) => x + y, 0) / Math.max(1, a.length);
      let wins = 0;
      for (let i = 0; i < P; i++) if (chosen[i] > rejected[i]) wins++;
      ctx.setMetrics({
        pairs: P,
        mean_chosen: mean(chosen),
        mean_rejected: mean(rejected),
        chosen_more_likely: wins / Math.max(1, P),
      });
    } finally {
      acc.dispose();
      lm.dispose();
      data.reader.close();
    }
  },
});
