/**
 * `sft`: supervised fine-tuning (method.md section 2, step 3) - every parameter trains on chat or
 * prompt/completion tokens with the completion-only loss mask the tokenize stage wrote, optionally with a
 * token-level KL to a teacher.
 *
 * @module
 */
import { defineStage } from "../pipelines/stage.ts";
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
import { LM_STATS, lmMicroStep, summarizeLm } from "./shared/lm_loss.ts";

/** The sft stage kind. */
export const sftStage = defineStage({
  kind: "sft",
  version: 1,
  doc: "Supervised fine-tuning: cross-entropy on the target tokens of chat or prompt/completion data (the " +
    "tokenize stage's completion-only mask and packing), every parameter trainable, plus an optional " +
    "kl_weight * KL(teacher || model) per token. Checkpoints resume exactly; a NaN or Inf loss stops the stage.",
  usesDevice: true,
  usesSeed: true,
  params: {
    kl_weight: {
      type: "number",
      min: 0,
      default: 0,
      doc:
        "Weight of a token-level KL(teacher || model) added to the cross-entropy (needs the teacher input).",
    },
    temperature: { type: "number", exclusiveMin: 0, default: 1, doc: "Softmax temperature of the KL term." },
    trainable: trainableParam("all", "What trains (paper: all parameters)."),
    ...trainingParams({
      learningRate: [2e-5, "paper: 2e-5"],
      warmupRatio: [0.01, "paper: 0.01"],
      adamBeta2: [0.999, "TrainingArguments default"],
      maxGradNorm: [1, "TrainingArguments default"],
      weightDecay: [0, "TrainingArguments default"],
      batch: [8, 8, "paper: 64"],
    }),
  },
  inputs: {
    model: { doc: "The model to fine-tune (a distilled hybrid, or any Llama/Mistral model)." },
    data: {
      doc: "Training tokens from the tokenize stage (chat or prompt_completion, packed).",
      type: "dir",
    },
    teacher: { doc: "Optional teacher for the KL term (kl_weight > 0).", optional: true },
  },
  outputs: {
    model: { type: "dir", doc: "The fine-tuned model (same layout as the input)." },
  },
  async run(ctx) {
    const p = ctx.params;
    const seed = p.seed ?? ctx.settings.seed;
    if (p.kl_weight > 0 && !ctx.inputs.teacher) {
      throw new UserError("sft: kl_weight > 0 needs the teacher input");
    }
    const { model: cpu } = await loadModelInput(ctx.inputs.model, "model");
    const rt = await stageRuntime(ctx.settings);
    const teacher = p.kl_weight > 0
      ? toGpu(rt, (await loadModelInput(ctx.inputs.teacher!, "teacher")).model, ctx.settings)
      : null;
    if (teacher && teacher.config.vocabSize !== cpu.config.vocabSize) {
      teacher.dispose();
      throw new UserError(
        `sft: the teacher's vocabulary (${teacher.config.vocabSize}) differs from the model's ` +
          `(${cpu.config.vocabSize}); a token-level KL needs the same tokenizer`,
      );
    }
    const data = await openTrainingData(ctx.inputs.data, {
      port: "data",
      layout: "sequences",
      vocabSize: cpu.config.vocabSize,
      maxLength: p.max_length,
      log: ctx.log,
    });
    const lm = toGpu(rt, cpu, ctx.settings, { trainable: trainablePredicate(p.trainable) });
    try {
      const batches = batchOptions(p, seed);
      const steps = phaseSteps(data, batches);
      ctx.progress.start(steps, "step", "sft");
      const latest = ctx.checkpoints.latest();
      if (latest) ctx.log.info(`resuming from step ${latest.step}`);
      const lossOpts = { ceWeight: 1, klWeight: p.kl_weight, temperature: p.temperature };
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
        statsSize: LM_STATS,
        weightOf: (mb) => mb.targetTokens,
        microStep: (mb, scale) => lmMicroStep(lm, teacher, mb, scale, lossOpts),
        summarize: (stats) => summarizeLm(stats, teacher !== null),
      });
      await writeModelArtifact(
        ctx.outputs.model,
        await fromGpu(lm),
        await modelDir(ctx.inputs.model, "model"),
      );
      ctx.setMetrics({
        ...(r.last ? { loss: r.last.loss, ce: r.last.ce } : {}),
        steps: r.step,
        tokens: r.tokens,
      });
    } finally {
      lm.dispose();
      teacher?.dispose();
      data.reader.close();
    }
  },
});
