/**
 * `testing.train`: a deterministic, checkpointing "training" loop for the runner's resume tests and the demo.
 *
 * It fits a vector of weights to noisy targets drawn from a seeded {@linkcode Rng}, one step at a time, logging
 * the loss as a metric and saving its whole state (weights, RNG state, step) every `checkpoint_every` steps. A run
 * resumed from any checkpoint produces exactly the bytes an uninterrupted run produces. `step_ms` slows it down so
 * a test can kill it mid-way; `fail_at_step` makes the loss NaN at that step (a user error, like a diverged run).
 *
 * @module
 */
import { join } from "node:path";
import { UserError } from "../../util/errors.ts";
import { Rng, type RngState } from "../../util/rng.ts";
import { defineStage } from "../../pipelines/stage.ts";

interface TrainState {
  step: number;
  rng: RngState;
  weights: number[];
}

/** The test training stage kind. */
export const trainStage = defineStage({
  kind: "testing.train",
  version: 1,
  doc: "Test-only: a deterministic toy training loop with step checkpoints, metrics and progress.",
  testOnly: true,
  usesSeed: true,
  params: {
    steps: { type: "number", integer: true, min: 1, default: 20, doc: "Number of steps." },
    dim: { type: "number", integer: true, min: 1, max: 1 << 20, default: 16, doc: "Number of weights." },
    learning_rate: { type: "number", exclusiveMin: 0, max: 1, default: 0.1, doc: "Step size." },
    checkpoint_every: {
      type: "number",
      integer: true,
      min: 1,
      default: 5,
      inKey: false,
      doc: "Steps between checkpoints.",
    },
    step_ms: {
      type: "number",
      min: 0,
      default: 0,
      inKey: false,
      doc: "Sleep per step, ms (to make the stage slow in tests).",
    },
    fail_at_step: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Make the loss NaN at this step (tests the failure path).",
    },
  },
  inputs: {
    data: {
      doc: "Optional text whose bytes shift the targets (tests input-file changes).",
      optional: true,
      type: "file",
    },
  },
  outputs: { weights: { type: "file", doc: "Final weights, little-endian float32." } },
  async run(ctx) {
    const p = ctx.params;
    let shift = 0;
    if (ctx.inputs.data) {
      for (const b of await Deno.readFile(ctx.inputs.data.path!)) shift = (shift * 31 + b) % 1000;
    }
    let state: TrainState;
    const latest = ctx.checkpoints.latest();
    if (latest) {
      state = JSON.parse(await Deno.readTextFile(join(latest.dir, "state.json")));
      ctx.log.info(`resuming from step ${state.step}`);
    } else {
      state = { step: 0, rng: new Rng(ctx.settings.seed).getState(), weights: Array(p.dim).fill(0) };
    }
    const rng = Rng.fromState(state.rng);
    const w = Float32Array.from(state.weights);
    ctx.progress.start(p.steps, "step");
    for (let step = state.step + 1; step <= p.steps; step++) {
      if (ctx.signal.aborted) throw ctx.signal.reason;
      let loss = 0;
      for (let i = 0; i < w.length; i++) {
        const target = Math.fround(1 + shift / 1000 + 0.1 * rng.normal());
        const d = w[i] - target;
        loss += d * d;
        w[i] = Math.fround(w[i] - p.learning_rate * 2 * d);
      }
      loss /= w.length;
      if (p.fail_at_step !== null && step >= p.fail_at_step) loss = NaN;
      ctx.log.metric(step, { loss });
      if (!Number.isFinite(loss)) {
        throw new UserError(`loss is ${loss} at step ${step}; the last good checkpoint is kept`);
      }
      if (p.step_ms > 0) await new Promise((r) => setTimeout(r, p.step_ms));
      ctx.progress.update(step, { tokens: step * w.length, loss });
      if (step % p.checkpoint_every === 0 && step < p.steps) {
        const s: TrainState = { step, rng: rng.getState(), weights: Array.from(w) };
        await ctx.checkpoints.save(
          step,
          (dir) => Deno.writeTextFile(join(dir, "state.json"), JSON.stringify(s)),
        );
      }
    }
    await Deno.writeFile(ctx.outputs.weights, new Uint8Array(w.buffer));
    ctx.setMetrics({ distance_to_one: distanceToOne(w), steps: p.steps });
  },
});

/** Mean squared distance of the weights from 1 (the noiseless target without a data shift). */
function distanceToOne(w: Float32Array): number {
  let s = 0;
  for (const x of w) s += (x - 1) * (x - 1);
  return s / w.length;
}
