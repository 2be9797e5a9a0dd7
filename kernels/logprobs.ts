/**
 * Per-token log-probabilities for DPO and evaluation, their masked sums per sequence, and greedy argmax with the
 * top-1/top-2 margin. Like the fused loss, each row of logits is streamed by one workgroup with online max /
 * sum-of-exp statistics; no probability tensor is written.
 *
 * - `logprob[t] = s_t[target_t] - logsumexp(s_t)`; target -100 gives 0 (ignored); backward
 *   `d s_t,i = g_t * ([i = target_t] - softmax(s_t)_i)` (zero rows for ignored tokens).
 * - `seqsum[b] = sum_t mask[b, t] * x[b, t]`; backward `g_b * mask[b, t]`.
 * - argmax: the lowest index among equal maxima (torch.argmax's rule); margin = top1 - top2 logit values (0 when
 *   the maximum is tied).
 *
 * @module
 */
import { cachedSpec, type DType, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { IGNORE_INDEX, ROW_WORKGROUP, rowGrid, WGSL_ONLINE_LSE, WGSL_ROW_INDEX } from "./cross_entropy.ts";

/**
 * Forward log-prob gather for a block of rows. Bindings: logits (read, `[rows, V]`, maybe a slice), targets
 * (read, i32 `[N]`), logprob (rw, f32 `[N]`), lse (rw, f32 `[N]`, saved for the backward). Row r is token
 * `row0 + r`.
 */
export function tokenLogprobForward(dtype: DType, rows: number, row0: number, V: number): Launch {
  const spec = cachedSpec(`logprob_fwd_${dtype}`, () => ({
    bindings: ["read", "read", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, V: u32, row0: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> logits: array<${wgslType(dtype)}>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> logprob: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
${WGSL_ONLINE_LSE}${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
var<workgroup> red: array<vec2<f32>, WG>;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  let base = r * p.V;
  var m = NEG;
  var s = 0.0;
  for (var i = lid; i < p.V; i += WG) { lse_push(&m, &s, f32(logits[base + i])); }
  red[lid] = vec2<f32>(m, s);
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      let a = red[lid];
      let b = red[lid + stride];
      red[lid] = lse_merge(a.x, a.y, b.x, b.y);
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let t = p.row0 + r;
    let l = red[0].x + log(red[0].y);
    lse[t] = l;
    let tg = targets[t];
    if (tg == ${IGNORE_INDEX}) {
      logprob[t] = 0.0;
    } else if (tg < 0 || u32(tg) >= p.V) {
      logprob[t] = bitcast<f32>(0x7fc00000u + min(p.V, 0u)); // NaN: a target outside the vocabulary is a data bug
    } else {
      logprob[t] = f32(logits[base + u32(tg)]) - l;
    }
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(V).u32(row0).buffer, workgroups: rowGrid(rows) };
}

/**
 * Backward of the log-prob gather for a block of rows. Bindings: logits (read), targets (read), lse (read),
 * g (read, f32 `[N]`), dlogits (rw, `[rows, V]`).
 */
export function tokenLogprobBackward(dtype: DType, rows: number, row0: number, V: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`logprob_bwd_${dtype}`, () => ({
    bindings: ["read", "read", "read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, V: u32, row0: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> logits: array<${T}>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read> lse: array<f32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<${T}>;
@group(0) @binding(5) var<uniform> p: P;
${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  let t = p.row0 + r;
  let base = r * p.V;
  let tg = targets[t];
  let gt = select(g[t], 0.0, tg == ${IGNORE_INDEX});
  let l = lse[t];
  for (var i = lid; i < p.V; i += WG) {
    let pr = exp(f32(logits[base + i]) - l);
    dlogits[base + i] = ${T}(gt * (select(0.0, 1.0, i32(i) == tg) - pr));
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(V).u32(row0).buffer, workgroups: rowGrid(rows) };
}

/**
 * Masked sum per row: `out[b] = sum_t mask[b, t] * x[b, t]` for x, mask `[B, L]` f32. Bindings: x, mask (read),
 * out (rw, f32 `[B]`). One workgroup per row.
 */
export function maskedRowSum(B: number, L: number): Launch {
  const spec = cachedSpec("masked_row_sum", () => ({
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `
struct P { rows: u32, L: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
var<workgroup> red: array<f32, WG>;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  var acc = 0.0;
  // masked-out entries may hold anything (even NaN from ignored targets): select, do not multiply
  for (var i = lid; i < p.L; i += WG) {
    let mk = mask[r * p.L + i];
    acc += select(0.0, mk * x[r * p.L + i], mk != 0.0);
  }
  red[lid] = acc;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) { red[lid] += red[lid + stride]; }
    workgroupBarrier();
  }
  if (lid == 0u) { out[r] = red[0]; }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(B).u32(L).buffer, workgroups: rowGrid(B) };
}

/** Backward of {@linkcode maskedRowSum}: `gx[b, t] = g[b] * mask[b, t]`. Bindings: mask, g (read), gx (rw). */
export function maskedRowSumBackward(B: number, L: number): Launch {
  const spec = cachedSpec("masked_row_sum_bwd", () => ({
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `
struct P { rows: u32, L: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> mask: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> gx: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid;
  if (i >= p.rows * p.L) { return; }
  gx[i] = g[i / p.L] * mask[i];
}
`,
  }));
  const wg = Math.ceil((B * L) / 256);
  const y = Math.ceil(wg / 65535);
  return {
    spec,
    uniforms: new Uniforms(16).u32(B).u32(L).buffer,
    workgroups: [Math.max(1, Math.ceil(wg / y)), y],
  };
}

/**
 * Greedy argmax per row with the top-1/top-2 margin. Bindings: logits (read, `[rows, V]`), ids (rw, i32 `[N]`),
 * margin (rw, f32 `[N]`). Row r is token `row0 + r`.
 */
export function argmaxRows(dtype: DType, rows: number, row0: number, V: number): Launch {
  const spec = cachedSpec(`argmax_${dtype}`, () => ({
    bindings: ["read", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, V: u32, row0: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> logits: array<${wgslType(dtype)}>;
@group(0) @binding(1) var<storage, read_write> ids: array<i32>;
@group(0) @binding(2) var<storage, read_write> margin: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
const NEG: f32 = -3.4e38;
// (best value, best index, second value): merging keeps the two largest values and the lowest index of the best
var<workgroup> red: array<vec3<f32>, WG>;
var<workgroup> red_i: array<u32, WG>;
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool { return v > bv || (v == bv && i < bi); }
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  let base = r * p.V;
  var b1 = NEG;
  var bi = 0xffffffffu;
  var b2 = NEG;
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    if (better(x, i, b1, bi)) {
      b2 = b1;
      b1 = x;
      bi = i;
    } else if (x > b2) {
      b2 = x;
    }
  }
  red[lid] = vec3<f32>(b1, 0.0, b2);
  red_i[lid] = bi;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      let a = red[lid];
      let c = red[lid + stride];
      let ai = red_i[lid];
      let ci = red_i[lid + stride];
      if (better(c.x, ci, a.x, ai)) {
        red[lid] = vec3<f32>(c.x, 0.0, max(a.x, c.z));
        red_i[lid] = ci;
      } else {
        red[lid] = vec3<f32>(a.x, 0.0, max(a.z, c.x));
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let t = p.row0 + r;
    ids[t] = i32(red_i[0]);
    margin[t] = red[0].x - red[0].z;
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(V).u32(row0).buffer, workgroups: rowGrid(rows) };
}
