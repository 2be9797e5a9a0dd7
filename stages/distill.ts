/**
 * `distill`: stage 1 of the method (method.md section 2) - the hybrid student learns from the teacher with
 * `ce_weight * CE(data) + kl_weight * KL(teacher || student)` per token, teacher logits computed on the fly,
 * optionally progressively: a schedule of phases, each converting more attention layers to Mamba, starting
 * from the previous phase's Mamba layers and attention-initialising the newly converted ones.
 *
 * @module
 */
import { defineStage } from "../pipelines/stage.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import { mapAttentionToMamba2, mapAttentionToMambaProgressive } from "../models/mapping.ts";
import type { HybridModel, Model } from "../models/weights.ts";
import { Rng } from "../util/rng.ts";
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
import { readTrainStateMeta } from "./shared/train_state.ts";
import { LM_STATS, lmMicroStep, summarizeLm } from "./shared/lm_loss.ts";
import type { BatchOptions } from "../data/batches.ts";

const PHASE_FIELDS = {
  attn_layers: {
    type: "array",
    items: { type: "number", integer: true, min: 0, doc: "A layer index (0-based)." },
    required: true,
    doc: "Layers that keep attention in this phase (a subset of the previous phase's).",
  },
  tokens: {
    type: "number",
    integer: true,
    min: 1,
    nullable: true,
    doc: "Token budget of this phase (tokens fed to the student, padding excluded).",
  },
  steps: {
    type: "number",
    integer: true,
    min: 1,
    nullable: true,
    doc: "Optimizer steps of this phase (instead of tokens).",
  },
} as const;

interface Phase {
  attn: number[];
  budget: Partial<BatchOptions>;
}

/** The distill stage kind. */
export const distillStage = defineStage({
  kind: "distill",
  version: 1,
  doc: "Distils a hybrid Mamba student from its teacher (stage 1 of 'The Mamba in the Llama'): per target " +
    "token, ce_weight * cross-entropy on the data plus kl_weight * KL(teacher || student) at a temperature, " +
    "with the teacher's logits computed on the fly. A schedule converts attention layers progressively: each " +
    "phase starts from the previous phase's Mamba layers and attention-initialises the newly converted ones. " +
    "By default only Mamba parameters train (MLPs, norms, embeddings and kept attention frozen). " +
    "Checkpoints resume exactly; a NaN or Inf loss stops the stage.",
  usesDevice: true,
  usesSeed: true,
  params: {
    schedule: {
      type: "array",
      items: { type: "object", fields: PHASE_FIELDS, doc: "One phase: attn_layers and a budget." },
      minItems: 1,
      nullable: true,
      doc: "Progressive schedule, e.g. [{attn_layers: [1,3,5,7], tokens: 1e8}, {attn_layers: [3,7], " +
        "tokens: 1e8}] (paper: 50% -> 25% attention). A phase without tokens or steps uses max_tokens / " +
        "max_steps / num_train_epochs. Null: one phase with attn_layers.",
    },
    attn_layers: {
      type: "array",
      items: { type: "number", integer: true, min: 0, doc: "A layer index (0-based)." },
      nullable: true,
      doc: "One-phase shorthand for schedule: the layers that keep attention (paper 50%: every odd layer). " +
        "Null with no schedule: train the student input as it is.",
    },
    max_tokens: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Token budget of phases that set none (overrides max_steps and num_train_epochs).",
    },
    trainable: trainableParam(
      "mamba",
      "What trains: mamba (paper stage 1: MLPs, norms, embeddings and kept attention frozen), mamba_mlp " +
        "(Mamba layers and every MLP: the paper's frozen-MLP ablation), or all (the later KL-only recipe).",
    ),
    ce_weight: {
      type: "number",
      min: 0,
      default: 1,
      doc: "alpha: weight of the cross-entropy on the data's tokens (paper: 1; 0 for KL-only).",
    },
    kl_weight: {
      type: "number",
      min: 0,
      default: 0.1,
      doc: "beta: weight of KL(teacher || student), a per-token mean (paper: 0.1; the official code sums " +
        "over positions and divides by the batch size).",
    },
    temperature: {
      type: "number",
      exclusiveMin: 0,
      default: 1,
      doc: "Softmax temperature of the KL term, scaled by temperature^2 (paper: 1).",
    },
    share_frozen: {
      type: "boolean",
      default: true,
      inKey: false,
      doc:
        "Let the student use the teacher's GPU tensors for the parameters it does not train and holds with " +
        "the teacher's exact values (embeddings, lm_head, norms, MLPs, kept attention with trainable: mamba: " +
        "24.5 GiB at a 7B shape) instead of a copy. Needs the KL teacher on the GPU (kl_weight > 0). The " +
        "result is bit-identical either way; false only to measure or debug.",
    },
    ...trainingParams({
      learningRate: [8e-5, "paper: 8e-5"],
      warmupRatio: [0.01, "paper: warm-up then cosine; the ratio of its SFT stage, 0.01"],
      adamBeta2: [0.98, "paper: betas (0.9, 0.98)"],
      maxGradNorm: [0.1, "paper: 0.1"],
      weightDecay: [0, "paper: none"],
      batch: [8, 8, "paper: 64 sequences of 2048 tokens"],
    }),
  },
  inputs: {
    teacher: { doc: "The teacher: a Llama/Mistral model directory, stage output or hf:// reference." },
    data: {
      doc:
        "Training tokens (a tokenize stage output): pseudo-labels or text; the CE targets are its masked " +
        "tokens.",
      type: "dir",
    },
    student: {
      doc:
        "Optional starting hybrid (a map_weights or earlier distill output). Default: the teacher mapped " +
        "with the first phase's attn_layers (attention initialisation, Mamba2, seeded).",
      optional: true,
    },
  },
  outputs: {
    model: {
      type: "dir",
      doc: "The distilled hybrid: config.json, mamba_config.json, model.safetensors, tokenizer.",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    const seed = p.seed ?? ctx.settings.seed;
    if (p.schedule && p.attn_layers) {
      throw new UserError("distill: give either schedule or attn_layers, not both");
    }
    const teacherIn = await loadModelInput(ctx.inputs.teacher, "teacher");
    const teacherCpu = teacherIn.model;
    const studentIn = ctx.inputs.student ? await loadModelInput(ctx.inputs.student, "student") : null;
    if (studentIn && studentIn.model.kind !== "hybrid") {
      throw new UserError(`input student: ${ctx.inputs.student!.ref} is not a hybrid (no mamba_config.json)`);
    }
    const defaultBudget = (): Partial<BatchOptions> =>
      p.max_tokens !== null ? { maxTokens: p.max_tokens } : {};
    let phases: Phase[];
    if (p.schedule) {
      phases = p.schedule.map((s, i) => {
        if (s.tokens !== null && s.steps !== null) {
          throw new UserError(`distill: schedule[${i}] sets both tokens and steps; give one`);
        }
        const budget: Partial<BatchOptions> = s.tokens !== null
          ? { maxTokens: s.tokens }
          : s.steps !== null
          ? { maxSteps: s.steps }
          : defaultBudget();
        return { attn: [...s.attn_layers].sort((a, b) => a - b), budget };
      });
    } else if (p.attn_layers) {
      phases = [{ attn: [...p.attn_layers].sort((a, b) => a - b), budget: defaultBudget() }];
    } else if (studentIn) {
      phases = [{ attn: (studentIn.model as HybridModel).mamba.attnLayers, budget: defaultBudget() }];
    } else {
      throw new UserError("distill: set attn_layers or schedule (or give a student input)");
    }
    const rng = () => new Rng(seed);
    // The model a phase starts from, before training: phase 0 from the student (or the teacher), later phases
    // from the previous phase's result.
    const startOf = (prev: Model | null, k: number): HybridModel => {
      const attn = phases[k].attn;
      if (prev === null) {
        if (!studentIn) {
          if (teacherCpu.kind !== "transformer") {
            throw new UserError("input teacher: without a student input the teacher must be a Transformer");
          }
          return mapAttentionToMamba2(teacherCpu.weights, teacherCpu.config, attn, rng());
        }
        const s = studentIn.model as HybridModel;
        if (s.mamba.attnLayers.join() === attn.join()) return s;
        return mapAttentionToMambaProgressive(s, s, attn, rng());
      }
      // The previous model still has attention on the newly converted layers: convert from it, so trained
      // weights (trainable: all / mamba_mlp) carry over; with trainable: mamba they are the teacher's.
      return mapAttentionToMambaProgressive(prev as HybridModel, prev, attn, rng());
    };

    const rt = await stageRuntime(ctx.settings);
    const withKl = p.kl_weight !== 0;
    // without a KL term the teacher is only the source of the initial student
    const teacher = withKl ? toGpu(rt, teacherCpu, ctx.settings) : null;
    // teacherCpu.weights are what the teacher was uploaded from, and the frozen teacher is never written
    const share = teacher && p.share_frozen
      ? { owner: teacher, ownerWeights: teacherCpu.weights }
      : undefined;
    const data = await openTrainingData(ctx.inputs.data, {
      port: "data",
      layout: "sequences",
      vocabSize: teacherCpu.config.vocabSize,
      maxLength: p.max_length,
      log: ctx.log,
    });
    const lossOpts = { ceWeight: p.ce_weight, klWeight: p.kl_weight, temperature: p.temperature };
    const isTrainable = trainablePredicate(p.trainable);
    try {
      const budgets = phases.map((ph) => batchOptions(p, seed, ph.budget));
      const steps = budgets.map((b) => phaseSteps(data, b));
      ctx.progress.start(steps.reduce((a, b) => a + b, 0), "step", "distill");
      // Resume: the checkpoint says which phase it belongs to; earlier phases' frozen weights are rebuilt from
      // the inputs (they never change), the trainable ones come from the checkpoint.
      const latest = ctx.checkpoints.latest();
      let resumePhase = 0;
      if (latest) {
        const meta = await readTrainStateMeta(latest.dir);
        resumePhase = Number(meta.extra.phase ?? 0);
        ctx.log.info(`resuming from step ${meta.step} (phase ${resumePhase + 1} of ${phases.length})`);
      }
      let model: Model | null = null;
      for (let k = 0; k < resumePhase; k++) model = startOf(model, k);
      let tokens = 0, offset = steps.slice(0, resumePhase).reduce((a, b) => a + b, 0);
      let last: Record<string, number> | null = null;
      for (let k = resumePhase; k < phases.length; k++) {
        const start = startOf(model, k);
        if (phases.length > 1) {
          ctx.log.info(`phase ${k + 1}/${phases.length}: attention layers [${phases[k].attn}]`);
        }
        // The student borrows the teacher's frozen tensors it holds unchanged (CausalLM's ShareFrom): they are
        // views of the teacher's storage, so disposing the student at the end of each phase never frees them.
        // The teacher outlives every student (disposed in the outer finally, after the last phase's student) and
        // is never trained or written; the output model is read from the student while it lives (fromGpu).
        const student: CausalLM = toGpu(rt, start, ctx.settings, { trainable: isTrainable, share });
        if (student.borrowed.size > 0) {
          const bytes = [...student.borrowed].reduce((a, n) => a + student.params.get(n)!.byteLength, 0);
          ctx.log.info(
            `the student shares ${student.borrowed.size} frozen tensors (${
              (bytes / 2 ** 20).toFixed(1)
            } MiB) with the teacher`,
          );
        }
        try {
          const r = await runPhase({
            ctx,
            model: student,
            params: p,
            data,
            batches: budgets[k],
            stepOffset: offset,
            tokensBefore: tokens,
            lastPhase: k === phases.length - 1,
            resumeFrom: k === resumePhase && latest ? latest.dir : null,
            extra: { phase: k },
            statsSize: LM_STATS,
            weightOf: (mb) => mb.targetTokens,
            microStep: (mb, scale) => lmMicroStep(student, teacher, mb, scale, lossOpts),
            summarize: (stats) => summarizeLm(stats, withKl),
          });
          tokens = r.tokens;
          offset += steps[k];
          last = r.last ?? last;
          model = await fromGpu(student);
        } finally {
          student.dispose();
        }
      }
      await writeModelArtifact(ctx.outputs.model, model!, await modelDir(ctx.inputs.teacher, "teacher"));
      const attn = (model as HybridModel).mamba.attnLayers;
      ctx.setMetrics({
        ...(last ? { loss: last.loss, ce: last.ce, ...(withKl ? { kl: last.kl } : {}) } : {}),
        steps: offset,
        tokens,
        attention_fraction: attn.length / teacherCpu.config.numLayers,
      });
    } finally {
      data.reader.close();
      teacher?.dispose();
    }
  },
});
