/**
 * `dpo`: direct preference optimisation with the sigmoid loss (method.md section 2, step 4):
 * `-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))` per pair, log-probs summed over completion
 * tokens, reference log-probs from a ref_logprobs artifact. Logs TRL's rewards: `rewards/chosen = beta *
 * (logp_c - ref_c)`, `rewards/rejected`, `rewards/accuracies` (chosen > rejected) and `rewards/margins`.
 *
 * @module
 */
import { defineStage } from "../pipelines/stage.ts";
import type { MicroBatch } from "../data/batches.ts";
import { splitLastDim } from "../runtime/ops/columns.ts";
import { add, scale, softplus, sub } from "../runtime/ops/elementwise.ts";
import { mean } from "../runtime/ops/reduce.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { UserError } from "../util/errors.ts";
import {
  fromGpu,
  loadModelInput,
  modelDir,
  stageRuntime,
  toGpu,
  writeModelArtifact,
} from "./shared/models.ts";
import { batchOptions, trainableParam, trainingParams } from "./shared/train_params.ts";
import { openTrainingData, phaseSteps, runPhase, trainablePredicate } from "./shared/training.ts";
import { chosenTargetCount, pairLogprobs, readRefLogprobs, type RefLogprobs } from "./shared/preference.ts";

/**
 * The DPO metrics of one step from its micro-batches' statistics `[loss, logp(chosen) x B, logp(rejected) x B]`
 * (pair-weighted means, TRL's names and definitions).
 */
export function summarizeDpo(
  stats: Float32Array[],
  micro: MicroBatch[],
  ref: Pick<RefLogprobs, "chosen" | "rejected">,
  beta: number,
): Record<string, number> {
  let pairs = 0, loss = 0, rc = 0, rr = 0, acc = 0, margin = 0, lc = 0, lr = 0;
  micro.forEach((mb, m) => {
    const B = mb.rows / 2;
    const s = stats[m];
    loss += s[0] * B;
    for (let i = 0; i < B; i++) {
      const pair = mb.sequences[i] / 2;
      const pc = s[1 + i], pr = s[1 + B + i];
      const c = beta * (pc - ref.chosen[pair]), r = beta * (pr - ref.rejected[pair]);
      rc += c;
      rr += r;
      acc += c > r ? 1 : 0;
      margin += c - r;
      lc += pc;
      lr += pr;
    }
    pairs += B;
  });
  const n = Math.max(1, pairs);
  return {
    loss: loss / n,
    "rewards/chosen": rc / n,
    "rewards/rejected": rr / n,
    "rewards/accuracies": acc / n,
    "rewards/margins": margin / n,
    "logps/chosen": lc / n,
    "logps/rejected": lr / n,
  };
}

/** The dpo stage kind. */
export const dpoStage = defineStage({
  kind: "dpo",
  version: 1,
  doc:
    "Direct preference optimisation with the sigmoid loss -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - " +
    "ref_r))) per pair, log-probs summed over completion tokens, the reference log-probs from a ref_logprobs " +
    "stage. Logs rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins (TRL definitions). " +
    "Checkpoints resume exactly; a NaN or Inf loss stops the stage.",
  usesDevice: true,
  usesSeed: true,
  params: {
    beta: {
      type: "number",
      exclusiveMin: 0,
      default: 0.01,
      doc: "Strength of the implicit KL to the reference (paper: 0.01 for 1 epoch, or 0.1 for 3 epochs).",
    },
    rpo_alpha: {
      type: "number",
      min: 0,
      nullable: true,
      default: null,
      doc:
        "TRL's rpo_alpha: adds rpo_alpha times the mean negative log-likelihood of the chosen completions' " +
        "tokens to the loss (RPO; its paper recommends 1.0), which keeps the chosen log-probs from falling " +
        "with the rejected ones. Null: the plain DPO loss.",
    },
    trainable: trainableParam("all", "What trains (paper: all parameters)."),
    ...trainingParams({
      learningRate: [5e-7, "paper: 5e-7"],
      warmupRatio: [0.1, "paper: 0.1"],
      adamBeta2: [0.999, "TrainingArguments default"],
      maxGradNorm: [1, "TrainingArguments default"],
      weightDecay: [0, "TrainingArguments default"],
      batch: [8, 4, "paper: 32 pairs"],
    }),
  },
  inputs: {
    model: { doc: "The policy's starting point (the SFT model)." },
    pairs: { doc: "Preference pairs from the tokenize stage (format: preference).", type: "dir" },
    ref: { doc: "The reference log-probs of these pairs (a ref_logprobs stage output).", type: "dir" },
  },
  outputs: {
    model: { type: "dir", doc: "The aligned model (same layout as the input)." },
  },
  async run(ctx) {
    const p = ctx.params;
    const seed = p.seed ?? ctx.settings.seed;
    const ref = await readRefLogprobs(ctx.inputs.ref);
    const { model: cpu } = await loadModelInput(ctx.inputs.model, "model");
    const data = await openTrainingData(ctx.inputs.pairs, {
      port: "pairs",
      layout: "pairs",
      vocabSize: cpu.config.vocabSize,
      maxLength: p.max_length,
      log: ctx.log,
    });
    try {
      if (
        ref.tokensSha256 !== data.reader.header.payload_sha256 || ref.chosen.length !== data.reader.numPairs
      ) {
        throw new UserError(
          `dpo: the ref input (${ctx.inputs.ref.ref}) was computed on other pairs than ${ctx.inputs.pairs.ref}; ` +
            `wire ref_logprobs to the same tokenize output`,
        );
      }
      if (ref.maxLength !== p.max_length) {
        throw new UserError(
          `dpo: max_length is ${p.max_length} but the reference log-probs used ${ref.maxLength}; use the same`,
        );
      }
    } catch (e) {
      data.reader.close();
      throw e;
    }
    const rt = await stageRuntime(ctx.settings);
    const lm = toGpu(rt, cpu, ctx.settings, { trainable: trainablePredicate(p.trainable) });
    const B = p.per_device_train_batch_size;
    const microStep = (mb: MicroBatch, gradScale: number): Tensor[] => {
      const b = mb.rows / 2;
      const refDiff = new Float32Array(b);
      for (let i = 0; i < b; i++) {
        const pair = mb.sequences[i] / 2;
        refDiff[i] = ref.chosen[pair] - ref.rejected[pair];
      }
      const lp = pairLogprobs(lm, mb);
      const [pc, pr] = splitLastDim(lp.view([1, 2 * b]), [b, b]);
      const z = sub(sub(pc, pr), rt.tensor(refDiff, [1, b]));
      let loss = mean(softplus(scale(z, -p.beta)));
      if (p.rpo_alpha) {
        // TRL: the cross-entropy of the chosen rows' target tokens, a mean over this micro-batch's tokens
        const chosenTokens = chosenTargetCount(mb);
        if (chosenTokens > 0) loss = add(loss, scale(mean(pc), (-p.rpo_alpha * b) / chosenTokens));
      }
      rt.backward(loss, rt.tensor([gradScale], [1]));
      return [loss, lp];
    };
    try {
      const batches = batchOptions(p, seed, { pairs: true });
      const steps = phaseSteps(data, batches);
      ctx.progress.start(steps, "step", "dpo");
      const latest = ctx.checkpoints.latest();
      if (latest) ctx.log.info(`resuming from step ${latest.step}`);
      const r = await runPhase({
        ctx,
        model: lm,
        params: p,
        data,
        batches,
        stepOffset: 0,
        tokensBefore: 0,
        lastPhase: true,
        resumeFrom: latest?.dir ?? null,
        extra: {},
        statsSize: 1 + 2 * B,
        weightOf: (mb) => mb.rows / 2,
        microStep,
        summarize: (stats, micro) => summarizeDpo(stats, micro, ref, p.beta),
      });
      await writeModelArtifact(
        ctx.outputs.model,
        await fromGpu(lm),
        await modelDir(ctx.inputs.model, "model"),
      );
      const last = r.last ?? {};
      ctx.setMetrics({
        ...(r.last
          ? {
            loss: last.loss,
            "rewards/accuracies": last["rewards/accuracies"],
            "rewards/margins": last["rewards/margins"],
          }
          : {}),
        steps: r.step,
        pairs_seen: r.step * B * p.gradient_accumulation_steps,
      });
    } finally {
      lm.dispose();
      data.reader.close();
    }
  },
});
