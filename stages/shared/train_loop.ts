/**
 * The training loop every training stage runs: batches -> forward -> loss -> backward (accumulated over
 * micro-batches) -> global-norm clip -> AdamW -> metrics -> checkpoints.
 *
 * What the stage supplies is the part that differs (`microStep`: the forward pass and loss of one micro-batch,
 * which records its backward seeded with the micro-batch's share of the step's loss, and returns small GPU
 * tensors of statistics; `summarize`: those statistics -> named metrics on the CPU) and how to save a
 * checkpoint. The loop owns everything else:
 *
 * - Loss scale. A step's loss is the mean over its targets (tokens, or pairs for DPO), whatever the
 *   micro-batching: micro-batch m's mean loss is back-propagated with weight `w_m / sum(w)` (`weightOf`), so
 *   gradient accumulation gives the gradient of the full batch's mean.
 * - Few GPU reads. Statistics and the gradient norm of every step are copied on the GPU into a small buffer
 *   of `logging_steps` rows; the loop reads it once per `logging_steps` steps (and before each checkpoint), so
 *   training never waits on the GPU in between.
 * - Non-finite values. Each step's loss and gradient norm are checked when its row is read; the first bad step
 *   stops the stage with a {@linkcode UserError} naming the step and the quantity. Rows are always read and
 *   checked before a checkpoint is written, so a checkpoint never holds weights updated by a bad step and the
 *   last good checkpoint survives for inspection or a resume with other parameters.
 * - Checkpoints every `save_steps` steps (and when the stage is interrupted), through `ctx.checkpoints`.
 * - Metrics every `logging_steps` steps through `ctx.log.metric` (the window's mean of each metric, the
 *   learning rate of its last step, tokens/s), progress every step.
 *
 * @module
 */
import type { BatchIterator, BatchPosition, MicroBatch, TrainStep } from "../../data/batches.ts";
import type { AdamW, LrSchedule } from "../../runtime/optim.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import type { StageContext } from "../../pipelines/stage.ts";
import { UserError } from "../../util/errors.ts";

/** What the loop needs from the stage context. */
export type TrainLoopContext = Pick<StageContext, "log" | "progress" | "checkpoints" | "signal">;

/** Options of {@linkcode runTrainLoop}. */
export interface TrainLoopOptions {
  /** The runtime. */
  rt: Runtime;
  /** Logging, progress, checkpoints and the abort signal. */
  ctx: TrainLoopContext;
  /** The optimizer over the trainable parameters. */
  optimizer: AdamW;
  /** Learning rate per 0-based step of this loop. */
  schedule: LrSchedule;
  /** The data, possibly resumed at a position. */
  batches: BatchIterator;
  /** Steps this loop runs in total (for the last-step rule). */
  totalSteps: number;
  /** Global number of this loop's step 0 (progressive distillation continues counting across phases). */
  stepOffset?: number;
  /** Tokens the stage processed before this loop started (progress and tokens/s). */
  tokensBefore?: number;
  /** Micro-batches per step (the batches' gradient accumulation; a last step may have fewer). */
  gradAccumSteps: number;
  /** Floats of statistics per micro-batch (the sizes of the tensors `microStep` returns, summed). */
  statsSize: number;
  /** The loss weight of a micro-batch: its target tokens, or its pairs. */
  weightOf(mb: MicroBatch): number;
  /**
   * Records the forward pass, the loss and its backward (seeded with `gradScale`) of one micro-batch, and
   * returns its statistics tensors (f32, `statsSize` floats together). Runs inside a scope the loop closes.
   */
  microStep(mb: MicroBatch, gradScale: number): Tensor[];
  /**
   * Turns one step's statistics (one array per micro-batch) into named metrics. `loss` is required; the loop
   * adds `grad_norm`, `lr` and `epoch`.
   */
  summarize(stats: Float32Array[], micro: MicroBatch[]): Record<string, number>;
  /** Log every N steps. */
  loggingSteps: number;
  /** Checkpoint every N steps. */
  saveSteps: number;
  /** Whether the last step of this loop ends the stage (then no checkpoint is written for it). */
  lastLoop?: boolean;
  /** Writes a checkpoint of the current state into `dir` (after `step` global steps, data at `position`). */
  save(dir: string, step: number, position: BatchPosition): Promise<void>;
  /** Metrics that must be finite (default `loss` and `grad_norm`). */
  mustBeFinite?: string[];
}

/** What a finished loop reports. */
export interface TrainLoopResult {
  /** Global step count after the loop. */
  step: number;
  /** Tokens processed by the stage so far (including `tokensBefore`). */
  tokens: number;
  /** The last logged metrics (window means), or null when no step ran. */
  last: Record<string, number> | null;
}

interface PendingStep {
  step: number;
  lr: number;
  epoch: number;
  micro: MicroBatch[];
}

/** Runs the loop until the batches are exhausted; see the module documentation. */
export async function runTrainLoop(o: TrainLoopOptions): Promise<TrainLoopResult> {
  const { rt, ctx, optimizer } = o;
  const offset = o.stepOffset ?? 0;
  const accum = Math.max(1, o.gradAccumSteps);
  const rowFloats = accum * o.statsSize + 2;
  const capacity = Math.max(1, o.loggingSteps);
  const rows = rt.zeros([capacity, rowFloats], "f32").keep();
  const finite = o.mustBeFinite ?? ["loss", "grad_norm"];
  const pending: PendingStep[] = [];
  let window: Record<string, number>[] = [];
  let tokens = o.tokensBefore ?? 0;
  let windowTokens = 0;
  let windowStart = performance.now();
  let last: Record<string, number> | null = null;
  let lastLoss: number | undefined;
  let step = offset + o.batches.step;
  let lastSaved = step;

  /** Reads the pending rows, checks them and adds their metrics to the window. */
  const drain = async () => {
    if (pending.length === 0) return;
    const bytes = await rt.dev.read(rows.buffer, 0, pending.length * rowFloats * 4);
    const all = new Float32Array(bytes);
    for (let i = 0; i < pending.length; i++) {
      const p = pending[i];
      const row = all.subarray(i * rowFloats, (i + 1) * rowFloats);
      const stats = p.micro.map((_, m) => row.subarray(m * o.statsSize, (m + 1) * o.statsSize));
      const metrics: Record<string, number> = {
        ...o.summarize(stats, p.micro),
        grad_norm: row[accum * o.statsSize],
      };
      for (const k of finite) {
        const v = metrics[k];
        if (v !== undefined && !Number.isFinite(v)) {
          ctx.log.metric(p.step, { ...metrics, lr: p.lr });
          const parts = Object.entries(metrics).filter(([n]) => n !== k).map(([n, x]) => `${n} ${fmt(x)}`);
          throw new UserError(
            `${k} is ${v} at step ${p.step} (${parts.join(", ")}); training stopped, the last good ` +
              `checkpoint is kept. Lower learning_rate, keep max_grad_norm on, or check the data`,
          );
        }
      }
      window.push({ ...metrics, lr: p.lr, epoch: p.epoch });
    }
    pending.length = 0;
  };

  /** Logs the window's means at `at`. */
  const logWindow = (at: number) => {
    if (window.length === 0) return;
    const keys = Object.keys(window[0]);
    const rec: Record<string, number> = {};
    for (const k of keys) rec[k] = window.reduce((a, w) => a + (w[k] ?? 0), 0) / window.length;
    rec.lr = window[window.length - 1].lr;
    rec.epoch = window[window.length - 1].epoch;
    const secs = (performance.now() - windowStart) / 1000;
    rec.tokens_per_s = secs > 0 ? windowTokens / secs : 0;
    ctx.log.metric(at, rec);
    last = rec;
    lastLoss = rec.loss;
    window = [];
    windowTokens = 0;
    windowStart = performance.now();
  };

  const checkpoint = async (position: BatchPosition) => {
    await drain();
    await ctx.checkpoints.save(step, (dir) => o.save(dir, step, position));
    lastSaved = step;
  };

  try {
    while (true) {
      if (ctx.signal.aborted) {
        if (step > lastSaved) await checkpoint(o.batches.position());
        throw ctx.signal.reason;
      }
      const ts: TrainStep | null = o.batches.next();
      if (!ts) break;
      const lr = o.schedule(ts.step);
      const totalWeight = ts.micro.reduce((a, mb) => a + o.weightOf(mb), 0);
      const row = pending.length;
      ts.micro.forEach((mb, m) => {
        rt.scope(() => {
          const w = o.weightOf(mb);
          const stats = o.microStep(mb, totalWeight > 0 ? w / totalWeight : 0);
          let at = (row * rowFloats + m * o.statsSize) * 4;
          for (const s of stats) {
            rt.dev.copyBuffer(s.buffer, 0, rows.buffer, at, s.byteLength);
            at += s.byteLength;
          }
        });
      });
      if (optimizer.options.maxGradNorm <= 0) optimizer.computeGradNorm();
      optimizer.step(lr);
      rt.dev.copyBuffer(
        optimizer.gradNorm.buffer,
        0,
        rows.buffer,
        (row * rowFloats + accum * o.statsSize) * 4,
        8,
      );
      optimizer.zeroGrad();
      step = offset + ts.step + 1;
      tokens += ts.tokens;
      windowTokens += ts.tokens;
      pending.push({ step, lr, epoch: ts.epoch, micro: ts.micro });
      const isLast = ts.step + 1 >= o.totalSteps;
      if (pending.length >= capacity || isLast) await drain();
      if (step % o.loggingSteps === 0 || isLast) logWindow(step);
      ctx.progress.update(step, { tokens, ...(lastLoss !== undefined ? { loss: lastLoss } : {}) });
      if (step % o.saveSteps === 0 && !(isLast && o.lastLoop)) await checkpoint(o.batches.position());
    }
    await drain();
    logWindow(step);
  } finally {
    rows.dispose();
  }
  return { step, tokens, last };
}

function fmt(x: number): string {
  return Number.isFinite(x) ? x.toPrecision(4) : String(x);
}
