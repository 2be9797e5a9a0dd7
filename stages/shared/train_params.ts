/**
 * The parameters every training stage shares, named as in Hugging Face `TrainingArguments` / TRL (so a recipe
 * reads like a TRL config), with per-stage defaults, and their conversion into optimizer, schedule and batching
 * options.
 *
 * @module
 */
import type { BatchOptions } from "../../data/batches.ts";
import {
  type AdamWOptions,
  constantSchedule,
  linearDecaySchedule,
  type LrSchedule,
  warmupCosineSchedule,
  warmupStepsFromRatio,
} from "../../runtime/optim.ts";

/** Per-stage defaults (each with the sentence that says where it comes from). */
export interface TrainingDefaults {
  /** Peak learning rate and its source. */
  learningRate: [number, string];
  /** Warm-up ratio and its source. */
  warmupRatio: [number, string];
  /** Adam beta2 and its source. */
  adamBeta2: [number, string];
  /** Global gradient-norm clip and its source. */
  maxGradNorm: [number, string];
  /** Weight decay and its source. */
  weightDecay: [number, string];
  /** Sequences (or pairs) per micro-batch and gradient-accumulation steps, with the source of their product. */
  batch: [number, number, string];
}

/** The shared parameter schema with a stage's defaults. */
export function trainingParams(d: TrainingDefaults) {
  return {
    learning_rate: {
      type: "number",
      exclusiveMin: 0,
      default: d.learningRate[0],
      doc: `Peak AdamW learning rate (${d.learningRate[1]}).`,
    },
    lr_scheduler_type: {
      type: "string",
      enum: ["cosine", "linear", "constant"],
      default: "cosine",
      doc: "Learning-rate decay after the warm-up, to 0 at the last step (paper: cosine).",
    },
    warmup_ratio: {
      type: "number",
      min: 0,
      max: 1,
      default: d.warmupRatio[0],
      doc: `Fraction of the steps with a linear warm-up from 0 (${d.warmupRatio[1]}).`,
    },
    warmup_steps: {
      type: "number",
      integer: true,
      min: 0,
      nullable: true,
      doc: "Warm-up steps; overrides warmup_ratio when set (as in TrainingArguments).",
    },
    weight_decay: {
      type: "number",
      min: 0,
      default: d.weightDecay[0],
      doc: `Decoupled AdamW weight decay (${d.weightDecay[1]}).`,
    },
    adam_beta1: { type: "number", min: 0, exclusiveMax: 1, default: 0.9, doc: "AdamW beta1 (paper: 0.9)." },
    adam_beta2: {
      type: "number",
      min: 0,
      exclusiveMax: 1,
      default: d.adamBeta2[0],
      doc: `AdamW beta2 (${d.adamBeta2[1]}).`,
    },
    adam_epsilon: { type: "number", exclusiveMin: 0, default: 1e-8, doc: "AdamW epsilon (PyTorch default)." },
    max_grad_norm: {
      type: "number",
      min: 0,
      default: d.maxGradNorm[0],
      doc: `Clip gradients to this global L2 norm; 0 turns clipping off (${d.maxGradNorm[1]}).`,
    },
    per_device_train_batch_size: {
      type: "number",
      integer: true,
      min: 1,
      default: d.batch[0],
      doc: `Sequences (pairs for DPO) per forward pass (${d.batch[2]}: batch size x accumulation).`,
    },
    gradient_accumulation_steps: {
      type: "number",
      integer: true,
      min: 1,
      default: d.batch[1],
      doc: `Forward/backward passes per optimizer step (${d.batch[2]}: batch size x accumulation).`,
    },
    num_train_epochs: {
      type: "number",
      integer: true,
      min: 1,
      default: 1,
      doc: "Passes over the data (paper: 1), unless max_steps is set.",
    },
    max_steps: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Optimizer steps to run; overrides num_train_epochs (the data is repeated if needed).",
    },
    max_length: {
      type: "number",
      integer: true,
      min: 2,
      nullable: true,
      doc: "Cut longer sequences to this many tokens (keeping the start); null: the tokenized length.",
    },
    shuffle: { type: "boolean", default: true, doc: "Shuffle the data each epoch (seeded)." },
    pad_to_multiple_of: {
      type: "number",
      integer: true,
      min: 0,
      default: 8,
      doc:
        "Pad each micro-batch to its longest sequence rounded up to this multiple (0: every batch to the " +
        "longest sequence of the data). Padding is masked, so only the work changes.",
    },
    seed: {
      type: "number",
      integer: true,
      min: 0,
      nullable: true,
      doc: "Seed of the data order (and new weights); null: the recipe's settings.seed.",
    },
    logging_steps: {
      type: "number",
      integer: true,
      min: 1,
      default: 10,
      inKey: false,
      doc: "Log metrics (averaged over these steps) every N optimizer steps; each log is one GPU read.",
    },
    save_steps: {
      type: "number",
      integer: true,
      min: 1,
      default: 200,
      inKey: false,
      doc: "Save a resumable checkpoint every N optimizer steps.",
    },
  } as const;
}

/** The shared training parameters as a stage receives them. */
export interface TrainingParamValues {
  /** See {@linkcode trainingParams}. */
  learning_rate: number;
  lr_scheduler_type: "cosine" | "linear" | "constant";
  warmup_ratio: number;
  warmup_steps: number | null;
  weight_decay: number;
  adam_beta1: number;
  adam_beta2: number;
  adam_epsilon: number;
  max_grad_norm: number;
  per_device_train_batch_size: number;
  gradient_accumulation_steps: number;
  num_train_epochs: number;
  max_steps: number | null;
  max_length: number | null;
  shuffle: boolean;
  pad_to_multiple_of: number;
  seed: number | null;
  logging_steps: number;
  save_steps: number;
}

/** AdamW options from the parameters. */
export function adamwOptions(p: TrainingParamValues): AdamWOptions {
  return {
    lr: p.learning_rate,
    betas: [p.adam_beta1, p.adam_beta2],
    eps: p.adam_epsilon,
    weightDecay: p.weight_decay,
    maxGradNorm: p.max_grad_norm,
  };
}

/** The learning rate per 0-based step for a run of `totalSteps` steps. */
export function lrSchedule(p: TrainingParamValues, totalSteps: number): LrSchedule {
  const warmupSteps = p.warmup_steps ?? warmupStepsFromRatio(p.warmup_ratio, totalSteps);
  const o = { lr: p.learning_rate, warmupSteps, totalSteps };
  switch (p.lr_scheduler_type) {
    case "cosine":
      return warmupCosineSchedule(o);
    case "linear":
      return linearDecaySchedule(o);
    case "constant":
      return constantSchedule(o);
  }
}

/** Batching options from the parameters (budget: max_steps, else num_train_epochs). */
export function batchOptions(
  p: TrainingParamValues,
  seed: number | string,
  extra: Partial<BatchOptions> = {},
): BatchOptions {
  const o: BatchOptions = {
    batchSize: p.per_device_train_batch_size,
    gradAccumSteps: p.gradient_accumulation_steps,
    seed,
    shuffle: p.shuffle,
    padToMultipleOf: p.pad_to_multiple_of,
    ...extra,
  };
  if (extra.maxSteps === undefined && extra.maxTokens === undefined) {
    if (p.max_steps !== null) o.maxSteps = p.max_steps;
    else o.epochs = p.num_train_epochs;
  }
  return o;
}

/** Which parameters train, as a recipe parameter (see `trainablePredicate` in training.ts for the sets). */
export function trainableParam<D extends "mamba" | "mamba_mlp" | "all">(dflt: D, doc: string) {
  return { type: "string", enum: ["mamba", "mamba_mlp", "all"], default: dflt, doc } as const;
}
