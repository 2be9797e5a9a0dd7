/**
 * Fused distillation loss over the vocabulary: per-token cross-entropy against labels and KL(p_teacher || p_student)
 * at a temperature, without materialising any [N, V] probability tensor. One workgroup streams one row of logits
 * (and teacher logits) in chunks of 256 columns, keeping online max / sum-of-exp statistics per thread, then
 * merges them in workgroup memory. All math in f32 with max subtraction, whatever the storage dtype.
 *
 * Conventions (per token t with weight w_t = mask_t * [label_t != -100]):
 * - CE_t = logsumexp(s_t) - s_t[label_t] (temperature 1, like HF's loss).
 * - KL_t = tau^2 * sum_i p_i (log p_i - log q_i), p = softmax(teacher_t / tau), q = softmax(s_t / tau): Hinton's
 *   soft-target loss and `F.kl_div(log_softmax(s/tau), softmax(t/tau), reduction="batchmean") * tau^2` per row, as
 *   MambaInLlama's distillation trainer computes it (at tau = 1 the factor is 1).
 * - The reported loss is `alpha * mean_w(CE) + beta * mean_w(KL)`, means weighted by w over tokens (the per-token
 *   mean of method.md; the official code instead sums KL over positions and divides by the batch size).
 * - Per-token outputs are 0 at ignored tokens. A label outside [0, V) other than -100 gives CE = NaN.
 *
 * Backward: d loss / d s_t,i = g * w_t / sum(w) * (alpha (softmax(s_t)_i - [i = label_t]) + beta tau (q_i - p_i)),
 * one more pass over the row from the saved statistics; it may write into the logits buffer itself.
 *
 * @module
 */
import { type DType, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per row workgroup of the vocabulary kernels. */
export const ROW_WORKGROUP = 256;

/** Label value that marks a token as ignored (HF's `ignore_index`). */
export const IGNORE_INDEX = -100;

/**
 * WGSL: online log-sum-exp helpers. `lse_push(&m, &s, x)` folds x into a running (max, sum exp(x - max));
 * `lse_merge` combines two such pairs. Starting values: m = NEG, s = 0.
 */
export const WGSL_ONLINE_LSE = `
const NEG: f32 = -1.0e30;
fn lse_push(m: ptr<function, f32>, s: ptr<function, f32>, x: f32) {
  if (x > *m) {
    *s = *s * exp(*m - x) + 1.0;
    *m = x;
  } else {
    *s += exp(x - *m);
  }
}
fn lse_merge(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
  let m = max(m1, m2);
  return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}
`;

/** WGSL: the row index of a {@linkcode rowGrid} dispatch. */
export const WGSL_ROW_INDEX = `
fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.y * nwg.x + wid.x; }
`;

/** Workgroup grid with one workgroup per row (split over x and y beyond 65535 rows). */
export function rowGrid(rows: number): [number, number] {
  if (rows <= 65535) return [Math.max(1, rows), 1];
  const y = Math.ceil(rows / 65535);
  return [Math.ceil(rows / y), y];
}

/** Which parts of the distillation loss a kernel variant computes. */
export interface LossVariant {
  /** Storage type of the student logits (and of dlogits). */
  dtype: DType;
  /** Storage type of the teacher logits; null for cross-entropy only. */
  teacherDtype: DType | null;
}

function variantKey(v: LossVariant): string {
  return `${v.dtype}_${v.teacherDtype ?? "none"}`;
}

function header(v: LossVariant): string {
  return v.dtype === "f16" || v.teacherDtype === "f16" ? wgslHeader("f16") : "";
}

const fwdSpecs = new Map<string, KernelSpec>();

/**
 * Forward statistics of a block of rows. Bindings: logits (read) `[rows, V]`, [teacher (read) `[rows, V]`],
 * labels (read, i32 `[N]`), mask (read, f32 `[N]`, ignored unless `hasMask`), ce (rw, f32 `[N]`),
 * [kl (rw, f32 `[N]`)], rowstats (rw, f32 `[N, 4]`: lse(s), lse(s/tau), lse(t/tau), w). Row r of the block is
 * token `row0 + r` (the logits binding may be a slice of a larger buffer).
 */
export function distillLossForward(
  v: LossVariant,
  rows: number,
  row0: number,
  V: number,
  temperature: number,
  hasMask: boolean,
  hasLabels: boolean,
): Launch {
  const key = `distill_fwd_${variantKey(v)}`;
  let spec = fwdSpecs.get(key);
  if (!spec) {
    const kl = v.teacherDtype !== null;
    const S = wgslType(v.dtype);
    spec = {
      key,
      bindings: kl
        ? ["read", "read", "read", "read", "rw", "rw", "rw"]
        : ["read", "read", "read", "rw", "rw"],
      uniformBytes: 32,
      code: `${header(v)}
struct P { rows: u32, V: u32, row0: u32, has_mask: u32, has_labels: u32, inv_t: f32, kl_scale: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> logits: array<${S}>;
${
        kl
          ? `@group(0) @binding(1) var<storage, read> teacher: array<${wgslType(v.teacherDtype!)}>;
@group(0) @binding(2) var<storage, read> labels: array<i32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read_write> ce: array<f32>;
@group(0) @binding(5) var<storage, read_write> kl: array<f32>;
@group(0) @binding(6) var<storage, read_write> rowstats: array<f32>;
@group(0) @binding(7) var<uniform> p: P;`
          : `@group(0) @binding(1) var<storage, read> labels: array<i32>;
@group(0) @binding(2) var<storage, read> mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> ce: array<f32>;
@group(0) @binding(4) var<storage, read_write> rowstats: array<f32>;
@group(0) @binding(5) var<uniform> p: P;`
      }
${WGSL_ONLINE_LSE}${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
var<workgroup> red: array<vec4<f32>, WG>;
var<workgroup> red2: array<vec4<f32>, WG>;

@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  let base = r * p.V;
  // thread-local online statistics: (m, s) of s; (m, s) of s/tau; (m, s, w) of a = t/tau with w = sum e^(a-m)(a-b)
  var m1 = NEG; var s1 = 0.0;
  var m2 = NEG; var s2 = 0.0;
  var ma = NEG; var sa = 0.0; var wa = 0.0;
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    lse_push(&m1, &s1, x);
${
        kl
          ? `    let b = x * p.inv_t;
    lse_push(&m2, &s2, b);
    let a = f32(teacher[base + i]) * p.inv_t;
    if (a > ma) {
      let f = exp(ma - a);
      sa = sa * f + 1.0;
      wa = wa * f + (a - b);
      ma = a;
    } else {
      let e = exp(a - ma);
      sa += e;
      wa += e * (a - b);
    }`
          : ""
      }
  }
  red[lid] = vec4<f32>(m1, s1, m2, s2);
  red2[lid] = vec4<f32>(ma, sa, wa, 0.0);
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      let x = red[lid];
      let y = red[lid + stride];
      let u = lse_merge(x.x, x.y, y.x, y.y);
      let w = lse_merge(x.z, x.w, y.z, y.w);
      red[lid] = vec4<f32>(u, w);
      let a = red2[lid];
      let c = red2[lid + stride];
      let mm = max(a.x, c.x);
      let fa = exp(a.x - mm);
      let fc = exp(c.x - mm);
      red2[lid] = vec4<f32>(mm, a.y * fa + c.y * fc, a.z * fa + c.z * fc, 0.0);
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let t = p.row0 + r;
    let st = red[0];
    let lse1 = st.x + log(st.y);
    var w = 1.0;
    var ce_t = 0.0;
    if (p.has_labels != 0u) {
      let lab = labels[t];
      if (lab == ${IGNORE_INDEX}) {
        w = 0.0;
      } else if (lab < 0 || u32(lab) >= p.V) {
        ce_t = bitcast<f32>(0x7fc00000u + min(p.V, 0u)); // NaN: a label outside the vocabulary is a data bug, make it loud
      } else {
        ce_t = lse1 - f32(logits[base + u32(lab)]);
      }
    }
    if (p.has_mask != 0u) { w *= mask[t]; }
    ce[t] = select(0.0, ce_t, w != 0.0);
${
        kl
          ? `    let ta = red2[0];
    let lse_b = st.z + log(st.w);
    let lse_a = ta.x + log(ta.y);
    // sum_i p_i (a_i - b_i) - lse_a + lse_b, p = softmax(a)
    let kl_t = p.kl_scale * (ta.z / ta.y - lse_a + lse_b);
    kl[t] = select(0.0, kl_t, w != 0.0);
    rowstats[t * 4u + 1u] = lse_b;
    rowstats[t * 4u + 2u] = lse_a;`
          : `    rowstats[t * 4u + 1u] = 0.0;
    rowstats[t * 4u + 2u] = 0.0;`
      }
    rowstats[t * 4u] = lse1;
    rowstats[t * 4u + 3u] = w;
  }
}
`,
    };
    fwdSpecs.set(key, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(32).u32(rows).u32(V).u32(row0).u32(hasMask ? 1 : 0).u32(hasLabels ? 1 : 0)
      .f32(1 / temperature).f32(temperature * temperature).u32(0).buffer,
    workgroups: rowGrid(rows),
  };
}

const reduceSpecs = new Map<string, KernelSpec>();

/**
 * Reduces per-token losses to `totals = [alpha * meanCE + beta * meanKL, meanCE, meanKL, sum(w)]` (means weighted
 * by w; 0 when sum(w) = 0). Bindings: ce, kl (read; pass ce twice when there is no KL), rowstats (read),
 * totals (rw, f32 [4]). One workgroup.
 */
export function distillLossReduce(N: number, alpha: number, beta: number, hasKl: boolean): Launch {
  const key = "distill_reduce";
  let spec = reduceSpecs.get(key);
  if (!spec) {
    spec = {
      key,
      bindings: ["read", "read", "read", "rw"],
      uniformBytes: 16,
      code: `
struct P { n: u32, alpha: f32, beta: f32, has_kl: u32 }
@group(0) @binding(0) var<storage, read> ce: array<f32>;
@group(0) @binding(1) var<storage, read> kl: array<f32>;
@group(0) @binding(2) var<storage, read> rowstats: array<f32>;
@group(0) @binding(3) var<storage, read_write> totals: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
const WG: u32 = ${ROW_WORKGROUP}u;
var<workgroup> red: array<vec4<f32>, WG>;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = vec4<f32>(0.0);
  for (var t = lid; t < p.n; t += WG) {
    let w = rowstats[t * 4u + 3u];
    // ignored tokens carry exact zeros in ce/kl; weight the rest
    acc += vec4<f32>(w * ce[t], select(0.0, w * kl[t], p.has_kl != 0u), w, 0.0);
  }
  red[lid] = acc;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) { red[lid] += red[lid + stride]; }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let s = red[0];
    let inv = select(0.0, 1.0 / s.z, s.z != 0.0);
    totals[0] = p.alpha * s.x * inv + p.beta * s.y * inv;
    totals[1] = s.x * inv;
    totals[2] = s.y * inv;
    totals[3] = s.z;
  }
}
`,
    };
    reduceSpecs.set(key, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(16).u32(N).f32(alpha).f32(beta).u32(hasKl ? 1 : 0).buffer,
    workgroups: [1],
  };
}

const bwdSpecs = new Map<string, KernelSpec>();

/**
 * dlogits of `g * totals[0]` for a block of rows. Bindings: logits (read, or rw when `inPlace`: the gradient
 * overwrites the logits), [teacher (read)], labels (read), rowstats (read), totals (read), g (read, f32 [1]),
 * [dlogits (rw), absent when in place].
 */
export function distillLossBackward(
  v: LossVariant,
  rows: number,
  row0: number,
  V: number,
  temperature: number,
  alpha: number,
  beta: number,
  hasLabels: boolean,
  inPlace: boolean,
): Launch {
  const key = `distill_bwd_${variantKey(v)}${inPlace ? "_inplace" : ""}`;
  let spec = bwdSpecs.get(key);
  if (!spec) {
    const kl = v.teacherDtype !== null;
    const S = wgslType(v.dtype);
    const bindings: ("read" | "rw")[] = [inPlace ? "rw" : "read"];
    const decls = [`var<storage, ${inPlace ? "read_write" : "read"}> logits: array<${S}>;`];
    if (kl) {
      bindings.push("read");
      decls.push(`var<storage, read> teacher: array<${wgslType(v.teacherDtype!)}>;`);
    }
    bindings.push("read", "read", "read", "read");
    decls.push(
      "var<storage, read> labels: array<i32>;",
      "var<storage, read> rowstats: array<f32>;",
      "var<storage, read> totals: array<f32>;",
      "var<storage, read> gscale: array<f32>;",
    );
    if (!inPlace) {
      bindings.push("rw");
      decls.push(`var<storage, read_write> dlogits: array<${S}>;`);
    }
    decls.push("var<uniform> p: P;");
    spec = {
      key,
      bindings,
      uniformBytes: 32,
      code: `${header(v)}
struct P { rows: u32, V: u32, row0: u32, has_labels: u32, inv_t: f32, alpha: f32, beta_t: f32, _a: u32 }
${decls.map((d, i) => `@group(0) @binding(${i}) ${d}`).join("\n")}
${WGSL_ROW_INDEX}
const WG: u32 = ${ROW_WORKGROUP}u;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }
  let t = p.row0 + r;
  let base = r * p.V;
  let wsum = totals[3];
  let c = select(0.0, gscale[0] * rowstats[t * 4u + 3u] / wsum, wsum != 0.0);
  let lse1 = rowstats[t * 4u];
  var lab = -1;
  if (p.has_labels != 0u) { lab = labels[t]; }
${kl ? "  let lse_b = rowstats[t * 4u + 1u];\n  let lse_a = rowstats[t * 4u + 2u];" : ""}
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    var gi = p.alpha * (exp(x - lse1) - select(0.0, 1.0, i32(i) == lab));
${
        kl
          ? "    gi += p.beta_t * (exp(x * p.inv_t - lse_b) - exp(f32(teacher[base + i]) * p.inv_t - lse_a));"
          : ""
      }
    ${inPlace ? "logits" : "dlogits"}[base + i] = ${S}(c * gi);
  }
}
`,
    };
    bwdSpecs.set(key, spec);
  }
  return {
    spec,
    uniforms:
      new Uniforms(32).u32(rows).u32(V).u32(row0).u32(hasLabels ? 1 : 0).f32(1 / temperature).f32(alpha)
        .f32(beta * temperature).u32(0).buffer,
    workgroups: rowGrid(rows),
  };
}
