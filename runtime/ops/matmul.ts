/**
 * Differentiable matrix products: {@linkcode matmul} (2-D and batched 3-D, transposes as flags, a 2-D operand
 * broadcast over the batch), {@linkcode linear} (`x W^T`, the PyTorch weight layout; GEMV for a few tokens) and
 * {@linkcode matmulInto} (write or accumulate into an existing tensor).
 *
 * Backward passes are matmuls with other transpose flags, so no transpose is materialised. Gradients of leaf
 * operands (weights) are written straight into `leaf.grad`, accumulating when it exists, which saves a
 * weight-sized temporary and an add per backward.
 *
 * Operands larger than one storage binding (`maxStorageBufferBindingSize`, 2 GiB on the H200; e.g. an lm_head
 * output of 8192 x 128256 f32 = 4.2 GB) are processed in blocks bound at aligned offsets: blocks of M rows for
 * `op(A) = A` (the forward of `linear` and its dX), blocks of K with accumulation when A is stored transposed
 * (the weight gradient `dW = dY^T X`). See {@linkcode splitRows}.
 *
 * f16 products run on the GPU's matrix units (`kernels/matmul_subgroup_matrix.ts`) when the device has Dawn's
 * subgroup-matrix feature and the shape qualifies ({@linkcode matmulLaunch} says which); everything else takes
 * the portable register-tiled kernel. `DISTILLERY_SGM=0` forces the portable kernel (for A/B comparisons).
 *
 * @module
 */
import {
  type MatmulConfig,
  matmulKernel,
  type MatmulLayout,
  type MatmulShape,
  pickMatmulConfig,
  splitKSlices,
  splitKSumKernel,
} from "../../kernels/matmul.ts";
import {
  GEMV_MAX_ROWS,
  GEMV_SWIGLU_MAX_ROWS,
  gemvKernel,
  gemvQkvKernel,
  gemvSwigluKernel,
} from "../../kernels/gemv.ts";
import {
  pickSgmConfig,
  type SgmDeviceInfo,
  sgmLaunch,
  sgmSupported,
} from "../../kernels/matmul_subgroup_matrix.ts";
import type { Launch } from "../../kernels/fill.ts";
import { swiglu } from "./elementwise.ts";
import { dtypeBytes } from "../../kernels/kernel.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import type { Runtime } from "../runtime.ts";
import type { BufferSlice } from "../device.ts";
import { readEnv } from "../../util/env.ts";

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** A is stored transposed: [.., K, M]. */
  transA?: boolean;
  /** B is stored transposed: [.., N, K]. */
  transB?: boolean;
  /** Scale of the product (default 1). */
  alpha?: number;
  /** Tile configuration (default: chosen by size). */
  config?: MatmulConfig;
  /** Largest slice bound at once (default: the device's storage binding limit); tests lower it. */
  maxBindingBytes?: number;
}

/** Options of {@linkcode linear}. */
export interface LinearOptions {
  /** Largest slice bound at once (default: the device's storage binding limit); tests lower it. */
  maxBindingBytes?: number;
}

/** One block of a row split: rows `row0 .. row0 + rows - 1` of every tensor. */
export interface RowSplit {
  /** First row. */
  row0: number;
  /** Rows in the block. */
  rows: number;
}

/**
 * Splits `rows` rows of several row-major tensors (row `i` of tensor `t` is `rowBytes[t]` bytes) into blocks
 * whose slices each fit `limit` bytes and start at multiples of `align` bytes in every tensor. Throws when a
 * block of the smallest aligned row count would not fit.
 */
export function splitRows(
  rows: number,
  rowBytes: readonly number[],
  limit: number,
  align: number,
): RowSplit[] {
  let step = 1;
  for (const rb of rowBytes) step = lcm(step, align / gcd(rb, align));
  const widest = Math.max(...rowBytes);
  let per = Math.floor(limit / widest);
  per -= per % step;
  if (per < step) {
    if (rows * widest <= limit) per = rows;
    else {
      throw new Error(
        `matmul: cannot split rows of ${
          rowBytes.join("/")
        } bytes into ${limit}-byte bindings at ${align}-byte ` +
          `aligned offsets (${step} rows per aligned step)`,
      );
    }
  }
  const out: RowSplit[] = [];
  for (let r0 = 0; r0 < rows; r0 += per) out.push({ row0: r0, rows: Math.min(per, rows - r0) });
  return out;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

function lcm(a: number, b: number): number {
  return (a / gcd(a, b)) * b;
}

function bindingLimit(rt: Runtime, maxBindingBytes?: number): number {
  return Math.min(rt.dev.limits.maxStorageBufferBindingSize, maxBindingBytes ?? Infinity);
}

/**
 * Whether a product over `tokens` rows takes a GEMV kernel (of at most `maxRows` rows) instead of the tiled
 * matmul: few tokens, and every operand within one storage binding, since GEMV binds each whole (a larger
 * weight takes the matmul path, which splits it or explains why it cannot). Shared with the fused decode ops
 * (`linear_fused.ts`).
 */
export function takesGemv(
  rt: Runtime,
  tokens: number,
  maxRows: number,
  operandBytes: readonly number[],
  maxBindingBytes?: number,
): boolean {
  return tokens >= 1 && tokens <= Math.min(LINEAR_GEMV_MAX_TOKENS, maxRows) &&
    Math.max(...operandBytes) <= bindingLimit(rt, maxBindingBytes);
}

/** Environment variable that turns the GEMVs' subgroup sums off (`0`), to compare the two on one device. */
export const GEMV_SUBGROUPS_ENV_VAR = "DISTILLERY_GEMV_SUBGROUPS";

let gemvSubgroupsAllowed: boolean | undefined;

/**
 * The GEMV option for the device's subgroups: `{ subgroupSize }` when the device has the `subgroups` feature and
 * a fixed subgroup size (see `GemvOptions.subgroupSize`), else none. Shared with `linear_fused.ts`.
 */
export function gemvDeviceOptions(rt: Runtime): { subgroupSize?: number } {
  gemvSubgroupsAllowed ??= readEnv(GEMV_SUBGROUPS_ENV_VAR) !== "0";
  const { subgroupMinSize: lo, subgroupMaxSize: hi } = rt.dev;
  return gemvSubgroupsAllowed && rt.dev.features.subgroups && lo === hi && lo >= 4
    ? { subgroupSize: lo }
    : {};
}

/** Bytes `row0 .. row0 + rows` of a row-major tensor with `rowElems` elements per row, as a binding. */
function rowSlice(t: Tensor, rowElems: number, row0: number, rows: number): BufferSlice {
  const rb = rowElems * dtypeBytes(t.dtype);
  return { buffer: t.buffer, offset: row0 * rb, size: Math.ceil((rows * rb) / 4) * 4 };
}

/**
 * Most tokens for which {@linkcode linear} uses the GEMV kernel instead of the tiled matmul. A verification pass
 * of K+1 tokens with a tiled matmul ran 9x slower on the H200 than with GEMV (bench/spec.ts: 4 ms at K <= 3, 36
 * ms at K = 4 when this was 4): a 128-row tile for 5 rows leaves the GPU almost idle while W is read anyway.
 */
export const LINEAR_GEMV_MAX_TOKENS = 16;

/** Environment variable that, set to `0`, keeps f16 products off the subgroup-matrix kernel. */
export const SGM_ENV_VAR = "DISTILLERY_SGM";

let sgmAllowed: boolean | undefined;
function sgmEnabled(): boolean {
  sgmAllowed ??= readEnv(SGM_ENV_VAR) !== "0";
  return sgmAllowed;
}

/**
 * Whether f16 work may run on the device's matrix units: the device supports the subgroup-matrix kernels
 * ({@linkcode sgmSupported}) and {@linkcode SGM_ENV_VAR} does not turn them off.
 */
export function useSubgroupMatrices(dev: SgmDeviceInfo): boolean {
  return sgmEnabled() && sgmSupported(dev);
}

/**
 * The dispatch for one product: an explicit `config` always takes the register-tiled kernel; otherwise f16
 * operands take the subgroup-matrix kernel when the device supports it ({@linkcode sgmSupported}) and the shape
 * qualifies ({@linkcode pickSgmConfig}: 2-half aligned contiguous dimensions, strides and offsets, M, N >= 32,
 * K >= 16), and everything else takes the register-tiled kernel with a config chosen by size.
 */
export function matmulLaunch(
  dev: SgmDeviceInfo,
  shape: MatmulShape,
  layout: MatmulLayout,
  config?: MatmulConfig,
): Launch {
  if (!config && layout.dtype === "f16" && useSubgroupMatrices(dev)) {
    const sgmLayout = {
      transA: layout.transA,
      transB: layout.transB,
      out: "f16",
      accumulate: layout.accumulate,
    } as const;
    const sgm = pickSgmConfig(shape, sgmLayout);
    if (sgm) return sgmLaunch(shape, sgmLayout, sgm);
  }
  const shared = dev.limits.maxComputeWorkgroupStorageSize;
  return matmulKernel(shape, layout, config ?? pickMatmulConfig(shape.m, shape.n, shape.batch, shared));
}

/** Geometry of `op(A) op(B)` derived from stored shapes. */
interface Geometry {
  m: number;
  n: number;
  k: number;
  /** Batch size (1 when both operands are 2-D). */
  batch: number;
  aBatched: boolean;
  bBatched: boolean;
  /** Output shape. */
  out: number[];
}

function geometry(a: Tensor, b: Tensor, transA: boolean, transB: boolean, what: string): Geometry {
  const ra = a.shape.length, rb = b.shape.length;
  if ((ra !== 2 && ra !== 3) || (rb !== 2 && rb !== 3)) {
    throw new Error(
      `${what}: operands must be 2-D or 3-D, got ${shapeStr(a.shape)} and ${shapeStr(b.shape)}`,
    );
  }
  if (a.dtype !== b.dtype || (a.dtype !== "f32" && a.dtype !== "f16")) {
    throw new Error(`${what}: operands must both be f32 or both f16, got ${a.dtype} and ${b.dtype}`);
  }
  const [ar, ac] = a.shape.slice(-2), [br, bc] = b.shape.slice(-2);
  const m = transA ? ac : ar, ka = transA ? ar : ac;
  const kb = transB ? bc : br, n = transB ? br : bc;
  if (ka !== kb) {
    throw new Error(
      `${what}: inner dimensions differ: ${shapeStr(a.shape)}${transA ? "^T" : ""} x ${shapeStr(b.shape)}${
        transB ? "^T" : ""
      }`,
    );
  }
  const aBatched = ra === 3, bBatched = rb === 3;
  const batch = aBatched ? a.shape[0] : bBatched ? b.shape[0] : 1;
  if (aBatched && bBatched && a.shape[0] !== b.shape[0]) {
    throw new Error(`${what}: batch sizes differ: ${shapeStr(a.shape)} and ${shapeStr(b.shape)}`);
  }
  return { m, n, k: ka, batch, aBatched, bBatched, out: aBatched || bBatched ? [batch, m, n] : [m, n] };
}

/**
 * Records `C = alpha op(A) op(B)` (or `C += ...`) for stored operands, batched or broadcast. A 3-D A that is
 * not transposed and a 2-D B fold the batch into M (one larger matmul instead of a batch of small ones).
 */
function dispatchMatmul(
  rt: Runtime,
  a: Tensor,
  b: Tensor,
  c: Tensor,
  g: Geometry,
  layout: Omit<MatmulLayout, "dtype">,
  alpha: number,
  config?: MatmulConfig,
  maxBindingBytes?: number,
): void {
  let { m, batch } = g;
  const { n, k } = g;
  let strideA = g.aBatched ? m * k : 0;
  const strideB = g.bBatched ? k * n : 0;
  let strideC = batch > 1 || g.aBatched || g.bBatched ? m * n : 0;
  if (g.aBatched && !g.bBatched && !layout.transA) {
    m *= batch;
    batch = 1;
    strideA = strideC = 0;
  }
  const limit = bindingLimit(rt, maxBindingBytes);
  const fits = (t: Tensor) => t.paddedByteLength <= limit;
  if (fits(a) && fits(b) && fits(c)) {
    if (batch === 1 && layout.transA && !layout.transB && c.dtype === "f32" && !config) {
      const cfg = pickMatmulConfig(m, n, 1, rt.dev.limits.maxComputeWorkgroupStorageSize);
      const slices = splitKSlices(m, n, k, cfg, limit);
      if (slices > 1) return dispatchSplitK(rt, a, b, c, m, n, k, slices, layout.accumulate, alpha, cfg);
    }
    const shape: MatmulShape = { m, n, k, batch, strideA, strideB, strideC, alpha };
    const l = matmulLaunch(rt.dev, shape, { ...layout, dtype: c.dtype }, config);
    rt.dev.dispatch(l.spec, [a.binding, b.binding, c.binding], l.workgroups, l.uniforms);
    return;
  }
  const align = rt.dev.limits.minStorageBufferOffsetAlignment;
  const el = dtypeBytes(c.dtype);
  const too = () =>
    new Error(
      `matmul: ${shapeStr(a.shape)}${layout.transA ? "^T" : ""} x ${shapeStr(b.shape)}${
        layout.transB ? "^T" : ""
      } -> ${
        shapeStr(c.shape)
      } exceeds the ${limit}-byte storage binding limit in a way that cannot be split ` +
        `(supported: 2-D products split along M when A is not transposed, or along K when A is transposed and ` +
        `B is not)`,
    );
  if (batch !== 1) throw too();
  if (!layout.transA) {
    // rows of op(A) = A and of C are contiguous: blocks of M rows, B bound whole
    if (!fits(b)) throw too();
    for (const blk of splitRows(m, [k * el, n * el], limit, align)) {
      const shape: MatmulShape = { m: blk.rows, n, k, batch: 1, strideA: 0, strideB: 0, strideC: 0, alpha };
      const l = matmulLaunch(rt.dev, shape, { ...layout, dtype: c.dtype }, config);
      rt.dev.dispatch(
        l.spec,
        [rowSlice(a, k, blk.row0, blk.rows), b.binding, rowSlice(c, n, blk.row0, blk.rows)],
        l.workgroups,
        l.uniforms,
      );
    }
    return;
  }
  // A stored [K, M] and B [K, N]: rows of both are steps of K, so C (bound whole) accumulates blocks of K
  if (layout.transB || !fits(c)) throw too();
  const blocks = splitRows(k, [m * el, n * el], limit, align);
  blocks.forEach((blk, i) => {
    const shape: MatmulShape = { m, n, k: blk.rows, batch: 1, strideA: 0, strideB: 0, strideC: 0, alpha };
    const l = matmulLaunch(
      rt.dev,
      shape,
      { ...layout, accumulate: layout.accumulate || i > 0, dtype: c.dtype },
      config,
    );
    rt.dev.dispatch(
      l.spec,
      [rowSlice(a, m, blk.row0, blk.rows), rowSlice(b, n, blk.row0, blk.rows), c.binding],
      l.workgroups,
      l.uniforms,
    );
  });
}

/**
 * Records `C (+)= alpha A^T B` for A stored [K, M] and B [K, N] (a weight gradient) as `slices` products over
 * consecutive row blocks of K: the rows of both operands are steps of K, so slice s is the batch entry at
 * element offset s * kSlice * M (and * N) of the same bindings, written to its own f32 partial. The K % slices
 * leftover rows accumulate into the first partial; one more dispatch sums the partials into C.
 */
function dispatchSplitK(
  rt: Runtime,
  a: Tensor,
  b: Tensor,
  c: Tensor,
  m: number,
  n: number,
  k: number,
  slices: number,
  accumulate: boolean,
  alpha: number,
  config: MatmulConfig,
): void {
  const kSlice = Math.floor(k / slices), rest = k - kSlice * slices;
  const parts = rt.empty([slices, m, n], "f32");
  const layout: MatmulLayout = { dtype: "f32", transA: true, transB: false, accumulate: false };
  const sliced: MatmulShape = {
    m,
    n,
    k: kSlice,
    batch: slices,
    strideA: kSlice * m,
    strideB: kSlice * n,
    strideC: m * n,
    alpha,
  };
  const l = matmulKernel(sliced, layout, config);
  rt.dev.dispatch(l.spec, [a.binding, b.binding, parts.binding], l.workgroups, l.uniforms);
  if (rest > 0) {
    const tail: MatmulShape = {
      m,
      n,
      k: rest,
      batch: 1,
      strideA: 0,
      strideB: 0,
      strideC: 0,
      offsetA: slices * kSlice * m,
      offsetB: slices * kSlice * n,
      alpha,
    };
    const t = matmulKernel(tail, { ...layout, accumulate: true }, config);
    rt.dev.dispatch(t.spec, [a.binding, b.binding, parts.binding], t.workgroups, t.uniforms);
  }
  const sum = splitKSumKernel(m * n, slices, accumulate);
  rt.dev.dispatch(sum.spec, [parts.binding, c.binding], sum.workgroups, sum.uniforms);
  parts.dispose();
}

/**
 * Records `C = alpha op(A) op(B)` summed over the batch into a 2-D C: the gradient of an operand that was
 * broadcast over the batch. One accumulating dispatch per batch entry (batches of broadcast products are short).
 */
function dispatchBatchSum(
  rt: Runtime,
  a: Tensor,
  b: Tensor,
  c: Tensor,
  g: Geometry,
  layout: Omit<MatmulLayout, "dtype" | "accumulate">,
  alpha: number,
  accumulate: boolean,
): void {
  const { m, n, k, batch } = g;
  for (let i = 0; i < batch; i++) {
    const shape: MatmulShape = {
      m,
      n,
      k,
      batch: 1,
      strideA: 0,
      strideB: 0,
      strideC: 0,
      offsetA: g.aBatched ? i * m * k : 0,
      offsetB: g.bBatched ? i * k * n : 0,
      alpha,
    };
    const l = matmulLaunch(rt.dev, shape, { ...layout, accumulate: accumulate || i > 0, dtype: c.dtype });
    rt.dev.dispatch(l.spec, [a.binding, b.binding, c.binding], l.workgroups, l.uniforms);
  }
}

/**
 * Computes the gradient of one operand as a product of two tensors, written to a new tensor or straight into
 * the leaf's `grad`. `sumBatch`: the operand was broadcast over the batch, so the batch is summed.
 */
function gradProduct(
  target: Tensor,
  p: Tensor,
  q: Tensor,
  transP: boolean,
  transQ: boolean,
  alpha: number,
  sumBatch: boolean,
  maxBindingBytes?: number,
): Tensor | null {
  const rt = target.rt;
  const g = geometry(p, q, transP, transQ, "matmul backward");
  const leaf = rt.leafGradTarget(target);
  const out = leaf ? leaf.grad : rt.empty(target.shape, target.dtype);
  const accumulate = leaf?.accumulate ?? false;
  if (sumBatch && g.batch > 1) {
    dispatchBatchSum(rt, p, q, out, g, { transA: transP, transB: transQ }, alpha, accumulate);
  } else {
    dispatchMatmul(
      rt,
      p,
      q,
      out,
      g,
      { transA: transP, transB: transQ, accumulate },
      alpha,
      undefined,
      maxBindingBytes,
    );
  }
  return leaf ? null : out;
}

/**
 * `alpha * op(A) op(B)`. A: [M, K] (or [K, M] with `transA`), optionally with a leading batch dimension; B: [K, N]
 * (or [N, K] with `transB`), optionally batched. A 2-D operand is broadcast over the other's batch. f32 or f16
 * (both the same), accumulated in f32. Differentiable in both operands.
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  const rt = a.rt;
  const transA = opts.transA ?? false, transB = opts.transB ?? false, alpha = opts.alpha ?? 1;
  const g = geometry(a, b, transA, transB, "matmul");
  const c = rt.empty(g.out, a.dtype);
  const mb = opts.maxBindingBytes;
  dispatchMatmul(rt, a, b, c, g, { transA, transB, accumulate: false }, alpha, opts.config, mb);
  rt.record("matmul", [a, b], [c], ([dc]) => {
    if (!dc) return [null, null];
    let da: Tensor | null = null, db: Tensor | null = null;
    // Batched gradients keep the batch; a broadcast operand's gradient sums over it.
    const sumA = !g.aBatched && g.bBatched, sumB = !g.bBatched && g.aBatched;
    if (a.requiresGrad) {
      da = transA
        // dA (stored [K, M]) = op(B) dC^T
        ? gradProduct(a, b, dc, transB, true, alpha, sumA, mb)
        // dA ([M, K]) = dC op(B)^T
        : gradProduct(a, dc, b, false, !transB, alpha, sumA, mb);
    }
    if (b.requiresGrad) {
      db = transB
        // dB (stored [N, K]) = dC^T op(A)
        ? gradProduct(b, dc, a, true, transA, alpha, sumB, mb)
        // dB ([K, N]) = op(A)^T dC
        : gradProduct(b, a, dc, !transA, false, alpha, sumB, mb);
    }
    return [da, db];
  });
  return c;
}

/**
 * Writes `alpha op(A) op(B)` into `out` (or adds it, with `accumulate`), without recording on the tape: for
 * hand-written backward passes and in-place accumulation. `out` must have the product's shape.
 */
export function matmulInto(
  out: Tensor,
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions & { accumulate?: boolean } = {},
): void {
  const transA = opts.transA ?? false, transB = opts.transB ?? false;
  const g = geometry(a, b, transA, transB, "matmulInto");
  if (out.size !== g.m * g.n * g.batch || out.dtype !== a.dtype) {
    throw new Error(`matmulInto: output ${out} does not hold the ${a.dtype} product ${shapeStr(g.out)}`);
  }
  dispatchMatmul(
    out.rt,
    a,
    b,
    out,
    g,
    { transA, transB, accumulate: opts.accumulate ?? false },
    opts.alpha ?? 1,
    opts.config,
    opts.maxBindingBytes,
  );
}

/**
 * The linear layer `y = x W^T`: x [..., in], W [out, in] (PyTorch layout), y [..., out]. A few tokens (decode)
 * take the GEMV kernel, which streams W once at memory bandwidth; more take the tiled matmul. The weight
 * gradient `dW = dY^T X` accumulates straight into `W.grad`.
 */
export function linear(x: Tensor, w: Tensor, opts: LinearOptions = {}): Tensor {
  const rt = x.rt;
  if (w.shape.length !== 2 || x.dim(-1) !== w.shape[1] || x.dtype !== w.dtype) {
    throw new Error(`linear: input ${x} does not match weight ${w} (expected [..., ${w.shape[1]}])`);
  }
  const [nOut, nIn] = w.shape;
  const tokens = x.size / nIn;
  const outShape = [...x.shape.slice(0, -1), nOut];
  const y = rt.empty(outShape, x.dtype);
  const mb = opts.maxBindingBytes;
  if (takesGemv(rt, tokens, GEMV_MAX_ROWS, [w.byteLength, x.byteLength, y.byteLength], mb)) {
    const l = gemvKernel(x.dtype, tokens, nOut, nIn, gemvDeviceOptions(rt));
    rt.dev.dispatch(l.spec, [x.binding, w.binding, y.binding], l.workgroups, l.uniforms);
  } else {
    const g: Geometry = { m: tokens, n: nOut, k: nIn, batch: 1, aBatched: false, bBatched: false, out: [] };
    dispatchMatmul(rt, x, w, y, g, { transA: false, transB: true, accumulate: false }, 1, undefined, mb);
  }
  rt.record("linear", [x, w], [y], ([dy]) => {
    if (!dy) return [null, null];
    const dy2 = dy.view([tokens, nOut]);
    let dx: Tensor | null = null, dw: Tensor | null = null;
    if (x.requiresGrad) {
      // dX [T, in] = dY [T, out] W [out, in]
      dx = rt.empty(x.shape, x.dtype);
      dispatchMatmul(
        rt,
        dy2,
        w,
        dx,
        geometry(dy2, w, false, false, "linear backward"),
        {
          transA: false,
          transB: false,
          accumulate: false,
        },
        1,
        undefined,
        mb,
      );
    }
    if (w.requiresGrad) {
      // dW [out, in] = dY^T [out, T] X [T, in]
      const x2 = x.view([tokens, nIn]);
      dw = gradProduct(w, dy2, x2, true, false, 1, false, mb);
      x2.dispose();
    }
    dy2.dispose();
    return [dx, dw];
  });
  return y;
}

/**
 * The first half of a SwiGLU MLP, `silu(x Wg^T) * (x Wu^T)` (x [..., in], Wg and Wu [hidden, in]). A few tokens
 * outside autograd (decoding) take one fused GEMV over both weights; otherwise it is
 * `swiglu(linear(x, Wg), linear(x, Wu))`, differentiable.
 */
export function linearSwiglu(x: Tensor, wGate: Tensor, wUp: Tensor): Tensor {
  const rt = x.rt;
  if (wGate.shape.join() !== wUp.shape.join() || wGate.dtype !== wUp.dtype) {
    throw new Error(`linearSwiglu: gate ${wGate} and up ${wUp} weights differ`);
  }
  const [nOut, nIn] = wGate.shape;
  const tokens = x.size / nIn;
  const bytes = [wGate.byteLength, x.byteLength, tokens * nOut * dtypeBytes(x.dtype)];
  if (
    x.dim(-1) === nIn && x.dtype === wGate.dtype && !rt.needsGrad(x, wGate, wUp) &&
    takesGemv(rt, tokens, GEMV_SWIGLU_MAX_ROWS, bytes)
  ) {
    const y = rt.empty([...x.shape.slice(0, -1), nOut], x.dtype);
    const l = gemvSwigluKernel(x.dtype, tokens, nOut, nIn, gemvDeviceOptions(rt));
    rt.dev.dispatch(l.spec, [x.binding, wGate.binding, wUp.binding, y.binding], l.workgroups, l.uniforms);
    return y;
  }
  return swiglu(linear(x, wGate), linear(x, wUp));
}

/**
 * The attention input projections `x Wq^T`, `x Wk^T`, `x Wv^T` (x [..., in]; Wk and Wv of one shape). A few tokens
 * outside autograd (decoding) take one GEMV dispatch for all three; otherwise three {@linkcode linear} calls.
 */
export function linearQkv(
  x: Tensor,
  wq: Tensor,
  wk: Tensor,
  wv: Tensor,
): { q: Tensor; k: Tensor; v: Tensor } {
  const rt = x.rt;
  const nIn = x.dim(-1);
  const tokens = x.size / nIn;
  const [nq, nkv] = [wq.shape[0], wk.shape[0]];
  const lead = x.shape.slice(0, -1);
  const same = [wq, wk, wv].every((w) => w.shape.length === 2 && w.shape[1] === nIn && w.dtype === x.dtype) &&
    wv.shape[0] === nkv;
  const bytes = [wq.byteLength, wk.byteLength, x.byteLength, tokens * nq * dtypeBytes(x.dtype)];
  if (
    same && rt.dev.limits.maxStorageBuffersPerShaderStage >= 7 && !rt.needsGrad(x, wq, wk, wv) &&
    takesGemv(rt, tokens, GEMV_MAX_ROWS, bytes)
  ) {
    const q = rt.empty([...lead, nq], x.dtype), k = rt.empty([...lead, nkv], x.dtype);
    const v = rt.empty([...lead, nkv], x.dtype);
    const l = gemvQkvKernel(x.dtype, tokens, nq, nkv, nIn, gemvDeviceOptions(rt));
    rt.dev.dispatch(
      l.spec,
      [x.binding, wq.binding, wk.binding, wv.binding, q.binding, k.binding, v.binding],
      l.workgroups,
      l.uniforms,
    );
    return { q, k, v };
  }
  return { q: linear(x, wq), k: linear(x, wk), v: linear(x, wv) };
}
