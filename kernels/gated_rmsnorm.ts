/**
 * Gated grouped RMSNorm (Mamba2's output norm), forward and backward side by side:
 *
 *     g = y * SiLU(z);   per group of `group` consecutive channels:  out = g / sqrt(mean(g^2) + eps) * weight
 *
 * (gate first, then norm: mamba_ssm's `norm_before_gate=False`; eps is 1e-5 there, independent of the model's
 * `rms_norm_eps`, and the group is head_dim). Rows are `[..., D]` with D a multiple of `group`.
 *
 * Parallel layout: a "unit" is one (row, group): the `group` elements at flat offset unit * group, loaded as vec4
 * when the group size allows. A unit is reduced by `lanes` threads (a power of two up to 64) that stride over
 * its elements, so adjacent threads touch adjacent elements; a 256-thread workgroup holds 256 / lanes units and reduces each with a tree in workgroup
 * memory. The weight grad sums over rows in two fixed-order stages (row blocks, then blocks): deterministic.
 * All math is f32 whatever the storage type.
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Default epsilon of the gated norm, as hard-coded in the reference. */
export const GATED_RMSNORM_EPS = 1e-5;

/** Threads per workgroup of the unit kernels. */
const WG = 256;

/** Shape of a gated grouped RMSNorm. */
export interface GatedRmsNormShape {
  /** Number of rows (product of the leading dimensions). */
  rows: number;
  /** Channels per row. */
  dim: number;
  /** Channels per normalised group (head_dim); divides `dim`. */
  group: number;
}

/** Threads that reduce one group: the next power of two of `group`, at most 64. */
export function gatedNormLanes(group: number): number {
  let l = 1;
  while (l < group && l < 64) l *= 2;
  return l;
}

/**
 * Channels per load: 4 (vec4 loads and stores) when the group size is a multiple of 4, as head_dim always is in
 * practice, else 1. Groups then hold group / 4 vectors and the lanes stride over vectors.
 */
export function gatedNormVectorWidth(group: number): 1 | 4 {
  return group % 4 === 0 ? 4 : 1;
}

// WGSL types and helpers for V channels per element: VS storage, VF f32 math, dotv a per-element dot product
function vectorPieces(T: string, V: 1 | 4): { VS: string; VF: string; defs: string } {
  const VF = V === 1 ? "f32" : "vec4<f32>";
  return {
    VS: V === 1 ? T : `vec4<${T}>`,
    VF,
    defs: `
alias VF = ${VF};
fn sigmoid(x: VF) -> VF { return 1.0 / (1.0 + exp(-x)); }
fn silu_grad(x: VF) -> VF { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }
fn dotv(a: VF, b: VF) -> f32 { return ${V === 1 ? "a * b" : "dot(a, b)"}; }`,
  };
}

// Sizes in vectors (DV, GV) for indexing, and the group size G in channels for the mean.
const UNIFORMS = `struct P { units: u32, DV: u32, GV: u32, eps: f32, G: u32, _a: u32, _b: u32, _c: u32 }`;

function unitUniforms(shape: GatedRmsNormShape, eps: number): ArrayBuffer {
  const V = gatedNormVectorWidth(shape.group);
  return new Uniforms(32).u32(shape.rows * (shape.dim / shape.group)).u32(shape.dim / V).u32(shape.group / V)
    .f32(eps).u32(shape.group).buffer;
}

function unitLanes(group: number): number {
  return gatedNormLanes(group / gatedNormVectorWidth(group));
}

function unitWorkgroups(shape: GatedRmsNormShape): [number, number] {
  const units = shape.rows * (shape.dim / shape.group);
  return grid2d(ceilDiv(units, WG / unitLanes(shape.group)));
}

// Unit indexing and a tree reduction over the `LANES` threads of a unit. Every thread reaches every barrier
// (units past the end compute zeros), as WGSL's uniformity rules require.
function unitPrelude(lanes: number): string {
  return `
const LANES: u32 = ${lanes}u;
var<workgroup> red: array<vec2<f32>, ${WG}>;
// sums v over the LANES threads of this thread's unit; every thread of the unit gets the total
fn unit_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
  red[lid] = v;
  for (var stride = LANES / 2u; stride > 0u; stride = stride / 2u) {
    workgroupBarrier();
    if (lid % LANES < stride) { red[lid] = red[lid] + red[lid + stride]; }
  }
  workgroupBarrier();
  return red[lid - lid % LANES];
}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid3: vec3<u32>) {
  let lid = lid3.x;
  let unit = (wid.y * nwg.x + wid.x) * (${WG}u / LANES) + lid / LANES;
  let lane = lid % LANES;
  let live = unit < p.units;
  let base = unit * p.GV;`;
}

/**
 * Forward. Bindings: y `[rows, D]`, z `[rows, D]`, weight `[D]`, out `[rows, D]` (rw).
 */
export function gatedRmsNormForward(dtype: DType, shape: GatedRmsNormShape, eps = GATED_RMSNORM_EPS): Launch {
  const T = wgslType(dtype);
  const V = gatedNormVectorWidth(shape.group);
  const lanes = unitLanes(shape.group);
  const spec = cachedSpec(`gated_rmsnorm_fwd_${dtype}_v${V}_l${lanes}`, () => {
    const { VS, defs } = vectorPieces(T, V);
    return {
      bindings: ["read", "read", "read", "rw"],
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
${UNIFORMS}
@group(0) @binding(0) var<storage, read> ys: array<${VS}>;
@group(0) @binding(1) var<storage, read> zs: array<${VS}>;
@group(0) @binding(2) var<storage, read> w: array<${VS}>;
@group(0) @binding(3) var<storage, read_write> out: array<${VS}>;
@group(0) @binding(4) var<uniform> p: P;
${defs}
${unitPrelude(lanes)}
  var ss = 0.0;
  if (live) {
    for (var e = lane; e < p.GV; e += LANES) {
      let z = VF(zs[base + e]);
      let g = VF(ys[base + e]) * z * sigmoid(z);
      ss += dotv(g, g);
    }
  }
  let r = inverseSqrt(unit_sum(lid, vec2(ss, 0.0)).x / f32(p.G) + p.eps);
  if (!live) { return; }
  for (var e = lane; e < p.GV; e += LANES) {
    let z = VF(zs[base + e]);
    let g = VF(ys[base + e]) * z * sigmoid(z);
    out[base + e] = ${VS}(g * r * VF(w[(base + e) % p.DV]));
  }
}
`,
    };
  });
  return { spec, uniforms: unitUniforms(shape, eps), workgroups: unitWorkgroups(shape) };
}

/**
 * Backward, first stage: grads of y and z, and each unit's 1/rms (f32 `[units]`) for the weight grad. With
 * dg = d out / d g:  dg_e = r w_e go_e - g_e r^3 / G * sum_i(go_i w_i g_i),  gy = dg SiLU(z),  gz = dg y SiLU'(z).
 * Bindings: y, z, weight, gout (read), gy (rw), gz (rw), rstd `[units]` f32 (rw).
 */
export function gatedRmsNormBackward(
  dtype: DType,
  shape: GatedRmsNormShape,
  eps = GATED_RMSNORM_EPS,
): Launch {
  const T = wgslType(dtype);
  const V = gatedNormVectorWidth(shape.group);
  const lanes = unitLanes(shape.group);
  const spec = cachedSpec(`gated_rmsnorm_bwd_${dtype}_v${V}_l${lanes}`, () => {
    const { VS, defs } = vectorPieces(T, V);
    return {
      bindings: ["read", "read", "read", "read", "rw", "rw", "rw"],
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
${UNIFORMS}
@group(0) @binding(0) var<storage, read> ys: array<${VS}>;
@group(0) @binding(1) var<storage, read> zs: array<${VS}>;
@group(0) @binding(2) var<storage, read> w: array<${VS}>;
@group(0) @binding(3) var<storage, read> gout: array<${VS}>;
@group(0) @binding(4) var<storage, read_write> gy: array<${VS}>;
@group(0) @binding(5) var<storage, read_write> gz: array<${VS}>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(7) var<uniform> p: P;
${defs}
${unitPrelude(lanes)}
  // one pass for both sums: sum g^2 (for r) and sum go w g (for the projection onto g)
  var acc = vec2(0.0, 0.0);
  if (live) {
    for (var e = lane; e < p.GV; e += LANES) {
      let z = VF(zs[base + e]);
      let g = VF(ys[base + e]) * z * sigmoid(z);
      acc += vec2(dotv(g, g), dotv(VF(gout[base + e]) * VF(w[(base + e) % p.DV]), g));
    }
  }
  let sums = unit_sum(lid, acc);
  let r = inverseSqrt(sums.x / f32(p.G) + p.eps);
  if (!live) { return; }
  let k = r * r * r * sums.y / f32(p.G);
  if (lane == 0u) { rstd[unit] = r; }
  for (var e = lane; e < p.GV; e += LANES) {
    let y = VF(ys[base + e]);
    let z = VF(zs[base + e]);
    let sz = z * sigmoid(z);
    let g = y * sz;
    let dg = r * VF(w[(base + e) % p.DV]) * VF(gout[base + e]) - g * k;
    gy[base + e] = ${VS}(dg * sz);
    gz[base + e] = ${VS}(dg * y * silu_grad(z));
  }
}
`,
    };
  });
  return { spec, uniforms: unitUniforms(shape, eps), workgroups: unitWorkgroups(shape) };
}

/** Target threads of the weight-grad partial stage (columns x row blocks). */
const WGRAD_TARGET_THREADS = 1 << 16;

/** Row blocks of the weight-grad partial stage: enough column x block threads, blocks of at least 16 rows. */
export function gatedNormWeightBlocks(shape: GatedRmsNormShape): number {
  const cols = shape.dim / gatedNormVectorWidth(shape.group);
  const want = Math.ceil(WGRAD_TARGET_THREADS / cols);
  return Math.max(1, Math.min(want, Math.ceil(shape.rows / 16)));
}

/**
 * Backward, second stage: partial weight grads over row blocks, `part[blk, j] = sum_rows go g r`; a thread owns
 * V adjacent columns (they share one group, so one r per row). Bindings: y, z, gout (read), rstd `[units]` f32
 * (read), part `[blocks, D]` f32 (rw).
 */
export function gatedRmsNormWeightPartial(
  dtype: DType,
  shape: GatedRmsNormShape,
): Launch & { blocks: number } {
  const T = wgslType(dtype);
  const V = gatedNormVectorWidth(shape.group);
  const blocks = gatedNormWeightBlocks(shape);
  const spec = cachedSpec(`gated_rmsnorm_wpart_${dtype}_v${V}`, () => {
    const { VS, VF, defs } = vectorPieces(T, V);
    return {
      bindings: ["read", "read", "read", "read", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { rows: u32, DV: u32, GV: u32, blocks: u32 }
@group(0) @binding(0) var<storage, read> ys: array<${VS}>;
@group(0) @binding(1) var<storage, read> zs: array<${VS}>;
@group(0) @binding(2) var<storage, read> gout: array<${VS}>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> part: array<${VF}>;
@group(0) @binding(5) var<uniform> p: P;
${defs}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wid.y * nwg.x + wid.x) * ${WG}u + lid.x;
  if (i >= p.blocks * p.DV) { return; }
  let j = i % p.DV;
  let blk = i / p.DV;
  let per = (p.rows + p.blocks - 1u) / p.blocks;
  let r1 = min(p.rows, (blk + 1u) * per);
  let gpr = p.DV / p.GV;
  var s = VF(0.0);
  for (var row = blk * per; row < r1; row++) {
    let idx = row * p.DV + j;
    let z = VF(zs[idx]);
    s += VF(gout[idx]) * VF(ys[idx]) * z * sigmoid(z) * rstd[row * gpr + j / p.GV];
  }
  part[i] = s;
}
`,
    };
  });
  return {
    spec,
    uniforms: new Uniforms(16).u32(shape.rows).u32(shape.dim / V).u32(shape.group / V).u32(blocks).buffer,
    workgroups: grid2d(ceilDiv(blocks * (shape.dim / V), WG)),
    blocks,
  };
}

/** Backward, last stage: `gw[j] = sum_blk part[blk, j]`. Bindings: part `[blocks, D]` f32 (read), gw `[D]` (rw). */
export function gatedRmsNormWeightReduce(dtype: DType, blocks: number, dim: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`gated_rmsnorm_wreduce_${dtype}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { blocks: u32, D: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> gw: array<${T}>;
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let j = (wid.y * nwg.x + wid.x) * ${WG}u + lid.x;
  if (j >= p.D) { return; }
  var s = 0.0;
  for (var b = 0u; b < p.blocks; b++) { s += part[b * p.D + j]; }
  gw[j] = ${T}(s);
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(blocks).u32(dim).buffer,
    workgroups: grid2d(ceilDiv(dim, WG)),
  };
}
