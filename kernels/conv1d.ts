/**
 * Causal depthwise conv1d of width 4 (the Mamba short convolution), forward and backward side by side, plus the
 * decode-time kernels: a one-token step on a 3-slot state and a multi-token step on a circular state buffer.
 *
 * Layout: activations are channels-last, `x [B, L, C]`, as they come out of `in_proj`; `weight [C, 4]` (the
 * checkpoint's `[C, 1, 4]` is the same memory) and `bias [C]`. For each channel
 *
 *     pre[t] = bias + w[0] x[t-3] + w[1] x[t-2] + w[2] x[t-1] + w[3] x[t]      out[t] = pre[t] or SiLU(pre[t])
 *
 * where x at negative times comes from the optional initial state (`[B, C, 3]`, oldest first: slot j holds time
 * j - 3) or is zero. This is `conv1d(x, padding=3)[..., :L]` (PyTorch's `causal_conv1d_ref`), not the official
 * Mamba2 fallback that keeps the last outputs. The final state `[B, C, 3]` holds the pre-conv inputs of the last
 * three times, oldest first (the reference fixtures' `conv_state [C, 4]` keeps four: its columns 1..3 are ours).
 *
 * Parallel layout of the sequence kernels: one thread per (batch, time segment, channel), walking its segment in
 * time order with the 4-tap window in registers, so each input is loaded once; adjacent threads own adjacent
 * channels, so every load is coalesced. Segments exist only to make enough threads when B * C is small
 * (decode-sized prefill); see {@linkcode conv1dSegments}.
 *
 * @module
 */
import {
  type BindingAccess,
  cachedSpec,
  type DType,
  LINEAR_WORKGROUP,
  linearWorkgroups,
  Uniforms,
  WGSL_LINEAR_INDEX,
  wgslHeader,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Width of the convolution (Mamba's `d_conv`). The kernels are written for 4 taps. */
export const CONV_WIDTH = 4;
/** Number of past inputs a conv state holds (`CONV_WIDTH - 1`). */
export const CONV_STATE = 3;

/** Shape of a conv over a sequence. */
export interface Conv1dShape {
  /** Batch size. */
  batch: number;
  /** Sequence length. */
  length: number;
  /** Channels. */
  channels: number;
}

/** Variant flags of the sequence kernels. */
export interface Conv1dFlags {
  /** Apply SiLU after the bias (Mamba's `xBC = SiLU(conv(xBC) + bias)`). */
  silu: boolean;
  /** An initial state `[B, C, 3]` supplies the inputs before time 0 (else zeros). */
  initialState: boolean;
}

const HELPERS = `
fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }
fn silu_grad(x: f32) -> f32 { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }
`;

const ENTRY = `@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);`;

/** Threads the sequence kernels aim for before they split time into segments (enough to fill a large GPU). */
export const CONV1D_TARGET_THREADS = 1 << 17;
/** Shortest segment worth a thread: each segment re-reads three inputs at its start. */
export const CONV1D_MIN_SEGMENT = 16;

/**
 * Number of time segments the sequence kernels use: 1 when batch * channels threads already fill the GPU, more
 * (each at least {@linkcode CONV1D_MIN_SEGMENT} long) when they do not. `segmentLength` overrides (tests use it
 * to exercise segment boundaries).
 */
export function conv1dSegments(
  shape: Conv1dShape,
  segmentLength?: number,
): { count: number; length: number } {
  const { batch, length, channels } = shape;
  let segLen: number;
  if (segmentLength !== undefined) {
    segLen = Math.max(1, Math.floor(segmentLength));
  } else {
    const want = Math.ceil(CONV1D_TARGET_THREADS / Math.max(1, batch * channels));
    segLen = Math.max(CONV1D_MIN_SEGMENT, Math.ceil(length / Math.max(1, want)));
  }
  segLen = Math.min(segLen, Math.max(1, length));
  return { count: Math.max(1, Math.ceil(length / segLen)), length: segLen };
}

// Uniform struct shared by the sequence kernels. CV = channels / V, the vector count per time step.
const SEQ_UNIFORMS = `struct P { B: u32, L: u32, C: u32, nseg: u32, seglen: u32, CV: u32, _b: u32, _c: u32 }`;

function seqUniforms(shape: Conv1dShape, seg: { count: number; length: number }, v = 1): ArrayBuffer {
  return new Uniforms(32).u32(shape.batch).u32(shape.length).u32(shape.channels).u32(seg.count)
    .u32(seg.length).u32(shape.channels / v).buffer;
}

/**
 * Channels per thread of the sequence kernels: 4 (vec4 loads and stores of activations) when the channel count
 * is a multiple of 4, else 1.
 */
export function conv1dVectorWidth(channels: number): 1 | 4 {
  return channels % 4 === 0 ? 4 : 1;
}

/**
 * WGSL pieces of a sequence kernel that handles V consecutive channels per thread. Activations `[B, L, C]` are
 * bound as arrays of `vec4<T>` when V = 4, so one load moves four channels; per-channel data (weights, bias,
 * states, partial sums) stays scalar and is gathered or scattered one channel at a time.
 */
function vectorPieces(T: string, V: 1 | 4) {
  const VF = V === 1 ? "f32" : "vec4<f32>";
  const lanes = V === 1 ? [""] : [0, 1, 2, 3].map((k) => ` + ${k}u`);
  return {
    /** Storage element type of activations. */
    VS: V === 1 ? T : `vec4<${T}>`,
    /** f32 math type. */
    VF,
    /** `VF` built from a per-channel scalar expression of channel `c` (+ lane). */
    gather: (f: (c: string) => string) =>
      V === 1 ? `f32(${f("c")})` : `${VF}(${lanes.map((l) => `f32(${f(`c${l}`)})`).join(", ")})`,
    /** Statements storing a `VF` value `v` into per-channel scalar locations of type `cast` (+ lane). */
    scatter: (f: (c: string) => string, v: string, cast = T) =>
      V === 1
        ? `${f("c")} = ${cast}(${v});`
        : lanes.map((l, k) => `${f(`c${l}`)} = ${cast}(${v}[${k}]);`).join(" "),
    helpers: `
alias VF = ${VF};
fn sigmoid(x: VF) -> VF { return 1.0 / (1.0 + exp(-x)); }
fn silu_grad(x: VF) -> VF { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }`,
  };
}

// `load_x(b, t, cv)` with t possibly negative: inputs before time 0 come from the initial state or are zero.
// `cv` indexes V-channel vectors; the scalar channel is c = cv * V.
function loadX(init: boolean, T: string, V: 1 | 4): string {
  const vp = vectorPieces(T, V);
  return `
fn load_x(b: u32, t: i32, cv: u32) -> VF {
  if (t >= 0) { return VF(xs[(b * p.L + u32(t)) * p.CV + cv]); }
  let c = cv * ${V}u;
  ${init ? `return ${vp.gather((c) => `init[(b * p.C + ${c}) * 3u + u32(t + 3)]`)};` : "return VF(0.0);"}
}`;
}

// Index decomposition of the (batch, segment, channel vector) threads: channels fastest, so loads coalesce.
const SEQ_THREAD = `
  if (i >= p.B * p.nseg * p.CV) { return; }
  let cv = i % p.CV;
  let c = cv * (p.C / p.CV);
  let bs = i / p.CV;
  let seg = bs % p.nseg;
  let b = bs / p.nseg;
  let t0 = i32(seg * p.seglen);
  let t1 = i32(min(p.L, (seg + 1u) * p.seglen));`;

/**
 * Forward over a sequence. Bindings: x `[B, L, C]`, weight `[C, 4]`, bias `[C]`, (initial state `[B, C, 3]` if
 * `flags.initialState`), out `[B, L, C]` (rw).
 */
export function conv1dForward(
  dtype: DType,
  shape: Conv1dShape,
  flags: Conv1dFlags,
  segmentLength?: number,
): Launch {
  const T = wgslType(dtype);
  const seg = conv1dSegments(shape, segmentLength);
  const V = conv1dVectorWidth(shape.channels);
  const key = `conv1d_fwd_${dtype}_v${V}_${flags.silu ? "silu" : "id"}_${
    flags.initialState ? "init" : "zero"
  }`;
  const spec = cachedSpec(key, () => {
    const vp = vectorPieces(T, V);
    const bindings: BindingAccess[] = flags.initialState
      ? ["read", "read", "read", "read", "rw"]
      : ["read", "read", "read", "rw"];
    let n = 0;
    return {
      bindings,
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
${SEQ_UNIFORMS}
@group(0) @binding(${n++}) var<storage, read> xs: array<${vp.VS}>;
@group(0) @binding(${n++}) var<storage, read> w: array<${T}>;
@group(0) @binding(${n++}) var<storage, read> bias: array<${T}>;
${flags.initialState ? `@group(0) @binding(${n++}) var<storage, read> init: array<${T}>;` : ""}
@group(0) @binding(${n++}) var<storage, read_write> out: array<${vp.VS}>;
@group(0) @binding(${n++}) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${vp.helpers}${loadX(flags.initialState, T, V)}
${ENTRY}
${SEQ_THREAD}
  let w0 = ${vp.gather((c) => `w[(${c}) * 4u]`)};
  let w1 = ${vp.gather((c) => `w[(${c}) * 4u + 1u]`)};
  let w2 = ${vp.gather((c) => `w[(${c}) * 4u + 2u]`)};
  let w3 = ${vp.gather((c) => `w[(${c}) * 4u + 3u]`)};
  let bb = ${vp.gather((c) => `bias[${c}]`)};
  // window x[t-3], x[t-2], x[t-1]: shifted one step per output
  var x0 = load_x(b, t0 - 3, cv);
  var x1 = load_x(b, t0 - 2, cv);
  var x2 = load_x(b, t0 - 1, cv);
  for (var t = t0; t < t1; t++) {
    let idx = (b * p.L + u32(t)) * p.CV + cv;
    let x3 = VF(xs[idx]);
    let pre = bb + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3;
    out[idx] = ${vp.VS}(${flags.silu ? "pre * sigmoid(pre)" : "pre"});
    x0 = x1; x1 = x2; x2 = x3;
  }
}
`,
    };
  });
  return {
    spec,
    uniforms: seqUniforms(shape, seg, V),
    workgroups: linearWorkgroups(shape.batch * seg.count * (shape.channels / V)),
  };
}

/**
 * The state after a sequence: the pre-conv inputs of times L-3, L-2, L-1 (oldest first), taken from the initial
 * state when L < 3. Bindings: x `[B, L, C]`, (initial state `[B, C, 3]`), final state `[B, C, 3]` (rw).
 */
export function conv1dFinalState(dtype: DType, shape: Conv1dShape, initialState: boolean): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`conv1d_final_state_${dtype}_${initialState ? "init" : "zero"}`, () => {
    let n = 0;
    return {
      bindings: initialState ? ["read", "read", "rw"] : ["read", "rw"],
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
${SEQ_UNIFORMS}
@group(0) @binding(${n++}) var<storage, read> xs: array<${T}>;
${initialState ? `@group(0) @binding(${n++}) var<storage, read> init: array<${T}>;` : ""}
@group(0) @binding(${n++}) var<storage, read_write> fin: array<${T}>;
@group(0) @binding(${n++}) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${vectorPieces(T, 1).helpers}${loadX(initialState, T, 1)}
${ENTRY}
  if (i >= p.B * p.C * 3u) { return; }
  let j = i % 3u;
  let c = (i / 3u) % p.C;
  let b = i / (3u * p.C);
  fin[i] = ${T}(load_x(b, i32(p.L) - 3 + i32(j), c));
}
`,
    };
  });
  return {
    spec,
    uniforms: seqUniforms(shape, { count: 1, length: shape.length }),
    workgroups: linearWorkgroups(shape.batch * shape.channels * 3),
  };
}

/** Optional inputs and outputs of {@linkcode conv1dBackward}. */
export interface Conv1dBackwardFlags extends Conv1dFlags {
  /** A gradient of the final state `[B, C, 3]` flows back into x (and the initial state when L < 3). */
  finalStateGrad: boolean;
}

/**
 * Backward over a sequence, first stage: grad of x and per-segment partial sums of the weight and bias grads.
 * Each thread walks its segment backwards: dL/dx[t] = sum_k w[k] * gpre[t + 3 - k] needs the three later
 * pre-activation grads, kept in registers (recomputed across segment boundaries).
 *
 * Bindings: x, weight, bias, gout `[B, L, C]`, (initial state), (final-state grad `[B, C, 3]`), gx `[B, L, C]`
 * (rw), partials `[B * segments, 5, C]` f32 (rw: 4 weight taps then bias), (initial-state grad `[B, C, 3]` (rw)).
 * Finish with {@linkcode conv1dReduceParams}.
 */
export function conv1dBackward(
  dtype: DType,
  shape: Conv1dShape,
  flags: Conv1dBackwardFlags,
  segmentLength?: number,
): Launch & { partialRows: number } {
  const T = wgslType(dtype);
  const seg = conv1dSegments(shape, segmentLength);
  const V = conv1dVectorWidth(shape.channels);
  const key = `conv1d_bwd_${dtype}_v${V}_${flags.silu ? "silu" : "id"}_${
    flags.initialState ? "init" : "zero"
  }_${flags.finalStateGrad ? "gfin" : "nofin"}`;
  const spec = cachedSpec(key, () => {
    const vp = vectorPieces(T, V);
    const bindings: BindingAccess[] = ["read", "read", "read", "read"];
    if (flags.initialState) bindings.push("read");
    if (flags.finalStateGrad) bindings.push("read");
    bindings.push("rw", "rw");
    if (flags.initialState) bindings.push("rw");
    let n = 0;
    const gpre = flags.silu
      ? `
  let pre = bb + w0 * xa + w1 * xb + w2 * xc + w3 * xd;
  return g * silu_grad(pre);`
      : "return g;";
    return {
      bindings,
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
${SEQ_UNIFORMS}
@group(0) @binding(${n++}) var<storage, read> xs: array<${vp.VS}>;
@group(0) @binding(${n++}) var<storage, read> w: array<${T}>;
@group(0) @binding(${n++}) var<storage, read> bias: array<${T}>;
@group(0) @binding(${n++}) var<storage, read> gout: array<${vp.VS}>;
${flags.initialState ? `@group(0) @binding(${n++}) var<storage, read> init: array<${T}>;` : ""}
${flags.finalStateGrad ? `@group(0) @binding(${n++}) var<storage, read> gfin: array<${T}>;` : ""}
@group(0) @binding(${n++}) var<storage, read_write> gx: array<${vp.VS}>;
@group(0) @binding(${n++}) var<storage, read_write> part: array<f32>;
${flags.initialState ? `@group(0) @binding(${n++}) var<storage, read_write> ginit: array<${T}>;` : ""}
@group(0) @binding(${n++}) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${vp.helpers}${loadX(flags.initialState, T, V)}

// grad of the pre-activation at time t (0 outside [0, L)), from the window x[t-3..t]
fn gpre_of(b: u32, t: i32, cv: u32, xa: VF, xb: VF, xc: VF, xd: VF,
           w0: VF, w1: VF, w2: VF, w3: VF, bb: VF) -> VF {
  if (t < 0 || t >= i32(p.L)) { return VF(0.0); }
  let g = VF(gout[(b * p.L + u32(t)) * p.CV + cv]);
  ${gpre}
}

// gradient reaching the input at time t through the final state (times L-3..L-1)
fn gfin_at(b: u32, t: i32, c: u32) -> VF {
  ${
        flags.finalStateGrad
          ? `let j = t - (i32(p.L) - 3);
  if (j < 0 || j > 2) { return VF(0.0); }
  return ${vp.gather((c) => `gfin[(b * p.C + ${c}) * 3u + u32(j)]`)};`
          : "return VF(0.0);"
      }
}

${ENTRY}
${SEQ_THREAD}
  let w0 = ${vp.gather((c) => `w[(${c}) * 4u]`)};
  let w1 = ${vp.gather((c) => `w[(${c}) * 4u + 1u]`)};
  let w2 = ${vp.gather((c) => `w[(${c}) * 4u + 2u]`)};
  let w3 = ${vp.gather((c) => `w[(${c}) * 4u + 3u]`)};
  let bb = ${vp.gather((c) => `bias[${c}]`)};
  // later pre-activation grads g1 = gpre[t+1], g2 = gpre[t+2], g3 = gpre[t+3]: recomputed past the segment end
  var g1 = VF(0.0); var g2 = VF(0.0); var g3 = VF(0.0);
  {
    let e = t1;
    let a0 = load_x(b, e - 3, cv); let a1 = load_x(b, e - 2, cv); let a2 = load_x(b, e - 1, cv);
    var a3 = VF(0.0); var a4 = VF(0.0); var a5 = VF(0.0);
    if (e < i32(p.L)) { a3 = load_x(b, e, cv); }
    if (e + 1 < i32(p.L)) { a4 = load_x(b, e + 1, cv); }
    if (e + 2 < i32(p.L)) { a5 = load_x(b, e + 2, cv); }
    g1 = gpre_of(b, e, cv, a0, a1, a2, a3, w0, w1, w2, w3, bb);
    g2 = gpre_of(b, e + 1, cv, a1, a2, a3, a4, w0, w1, w2, w3, bb);
    g3 = gpre_of(b, e + 2, cv, a2, a3, a4, a5, w0, w1, w2, w3, bb);
  }
  // window x[t-3], x[t-2], x[t-1], x[t] for t = t1 - 1, shifted back one step per iteration
  var xa = load_x(b, t1 - 4, cv);
  var xb = load_x(b, t1 - 3, cv);
  var xc = load_x(b, t1 - 2, cv);
  var xd = load_x(b, t1 - 1, cv);
  var s0 = VF(0.0); var s1 = VF(0.0); var s2 = VF(0.0); var s3 = VF(0.0); var sb = VF(0.0);
  for (var t = t1 - 1; t >= t0; t--) {
    let gp = gpre_of(b, t, cv, xa, xb, xc, xd, w0, w1, w2, w3, bb);
    gx[(b * p.L + u32(t)) * p.CV + cv] = ${vp.VS}(w3 * gp + w2 * g1 + w1 * g2 + w0 * g3 + gfin_at(b, t, c));
    s0 += gp * xa; s1 += gp * xb; s2 += gp * xc; s3 += gp * xd; sb += gp;
    g3 = g2; g2 = g1; g1 = gp;
    xd = xc; xc = xb; xb = xa;
    xa = load_x(b, t - 4, cv);
  }
  ${
        flags.initialState
          ? `// the first segment also owns the initial state's grad: inputs at times -1, -2, -3
  if (seg == 0u) {
    for (var t = -1; t >= -3; t--) {
      let gi = w2 * g1 + w1 * g2 + w0 * g3 + gfin_at(b, t, c);
      ${vp.scatter((c) => `ginit[(b * p.C + ${c}) * 3u + u32(t + 3)]`, "gi")}
      g3 = g2; g2 = g1; g1 = VF(0.0);
    }
  }`
          : ""
      }
  let row = (b * p.nseg + seg) * 5u;
  ${
        ["s0", "s1", "s2", "s3", "sb"].map((s, k) =>
          vp.scatter((c) => `part[(row + ${k}u) * p.C + ${c}]`, s, "f32")
        )
          .join("\n  ")
      }
}
`,
    };
  });
  return {
    spec,
    uniforms: seqUniforms(shape, seg, V),
    workgroups: linearWorkgroups(shape.batch * seg.count * (shape.channels / V)),
    partialRows: shape.batch * seg.count,
  };
}

/**
 * Backward, second stage: sums the partials `[rows, 5, C]` over rows into the weight grad `[C, 4]` and the bias
 * grad `[C]`, in a fixed order (deterministic). Bindings: partials (read), gweight (rw), gbias (rw).
 */
export function conv1dReduceParams(dtype: DType, rows: number, channels: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`conv1d_reduce_params_${dtype}`, () => ({
    bindings: ["read", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, C: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> gw: array<${T}>;
@group(0) @binding(2) var<storage, read_write> gbias: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
${ENTRY}
  if (i >= 5u * p.C) { return; }
  let c = i % p.C;
  let k = i / p.C;
  var s = 0.0;
  for (var r = 0u; r < p.rows; r++) { s += part[(r * 5u + k) * p.C + c]; }
  if (k < 4u) { gw[c * 4u + k] = ${T}(s); } else { gbias[c] = ${T}(s); }
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(channels).buffer,
    workgroups: linearWorkgroups(5 * channels),
  };
}

/**
 * One decode token on a 3-slot state, updated in place: out = conv(state ++ x), state <- (s1, s2, x).
 * Bindings: x `[B, C]`, weight, bias, state `[B, C, 3]` (rw), out `[B, C]` (rw).
 */
export function conv1dStep(dtype: DType, batch: number, channels: number, silu: boolean): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`conv1d_step_${dtype}_${silu ? "silu" : "id"}`, () => ({
    bindings: ["read", "read", "read", "rw", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { B: u32, C: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> xs: array<${T}>;
@group(0) @binding(1) var<storage, read> w: array<${T}>;
@group(0) @binding(2) var<storage, read> bias: array<${T}>;
@group(0) @binding(3) var<storage, read_write> state: array<${T}>;
@group(0) @binding(4) var<storage, read_write> out: array<${T}>;
@group(0) @binding(5) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${HELPERS}
${ENTRY}
  if (i >= p.B * p.C) { return; }
  let c = i % p.C;
  let s = i * 3u;
  let x0 = f32(state[s]); let x1 = f32(state[s + 1u]); let x2 = f32(state[s + 2u]);
  let x3 = f32(xs[i]);
  let pre = f32(bias[c]) + f32(w[c * 4u]) * x0 + f32(w[c * 4u + 1u]) * x1 + f32(w[c * 4u + 2u]) * x2 +
    f32(w[c * 4u + 3u]) * x3;
  out[i] = ${T}(${silu ? "pre * sigmoid(pre)" : "pre"});
  state[s] = ${T}(x1); state[s + 1u] = ${T}(x2); state[s + 2u] = xs[i];
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(batch).u32(channels).buffer,
    workgroups: linearWorkgroups(batch * channels),
  };
}

/** Shape of a circular-state conv call. */
export interface Conv1dRingShape {
  /** Batch size. */
  batch: number;
  /** New tokens per call (K + 1 when verifying K drafts). */
  tokens: number;
  /** Channels. */
  channels: number;
  /** Slots of the circular state (3 + K for K drafts); at least tokens + 2. */
  slots: number;
}

/**
 * Several decode tokens on a circular state (speculative verification). Per batch row b, `pos[b]` is the slot
 * the next input goes to; the current window is slots pos-3, pos-2, pos-1 (mod S). The kernel writes the T new
 * inputs at slots pos..pos+T-1 and does NOT move `pos`: after acceptance the caller advances it by the number
 * of inputs kept (1..T) with {@linkcode conv1dRingAdvance}, which rolls back the rest. Since the window of any
 * kept prefix (>= 1 token) only needs the two slots before `pos`, S = T + 2 slots suffice (3 + K for K drafts).
 *
 * Bindings: x `[B, T, C]`, weight, bias, ring `[B, C, S]` (rw), pos `[B]` u32, out `[B, T, C]` (rw).
 */
export function conv1dRing(dtype: DType, shape: Conv1dRingShape, silu: boolean): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`conv1d_ring_${dtype}_${silu ? "silu" : "id"}`, () => ({
    bindings: ["read", "read", "read", "rw", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { B: u32, T: u32, C: u32, S: u32 }
@group(0) @binding(0) var<storage, read> xs: array<${T}>;
@group(0) @binding(1) var<storage, read> w: array<${T}>;
@group(0) @binding(2) var<storage, read> bias: array<${T}>;
@group(0) @binding(3) var<storage, read_write> ring: array<${T}>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<${T}>;
@group(0) @binding(6) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${HELPERS}
${ENTRY}
  if (i >= p.B * p.C) { return; }
  let c = i % p.C;
  let b = i / p.C;
  let base = i * p.S;
  let q = pos[b] % p.S;
  // + 3S keeps the unsigned slot arithmetic non-negative
  var x0 = f32(ring[base + (q + 3u * p.S - 3u) % p.S]);
  var x1 = f32(ring[base + (q + 3u * p.S - 2u) % p.S]);
  var x2 = f32(ring[base + (q + 3u * p.S - 1u) % p.S]);
  let w0 = f32(w[c * 4u]); let w1 = f32(w[c * 4u + 1u]); let w2 = f32(w[c * 4u + 2u]); let w3 = f32(w[c * 4u + 3u]);
  let bb = f32(bias[c]);
  for (var t = 0u; t < p.T; t++) {
    let idx = (b * p.T + t) * p.C + c;
    let x3 = f32(xs[idx]);
    let pre = bb + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3;
    out[idx] = ${T}(${silu ? "pre * sigmoid(pre)" : "pre"});
    ring[base + (q + t) % p.S] = xs[idx];
    x0 = x1; x1 = x2; x2 = x3;
  }
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(shape.batch).u32(shape.tokens).u32(shape.channels).u32(shape.slots).buffer,
    workgroups: linearWorkgroups(shape.batch * shape.channels),
  };
}

/**
 * Moves the circular states' positions: `pos[b] = (pos[b] + n) % S`, with n = `counts[b]` (u32 `[B]`, e.g. the
 * accepted tokens + 1 computed on the GPU) or the constant `by`. Bindings: pos `[B]` u32 (rw), (counts `[B]` u32).
 */
export function conv1dRingAdvance(batch: number, slots: number, by: number | "counts"): Launch {
  const counts = by === "counts";
  const spec = cachedSpec(`conv1d_ring_advance_${counts ? "counts" : "const"}`, () => ({
    bindings: counts ? ["rw", "read"] : ["rw"],
    uniformBytes: 16,
    code: `struct P { B: u32, S: u32, by: u32, _a: u32 }
@group(0) @binding(0) var<storage, read_write> pos: array<u32>;
${counts ? "@group(0) @binding(1) var<storage, read> counts: array<u32>;" : ""}
@group(0) @binding(${counts ? 2 : 1}) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
${ENTRY}
  if (i >= p.B) { return; }
  pos[i] = (pos[i] % p.S + ${counts ? "counts[i]" : "p.by"} % p.S) % p.S;
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(batch).u32(slots).u32(counts ? 0 : by as number).buffer,
    workgroups: linearWorkgroups(batch),
  };
}

/**
 * Converts between a 3-slot state `[B, C, 3]` and a circular state `[B, C, S]` with positions `[B]`.
 * `toRing`: ring slots 0..2 <- state, pos <- 3 % S (other slots are left as they are: they are never read
 * before being written). Bindings: state (read), ring (rw), pos (rw).
 * `fromRing`: state <- the window before pos. Bindings: ring (read), pos (read), state (rw).
 */
export function conv1dRingConvert(
  dtype: DType,
  batch: number,
  channels: number,
  slots: number,
  direction: "toRing" | "fromRing",
): Launch {
  const T = wgslType(dtype);
  const toRing = direction === "toRing";
  const spec = cachedSpec(`conv1d_ring_${direction}_${dtype}`, () => ({
    bindings: toRing ? ["read", "rw", "rw"] : ["read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { B: u32, C: u32, S: u32, _a: u32 }
${
      toRing
        ? `@group(0) @binding(0) var<storage, read> state: array<${T}>;
@group(0) @binding(1) var<storage, read_write> ring: array<${T}>;
@group(0) @binding(2) var<storage, read_write> pos: array<u32>;`
        : `@group(0) @binding(0) var<storage, read> ring: array<${T}>;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
@group(0) @binding(2) var<storage, read_write> state: array<${T}>;`
    }
@group(0) @binding(3) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
${ENTRY}
  if (i >= p.B * p.C * 3u) { return; }
  let j = i % 3u;
  let bc = i / 3u;
  let b = bc / p.C;
  ${
      toRing
        ? `ring[bc * p.S + j] = state[i];
  if (i % (3u * p.C) == 0u) { pos[b] = 3u % p.S; }`
        : `state[i] = ring[bc * p.S + (pos[b] % p.S + 3u * p.S - 3u + j) % p.S];`
    }
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(batch).u32(channels).u32(slots).buffer,
    workgroups: linearWorkgroups(batch * channels * 3),
  };
}
