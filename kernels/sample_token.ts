/**
 * Next-token sampling on the GPU, one workgroup per row of logits: temperature, top-k and top-p (nucleus) with
 * the semantics of `models/sampling.ts` `samplingDistribution` (top-k first, then the smallest set of the most
 * likely kept tokens whose renormalised probability reaches top_p, always at least one token; temperature 0 is
 * argmax with the lowest index on ties), then one draw from a counter-based random number generator. The token
 * id is written to a GPU buffer, so a decode loop can feed it to the next step's embedding without a read.
 *
 * Algorithm, per row (V logits, WG threads, each thread reading a strided share so reads coalesce):
 *
 * 1. One pass for the maximum m and its lowest index (the answer when greedy). Weights are
 *    `w_i = exp((x_i - m) / T)`: the softmax up to its normaliser, which is never needed.
 * 2. Tokens are ranked by a unique 64-bit composite key: the logit's bits mapped to an order-preserving u32,
 *    then `V - 1 - i`, so equal logits rank the lower index first (the CPU sort's tie rule). A kept set is
 *    always an upper set of that ranking, `{i : key_i >= threshold}`, so it is one (u32, u32) pair.
 * 3. Top-k and top-p are both "find the ranked element at which a running total from the top first reaches a
 *    target", the total being a count (top-k: target k) or a mass (top-p: target top_p times the mass of the
 *    top-k set). That element is found by a most-significant-digit-first radix select over the composite key,
 *    4 bits per pass: each pass histograms the count and the mass of the kept elements that share the prefix
 *    chosen so far into 16 bins (per-thread private bins, then a fixed-order tree sum: no atomics, so the
 *    result does not depend on scheduling), and thread 0 walks the bins from the top to pick the next digit.
 *    It stops as soon as the chosen bin holds one element (or, for a count, is taken whole), so untied
 *    logits need at most the 8 key digits; ties go on into the index digits. The worst case is
 *    8 + ceil(log2 V / 4) passes per select (13 for V = 128256), never a sort, and the cost does not grow
 *    with k or with the size of the nucleus (top_p without top_k on a flat distribution keeps thousands of
 *    tokens at the same cost). For the 1B Llama (V = 128256, top-k 50 and top-p) that is at most about 30
 *    passes over a 500 KB row that stays in cache, by one workgroup per row.
 * 4. The draw: `u` uniform in [0, 1) from Philox4x32-10 keyed by the 64-bit seed with counter
 *    `(step, stream, 0, 0)`, so a draw depends only on (seed, stream, step), never on which rows share the
 *    dispatch. Each thread sums the weights of its kept tokens, thread 0 finds whose share contains
 *    `u * total` (in thread order), and that thread walks its tokens to the one where its running sum passes
 *    the remainder. Any fixed order gives the same distribution; this one needs a single extra pass.
 *
 * Precision: weights and sums are f32, and `u` has 24 bits, so probabilities are right to about 1e-6
 * relative; a top-p boundary within that of top_p can fall on either side (the float64 CPU reference may
 * differ there).
 *
 * @module
 */
import { cachedSpec, type DType, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { rowGrid, WGSL_ROW_INDEX } from "./cross_entropy.ts";

/** Threads per row of {@linkcode sampleTokensKernel}: 256 for large vocabularies, 64 for small ones. */
export function sampleWorkgroup(V: number): number {
  return V >= 8192 ? 256 : 64;
}

/**
 * WGSL: `philox4x32_10(counter, key)`, the counter-based generator of Salmon et al. (SC'11, Random123's
 * constants), with the 32x32 -> 64-bit product done in 16-bit halves (WGSL has no mulhi).
 */
export const WGSL_PHILOX = `
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
  let a0 = a & 0xffffu;
  let a1 = a >> 16u;
  let b0 = b & 0xffffu;
  let b1 = b >> 16u;
  let p01 = a0 * b1;
  let p10 = a1 * b0;
  let mid = ((a0 * b0) >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
  return vec2<u32>(a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u), a * b);
}
fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
  var c = counter;
  var k = key;
  for (var round = 0u; round < 10u; round++) {
    let h0 = mulhilo(0xd2511f53u, c.x);
    let h1 = mulhilo(0xcd9e8d57u, c.z);
    c = vec4<u32>(h1.x ^ c.y ^ k.x, h1.y, h0.x ^ c.w ^ k.y, h0.y);
    k += vec2<u32>(0x9e3779b9u, 0xbb67ae85u);
  }
  return c;
}
`;

/** The sampling settings of one dispatch. */
export interface SampleParams {
  /** Softmax temperature; 0 (or less, or below about 3e-39) is greedy. */
  temperature: number;
  /** Keep the k most likely tokens; 0, or k >= V: no limit. */
  topK: number;
  /** Nucleus mass; 1 (or more): no limit. */
  topP: number;
  /** The generator's 64-bit key as two u32 words (low, high). */
  key: readonly [number, number];
  /** The draw's position in each row's stream (the decode step). */
  step: number;
}

/** Bits of `V - 1 - i`, rounded up to whole 4-bit digits. */
function indexBits(V: number): number {
  return Math.max(4, Math.ceil(Math.log2(Math.max(2, V)) / 4) * 4);
}

/**
 * Whether a temperature picks the argmax: 0 or less, or one whose inverse overflows f32 (greedy in effect, and it
 * would give inf * 0 = NaN at the maximum).
 */
export function samplesGreedily(temperature: number): boolean {
  return !(temperature > 0) || !Number.isFinite(Math.fround(1 / temperature));
}

/**
 * Samples one token per row of a block of `rows` rows of logits (`[rows, V]`, maybe a slice; row r is row
 * `row0 + r` of the batch). Bindings: logits (read), streams (read, u32 `[N]`: the random stream of each row),
 * ids (rw, i32 `[N]`), and with `withProbs` probs (rw, f32 `[rows, V]`, a slice like the logits): the sampling
 * distribution the token was drawn from (zeros outside the kept set).
 */
export function sampleTokensKernel(
  dtype: DType,
  rows: number,
  row0: number,
  V: number,
  s: SampleParams,
  withProbs = false,
): Launch {
  const WG = sampleWorkgroup(V);
  const spec = cachedSpec(`sample_token_${dtype}_${WG}${withProbs ? "_probs" : ""}`, () => ({
    bindings: withProbs ? ["read", "read", "rw", "rw"] : ["read", "read", "rw"],
    uniformBytes: 48,
    code: sampleSource(dtype, WG, withProbs),
  }));
  const greedy = samplesGreedily(s.temperature);
  const topK = s.topK > 0 && s.topK < V ? s.topK : 0;
  const topP = s.topP < 1 ? Math.max(0, s.topP) : 1;
  return {
    spec,
    uniforms: new Uniforms(48)
      .u32(rows).u32(V).u32(row0).u32(topK)
      .f32(greedy ? 1 : 1 / s.temperature).f32(topP).u32(greedy ? 1 : 0).u32(indexBits(V))
      .u32(s.key[0]).u32(s.key[1]).u32(s.step).u32(0).buffer,
    workgroups: rowGrid(rows),
  };
}

function sampleSource(dtype: DType, WG: number, withProbs: boolean): string {
  const probsBinding = withProbs ? "@group(0) @binding(3) var<storage, read_write> probs: array<f32>;\n" : "";
  return `${wgslHeader(dtype)}
struct P {
  rows: u32, V: u32, row0: u32, topK: u32,
  invTemp: f32, topP: f32, greedy: u32, idxBits: u32,
  key0: u32, key1: u32, step: u32, _a: u32,
}
@group(0) @binding(0) var<storage, read> logits: array<${wgslType(dtype)}>;
@group(0) @binding(1) var<storage, read> streams: array<u32>;
@group(0) @binding(2) var<storage, read_write> ids: array<i32>;
${probsBinding}@group(0) @binding(${withProbs ? 4 : 3}) var<uniform> p: P;
${WGSL_ROW_INDEX}${WGSL_PHILOX}
const WG: u32 = ${WG}u;
var<workgroup> red: array<vec4<f32>, WG>;
var<workgroup> red_i: array<u32, WG>;
var<workgroup> bins: array<f32, 32>;  // 16 counts, then 16 masses
// the kept set: composite key >= (s_tk, s_ti)
var<workgroup> s_tk: u32;
var<workgroup> s_ti: u32;
// the radix select: prefix bits and masks of the key and index words, total above the prefix, target
var<workgroup> s_phi: u32;
var<workgroup> s_mhi: u32;
var<workgroup> s_plo: u32;
var<workgroup> s_mlo: u32;
var<workgroup> s_acc: f32;
var<workgroup> s_target: f32;
var<workgroup> s_done: u32;
var<workgroup> s_pick: u32;
var<workgroup> s_rest: f32;
var<workgroup> s_total: f32;

// order-preserving map of f32 to u32 (+0 and -0 map alike, as they compare equal)
fn order_key(x: f32) -> u32 {
  let b = select(bitcast<u32>(x), 0u, x == 0.0);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
// the index word of the composite key: lower indices rank higher among equal logits
fn inv_index(i: u32) -> u32 { return p.V - 1u - i; }
// composite (key, inv) >= (tk, ti)
fn ranks_at_least(key: u32, inv: u32, tk: u32, ti: u32) -> bool {
  return key > tk || (key == tk && inv >= ti);
}
fn weight(x: f32, m: f32) -> f32 { return exp((x - m) * p.invTemp); }

// Moves the kept threshold down the ranking to the element where the running count (by_mass false) or mass
// (true) of kept elements, from the top, first reaches goal (a mass goal is a fraction of the kept mass).
fn radix_select(base: u32, m: f32, lid: u32, by_mass: bool, goal: f32) {
  workgroupBarrier();  // everyone has read the previous select's state
  if (lid == 0u) {
    s_phi = 0u;
    s_mhi = 0u;
    s_plo = 0u;
    s_mlo = 0u;
    s_acc = 0.0;
    s_target = goal;
    s_done = 0u;
  }
  let digits = 8u + p.idxBits / 4u;
  let rounds = select(4u, 8u, by_mass);
  for (var j = 0u; j < digits; j++) {
    if (workgroupUniformLoad(&s_done) != 0u) { break; }
    let tk = s_tk;
    let ti = s_ti;
    let phi = s_phi;
    let mhi = s_mhi;
    let plo = s_plo;
    let mlo = s_mlo;
    let on_key = j < 8u;
    let shift = select(p.idxBits - 4u * (j - 7u), 28u - 4u * j, on_key);
    var acc = array<f32, 32>();  // explicit: Naga declares a loop-body var once, without re-zeroing it
    for (var i = lid; i < p.V; i += WG) {
      let x = f32(logits[base + i]);
      let key = order_key(x);
      let inv = inv_index(i);
      if (!ranks_at_least(key, inv, tk, ti) || (key & mhi) != phi || (inv & mlo) != plo) { continue; }
      let d = (select(inv, key, on_key) >> shift) & 15u;
      acc[d] += 1.0;
      if (by_mass) { acc[16u + d] += weight(x, m); }
    }
    for (var q = 0u; q < rounds; q++) {
      red[lid] = vec4<f32>(acc[4u * q], acc[4u * q + 1u], acc[4u * q + 2u], acc[4u * q + 3u]);
      workgroupBarrier();
      for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { red[lid] += red[lid + stride]; }
        workgroupBarrier();
      }
      if (lid == 0u) {
        let v = red[0];
        bins[4u * q] = v.x;
        bins[4u * q + 1u] = v.y;
        bins[4u * q + 2u] = v.z;
        bins[4u * q + 3u] = v.w;
      }
      workgroupBarrier();
    }
    if (lid == 0u) {
      var want = s_target;
      if (by_mass && j == 0u) {
        // the first pass sees every kept element: its mass total is what top_p is a fraction of
        var z = 0.0;
        for (var d = 0u; d < 16u; d++) { z += bins[16u + d]; }
        want = goal * z;
        s_target = want;
      }
      // walk the bins from the top; if rounding leaves the target above the total, the lowest non-empty bin
      var above = s_acc;
      var chosen = 0u;
      var before = above;
      for (var dd = 0u; dd < 16u; dd++) {
        let d = 15u - dd;
        let c = bins[d];
        if (c == 0.0) { continue; }
        chosen = d;
        before = above;
        let v = select(c, bins[16u + d], by_mass);
        if (above + v >= want) { break; }
        above += v;
      }
      let c = bins[chosen];
      s_acc = before;
      if (on_key) {
        s_phi = phi | (chosen << shift);
        s_mhi = mhi | (15u << shift);
      } else {
        s_plo = plo | (chosen << shift);
        s_mlo = mlo | (15u << shift);
      }
      // done when the bin is one element, or a count takes it whole: the kept set is then everything ranked
      // at or above the prefix padded with zeros (within the previous kept set)
      if (c == 1.0 || (!by_mass && before + c == want) || j + 1u == digits) {
        if (ranks_at_least(s_phi, s_plo, tk, ti)) {
          s_tk = s_phi;
          s_ti = s_plo;
        }
        s_done = 1u;
      }
    }
  }
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = row_index(wid, nwg);
  if (r >= p.rows) { return; }  // uniform per workgroup
  let base = r * p.V;
  let row = p.row0 + r;

  // 1. the maximum and its lowest index (starting from the first element, so -inf rows work too)
  var bv = 0.0;
  var bi = 0xffffffffu;
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    if (bi == 0xffffffffu || x > bv) {
      bv = x;
      bi = i;
    }
  }
  red[lid] = vec4<f32>(bv, 0.0, 0.0, 0.0);
  red_i[lid] = bi;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (lid < stride) {
      let a = red[lid].x;
      let ai = red_i[lid];
      let c = red[lid + stride].x;
      let ci = red_i[lid + stride];
      if (ai == 0xffffffffu || (ci != 0xffffffffu && (c > a || (c == a && ci < ai)))) {
        red[lid].x = c;
        red_i[lid] = ci;
      }
    }
    workgroupBarrier();
  }
  let m = red[0].x;
  let top = red_i[0];
  if (p.greedy != 0u) {
    if (lid == 0u) { ids[row] = i32(top); }${
    withProbs
      ? "\n    for (var i = lid; i < p.V; i += WG) { probs[base + i] = select(0.0, 1.0, i == top); }"
      : ""
  }
    return;
  }
  if (lid == 0u) {
    s_tk = 0u;
    s_ti = 0u;
  }
  workgroupBarrier();

  // 2. top-k, then top-p within it
  if (p.topK != 0u) { radix_select(base, m, lid, false, f32(p.topK)); }
  if (p.topP < 1.0) { radix_select(base, m, lid, true, p.topP); }
  workgroupBarrier();

  // 3. the draw: per-thread kept mass, thread 0 finds the share holding u * total, that thread walks it
  let tk = s_tk;
  let ti = s_ti;
  var part = 0.0;
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    if (ranks_at_least(order_key(x), inv_index(i), tk, ti)) { part += weight(x, m); }
  }
  red[lid].x = part;
  workgroupBarrier();
  if (lid == 0u) {
    var total = 0.0;
    for (var t = 0u; t < WG; t++) { total += red[t].x; }
    let bits = philox4x32_10(vec4<u32>(p.step, streams[row], 0u, 0u), vec2<u32>(p.key0, p.key1));
    let goal = f32(bits.x >> 8u) * (1.0 / 16777216.0) * total;
    var run = 0.0;
    var pick = WG;
    var rest = 0.0;
    var last = 0u;
    for (var t = 0u; t < WG; t++) {
      let s = red[t].x;
      if (s > 0.0) {
        last = t;
        if (pick == WG && run + s > goal) {
          pick = t;
          rest = goal - run;
        }
      }
      run += s;
    }
    if (pick == WG) {
      // rounding put the goal at or past the total: the last token with mass
      pick = last;
      rest = red[last].x;
    }
    s_pick = pick;
    s_rest = rest;
    s_total = total;
  }
  workgroupBarrier();
  if (lid == s_pick) {
    let rest = s_rest;
    var run = 0.0;
    var token = 0xffffffffu;
    var last = top;
    for (var i = lid; i < p.V; i += WG) {
      let x = f32(logits[base + i]);
      if (!ranks_at_least(order_key(x), inv_index(i), tk, ti)) { continue; }
      let w = weight(x, m);
      if (w <= 0.0) { continue; }
      last = i;
      run += w;
      if (rest < run) {
        token = i;
        break;
      }
    }
    ids[row] = i32(select(token, last, token == 0xffffffffu));
  }${
    withProbs
      ? `
  let total = s_total;
  for (var i = lid; i < p.V; i += WG) {
    let x = f32(logits[base + i]);
    let kept = ranks_at_least(order_key(x), inv_index(i), tk, ti);
    probs[base + i] = select(0.0, weight(x, m) / total, kept);
  }`
      : ""
  }
}
`;
}

/**
 * Raw Philox4x32-10 blocks, for checking the generator against its published known answers. Bindings: input
 * (read, u32 `[n, 6]`: four counter words, two key words), out (rw, u32 `[n, 4]`).
 */
export function philoxKernel(n: number): Launch {
  const spec = cachedSpec("philox4x32_10", () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `struct P { n: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<storage, read> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<uniform> p: P;
${WGSL_PHILOX}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= p.n) { return; }
  let c = vec4<u32>(input[6u * i], input[6u * i + 1u], input[6u * i + 2u], input[6u * i + 3u]);
  let r = philox4x32_10(c, vec2<u32>(input[6u * i + 4u], input[6u * i + 5u]));
  out[4u * i] = r.x;
  out[4u * i + 1u] = r.y;
  out[4u * i + 2u] = r.z;
  out[4u * i + 3u] = r.w;
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(n).buffer, workgroups: [Math.ceil(n / 64)] };
}
