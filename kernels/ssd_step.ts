/**
 * Decode-time Mamba2 recurrence: one token per call ({@linkcode ssdStepKernel}), and the fused multi-step
 * verification kernel of speculative decoding ({@linkcode ssdVerifyKernel}, method.md section 3).
 *
 * Per batch b and head h, with the state S [P, N] kept in f32:
 *     delta = softplus(dt + dt_bias) (or dt itself);  S = exp(delta A) S + delta x B^T;  y = S C + D x
 *
 * Inputs are read where the mixer has them: x, B and C as the column ranges [x | B | C] of the conv output
 * `xBC` [B, T, Hx P + Hb N + Hc N], dt [B, T, H], and the per-head scalars as one `heads` tensor [3, H] = rows
 * A, D, dt_bias (built once per weight update), so that the verify kernel stays within 8 storage bindings.
 *
 * Work split: one workgroup of 256 threads per (b, h, block of 16 rows p); each row's 16 threads hold the row's
 * state in registers, n = lane + 16 k, and reduce y's dot product over n through workgroup memory. State is read
 * once and written once per call, whatever the number of steps.
 *
 * Verification: a layer keeps one state snapshot and a cache of the per-step inputs (x, B, delta) of the last
 * verified chunk, as a ping-pong buffer [2, B, Kc, Wc] with Wc = Hx P + Hb N + H (half `parity` holds the cached
 * steps, the kernel writes the new ones into the other half, so no workgroup can overwrite what another still
 * reads). One call: load the snapshot, re-apply the first `accepted[b]` cached steps, store the result as the new
 * snapshot, then advance through the K+1 new tokens, writing their outputs and caching their inputs, without
 * storing any intermediate state. The arithmetic per step is the step kernel's, in the same order.
 *
 * @module
 */
import { cachedSpec, ceilDiv, grid2d, type KernelSpec, Uniforms } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { WGSL_SOFTPLUS } from "./ssd.ts";

/** Sizes of a decode call. */
export interface SsdStepShape {
  /** Batch B. */
  batch: number;
  /** Heads H. */
  heads: number;
  /** Groups of x. */
  headsX: number;
  /** Groups of B. */
  headsB: number;
  /** Groups of C. */
  headsC: number;
  /** Head dim P. */
  dimP: number;
  /** State dim N. */
  dimN: number;
}

/** Rows of p per workgroup. */
export const SSD_STEP_ROWS = 16;
const LANES = 16;

const FIELDS = [
  "batch",
  "heads",
  "heads_x",
  "heads_b",
  "heads_c",
  "dim_p",
  "dim_n",
  "p_blocks",
  "x_off",
  "b_off",
  "c_off",
  "xbc_bstride",
  "xbc_tstride",
  "dt_off",
  "dt_bstride",
  "dt_tstride",
  "flags",
  "steps",
  "cache_steps",
  "parity",
] as const;
type Field = typeof FIELDS[number];
const UNIFORM_BYTES = FIELDS.length * 4;

/** Width of one cached step: x (Hx P), B (Hb N), delta (H). */
export function ssdCacheWidth(s: SsdStepShape): number {
  return s.headsX * s.dimP + s.headsB * s.dimN + s.heads;
}

/** Width of one token of the packed conv output [x | B | C]. */
export function ssdXbcWidth(s: SsdStepShape): number {
  return s.headsX * s.dimP + (s.headsB + s.headsC) * s.dimN;
}

/** Where the tokens of a decode call live. */
export interface SsdStepLayout {
  /** Element offset of token (0, 0) in xBC. */
  xbcOffset: number;
  /** Elements between batch rows of xBC. */
  xbcBatchStride: number;
  /** Elements between consecutive tokens of xBC. */
  xbcTokenStride: number;
  /** Element offset of token (0, 0) in dt. */
  dtOffset: number;
  /** Elements between batch rows of dt. */
  dtBatchStride: number;
  /** Elements between consecutive tokens of dt. */
  dtTokenStride: number;
}

/** The contiguous layout of `tokens` tokens per batch row: xBC [B, T, W], dt [B, T, H]. */
export function ssdStepContiguous(s: SsdStepShape, tokens: number): SsdStepLayout {
  const w = ssdXbcWidth(s);
  return {
    xbcOffset: 0,
    xbcBatchStride: tokens * w,
    xbcTokenStride: w,
    dtOffset: 0,
    dtBatchStride: tokens * s.heads,
    dtTokenStride: s.heads,
  };
}

function pack(s: SsdStepShape, l: SsdStepLayout, extra: Partial<Record<Field, number>>): ArrayBuffer {
  const v: Partial<Record<Field, number>> = {
    batch: s.batch,
    heads: s.heads,
    heads_x: s.headsX,
    heads_b: s.headsB,
    heads_c: s.headsC,
    dim_p: s.dimP,
    dim_n: s.dimN,
    p_blocks: ceilDiv(s.dimP, SSD_STEP_ROWS),
    x_off: l.xbcOffset,
    b_off: l.xbcOffset + s.headsX * s.dimP,
    c_off: l.xbcOffset + s.headsX * s.dimP + s.headsB * s.dimN,
    xbc_bstride: l.xbcBatchStride,
    xbc_tstride: l.xbcTokenStride,
    dt_off: l.dtOffset,
    dt_bstride: l.dtBatchStride,
    dt_tstride: l.dtTokenStride,
    ...extra,
  };
  const u = new Uniforms(UNIFORM_BYTES);
  for (const f of FIELDS) u.u32(v[f] ?? 0);
  return u.buffer;
}

function code(verify: boolean, npt: number, io: "f32" | "f16"): string {
  // The loops over a thread's NPT state entries are written out (k a constant in each copy), so the state array
  // is only ever indexed by constants: alone on the H200 the 1B hybrid's step took 5.2 us against 5.6 as loops.
  const forK = (body: string) =>
    Array.from({ length: npt }, (_, k) => `{ let k = ${k}u;${body}}`).join("\n    ");
  const bindings = verify
    ? `@group(0) @binding(0) var<storage, read_write> state: array<f32>;
@group(0) @binding(1) var<storage, read_write> cache: array<f32>;
@group(0) @binding(2) var<storage, read> accepted: array<u32>;
@group(0) @binding(3) var<storage, read> xbc: array<${io}>;
@group(0) @binding(4) var<storage, read> dt: array<${io}>;
@group(0) @binding(5) var<storage, read> hp: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<${io}>;
@group(0) @binding(7) var<uniform> d: Dims;`
    : `@group(0) @binding(0) var<storage, read_write> state: array<f32>;
@group(0) @binding(1) var<storage, read> xbc: array<${io}>;
@group(0) @binding(2) var<storage, read> dt: array<${io}>;
@group(0) @binding(3) var<storage, read> hp: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<${io}>;
@group(0) @binding(5) var<uniform> d: Dims;`;
  const replay = verify
    ? `
  // Re-apply the accepted cached steps from the snapshot, then store the new snapshot.
  let wc = d.heads_x * d.dim_p + d.heads_b * d.dim_n + d.heads;
  let nacc = min(accepted[b], d.cache_steps);
  let cin = (d.parity * d.batch + b) * d.cache_steps * wc;
  for (var i = 0u; i < nacc; i++) {
    let cb = cin + i * wc;
    let v = cache[cb + d.heads_x * d.dim_p + d.heads_b * d.dim_n + h];
    let a = exp(v * A);
    var xp = 0.0;
    if (pv) { xp = cache[cb + gx * d.dim_p + p]; }
    let vx = v * xp;
    ${
      forK(`
      let n = lane + ${LANES}u * k;
      if (n < d.dim_n) { s[k] = a * s[k] + vx * cache[cb + d.heads_x * d.dim_p + gb * d.dim_n + n]; }
    `)
    }
  }
  if (pv) {
    ${
      forK(`
      let n = lane + ${LANES}u * k;
      if (n < d.dim_n) { state[sbase + n] = s[k]; }
    `)
    }
  }
  let cout = ((1u - d.parity) * d.batch + b) * d.cache_steps * wc;`
    : "";
  const cacheWrite = verify
    ? `
    // Cache this step's inputs; each value is written by exactly one thread.
    let cb = cout + j * wc;
    if (pv && lane == 0u && h % (d.heads / d.heads_x) == 0u) { cache[cb + gx * d.dim_p + p] = xp; }
    if (pb == 0u && row == 0u && h % (d.heads / d.heads_b) == 0u) {
      ${
      forK(`
        let n = lane + ${LANES}u * k;
        if (n < d.dim_n) { cache[cb + d.heads_x * d.dim_p + gb * d.dim_n + n] = f32(xbc[d.b_off + tok + gb * d.dim_n + n]); }
      `)
    }
    }
    if (pb == 0u && li == 0u) { cache[cb + d.heads_x * d.dim_p + d.heads_b * d.dim_n + h] = v; }`
    : "";
  const writeBack = verify ? "" : `
  if (pv) {
    ${
    forK(`
      let n = lane + ${LANES}u * k;
      if (n < d.dim_n) { state[sbase + n] = s[k]; }
    `)
  }
  }`;
  return `${io === "f16" ? "enable f16;\n" : ""}struct Dims { ${FIELDS.map((f) => `${f}: u32`).join(", ")} }
${bindings}
${WGSL_SOFTPLUS}
const NPT = ${npt}u;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
  var w = wid.y * nwg.x + wid.x;
  let pb = w % d.p_blocks; w = w / d.p_blocks;
  let h = w % d.heads;
  let b = w / d.heads;
  if (b >= d.batch) { return; }
  let lane = li % ${LANES}u;
  let row = li / ${LANES}u;
  let p = pb * ${SSD_STEP_ROWS}u + row;
  let pv = p < d.dim_p;
  let gx = h / (d.heads / d.heads_x);
  let gb = h / (d.heads / d.heads_b);
  let gc = h / (d.heads / d.heads_c);
  let A = hp[h];
  let Dh = hp[d.heads + h];
  let sbase = ((b * d.heads + h) * d.dim_p + p) * d.dim_n;
  var s: array<f32, NPT>;
  ${
    forK(`
    let n = lane + ${LANES}u * k;
    var sv = 0.0;
    if (pv && n < d.dim_n) { sv = state[sbase + n]; }
    s[k] = sv;
  `)
  }
${replay}
  for (var j = 0u; j < d.steps; j++) {
    let tok = b * d.xbc_bstride + j * d.xbc_tstride;
    var v = f32(dt[d.dt_off + b * d.dt_bstride + j * d.dt_tstride + h]);
    if ((d.flags & 1u) != 0u) { v = softplus(v + hp[2u * d.heads + h]); }
    let a = exp(v * A);
    var xp = 0.0;
    if (pv) { xp = f32(xbc[d.x_off + tok + gx * d.dim_p + p]); }
    let vx = v * xp;
    var part = 0.0;
    ${
    forK(`
      let n = lane + ${LANES}u * k;
      if (pv && n < d.dim_n) {
        let sv = a * s[k] + vx * f32(xbc[d.b_off + tok + gb * d.dim_n + n]);
        s[k] = sv;
        part += sv * f32(xbc[d.c_off + tok + gc * d.dim_n + n]);
      }
    `)
  }
    red[li] = part;
    workgroupBarrier();
    if (pv && lane == 0u) {
      var sum = 0.0;
      for (var q = 0u; q < ${LANES}u; q++) { sum += red[row * ${LANES}u + q]; }
      y[((b * d.steps + j) * d.heads + h) * d.dim_p + p] = ${io}(sum + Dh * xp);
    }
${cacheWrite}
    workgroupBarrier();
  }
${writeBack}
}
`;
}

function spec(verify: boolean, dimN: number, io: "f32" | "f16" = "f32"): KernelSpec {
  const npt = Math.max(1, ceilDiv(dimN, LANES));
  return cachedSpec(`ssd_${verify ? "verify" : "step"}_npt${npt}${io === "f16" ? "_f16" : ""}`, () => ({
    bindings: verify
      ? ["rw", "rw", "read", "read", "read", "read", "rw"]
      : ["rw", "read", "read", "read", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: code(verify, npt, io),
  }));
}

function workgroups(s: SsdStepShape): [number, number] {
  return grid2d(ceilDiv(s.dimP, SSD_STEP_ROWS) * s.heads * s.batch);
}

/**
 * One decode step, state updated in place. `softplus`: dt is raw and delta = softplus(dt + dt_bias).
 * Bindings: state (rw, f32) [B, H, P, N], xBC, dt (`io`), heads [3, H] (f32), y (rw, `io`) [B, H, P]: f16
 * inputs and output are read and written as they are (math in f32), saving an f16 decode three casts per layer.
 */
export function ssdStepKernel(
  s: SsdStepShape,
  layout: SsdStepLayout,
  softplus: boolean,
  io: "f32" | "f16" = "f32",
): Launch {
  return {
    spec: spec(false, s.dimN, io),
    uniforms: pack(s, layout, { flags: softplus ? 1 : 0, steps: 1 }),
    workgroups: workgroups(s),
  };
}

/**
 * The fused verification pass over `steps` new tokens (K + 1), with a cache of `cacheSteps` steps per half
 * (>= steps). Bindings: state (rw; snapshot in, new snapshot out) [B, H, P, N], cache (rw) [2, B, Kc, Wc],
 * accepted (u32) [B], xBC, dt (`io`), heads [3, H], y (rw, `io`) [B, steps, H, P]; state and cache are f32.
 */
export function ssdVerifyKernel(
  s: SsdStepShape,
  layout: SsdStepLayout,
  softplus: boolean,
  steps: number,
  cacheSteps: number,
  parity: 0 | 1,
  io: "f32" | "f16" = "f32",
): Launch {
  if (steps > cacheSteps) {
    throw new Error(`ssdVerifyKernel: ${steps} new steps do not fit a cache of ${cacheSteps}`);
  }
  return {
    spec: spec(true, s.dimN, io),
    uniforms: pack(s, layout, { flags: softplus ? 1 : 0, steps, cache_steps: cacheSteps, parity }),
    workgroups: workgroups(s),
  };
}
