/**
 * Losses over the vocabulary: the fused distillation loss (cross-entropy + KL to a teacher at a temperature),
 * per-token log-probabilities and their masked sums (DPO, evaluation), and greedy argmax.
 *
 * Layouts: logits `[N, V]` or `[B, T, V]` (rows = tokens), f32 or f16; labels / targets i32 with one entry per
 * row (`-100` = ignored); masks f32 with one entry per row. Conventions are documented in
 * `kernels/cross_entropy.ts` (KL = tau^2 * KL(softmax(t/tau) || softmax(s/tau)) per token, means over tokens
 * weighted by mask * [label != -100]).
 *
 * Logits larger than one storage binding (e.g. 8192 x 128256 f32 = 4.2 GB) are processed in row blocks bound at
 * aligned offsets.
 *
 * @module
 */
import {
  distillLossBackward,
  distillLossForward,
  distillLossReduce,
  type LossVariant,
} from "../../kernels/cross_entropy.ts";
import {
  argmaxRows,
  maskedRowSum,
  maskedRowSumBackward,
  tokenLogprobBackward,
  tokenLogprobForward,
} from "../../kernels/logprobs.ts";
import { dtypeBytes } from "../../kernels/kernel.ts";
import type { BufferSlice } from "../device.ts";
import type { Runtime } from "../runtime.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Options of {@linkcode distillLoss}. */
export interface DistillLossOptions {
  /** Target token per row, i32 (-100 = ignored). Required when `alpha` is not 0. */
  labels?: Tensor;
  /** Per-row weights (1 = use, 0 = ignore), f32. Multiplies the label mask. */
  mask?: Tensor;
  /** Teacher logits, same rows and vocabulary as the student. Required when `beta` is not 0. */
  teacher?: Tensor;
  /** Weight of the cross-entropy term (default 1). */
  alpha?: number;
  /** Weight of the KL term (default 0.1 with a teacher, else 0). */
  beta?: number;
  /** Softmax temperature of the KL term (default 1). */
  temperature?: number;
  /**
   * Write dlogits into the logits buffer during backward (saves one [N, V] buffer). The logits tensor then holds
   * gradients, not logits, after `backward`; only use when nothing reads the logits afterwards.
   */
  inPlaceGrad?: boolean;
  /** Largest logits slice bound at once (default: the device's storage binding limit); tests lower it. */
  maxBindingBytes?: number;
}

/** Result of {@linkcode distillLoss}. */
export interface DistillLossResult {
  /** `alpha * mean(CE) + beta * mean(KL)`, shape [1]; the only differentiable output. */
  loss: Tensor;
  /** Per-token cross-entropy `[N]` (0 at ignored tokens). */
  ce: Tensor;
  /** Per-token tau^2-scaled KL `[N]` (0 at ignored tokens), or null without a teacher. */
  kl: Tensor | null;
  /** `[loss, meanCE, meanKL, sum of token weights]` (one read gives every logged metric). */
  totals: Tensor;
}

/** One block of rows, with the binding of each tensor's slice. */
export interface RowBlock {
  /** First row. */
  row0: number;
  /** Rows in the block. */
  rows: number;
  /** The block's slice of each tensor, in the order given. */
  slices: BufferSlice[];
}

/**
 * Splits rows of `[rows, V]` tensors into blocks whose slices each fit one storage binding and start at aligned
 * offsets (the same rows for every tensor, whatever their dtypes).
 */
export function rowBlocks(
  rt: Runtime,
  tensors: Tensor[],
  rows: number,
  V: number,
  maxBindingBytes?: number,
): RowBlock[] {
  const limit = Math.min(rt.dev.limits.maxStorageBufferBindingSize, maxBindingBytes ?? Infinity);
  const align = rt.dev.limits.minStorageBufferOffsetAlignment;
  const rowBytes = tensors.map((t) => V * dtypeBytes(t.dtype));
  // rows per aligned offset step, common to all tensors
  let step = 1;
  for (const rb of rowBytes) step = lcm(step, align / gcd(rb, align));
  let per = Math.floor(limit / Math.max(...rowBytes));
  per = per - (per % step);
  if (per < step) {
    if (rows > step) throw new Error(`loss: ${step} rows x ${V} exceed the storage binding limit ${limit}`);
    per = step;
  }
  const out: RowBlock[] = [];
  for (let r0 = 0; r0 < rows; r0 += per) {
    const n = Math.min(per, rows - r0);
    out.push({
      row0: r0,
      rows: n,
      slices: tensors.map((t, i) => ({
        buffer: t.buffer,
        offset: r0 * rowBytes[i],
        size: Math.ceil((n * rowBytes[i]) / 4) * 4,
      })),
    });
  }
  return out;
}

function lcm(a: number, b: number): number {
  return (a / gcd(a, b)) * b;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

function rowsOf(logits: Tensor, what: string): { N: number; V: number } {
  if (logits.shape.length < 2) {
    throw new Error(`${what}: logits must be [N, V] or [B, T, V], got ${shapeStr(logits.shape)}`);
  }
  if (logits.dtype !== "f32" && logits.dtype !== "f16") throw new Error(`${what}: logits must be f32 or f16`);
  const V = logits.shape[logits.shape.length - 1];
  return { N: logits.size / V, V };
}

function checkPerRow(t: Tensor | undefined, N: number, dtype: string, what: string): void {
  if (t && (t.size !== N || t.dtype !== dtype)) {
    throw new Error(
      `${what}: expected ${N} ${dtype} values (one per logits row), got ${shapeStr(t.shape)} ${t.dtype}`,
    );
  }
}

/**
 * The fused distillation loss `alpha * CE + beta * KL` over rows of logits, computed in one streaming pass over
 * the vocabulary (plus one more in backward), with no probability tensor. Differentiable in `logits` only.
 */
export function distillLoss(logits: Tensor, opts: DistillLossOptions = {}): DistillLossResult {
  const rt = logits.rt;
  const { N, V } = rowsOf(logits, "distillLoss");
  const { labels, mask, teacher } = opts;
  const alpha = opts.alpha ?? 1;
  const beta = opts.beta ?? (teacher ? 0.1 : 0);
  const temperature = opts.temperature ?? 1;
  if (alpha !== 0 && !labels) throw new Error("distillLoss: alpha != 0 needs labels");
  if (beta !== 0 && !teacher) throw new Error("distillLoss: beta != 0 needs teacher logits");
  if (!(temperature > 0)) throw new Error(`distillLoss: temperature must be > 0, got ${temperature}`);
  checkPerRow(labels, N, "i32", "distillLoss labels");
  checkPerRow(mask, N, "f32", "distillLoss mask");
  if (teacher && teacher.size !== logits.size) {
    throw new Error(
      `distillLoss: teacher logits ${shapeStr(teacher.shape)} do not match student ${shapeStr(logits.shape)}`,
    );
  }
  const variant: LossVariant = { dtype: logits.dtype, teacherDtype: teacher ? teacher.dtype : null };
  const ce = rt.empty([N], "f32");
  const kl = teacher ? rt.empty([N], "f32") : null;
  const rowstats = rt.empty([N, 4], "f32");
  const totals = rt.empty([4], "f32");
  // absent labels/mask bind a placeholder the kernel never reads (flags say so); it must not alias a buffer
  // the same dispatch writes, which WebGPU rejects
  const placeholder = labels && mask ? null : rt.empty([1], "f32");
  const lab = labels ?? placeholder!;
  const msk = mask ?? placeholder!;
  const inPlace = !!opts.inPlaceGrad;
  // dlogits (when not in place) takes the logits' dtype, so one partition serves forward and backward
  const blocks = rowBlocks(rt, teacher ? [logits, teacher] : [logits], N, V, opts.maxBindingBytes);
  for (const blk of blocks) {
    const f = distillLossForward(variant, blk.rows, blk.row0, V, temperature, !!mask, !!labels);
    const bind = teacher
      ? [blk.slices[0], blk.slices[1], lab.binding, msk.binding, ce.binding, kl!.binding, rowstats.binding]
      : [blk.slices[0], lab.binding, msk.binding, ce.binding, rowstats.binding];
    rt.dev.dispatch(f.spec, bind, f.workgroups, f.uniforms);
  }
  const red = distillLossReduce(N, alpha, beta, !!teacher);
  rt.dev.dispatch(
    red.spec,
    [ce.binding, (kl ?? ce).binding, rowstats.binding, totals.binding],
    red.workgroups,
    red.uniforms,
  );
  // the loss is totals[0], exposed as its own [1] tensor so autograd sees a scalar output
  const lossT = rt.empty([1], "f32");
  rt.dev.copyBuffer(totals.buffer, 0, lossT.buffer, 0, 4);
  rt.record("distillLoss", [logits], [lossT], ([g]) => {
    if (!g) return [null];
    const dl = inPlace ? logits : rt.empty(logits.shape, logits.dtype);
    for (const blk of blocks) {
      const b = distillLossBackward(
        variant,
        blk.rows,
        blk.row0,
        V,
        temperature,
        alpha,
        beta,
        !!labels,
        inPlace,
      );
      const bind: BufferSlice[] = [blk.slices[0]];
      if (teacher) bind.push(blk.slices[1]);
      bind.push(lab.binding, rowstats.binding, totals.binding, g.binding);
      // same dtype and rows as the logits: the logits' slice offsets apply to dl's buffer
      if (!inPlace) bind.push({ ...blk.slices[0], buffer: dl.buffer });
      rt.dev.dispatch(b.spec, bind, b.workgroups, b.uniforms);
    }
    return [inPlace ? dl.view(logits.shape) : dl];
  });
  return { loss: lossT, ce, kl, totals };
}

/** Cross-entropy only: mean over non-ignored tokens (label -100 or mask 0), differentiable in logits. */
export function crossEntropy(logits: Tensor, labels: Tensor, mask?: Tensor): DistillLossResult {
  return distillLoss(logits, { labels, mask, alpha: 1, beta: 0 });
}

/**
 * `logprob[t] = log_softmax(logits[t])[target[t]]`, 0 where the target is -100. Output shape: logits' shape
 * without the vocabulary dimension, f32. Differentiable in logits.
 */
export function tokenLogprobs(
  logits: Tensor,
  targets: Tensor,
  opts: { maxBindingBytes?: number } = {},
): Tensor {
  const rt = logits.rt;
  const { N, V } = rowsOf(logits, "tokenLogprobs");
  checkPerRow(targets, N, "i32", "tokenLogprobs targets");
  const lp = rt.empty(logits.shape.slice(0, -1), "f32");
  const lse = rt.empty([N], "f32");
  const blocks = rowBlocks(rt, [logits], N, V, opts.maxBindingBytes);
  for (const blk of blocks) {
    const f = tokenLogprobForward(logits.dtype, blk.rows, blk.row0, V);
    rt.dev.dispatch(
      f.spec,
      [blk.slices[0], targets.binding, lp.binding, lse.binding],
      f.workgroups,
      f.uniforms,
    );
  }
  rt.record("tokenLogprobs", [logits, targets], [lp], ([g]) => {
    if (!g) return [null, null];
    const dl = rt.empty(logits.shape, logits.dtype);
    for (const blk of blocks) {
      const b = tokenLogprobBackward(logits.dtype, blk.rows, blk.row0, V);
      rt.dev.dispatch(
        b.spec,
        [blk.slices[0], targets.binding, lse.binding, g.binding, { ...blk.slices[0], buffer: dl.buffer }],
        b.workgroups,
        b.uniforms,
      );
    }
    return [dl, null];
  });
  return lp;
}

/** `out[b] = sum_t mask[b, t] * x[b, t]` for x, mask `[B, L]` f32 (masked-out x may be anything). Differentiable in x. */
export function maskedSum(x: Tensor, mask: Tensor): Tensor {
  const rt = x.rt;
  if (
    x.shape.length !== 2 || mask.shape.join() !== x.shape.join() || x.dtype !== "f32" || mask.dtype !== "f32"
  ) {
    throw new Error(
      `maskedSum: x and mask must both be [B, L] f32, got ${shapeStr(x.shape)}, ${shapeStr(mask.shape)}`,
    );
  }
  const [B, L] = x.shape;
  const out = rt.empty([B], "f32");
  const f = maskedRowSum(B, L);
  rt.dev.dispatch(f.spec, [x.binding, mask.binding, out.binding], f.workgroups, f.uniforms);
  rt.record("maskedSum", [x, mask], [out], ([g]) => {
    if (!g) return [null, null];
    const gx = rt.empty(x.shape, "f32");
    const b = maskedRowSumBackward(B, L);
    rt.dev.dispatch(b.spec, [mask.binding, g.binding, gx.binding], b.workgroups, b.uniforms);
    return [gx, null];
  });
  return out;
}

/**
 * Summed log-probability of the masked (completion) tokens of each sequence: logits `[B, T, V]`, targets i32
 * `[B, T]`, mask f32 `[B, T]` -> `[B]`. This is DPO's `logp(completion | prompt)`. Differentiable in logits.
 */
export function sequenceLogprobs(logits: Tensor, targets: Tensor, mask: Tensor): Tensor {
  if (logits.shape.length !== 3) {
    throw new Error(`sequenceLogprobs: logits must be [B, T, V], got ${shapeStr(logits.shape)}`);
  }
  return maskedSum(tokenLogprobs(logits, targets), mask);
}

/** Greedy argmax per row (lowest index on ties) and the top-1 minus top-2 logit margin. Not differentiable. */
export function greedyArgmax(
  logits: Tensor,
  opts: { maxBindingBytes?: number } = {},
): { ids: Tensor; margin: Tensor } {
  const rt = logits.rt;
  const { N, V } = rowsOf(logits, "greedyArgmax");
  const shape = logits.shape.slice(0, -1);
  const ids = rt.empty(shape, "i32");
  const margin = rt.empty(shape, "f32");
  for (const blk of rowBlocks(rt, [logits], N, V, opts.maxBindingBytes)) {
    const a = argmaxRows(logits.dtype, blk.rows, blk.row0, V);
    rt.dev.dispatch(a.spec, [blk.slices[0], ids.binding, margin.binding], a.workgroups, a.uniforms);
  }
  return { ids, margin };
}
