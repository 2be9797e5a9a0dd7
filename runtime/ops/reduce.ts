/**
 * Reductions as tensor ops, all producing f32 whatever the input type: {@linkcode sum}, {@linkcode mean},
 * {@linkcode sumSquares} and {@linkcode max} over all elements (a [1] tensor), and {@linkcode sumLastDim},
 * {@linkcode meanLastDim}, {@linkcode maxLastDim} over the last dimension. Sums are differentiable; max is for
 * metrics and records no gradient.
 *
 * @module
 */
import { reduceBackwardKernel, type ReduceOp, reducePlan, reduceRowsKernel } from "../../kernels/reduce.ts";
import type { Tensor } from "../tensor.ts";

/**
 * Records the passes of a full reduction of `x` into `out[outOffset]` (f32), scaled by `scale` (not for max).
 * Scratch buffers are released once recorded: the pool reuses them only for work recorded later, which runs
 * after this.
 */
export function reduceAllInto(op: ReduceOp, x: Tensor, out: Tensor, outOffset = 0, scale = 1): void {
  const rt = x.rt;
  if (out.dtype !== "f32" || outOffset >= out.size) {
    throw new Error(`reduce: cannot write element ${outOffset} of ${out}`);
  }
  const { passes, scratch } = reducePlan(op, x.dtype, x.size, outOffset, scale);
  const temps = scratch.map((n) => rt.empty([n], "f32"));
  let src = x;
  for (let i = 0; i < passes.length; i++) {
    const dst = i < temps.length ? temps[i] : out;
    rt.dev.dispatch(passes[i].spec, [src.binding, dst.binding], passes[i].workgroups, passes[i].uniforms);
    src = dst;
  }
  for (const t of temps) t.dispose();
}

function reduceAll(op: ReduceOp, x: Tensor, scale: number): Tensor {
  const rt = x.rt;
  const out = rt.empty([1], "f32");
  reduceAllInto(op, x, out, 0, scale);
  if (op === "max") return out;
  rt.record(op, [x], [out], ([g]) => {
    const gx = rt.empty(x.shape, x.dtype);
    const k = reduceBackwardKernel(op, x.dtype, x.size, x.size, scale);
    rt.dev.dispatch(k.spec, [x.binding, g!.binding, gx.binding], k.workgroups, k.uniforms);
    return [gx];
  });
  return out;
}

function reduceRows(op: ReduceOp, x: Tensor, scale: number): Tensor {
  const rt = x.rt;
  const d = x.dim(-1);
  const rows = x.size / d;
  const out = rt.empty(x.shape.length > 1 ? x.shape.slice(0, -1) : [1], "f32");
  const k = reduceRowsKernel(op, x.dtype, rows, d, scale);
  rt.dev.dispatch(k.spec, [x.binding, out.binding], k.workgroups, k.uniforms);
  if (op === "max") return out;
  rt.record(`${op}LastDim`, [x], [out], ([g]) => {
    const gx = rt.empty(x.shape, x.dtype);
    const b = reduceBackwardKernel(op as "sum", x.dtype, x.size, d, scale);
    rt.dev.dispatch(b.spec, [x.binding, g!.binding, gx.binding], b.workgroups, b.uniforms);
    return [gx];
  });
  return out;
}

/** Sum of all elements (f32 [1]). */
export const sum = (x: Tensor): Tensor => reduceAll("sum", x, 1);
/** Mean of all elements (f32 [1]). */
export const mean = (x: Tensor): Tensor => reduceAll("sum", x, 1 / x.size);
/** Sum of squares of all elements (f32 [1]): squared L2 norm, for gradient norms and square losses. */
export const sumSquares = (x: Tensor): Tensor => reduceAll("sumsq", x, 1);
/** Mean of squares of all elements (f32 [1]): the mean-square loss of a difference. */
export const meanSquares = (x: Tensor): Tensor => reduceAll("sumsq", x, 1 / x.size);
/** Largest element (f32 [1]); not differentiable. NaN inputs give an unspecified result. */
export const max = (x: Tensor): Tensor => reduceAll("max", x, 1);
/** Sum over the last dimension (f32, shape without it). */
export const sumLastDim = (x: Tensor): Tensor => reduceRows("sum", x, 1);
/** Mean over the last dimension (f32, shape without it). */
export const meanLastDim = (x: Tensor): Tensor => reduceRows("sum", x, 1 / x.dim(-1));
/** Largest element of each row of the last dimension (f32); not differentiable. */
export const maxLastDim = (x: Tensor): Tensor => reduceRows("max", x, 1);
