/**
 * Set-up steps the training stages share: the training data with its length limit, the optimizer over a
 * model's trainable parameters, and the phase of a training run (one optimizer, schedule and data pass) driven
 * through {@linkcode runTrainLoop} with checkpoints that restore it exactly.
 *
 * @module
 */
import { BatchIterator, type BatchOptions, type MicroBatch } from "../../data/batches.ts";
import type { SequenceSource, TokenFileReader } from "../../data/token_file.ts";
import type { CausalLM } from "../../models/causal_lm.ts";
import type { Artifact, StageLog } from "../../pipelines/stage.ts";
import { AdamW } from "../../runtime/optim.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import { UserError } from "../../util/errors.ts";
import { countSteps } from "./budget.ts";
import { adamwOptions, lrSchedule, type TrainingParamValues } from "./train_params.ts";
import { runTrainLoop, type TrainLoopContext, type TrainLoopResult } from "./train_loop.ts";
import { loadTrainState, saveTrainState } from "./train_state.ts";
import { openTokensInput, truncatedSource } from "./tokens.ts";

/** Training data: the open token file and the (possibly length-limited) view the batches read. */
export interface TrainingData {
  /** The token file (close it when done). */
  reader: TokenFileReader;
  /** What batches read. */
  source: SequenceSource;
  /** Padded width of a batch row. */
  seqLen: number;
}

/** Opens a token input for training, applying `max_length` (with a warning when it cuts sequences). */
export async function openTrainingData(
  input: Artifact,
  o: {
    port: string;
    layout: "sequences" | "pairs";
    vocabSize: number;
    maxLength: number | null;
    log: StageLog;
  },
): Promise<TrainingData> {
  const reader = await openTokensInput(input, { port: o.port, layout: o.layout, vocabSize: o.vocabSize });
  const longest = reader.header.max_sequence_length;
  if (o.maxLength === null || o.maxLength >= longest) return { reader, source: reader, seqLen: longest };
  const source = truncatedSource(reader, o.maxLength);
  o.log.warn(
    `max_length ${o.maxLength}: ${source.truncated} of ${reader.numSequences} sequences of ${input.ref} are ` +
      `longer (up to ${longest} tokens) and are cut`,
  );
  return { reader, source, seqLen: o.maxLength };
}

/** Which parameters of a model train. */
export type TrainableSet = "mamba" | "mamba_mlp" | "all";

/**
 * The predicate over Hugging Face parameter names for a trainable set: `mamba` = the Mamba mixers only (paper
 * stage 1), `mamba_mlp` = mixers and every MLP, `all` = everything.
 */
export function trainablePredicate(set: TrainableSet): (name: string) => boolean {
  switch (set) {
    case "mamba":
      return (n) => n.includes(".mamba.");
    case "mamba_mlp":
      return (n) => n.includes(".mamba.") || n.includes(".mlp.");
    case "all":
      return () => true;
  }
}

/** The model's trainable parameters by name. */
export function trainableParams(lm: CausalLM): Map<string, Tensor> {
  return new Map([...lm.params].filter(([, t]) => t.requiresGrad));
}

/** What one training phase needs besides the shared parameters. */
export interface PhaseOptions {
  /** The stage context. */
  ctx: TrainLoopContext & { log: StageLog };
  /** The model being trained (its trainable parameters get the optimizer). */
  model: CausalLM;
  /** Training parameters. */
  params: TrainingParamValues;
  /** Data to train on. */
  data: TrainingData;
  /** Batching (budget, seed, pairs...). */
  batches: BatchOptions;
  /** Global step of this phase's step 0. */
  stepOffset: number;
  /** Tokens processed before this phase. */
  tokensBefore: number;
  /** Whether this phase ends the stage. */
  lastPhase: boolean;
  /** Checkpoint to resume from (already known to belong to this phase), or null. */
  resumeFrom: string | null;
  /** Extra checkpoint metadata (e.g. the phase index). */
  extra: Record<string, unknown>;
  /** Statistics per micro-batch, the micro-step and the summary, as in {@linkcode runTrainLoop}. */
  statsSize: number;
  /** Loss weight of a micro-batch. */
  weightOf(mb: MicroBatch): number;
  /** Forward + loss + backward of a micro-batch. */
  microStep(mb: MicroBatch, gradScale: number): Tensor[];
  /** Step metrics from statistics. */
  summarize(stats: Float32Array[], micro: MicroBatch[]): Record<string, number>;
}

/** Steps a phase runs (for progress totals and the schedule). */
export function phaseSteps(data: TrainingData, batches: BatchOptions): number {
  return countSteps(data.source, batches);
}

/** Runs one phase: optimizer, schedule, batches (resumed if asked), the loop; disposes the optimizer. */
export async function runPhase(o: PhaseOptions): Promise<TrainLoopResult> {
  const rt = o.model.rt;
  const trainable = trainableParams(o.model);
  if (trainable.size === 0) {
    throw new UserError("no trainable parameters: the trainable set selects nothing in this model");
  }
  const optimizer = new AdamW(rt, [...trainable.values()], adamwOptions(o.params));
  try {
    const total = phaseSteps(o.data, o.batches);
    let batches: BatchIterator;
    let tokensBefore = o.tokensBefore;
    if (o.resumeFrom) {
      const meta = await loadTrainState(o.resumeFrom, trainable, optimizer);
      batches = new BatchIterator(o.data.source, { ...o.batches, seqLen: o.data.seqLen }, meta.position);
      tokensBefore += meta.position.tokensSeen;
    } else {
      batches = new BatchIterator(o.data.source, { ...o.batches, seqLen: o.data.seqLen });
    }
    return await runTrainLoop({
      rt,
      ctx: o.ctx,
      optimizer,
      schedule: lrSchedule(o.params, total),
      batches,
      totalSteps: total,
      stepOffset: o.stepOffset,
      tokensBefore,
      gradAccumSteps: o.batches.gradAccumSteps ?? 1,
      statsSize: o.statsSize,
      weightOf: o.weightOf,
      microStep: o.microStep,
      summarize: o.summarize,
      loggingSteps: o.params.logging_steps,
      saveSteps: o.params.save_steps,
      lastLoop: o.lastPhase,
      save: (dir, step, position) =>
        saveTrainState(dir, trainable, optimizer, { step, position, extra: o.extra }),
    });
  } finally {
    optimizer.dispose();
  }
}
