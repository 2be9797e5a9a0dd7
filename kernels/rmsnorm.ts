/**
 * RMSNorm with HF Llama semantics, over the last dimension d:
 * `y = w * T(x / sqrt(mean(x^2) + eps))`, computed in f32; T is the storage type, to which HF casts the
 * normalised value before the weight multiplies it (a no-op for f32).
 *
 * Forward: one workgroup per row; the row's sum of squares meets in a shared-memory tree; the reciprocal RMS
 * (`rstd`, f32 per row) is saved for the backward pass.
 *
 * Backward, with r = rstd and s = sum_j w_j g_j x_j over the row:
 *   dx_j = r w_j g_j - x_j r^3 s / d       (one workgroup per row, like the forward)
 *   dw_j = sum_rows g_j x_j r              (no atomics: each workgroup sums a chunk of rows for 256 columns into
 *                                            a partial row, then a second kernel adds the partials in order)
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the RMSNorm kernels. */
export const RMSNORM_WORKGROUP = 256;
/** Rows one workgroup of the weight-gradient pass sums into one partial. */
export const RMSNORM_ROWS_PER_PARTIAL = 64;

const WG = RMSNORM_WORKGROUP;

// A shared-memory sum of `red` (the caller stores its partial first); leaves the total in red[0].
const TREE_SUM = `
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    workgroupBarrier();
    if (lid < s) { red[lid] += red[lid + s]; }
  }
  workgroupBarrier();`;

const ROW_ENTRY = `@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wid.y * nwg.x + wid.x;
  if (row >= p.rows) { return; }  // workgroup-uniform: the barriers below stay in uniform control flow
  let base = row * p.d;`;

/** Forward. Bindings: x (read), w (read), y (rw), rstd (rw, f32 [rows]). */
export function rmsNormForward(dtype: DType, rows: number, d: number, eps: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`rmsnorm_fwd_${dtype}`, () => ({
    bindings: ["read", "read", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, d: u32, eps: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read> W: array<${T}>;
@group(0) @binding(2) var<storage, read_write> Y: array<${T}>;
@group(0) @binding(3) var<storage, read_write> RSTD: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;

${ROW_ENTRY}
  var acc = 0.0;
  for (var j = lid; j < p.d; j += ${WG}u) { let v = f32(X[base + j]); acc += v * v; }
  red[lid] = acc;
  ${TREE_SUM}
  let r = inverseSqrt(red[0] / f32(p.d) + p.eps);
  if (lid == 0u) { RSTD[row] = r; }
  for (var j = lid; j < p.d; j += ${WG}u) {
    Y[base + j] = ${T}(f32(W[j]) * f32(${T}(f32(X[base + j]) * r)));
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(d).f32(eps).buffer, workgroups: grid2d(rows) };
}

/**
 * Fused residual add + RMSNorm, the pre-norm pattern of a decoder layer: `h = T(x + r)` (rounded to the storage
 * type, as HF's residual add in that type), `y = rmsNorm(h)`, in one pass over the row. Bindings: x, r, w (read),
 * h (rw), y (rw), rstd (rw, f32 [rows]).
 */
export function addRmsNormForward(dtype: DType, rows: number, d: number, eps: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`add_rmsnorm_fwd_${dtype}`, () => ({
    bindings: ["read", "read", "read", "rw", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, d: u32, eps: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read> R: array<${T}>;
@group(0) @binding(2) var<storage, read> W: array<${T}>;
@group(0) @binding(3) var<storage, read_write> H: array<${T}>;
@group(0) @binding(4) var<storage, read_write> Y: array<${T}>;
@group(0) @binding(5) var<storage, read_write> RSTD: array<f32>;
@group(0) @binding(6) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;

${ROW_ENTRY}
  var acc = 0.0;
  for (var j = lid; j < p.d; j += ${WG}u) {
    let h = ${T}(f32(X[base + j]) + f32(R[base + j]));
    H[base + j] = h;
    let v = f32(h);
    acc += v * v;
  }
  red[lid] = acc;
  ${TREE_SUM}
  let r = inverseSqrt(red[0] / f32(p.d) + p.eps);
  if (lid == 0u) { RSTD[row] = r; }
  // each thread reads back only the elements of H it wrote itself: no barrier needed
  for (var j = lid; j < p.d; j += ${WG}u) {
    Y[base + j] = ${T}(f32(W[j]) * f32(${T}(f32(H[base + j]) * r)));
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(d).f32(eps).buffer, workgroups: grid2d(rows) };
}

/**
 * Input gradient. Bindings: x, w, g (read), rstd (read, f32), [gAdd (read),] gx (rw). With `addGrad`, `gAdd` is
 * added to the result: the gradient that reaches the residual stream directly in {@linkcode addRmsNormForward}.
 */
export function rmsNormBackwardInput(dtype: DType, rows: number, d: number, addGrad = false): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`rmsnorm_bwd_x_${dtype}${addGrad ? "_add" : ""}`, () => ({
    bindings: addGrad
      ? ["read", "read", "read", "read", "read", "rw"]
      : ["read", "read", "read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, d: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read> W: array<${T}>;
@group(0) @binding(2) var<storage, read> G: array<${T}>;
@group(0) @binding(3) var<storage, read> RSTD: array<f32>;
${
      addGrad
        ? `@group(0) @binding(4) var<storage, read> GADD: array<${T}>;
@group(0) @binding(5) var<storage, read_write> GX: array<${T}>;
@group(0) @binding(6) var<uniform> p: P;`
        : `@group(0) @binding(4) var<storage, read_write> GX: array<${T}>;
@group(0) @binding(5) var<uniform> p: P;`
    }
var<workgroup> red: array<f32, ${WG}>;

${ROW_ENTRY}
  var acc = 0.0;
  for (var j = lid; j < p.d; j += ${WG}u) { acc += f32(W[j]) * f32(G[base + j]) * f32(X[base + j]); }
  red[lid] = acc;
  ${TREE_SUM}
  let r = RSTD[row];
  let c = r * r * r * red[0] / f32(p.d);
  for (var j = lid; j < p.d; j += ${WG}u) {
    GX[base + j] = ${T}(r * f32(W[j]) * f32(G[base + j]) - f32(X[base + j]) * c${
      addGrad ? " + f32(GADD[base + j])" : ""
    });
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(d).buffer, workgroups: grid2d(rows) };
}

/** Number of partial rows of the weight gradient. */
export function rmsNormPartials(rows: number): number {
  return Math.max(1, ceilDiv(rows, RMSNORM_ROWS_PER_PARTIAL));
}

/**
 * Weight gradient, first pass: `partial[c, j] = sum over rows r of chunk c of g[r, j] x[r, j] rstd[r]`.
 * Bindings: x, g (read), rstd (read, f32), partial (rw, f32 [partials, d]).
 */
export function rmsNormBackwardWeightPartial(dtype: DType, rows: number, d: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`rmsnorm_bwd_wpart_${dtype}`, () => ({
    bindings: ["read", "read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, d: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
@group(0) @binding(1) var<storage, read> G: array<${T}>;
@group(0) @binding(2) var<storage, read> RSTD: array<f32>;
@group(0) @binding(3) var<storage, read_write> PART: array<f32>;
@group(0) @binding(4) var<uniform> p: P;

// x: a block of ${WG} columns (consecutive threads read consecutive columns of a row); y: a chunk of rows
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let j = wid.x * ${WG}u + lid;
  if (j >= p.d) { return; }
  let r0 = wid.y * ${RMSNORM_ROWS_PER_PARTIAL}u;
  let r1 = min(r0 + ${RMSNORM_ROWS_PER_PARTIAL}u, p.rows);
  var acc = 0.0;
  for (var r = r0; r < r1; r++) { acc += f32(G[r * p.d + j]) * f32(X[r * p.d + j]) * RSTD[r]; }
  PART[wid.y * p.d + j] = acc;
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(d).buffer,
    workgroups: [ceilDiv(d, WG), rmsNormPartials(rows)],
  };
}

/**
 * Weight gradient, second pass: `gw[j] (+)= sum_c partial[c, j]` in order. Bindings: partial (read, f32),
 * gw (rw).
 */
export function rmsNormBackwardWeightSum(
  dtype: DType,
  partials: number,
  d: number,
  accumulate: boolean,
): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`rmsnorm_bwd_wsum_${dtype}${accumulate ? "_acc" : ""}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { partials: u32, d: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> PART: array<f32>;
@group(0) @binding(1) var<storage, read_write> GW: array<${T}>;
@group(0) @binding(2) var<uniform> p: P;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let j = wid.x * ${WG}u + lid;
  if (j >= p.d) { return; }
  var acc = 0.0;
  for (var c = 0u; c < p.partials; c++) { acc += PART[c * p.d + j]; }
  GW[j] = ${T}(${accumulate ? "f32(GW[j]) + " : ""}acc);
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(partials).u32(d).buffer, workgroups: [ceilDiv(d, WG)] };
}
