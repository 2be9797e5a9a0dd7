/**
 * Greedy next-token choice for a few long rows of logits, spread over many workgroups: the argmax of each row,
 * lowest index on ties, as `kernels/sample_token.ts` picks it when the temperature is 0.
 *
 * Why: the sampler gives each row one workgroup, which suits its top-k / top-p passes but leaves a batch-1
 * decode step's argmax over a 128,256-entry vocabulary on one of the H200's 132 SMs: 190 us a token, a tenth of
 * the step (measured in the stream, BENCHMARKS.md). Here the row is cut into slices of
 * {@linkcode ARGMAX_SLICE} entries:
 *
 * 1. `argmaxSlices`: workgroup (slice s, row r) finds its slice's maximum and lowest index, as the sampler's
 *    first pass does for a whole row (each thread from its first element, strictly greater replaces; then a tree
 *    that keeps the lower index on ties), and writes the pair to `part[r, s]` (the value's bits and the index).
 * 2. `argmaxMerge`: one workgroup per row merges the row's slice results in slice order with the same rule and
 *    writes the token id.
 *
 * Two dispatches instead of one, for about 5-10 us of GPU time in place of 190.
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Logits per workgroup of {@linkcode argmaxSlices}: 4 per thread at 256 threads. */
export const ARGMAX_SLICE = 1024;
/** Most slices a row may have ({@linkcode argmaxMerge} reduces them with one workgroup): 1M-entry rows. */
export const ARGMAX_MAX_SLICES = 1024;
const WG = 256;

/** Slices of a row of `V` logits. */
export function argmaxSliceCount(V: number): number {
  return ceilDiv(V, ARGMAX_SLICE);
}

// The merge of two (value, index) candidates shared by both kernels: an empty candidate (index 0xffffffff) loses,
// a larger value wins, and on equal values the lower index.
const WGSL_BETTER = `
const NONE: u32 = 0xffffffffu;
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
  return bi == NONE || (i != NONE && (v > bv || (v == bv && i < bi)));
}
var<workgroup> red_v: array<f32, ${WG}>;
var<workgroup> red_i: array<u32, ${WG}>;
// tree over the workgroup's candidates; the winner ends in slot 0
fn merge_tree(lid: u32) {
  for (var stride = ${WG / 2}u; stride > 0u; stride >>= 1u) {
    workgroupBarrier();
    if (lid < stride && better(red_v[lid + stride], red_i[lid + stride], red_v[lid], red_i[lid])) {
      red_v[lid] = red_v[lid + stride];
      red_i[lid] = red_i[lid + stride];
    }
  }
  workgroupBarrier();
}
`;

/**
 * Pass 1: the maximum and its lowest index of every slice of every row of `logits` `[rows, V]`. Bindings:
 * logits (read), part (rw, `vec2<u32>` `[rows, argmaxSliceCount(V)]`: the value's f32 bits and the index, or
 * index 0xffffffff for an empty slice).
 */
export function argmaxSlices(dtype: DType, rows: number, V: number): Launch {
  const S = argmaxSliceCount(V);
  if (!(rows >= 1 && V >= 1 && S <= ARGMAX_MAX_SLICES)) {
    throw new Error(
      `argmaxSlices: expected rows >= 1 and 1 <= V <= ${ARGMAX_MAX_SLICES * ARGMAX_SLICE}, got ${rows}, ${V}`,
    );
  }
  const spec = cachedSpec(`argmax_slices_${dtype}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { V: u32, slices: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> logits: array<${wgslType(dtype)}>;
@group(0) @binding(1) var<storage, read_write> part: array<vec2<u32>>;
@group(0) @binding(2) var<uniform> p: P;
${WGSL_BETTER}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let s = wid.x;
  let r = wid.y;
  let end = min((s + 1u) * ${ARGMAX_SLICE}u, p.V);
  // from the thread's first element (so a row of -inf has an answer), strictly greater replaces
  var bv = 0.0;
  var bi = NONE;
  for (var i = s * ${ARGMAX_SLICE}u + lid; i < end; i += ${WG}u) {
    let x = f32(logits[r * p.V + i]);
    if (bi == NONE || x > bv) {
      bv = x;
      bi = i;
    }
  }
  red_v[lid] = bv;
  red_i[lid] = bi;
  merge_tree(lid);
  if (lid == 0u) { part[r * p.slices + s] = vec2<u32>(bitcast<u32>(red_v[0]), red_i[0]); }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(V).u32(S).buffer, workgroups: [S, rows] };
}

/**
 * Pass 2: each row's token from its slices' candidates. Bindings: part (read, from {@linkcode argmaxSlices}), ids
 * (rw, i32; row r writes `ids[row0 + r]`).
 */
export function argmaxMerge(rows: number, V: number, row0 = 0): Launch {
  const S = argmaxSliceCount(V);
  const spec = cachedSpec("argmax_merge", () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `
struct P { slices: u32, row0: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> part: array<vec2<u32>>;
@group(0) @binding(1) var<storage, read_write> ids: array<i32>;
@group(0) @binding(2) var<uniform> p: P;
${WGSL_BETTER}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let r = wid.x;
  var bv = 0.0;
  var bi = NONE;
  for (var s = lid; s < p.slices; s += ${WG}u) {
    let c = part[r * p.slices + s];
    let v = bitcast<f32>(c.x);
    if (better(v, c.y, bv, bi)) {
      bv = v;
      bi = c.y;
    }
  }
  red_v[lid] = bv;
  red_i[lid] = bi;
  merge_tree(lid);
  if (lid == 0u) { ids[p.row0 + r] = i32(red_i[0]); }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(S).u32(row0).buffer, workgroups: [rows] };
}
