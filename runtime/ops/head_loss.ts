/**
 * The fused, chunked lm_head + distillation loss: `distillLoss(linear(hidden, W), ...)` without ever holding the
 * `[N, V]` logits (8192 x 128256 f32 is 4.2 GB for the student alone, more than one storage binding).
 *
 * Per block of `chunkRows` tokens, in the forward pass:
 * 1. student logits `h_c W^T` (and, without gradients, the teacher's `th_c tW^T` from its final hidden states and
 *    lm_head) into a chunk-sized buffer;
 * 2. the loss kernels of `kernels/cross_entropy.ts`: per-token CE/KL and statistics, then, when gradients are
 *    needed, dlogits written over the chunk's logits, normalised by the GLOBAL weight total
 *    `sum_t mask_t * [label_t != -100]` (computed up front from labels and mask, so every chunk divides by the
 *    same count as the unchunked loss);
 * 3. `dHidden_c = dlogits_c W` and `dW += dlogits_c^T h_c` (skipped when W is frozen, as in stage-1
 *    distillation, or when hidden needs no gradient).
 *
 * Every product goes through `matmulLaunch`, so f16 ones run on the matrix units where the device has them: on
 * the H200 the register-tiled kernel spent 446 of a 1B-shape distill step's 1,162 ms in these products.
 *
 * The gradients are computed for a unit upstream gradient and stashed; the op's backward scales them by the
 * actual upstream scalar (on the GPU: it is never read back) and writes dW straight into `W.grad`.
 * Peak extra memory: two chunks of logits, dHidden `[N, D]`, and a W-sized dW stash when W trains.
 *
 * @module
 */
import {
  distillLossBackward,
  distillLossForward,
  distillLossReduce,
  type LossVariant,
} from "../../kernels/cross_entropy.ts";
import { scaleByScalar, tokenWeightTotal } from "../../kernels/head_loss.ts";
import { dtypeBytes } from "../../kernels/kernel.ts";
import type { MatmulShape } from "../../kernels/matmul.ts";
import { matmulLaunch } from "./matmul.ts";
import type { BufferSlice } from "../device.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import type { DistillLossResult } from "./loss.ts";

/** Options of {@linkcode headLoss}. */
export interface HeadLossOptions {
  /** Target token per row, i32 (-100 = ignored). Required when `alpha` is not 0. */
  labels?: Tensor;
  /** Per-row weights (1 = use, 0 = ignore), f32. Multiplies the label mask. */
  mask?: Tensor;
  /** The teacher's final (normed) hidden states `[N, Dt]`; required when `beta` is not 0. */
  teacherHidden?: Tensor;
  /** The teacher's lm_head weight `[V, Dt]`. */
  teacherW?: Tensor;
  /** Weight of the cross-entropy term (default 1). */
  alpha?: number;
  /** Weight of the KL term (default 0.1 with a teacher, else 0). */
  beta?: number;
  /** Softmax temperature of the KL term (default 1). */
  temperature?: number;
  /**
   * Tokens per chunk (default: as many as keep one chunk of logits within 1 GiB and one storage binding).
   * Larger chunks run larger matmuls; every chunk size gives the same result up to f32 rounding.
   */
  chunkRows?: number;
  /** Largest slice bound at once (default: the device's storage binding limit); tests lower it. */
  maxBindingBytes?: number;
}

// 1 GiB: at 256 MiB (1,024 rows of a 128k vocabulary in f16) dHidden = dlogits W was a 1024 x 2048 product
// with K = 128,256, too few blocks to fill an H200 (69 ms of a 747 ms distill step); 4,096 rows fill it.
const DEFAULT_CHUNK_BYTES = 1024 * 1024 * 1024;

/**
 * The default `chunkRows` for a vocabulary of `V`: a multiple of 128 when that fits (whole 128-row blocks of the
 * matrix-unit matmul, which then skips its bounds checks: 4,160 rows ran the logits products at 130 TFLOP/s
 * on the H200 against 200 for whole blocks), else of 64.
 */
export function defaultHeadLossChunkRows(V: number, elementBytes: number, bindingLimit: number): number {
  const rows = Math.floor(Math.min(DEFAULT_CHUNK_BYTES, bindingLimit) / (V * elementBytes));
  if (rows >= 128) return rows - (rows % 128);
  return rows >= 64 ? rows - (rows % 64) : Math.max(1, rows);
}

/**
 * A row block `[row0, row0 + rows)` of a row-major tensor as a binding plus the element offset of its first
 * row inside that binding: the whole tensor when it fits one binding, else an aligned slice around the block.
 */
function rowBlock(
  t: Tensor,
  rowElems: number,
  row0: number,
  rows: number,
  limit: number,
  align: number,
): { slice: BufferSlice; offset: number } {
  if (t.paddedByteLength <= limit) return { slice: t.binding, offset: row0 * rowElems };
  const el = dtypeBytes(t.dtype);
  const start = row0 * rowElems * el;
  const base = start - (start % align);
  const end = (row0 + rows) * rowElems * el;
  return {
    slice: { buffer: t.buffer, offset: base, size: Math.ceil((end - base) / 4) * 4 },
    offset: (start - base) / el,
  };
}

function dims(t: Tensor, what: string): { N: number; D: number } {
  if (t.shape.length < 2) {
    throw new Error(`headLoss: ${what} must be [N, D] or [B, T, D], got ${shapeStr(t.shape)}`);
  }
  const D = t.shape[t.shape.length - 1];
  return { N: t.size / D, D };
}

/**
 * `alpha * mean(CE(hidden W^T, labels)) + beta * mean(KL(teacher || student))` over tokens, computed in chunks of
 * rows without materialising the logits. `hidden` `[N, D]` (or `[B, T, D]`), `W` `[V, D]` (PyTorch lm_head
 * layout), both f32 or both f16; the teacher's hidden states and lm_head may have another width and dtype.
 * Differentiable in `hidden` and `W` (the teacher gets no gradient). Returns the same tensors as
 * {@linkcode distillLoss}: the scalar loss, per-token CE and KL, and `[loss, meanCE, meanKL, sum of weights]`.
 */
export function headLoss(hidden: Tensor, W: Tensor, opts: HeadLossOptions = {}): DistillLossResult {
  const rt = hidden.rt;
  const { N, D } = dims(hidden, "hidden");
  if (W.shape.length !== 2 || W.shape[1] !== D || W.dtype !== hidden.dtype) {
    throw new Error(
      `headLoss: W must be [V, ${D}] ${hidden.dtype} like hidden ${shapeStr(hidden.shape)}, got ${
        shapeStr(W.shape)
      } ${W.dtype}`,
    );
  }
  if (hidden.dtype !== "f32" && hidden.dtype !== "f16") {
    throw new Error("headLoss: hidden must be f32 or f16");
  }
  const V = W.shape[0];
  const { labels, mask, teacherHidden: th, teacherW: tw } = opts;
  const teacher = !!th;
  const alpha = opts.alpha ?? 1;
  const beta = opts.beta ?? (teacher ? 0.1 : 0);
  const temperature = opts.temperature ?? 1;
  if (alpha !== 0 && !labels) throw new Error("headLoss: alpha != 0 needs labels");
  if (beta !== 0 && !teacher) throw new Error("headLoss: beta != 0 needs teacherHidden and teacherW");
  if (!(temperature > 0)) throw new Error(`headLoss: temperature must be > 0, got ${temperature}`);
  for (const [t, dtype, what] of [[labels, "i32", "labels"], [mask, "f32", "mask"]] as const) {
    if (t && (t.size !== N || t.dtype !== dtype)) {
      throw new Error(
        `headLoss ${what}: expected ${N} ${dtype} values (one per token), got ${
          shapeStr(t.shape)
        } ${t.dtype}`,
      );
    }
  }
  let Dt = 0;
  if (teacher) {
    if (!tw) throw new Error("headLoss: teacherHidden needs teacherW");
    Dt = dims(th, "teacherHidden").D;
    if (
      th.size / Dt !== N || tw.shape.length !== 2 || tw.shape[0] !== V || tw.shape[1] !== Dt ||
      tw.dtype !== th.dtype
    ) {
      throw new Error(
        `headLoss: teacher hidden ${shapeStr(th.shape)} ${th.dtype} and lm_head ${
          shapeStr(tw.shape)
        } ${tw.dtype} ` +
          `do not give [${N}, ${V}] logits`,
      );
    }
    if (th.dtype !== "f32" && th.dtype !== "f16") throw new Error("headLoss: teacher must be f32 or f16");
  }
  const limit = Math.min(rt.dev.limits.maxStorageBufferBindingSize, opts.maxBindingBytes ?? Infinity);
  const align = rt.dev.limits.minStorageBufferOffsetAlignment;
  const el = dtypeBytes(hidden.dtype);
  const tel = teacher ? dtypeBytes(th.dtype) : 0;
  const maxRows = Math.floor(limit / (V * Math.max(el, tel)));
  if (maxRows < 1) {
    throw new Error(`headLoss: one row of ${V} logits exceeds the storage binding limit ${limit}`);
  }
  const chunkRows = Math.min(
    opts.chunkRows ?? defaultHeadLossChunkRows(V, Math.max(el, tel), limit),
    maxRows,
    N,
  );
  if (!(chunkRows >= 1)) throw new Error(`headLoss: chunkRows must be >= 1, got ${opts.chunkRows}`);

  const needX = rt.gradEnabled && hidden.requiresGrad;
  const needW = rt.gradEnabled && W.requiresGrad;
  const grads = needX || needW;
  const variant: LossVariant = { dtype: hidden.dtype, teacherDtype: teacher ? th.dtype : null };
  const ce = rt.empty([N], "f32");
  const kl = teacher ? rt.empty([N], "f32") : null;
  const rowstats = rt.empty([N, 4], "f32");
  const totals = rt.empty([4], "f32");
  // absent labels/mask bind a placeholder the kernels never read (flags say so)
  const placeholder = labels && mask ? null : rt.zeros([1], "f32");
  const lab = labels ?? placeholder!;
  const msk = mask ?? placeholder!;
  const logits = rt.empty([chunkRows, V], hidden.dtype);
  const tlogits = teacher ? rt.empty([chunkRows, V], th.dtype) : null;
  let weight: Tensor | null = null, unit: Tensor | null = null;
  let dHidden: Tensor | null = null, dW: Tensor | null = null;
  if (grads) {
    weight = rt.empty([4], "f32");
    const wt = tokenWeightTotal(N, !!labels, !!mask);
    rt.dev.dispatch(wt.spec, [lab.binding, msk.binding, weight.binding], wt.workgroups, wt.uniforms);
    unit = rt.full([1], 1, "f32");
    if (needX) dHidden = rt.empty(hidden.shape, hidden.dtype);
    if (needW) dW = rt.empty(W.shape, W.dtype);
  }
  const product = (
    a: BufferSlice,
    b: BufferSlice,
    c: BufferSlice,
    shape: MatmulShape,
    transA: boolean,
    transB: boolean,
    accumulate: boolean,
  ) => {
    const l = matmulLaunch(rt.dev, shape, { dtype: hidden.dtype, transA, transB, accumulate });
    rt.dev.dispatch(l.spec, [a, b, c], l.workgroups, l.uniforms);
  };
  const matmulT = (
    dtype: Tensor["dtype"],
    a: BufferSlice,
    offA: number,
    b: Tensor,
    c: Tensor,
    m: number,
    k: number,
  ) => {
    const shape: MatmulShape = { m, n: V, k, batch: 1, strideA: 0, strideB: 0, strideC: 0, offsetA: offA };
    const l = matmulLaunch(rt.dev, shape, { dtype, transA: false, transB: true, accumulate: false });
    rt.dev.dispatch(l.spec, [a, b.binding, c.binding], l.workgroups, l.uniforms);
  };

  for (let r0 = 0, chunk = 0; r0 < N; r0 += chunkRows, chunk++) {
    const n = Math.min(chunkRows, N - r0);
    const h = rowBlock(hidden, D, r0, n, limit, align);
    matmulT(hidden.dtype, h.slice, h.offset, W, logits, n, D);
    if (teacher) {
      const t = rowBlock(th, Dt, r0, n, limit, align);
      matmulT(th.dtype, t.slice, t.offset, tw!, tlogits!, n, Dt);
    }
    const f = distillLossForward(variant, n, r0, V, temperature, !!mask, !!labels);
    rt.dev.dispatch(
      f.spec,
      teacher
        ? [
          logits.binding,
          tlogits!.binding,
          lab.binding,
          msk.binding,
          ce.binding,
          kl!.binding,
          rowstats.binding,
        ]
        : [logits.binding, lab.binding, msk.binding, ce.binding, rowstats.binding],
      f.workgroups,
      f.uniforms,
    );
    if (!grads) continue;
    // dlogits over the chunk's logits, for a unit upstream gradient, divided by the global weight total
    const b = distillLossBackward(variant, n, r0, V, temperature, alpha, beta, !!labels, true);
    const bind: BufferSlice[] = [logits.binding];
    if (teacher) bind.push(tlogits!.binding);
    bind.push(lab.binding, rowstats.binding, weight!.binding, unit!.binding);
    rt.dev.dispatch(b.spec, bind, b.workgroups, b.uniforms);
    if (dHidden) {
      // dHidden[r0 .. r0+n) = dlogits [n, V] W [V, D]
      const dh = rowBlock(dHidden, D, r0, n, limit, align);
      product(
        logits.binding,
        W.binding,
        dh.slice,
        {
          m: n,
          n: D,
          k: V,
          batch: 1,
          strideA: 0,
          strideB: 0,
          strideC: 0,
          offsetC: dh.offset,
        },
        false,
        false,
        false,
      );
    }
    if (dW) {
      // dW [V, D] (+)= dlogits^T [V, n] h_c [n, D]
      product(
        logits.binding,
        h.slice,
        dW.binding,
        {
          m: V,
          n: D,
          k: n,
          batch: 1,
          strideA: 0,
          strideB: 0,
          strideC: 0,
          offsetB: h.offset,
        },
        true,
        false,
        chunk > 0,
      );
    }
  }
  const red = distillLossReduce(N, alpha, beta, teacher);
  rt.dev.dispatch(
    red.spec,
    [ce.binding, (kl ?? ce).binding, rowstats.binding, totals.binding],
    red.workgroups,
    red.uniforms,
  );
  const lossT = rt.empty([1], "f32");
  rt.dev.copyBuffer(totals.buffer, 0, lossT.buffer, 0, 4);
  logits.dispose();
  tlogits?.dispose();
  placeholder?.dispose();
  weight?.dispose();
  unit?.dispose();
  rowstats.dispose();
  if (!grads) return { loss: lossT, ce, kl, totals };
  // the stashes live in the caller's scope (backward runs inside it) and are released as soon as they are used
  rt.record("headLoss", [hidden, W], [lossT], ([g]) => {
    if (!g) return [null, null];
    let gx: Tensor | null = null;
    if (dHidden) {
      gx = rt.empty(hidden.shape, hidden.dtype);
      const s = scaleByScalar(hidden.dtype, hidden.size, false);
      rt.dev.dispatch(s.spec, [g.binding, dHidden.binding, gx.binding], s.workgroups, s.uniforms);
      dHidden.dispose();
    }
    let gw: Tensor | null = null;
    if (dW) {
      // written straight into W.grad when W is a leaf (a parameter), saving a W-sized copy
      const leaf = rt.leafGradTarget(W);
      const target = leaf ? leaf.grad : (gw = rt.empty(W.shape, W.dtype));
      const s = scaleByScalar(W.dtype, W.size, leaf?.accumulate ?? false);
      rt.dev.dispatch(s.spec, [g.binding, dW.binding, target.binding], s.workgroups, s.uniforms);
      dW.dispose();
    }
    return [gx, gw];
  });
  return { loss: lossT, ce, kl, totals };
}
