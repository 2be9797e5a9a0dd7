/**
 * Optimisation: AdamW with its state on the GPU, global gradient-norm clipping without a CPU round trip,
 * gradient zeroing, and learning-rate schedules as pure functions.
 *
 * One optimizer step records, for every parameter with a gradient: a sum of squares of the gradient into one
 * slot of a small buffer (only when clipping, or when the norm is asked for), then one kernel that turns the
 * slots into the global norm and the clip factor, then one fused AdamW dispatch per parameter that reads the
 * factor from that buffer. Nothing waits for the GPU; read {@linkcode AdamW.gradNorm} every N steps for logs
 * and NaN checks. f16 parameters are updated through f32 master copies (mixed-precision training's master
 * weights; `masterWeights: false` turns them off).
 *
 * @module
 */
import { adamwKernel, gradNormKernel } from "../kernels/adamw.ts";
import { reduceAllInto } from "./ops/reduce.ts";
import { widen } from "./ops/cast.ts";
import type { Runtime } from "./runtime.ts";
import type { Tensor } from "./tensor.ts";

/** Hyper-parameters of {@linkcode AdamW}. */
export interface AdamWOptions {
  /** Base learning rate (a schedule passes the step's value to {@linkcode AdamW.step}). */
  lr: number;
  /** Moment decays (default [0.9, 0.999], PyTorch's). */
  betas?: [number, number];
  /** Denominator epsilon (default 1e-8). */
  eps?: number;
  /** Decoupled weight decay (default 0.01, PyTorch's AdamW default). */
  weightDecay?: number;
  /** Clip gradients to this global L2 norm before the update; 0 or absent: no clipping. */
  maxGradNorm?: number;
  /**
   * Keep an f32 master copy of every f16 parameter and update that, writing the parameter back rounded to f16
   * (default true). Without it, updates smaller than half an f16 step of a weight are lost every step.
   */
  masterWeights?: boolean;
}

/** Parameters sharing hyper-parameter overrides (e.g. no weight decay on norms and biases). */
export interface ParamGroup {
  /** Trainable tensors (f32 or f16; state is f32 either way). */
  params: Tensor[];
  /** Overrides {@linkcode AdamWOptions.weightDecay} for this group. */
  weightDecay?: number;
  /** Multiplies the step's learning rate for this group (default 1). */
  lrScale?: number;
}

/** Optimizer state on the CPU, for checkpoints: enough to resume bit-exactly. */
export interface AdamWState {
  /** Parameter names (or `param<i>`), in optimizer order. */
  names: string[];
  /** Per-parameter step counts (parameters without a gradient at some step are skipped, as in PyTorch). */
  steps: number[];
  /** First moments. */
  m: Float32Array[];
  /** Second moments. */
  v: Float32Array[];
  /**
   * f32 master copies of f16 parameters (null for parameters without one). Absent or null for a parameter that
   * has one now (a state written before master weights): it starts again from the parameter's value.
   */
  master?: (Float32Array | null)[];
}

interface Slot {
  param: Tensor;
  m: Tensor;
  v: Tensor;
  /** The f32 master copy of an f16 parameter, or null. */
  master: Tensor | null;
  step: number;
  weightDecay: number;
  lrScale: number;
}

/**
 * Records the global L2 norm of `grads` and the clip factor `min(1, maxNorm / (norm + 1e-6))` (1 when maxNorm
 * <= 0) into `out` (f32 [2]) on the GPU. `scratch` (f32, at least grads.length elements) receives the
 * per-tensor sums of squares.
 */
export function globalGradNormInto(grads: Tensor[], maxNorm: number, scratch: Tensor, out: Tensor): void {
  const rt = out.rt;
  if (scratch.size < Math.max(grads.length, 1)) throw new Error("globalGradNormInto: scratch too small");
  rt.dev.encoder().clearBuffer(scratch.buffer, 0, scratch.paddedByteLength);
  grads.forEach((g, i) => reduceAllInto("sumsq", g, scratch, i));
  const k = gradNormKernel(grads.length, maxNorm);
  rt.dev.dispatch(k.spec, [scratch.binding, out.binding], k.workgroups, k.uniforms);
}

/**
 * AdamW (PyTorch semantics: decoupled weight decay, bias correction) with one fused kernel per parameter, state
 * tensors m and v in f32, f32 master weights for f16 parameters, optional clipping by global gradient norm
 * computed and applied on the GPU.
 */
export class AdamW {
  /** The runtime. */
  readonly rt: Runtime;
  /** Hyper-parameters (the base lr is used when {@linkcode step} gets none). */
  readonly options: Required<AdamWOptions>;
  #slots: Slot[] = [];
  #normScratch: Tensor;
  #norm: Tensor;
  #unitClip: Tensor;

  /** An optimizer over parameters (a flat list, or groups with overrides). */
  constructor(rt: Runtime, params: Tensor[] | ParamGroup[], opts: AdamWOptions) {
    this.rt = rt;
    this.options = {
      lr: opts.lr,
      betas: opts.betas ?? [0.9, 0.999],
      eps: opts.eps ?? 1e-8,
      weightDecay: opts.weightDecay ?? 0.01,
      maxGradNorm: opts.maxGradNorm ?? 0,
      masterWeights: opts.masterWeights ?? true,
    };
    const groups: ParamGroup[] = params.length > 0 && !("params" in params[0])
      ? [{ params: params as Tensor[] }]
      : params as ParamGroup[];
    const seen = new Set<Tensor>();
    for (const g of groups) {
      for (const p of g.params) {
        if (seen.has(p)) throw new Error(`AdamW: parameter ${p} appears twice`);
        seen.add(p);
        if (p.dtype !== "f32" && p.dtype !== "f16") {
          throw new Error(`AdamW: parameter ${p} is not floating point`);
        }
        this.#slots.push({
          param: p,
          m: rt.zeros(p.shape, "f32").keep(),
          v: rt.zeros(p.shape, "f32").keep(),
          master: p.dtype === "f16" && this.options.masterWeights ? rt.noGrad(() => widen(p)).keep() : null,
          step: 0,
          weightDecay: g.weightDecay ?? this.options.weightDecay,
          lrScale: g.lrScale ?? 1,
        });
      }
    }
    this.#normScratch = rt.zeros([Math.max(this.#slots.length, 1)], "f32").keep();
    this.#norm = rt.zeros([2], "f32").keep();
    this.#unitClip = rt.tensor([0, 1], [2], "f32").keep();
  }

  /** The parameters, in optimizer order. */
  get params(): Tensor[] {
    return this.#slots.map((s) => s.param);
  }

  /**
   * Records one update of every parameter that has a gradient, with learning rate `lr` (default: the base lr).
   * Clips by global norm first when `maxGradNorm` is set; the norm is then available from {@linkcode gradNorm}.
   */
  step(lr = this.options.lr): void {
    const rt = this.rt;
    const live = this.#slots.filter((s) => s.param.grad);
    const clip = this.options.maxGradNorm > 0;
    if (clip) this.computeGradNorm();
    const clipBuf = clip ? this.#norm : this.#unitClip;
    const [beta1, beta2] = this.options.betas;
    for (const s of live) {
      const g = s.param.grad!;
      if (g.size !== s.param.size || g.dtype !== s.param.dtype) {
        throw new Error(`AdamW: gradient ${g} does not match parameter ${s.param}`);
      }
      s.step++;
      const k = adamwKernel(s.param.dtype, s.param.size, {
        lr: lr * s.lrScale,
        beta1,
        beta2,
        eps: this.options.eps,
        weightDecay: s.weightDecay,
        step: s.step,
      }, s.master !== null);
      rt.dev.dispatch(
        k.spec,
        [
          s.param.binding,
          g.binding,
          s.m.binding,
          s.v.binding,
          clipBuf.binding,
          ...(s.master ? [s.master.binding] : []),
        ],
        k.workgroups,
        k.uniforms,
      );
    }
  }

  /**
   * Records the global L2 norm of the current gradients (and the clip factor) into {@linkcode gradNorm}'s tensor.
   * {@linkcode step} calls it when clipping; call it yourself to log the norm without clipping.
   */
  computeGradNorm(): void {
    const grads = this.#slots.map((s) => s.param.grad).filter((g): g is Tensor => g !== null);
    globalGradNormInto(grads, this.options.maxGradNorm, this.#normScratch, this.#norm);
  }

  /**
   * f32 [2] tensor: [global gradient norm before clipping, clip factor], as of the last
   * {@linkcode computeGradNorm} (or clipping step). Owned by the optimizer: read it, do not dispose it.
   */
  get gradNorm(): Tensor {
    return this.#norm;
  }

  /**
   * Drops the gradients (PyTorch's `set_to_none`): the next backward writes fresh ones instead of adding, which
   * saves a fill and an add per parameter; the pool hands the same buffers back, so memory stays flat.
   */
  zeroGrad(opts: { setToNone?: boolean } = {}): void {
    for (const s of this.#slots) {
      const g = s.param.grad;
      if (!g) continue;
      if (opts.setToNone ?? true) {
        g.dispose();
        s.param.grad = null;
      } else {
        this.rt.dev.encoder().clearBuffer(g.buffer, 0, g.paddedByteLength);
      }
    }
  }

  /** The GPU state tensors in optimizer order (for checkpoint writers that stream tensors). */
  stateTensors(): { name: string; m: Tensor; v: Tensor; master: Tensor | null; step: number }[] {
    return this.#slots.map((s, i) => ({
      name: s.param.name ?? `param${i}`,
      m: s.m,
      v: s.v,
      master: s.master,
      step: s.step,
    }));
  }

  /** Reads the state to the CPU (one GPU sync). */
  async exportState(): Promise<AdamWState> {
    const range = (t: Tensor) => ({ buffer: t.buffer, offset: 0, size: t.byteLength });
    const masters = this.#slots.filter((s) => s.master);
    const bytes = await this.rt.dev.readMany([
      ...this.#slots.flatMap((s) => [range(s.m), range(s.v)]),
      ...masters.map((s) => range(s.master!)),
    ]);
    let next = 2 * this.#slots.length;
    return {
      names: this.#slots.map((s, i) => s.param.name ?? `param${i}`),
      steps: this.#slots.map((s) => s.step),
      m: this.#slots.map((_, i) => new Float32Array(bytes[2 * i])),
      v: this.#slots.map((_, i) => new Float32Array(bytes[2 * i + 1])),
      master: this.#slots.map((s) => (s.master ? new Float32Array(bytes[next++]) : null)),
    };
  }

  /** Restores state exported by {@linkcode exportState} (same parameters, same order and sizes). */
  importState(state: AdamWState): void {
    if (state.m.length !== this.#slots.length) {
      throw new Error(`AdamW state has ${state.m.length} parameters, the optimizer ${this.#slots.length}`);
    }
    this.#slots.forEach((s, i) => {
      if (state.m[i].length !== s.param.size || state.v[i].length !== s.param.size) {
        throw new Error(
          `AdamW state for ${state.names[i]} has ${state.m[i].length} values, expected ${s.param.size}`,
        );
      }
      this.rt.dev.write(s.m.buffer, 0, state.m[i]);
      this.rt.dev.write(s.v.buffer, 0, state.v[i]);
      s.step = state.steps[i];
      if (!s.master) return;
      const master = state.master?.[i];
      if (master) {
        if (master.length !== s.param.size) {
          throw new Error(
            `AdamW state for ${
              state.names[i]
            } has a master copy of ${master.length} values, expected ${s.param.size}`,
          );
        }
        this.rt.dev.write(s.master.buffer, 0, master);
      } else {
        // no master copy saved: start it again from the parameter, as a new optimizer does
        const rt = this.rt;
        rt.scope(() => rt.noGrad(() => rt.copyInto(s.master!, widen(s.param))));
      }
    });
  }

  /** Releases the state tensors. */
  dispose(): void {
    for (const s of this.#slots) {
      s.m.dispose();
      s.v.dispose();
      s.master?.dispose();
    }
    this.#normScratch.dispose();
    this.#norm.dispose();
    this.#unitClip.dispose();
  }
}

// ---- learning-rate schedules ---------------------------------------------------------------------------------

/** A learning rate per 0-based optimizer step. */
export type LrSchedule = (step: number) => number;

/** Options shared by the schedules. */
export interface ScheduleOptions {
  /** Peak learning rate. */
  lr: number;
  /** Steps of linear warm-up from 0 (default 0). */
  warmupSteps?: number;
  /** Total optimizer steps (the decay ends here). */
  totalSteps: number;
  /** Floor as a fraction of `lr` at the end of the decay (default 0). */
  minRatio?: number;
}

/** Warm-up steps for a warm-up ratio, rounded up as HF's `TrainingArguments.get_warmup_steps` does. */
export function warmupStepsFromRatio(ratio: number, totalSteps: number): number {
  return Math.ceil(ratio * totalSteps);
}

function warmup(step: number, o: ScheduleOptions): number | null {
  const w = o.warmupSteps ?? 0;
  return step < w ? (o.lr * step) / Math.max(1, w) : null;
}

/**
 * Constant learning rate after an optional linear warm-up. Like HF's schedulers, step 0 of a warm-up has lr 0
 * and step `warmupSteps` reaches the peak.
 */
export function constantSchedule(o: { lr: number; warmupSteps?: number }): LrSchedule {
  return (step) => warmup(step, { ...o, totalSteps: 0 }) ?? o.lr;
}

/**
 * Linear warm-up, then cosine decay from `lr` to `minRatio * lr` at `totalSteps` (HF's
 * `get_cosine_with_min_lr_schedule_with_warmup`; with minRatio 0, `get_cosine_schedule_with_warmup`).
 */
export function warmupCosineSchedule(o: ScheduleOptions): LrSchedule {
  const min = o.minRatio ?? 0;
  const w = o.warmupSteps ?? 0;
  return (step) => {
    const up = warmup(step, o);
    if (up !== null) return up;
    const progress = Math.min(1, (step - w) / Math.max(1, o.totalSteps - w));
    return o.lr * (min + (1 - min) * 0.5 * (1 + Math.cos(Math.PI * progress)));
  };
}

/** Linear warm-up, then linear decay to `minRatio * lr` at `totalSteps` (HF's linear schedule when minRatio 0). */
export function linearDecaySchedule(o: ScheduleOptions): LrSchedule {
  const min = o.minRatio ?? 0;
  const w = o.warmupSteps ?? 0;
  return (step) => {
    const up = warmup(step, o);
    if (up !== null) return up;
    const progress = Math.min(1, (step - w) / Math.max(1, o.totalSteps - w));
    return o.lr * (min + (1 - min) * (1 - progress));
  };
}
