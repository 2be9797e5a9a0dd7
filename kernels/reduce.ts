/**
 * Reductions in f32: over all elements (sum, sum of squares, max; multi-pass for large inputs) and over the last
 * dimension (one workgroup per row), plus the broadcasts that are their backward passes.
 *
 * A full reduction is a chain of passes: the first reads the input with a grid-stride loop over at most
 * {@linkcode REDUCE_MAX_PARTIALS} workgroups and writes one partial per workgroup; a second pass (and, for
 * very large inputs, a third) folds the partials. The partition depends only on the length, and every partial is
 * a fixed shared-memory tree, so the result is deterministic (no atomics). The last pass writes its value at an
 * element offset of the output, which lets the optimizer collect one sum of squares per parameter in one buffer.
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the reduction kernels. */
export const REDUCE_WORKGROUP = 256;
/** Elements each thread reads per grid stride before partials are formed (at least). */
const ITEMS_PER_THREAD = 4;
/** Most workgroups of one pass, hence most partials it writes. */
export const REDUCE_MAX_PARTIALS = 1024;

/** What a reduction computes: the per-element map and how values combine. */
export type ReduceOp = "sum" | "sumsq" | "max";

const MAP: Record<ReduceOp, string> = { sum: "v", sumsq: "v * v", max: "v" };
const COMBINE: Record<ReduceOp, (a: string, b: string) => string> = {
  sum: (a, b) => `${a} + ${b}`,
  sumsq: (a, b) => `${a} + ${b}`,
  max: (a, b) => `max(${a}, ${b})`,
};
// -FLT_MAX (bit pattern 0xff7fffff; a decimal literal may round past the f32 range and Tint rejects it): the
// identity of max for finite inputs (-inf inputs still reduce correctly)
const IDENTITY: Record<ReduceOp, string> = { sum: "0.0", sumsq: "0.0", max: "bitcast<f32>(0xff7fffffu)" };

/** The op that folds partials of `op` (a sum of squares is summed, not squared again). */
export function partialOp(op: ReduceOp): ReduceOp {
  return op === "max" ? "max" : "sum";
}

/** Number of partials the first pass of a full reduction of `n` elements writes. */
export function reducePartials(n: number): number {
  return Math.max(1, Math.min(REDUCE_MAX_PARTIALS, ceilDiv(n, REDUCE_WORKGROUP * ITEMS_PER_THREAD)));
}

const TREE = (op: ReduceOp) => `
  red[lid] = acc;
  for (var s = ${REDUCE_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
    workgroupBarrier();
    if (lid < s) { red[lid] = ${COMBINE[op]("red[lid]", "red[lid + s]")}; }
  }`;

/**
 * One pass of a full reduction: `out[outOffset + wg] = reduce(x[i] for i in wg's grid-stride share)` over
 * `partials` workgroups, each value multiplied by `scale` (use 1 except in a final pass). Bindings: x (read),
 * out (rw, f32).
 */
export function reducePass(
  op: ReduceOp,
  dtype: DType,
  n: number,
  partials: number,
  outOffset = 0,
  scale = 1,
): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`reduce_all_${op}_${dtype}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { n: u32, outOffset: u32, scale: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${REDUCE_WORKGROUP}>;

@compute @workgroup_size(${REDUCE_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  var acc = ${IDENTITY[op]};
  let stride = nwg.x * ${REDUCE_WORKGROUP}u;
  for (var i = wid.x * ${REDUCE_WORKGROUP}u + lid; i < p.n; i += stride) {
    let v = f32(X[i]);
    acc = ${COMBINE[op]("acc", MAP[op])};
  }
  ${TREE(op)}
  if (lid == 0u) { out[p.outOffset + wid.x] = red[0] * ${op === "max" ? "1.0" : "p.scale"}; }
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(outOffset).f32(scale).buffer,
    workgroups: [partials],
  };
}

/**
 * The passes of a full reduction of `n` elements, with the lengths of the scratch buffers they need (f32).
 * Pass i reads the input (i = 0) or scratch i - 1, and writes scratch i, or the final output at `outOffset`.
 */
export function reducePlan(
  op: ReduceOp,
  dtype: DType,
  n: number,
  outOffset = 0,
  scale = 1,
): { passes: Launch[]; scratch: number[] } {
  const passes: Launch[] = [];
  const scratch: number[] = [];
  let len = n, curOp = op, curType = dtype;
  for (;;) {
    const parts = reducePartials(len);
    if (parts === 1) {
      passes.push(reducePass(curOp, curType, len, 1, outOffset, scale));
      return { passes, scratch };
    }
    passes.push(reducePass(curOp, curType, len, parts));
    scratch.push(parts);
    len = parts;
    curOp = partialOp(curOp);
    curType = "f32";
  }
}

/**
 * Reduction over the last dimension: `out[r] = scale * reduce(x[r, :])` for `rows` rows of length `d`, one
 * workgroup per row. Bindings: x (read), out (rw, f32).
 */
export function reduceRowsKernel(op: ReduceOp, dtype: DType, rows: number, d: number, scale = 1): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`reduce_rows_${op}_${dtype}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, d: u32, scale: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${REDUCE_WORKGROUP}>;

@compute @workgroup_size(${REDUCE_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wid.y * nwg.x + wid.x;
  if (row >= p.rows) { return; }  // uniform per workgroup, so the barriers below stay in uniform control flow
  let base = row * p.d;
  var acc = ${IDENTITY[op]};
  for (var j = lid; j < p.d; j += ${REDUCE_WORKGROUP}u) {
    let v = f32(X[base + j]);
    acc = ${COMBINE[op]("acc", MAP[op])};
  }
  ${TREE(op)}
  if (lid == 0u) { out[row] = red[0] * ${op === "max" ? "1.0" : "p.scale"}; }
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(d).f32(scale).buffer,
    workgroups: grid2d(rows),
  };
}

/**
 * Backward of a sum or sum of squares, full (`d` = n: one gradient value) or over rows of length `d`:
 * `gx[i] = scale * g[i / d] * (1 or 2 x[i])`. Bindings: x (read), g (read, f32), gx (rw).
 */
export function reduceBackwardKernel(
  op: "sum" | "sumsq",
  dtype: DType,
  n: number,
  d: number,
  scale = 1,
): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`reduce_bwd_${op}_${dtype}`, () => ({
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { n: u32, d: u32, scale: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read_write> GX: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(${REDUCE_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * ${REDUCE_WORKGROUP}u + lid;
  if (i >= p.n) { return; }
  let g = G[i / p.d] * p.scale;
  GX[i] = ${T}(${op === "sum" ? "g" : "2.0 * f32(X[i]) * g"});
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(d).f32(scale).buffer,
    workgroups: grid2d(ceilDiv(n, REDUCE_WORKGROUP)),
  };
}
