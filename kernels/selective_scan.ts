/**
 * Mamba1 selective scan (method.md 1.2), forward and backward side by side, plus the one-token decode step.
 *
 * Per batch row, channel c (of Dn = d_inner) and state n (of N = d_state):
 *
 *     h[t, c, n] = exp(delta[t, c] A[c, n]) h[t-1, c, n] + delta[t, c] B[t, gB(c), n] x[t, c]
 *     y[t, c]    = sum_n C[t, gC(c), n] h[t, c, n] + D[c] x[t, c]
 *
 * with gB(c) = c / (Dn / GB) and gC(c) = c / (Dn / GC): B `[B, L, GB, N]` and C `[B, L, GC, N]` are shared by
 * groups of consecutive channels. Mamba1 hybrids pass B un-repeated (GB = d_xb / 16: the repeat_kv of the
 * reference is exactly this grouping) and C with GC = d_inner / 16. `delta` is already softplus'ed and `A` is
 * already `-exp(A_log)`: the caller composes both from elementwise ops (and reproduces the double dt bias).
 * Activations and parameters share one dtype (f32 or f16); states, checkpoints and all math are f32.
 *
 * Parallel layout: one thread per (batch, channel) walks time with the N states in registers; B and C rows are
 * read by every channel of a group (cache hits). Time is cut into chunks of `SUB * NSUB` steps. When batch x
 * channels threads fill the GPU, one thread walks all chunks ("sequential"); when they do not (small-batch
 * prefill), chunks run in parallel: each chunk scans from a zero state, a cheap pass chains the chunk states
 * (the decay over a chunk is exp(A * sum delta)), and each chunk scans again from its true start state.
 *
 * Memory trade-off of the backward: the forward saves the state at each chunk start (checkpoints
 * `[B, chunks, N, Dn]` f32, i.e. N / chunkLength times the size of x: a quarter of x for N = 16 and chunks of
 * 64), never the per-step states (N times x). The backward walks each chunk in reverse; it recomputes the
 * states inside the chunk from its checkpoint in two levels (sub-chunk starts, then the SUB states of one
 * sub-chunk, both in private arrays), so it scans about three times and stores nothing per step. The gradient of
 * the state (the adjoint) runs backwards through the same recurrence; across chunks it is chained like the
 * forward (a local pass with zero carry, a reverse chaining pass, then the main pass) when chunks run in
 * parallel.
 *
 * Gradients of B and C sum over the channels of a group at every step: each workgroup (W consecutive channels of
 * one batch row and chunk range) reduces them in workgroup memory; W is chosen so that groups never straddle a
 * workgroup unless they span whole workgroups, in which case per-workgroup partial sums are added afterwards.
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Shape of a selective scan. */
export interface ScanShape {
  /** Batch size. */
  batch: number;
  /** Sequence length. */
  length: number;
  /** Channels (d_inner). */
  channels: number;
  /** States per channel (d_state, 16 in Mamba1). */
  states: number;
  /** Groups of B (channels / groupsB consecutive channels share one B row). */
  groupsB: number;
  /** Groups of C. */
  groupsC: number;
}

/** How the time axis is cut: chunks of `sub * nsub` steps; `parallel` runs chunks side by side. */
export interface ScanChunking {
  /** Steps per sub-chunk (states of one sub-chunk are kept in a private array in the backward). */
  sub: number;
  /** Sub-chunks per chunk. */
  nsub: number;
  /** Number of chunks. */
  chunks: number;
  /** Chunks run in parallel (three passes) instead of one thread walking them all. */
  parallel: boolean;
}

/** Default checkpoint interval: checkpoints cost N / 64 of x (a quarter for N = 16). */
export const SCAN_DEFAULT_CHUNK = 64;
/** Batch x channel threads below which chunks run in parallel (an H200 holds about 270k resident threads). */
export const SCAN_PARALLEL_BELOW = 1 << 17;

/**
 * The chunking of a scan: chunks of `chunkLength` steps (rounded to whole sub-chunks of at most 8), parallel
 * when batch * channels is below {@linkcode SCAN_PARALLEL_BELOW} and there is more than one chunk, or as forced.
 */
export function scanChunking(
  shape: ScanShape,
  chunkLength = SCAN_DEFAULT_CHUNK,
  parallel?: boolean,
): ScanChunking {
  const tc = Math.max(1, Math.floor(chunkLength));
  const sub = Math.min(8, tc);
  const nsub = Math.ceil(tc / sub);
  const chunks = Math.max(1, Math.ceil(shape.length / (sub * nsub)));
  const par = parallel ?? (shape.batch * shape.channels < SCAN_PARALLEL_BELOW && chunks > 1);
  return { sub, nsub, chunks, parallel: par };
}

/**
 * Channels per workgroup of the backward: the largest W <= 64 such that, for both B and C, W is a multiple of
 * the group size or the group size a multiple of W (then the group's sum is finished by a second pass).
 */
export function scanGroupWidth(shape: ScanShape): number {
  const cpgB = shape.channels / shape.groupsB, cpgC = shape.channels / shape.groupsC;
  const fits = (w: number, g: number) => w % g === 0 || g % w === 0;
  for (let w = 64; w > 1; w--) if (fits(w, cpgB) && fits(w, cpgC)) return w;
  return 1;
}

const UNIFORMS = `struct P {
  B: u32, L: u32, Dn: u32, GB: u32, GC: u32, cpgB: u32, cpgC: u32, tc: u32,
  nck: u32, sbB: u32, sbC: u32, _a: u32,
}`;
const UNIFORM_BYTES = 48;

function scanUniforms(shape: ScanShape, ch: ScanChunking, w = 64): ArrayBuffer {
  const cpgB = shape.channels / shape.groupsB, cpgC = shape.channels / shape.groupsC;
  return new Uniforms(UNIFORM_BYTES)
    .u32(shape.batch).u32(shape.length).u32(shape.channels).u32(shape.groupsB).u32(shape.groupsC)
    .u32(cpgB).u32(cpgC).u32(ch.sub * ch.nsub).u32(ch.chunks)
    .u32(Math.min(cpgB, w)).u32(Math.min(cpgC, w)).buffer;
}

/** Threads per workgroup of the forward scans (channels of one batch row and chunk). */
const FWD_W = 64;

// One step of the recurrence for channel c at flat row `row` = b * L + t: updates h, returns y without D x.
// Expects the bindings xs, delta, bm, cm (any storage type: every load is widened to f32).
const STEP_FN = `
fn scan_step(row: u32, c: u32, gb: u32, gc: u32, a: ptr<function, array<f32, N>>,
             h: ptr<function, array<f32, N>>) -> f32 {
  let dv = f32(delta[row * p.Dn + c]);
  let dx = dv * f32(xs[row * p.Dn + c]);
  let bb = (row * p.GB + gb) * N;
  let cb = (row * p.GC + gc) * N;
  var yv = 0.0;
  for (var n = 0u; n < N; n++) {
    (*h)[n] = exp(dv * (*a)[n]) * (*h)[n] + dx * f32(bm[bb + n]);
    yv += f32(cm[cb + n]) * (*h)[n];
  }
  return yv;
}
// The same step when y is not needed (recomputation, chunk-local passes): no C loads.
fn state_step(row: u32, c: u32, gb: u32, a: ptr<function, array<f32, N>>, h: ptr<function, array<f32, N>>) {
  let dv = f32(delta[row * p.Dn + c]);
  let dx = dv * f32(xs[row * p.Dn + c]);
  let bb = (row * p.GB + gb) * N;
  for (var n = 0u; n < N; n++) { (*h)[n] = exp(dv * (*a)[n]) * (*h)[n] + dx * f32(bm[bb + n]); }
}`;

/** Variants of {@linkcode scanForward}. */
export type ScanForwardMode =
  /** One thread per (batch, channel) walks every chunk: init from h0 or zeros, writes y (and checkpoints). */
  | "sequential"
  /** Parallel pass 1: each chunk from a zero state; writes its end state into `ck` and its sum of delta. */
  | "local"
  /** Parallel pass 3: each chunk from its checkpoint (after {@linkcode scanChain}); writes y. */
  | "chunk";

/** Flags of {@linkcode scanForward}. */
export interface ScanForwardFlags {
  /** Which pass. */
  mode: ScanForwardMode;
  /** "sequential": an initial state h0 `[B, Dn, N]` f32 is bound (else zeros). */
  initialState: boolean;
  /** "sequential": write the checkpoint at every chunk start (needed by the backward). */
  checkpoints: boolean;
  /** "sequential": write the final state `[B, Dn, N]` f32. */
  finalState: boolean;
}

/**
 * Forward scan passes. Bindings, in order: x `[B, L, Dn]`, delta `[B, L, Dn]`, A `[Dn, N]`, B `[B, L, GB, N]`,
 * C `[B, L, GC, N]`, D `[Dn]`, then by mode:
 * - sequential: (h0 `[B, Dn, N]` f32), y `[B, L, Dn]` (rw), (ck `[B, chunks, N, Dn]` f32 (rw)), (hL `[B, Dn, N]`
 *   f32 (rw));
 * - local: ck (rw: chunk end states from zero), dsum `[B, chunks, Dn]` f32 (rw);
 * - chunk: ck (read: chunk start states), y (rw).
 */
export function scanForward(
  dtype: DType,
  shape: ScanShape,
  ch: ScanChunking,
  flags: ScanForwardFlags,
): Launch {
  const T = wgslType(dtype);
  const N = shape.states;
  const { mode } = flags;
  const seq = mode === "sequential";
  const init = seq && flags.initialState,
    writeCk = seq && flags.checkpoints,
    writeHL = seq && flags.finalState;
  const key = `scan_fwd_${dtype}_n${N}_${mode}${init ? "_h0" : ""}${writeCk ? "_ck" : ""}${
    writeHL ? "_hl" : ""
  }`;
  const spec = cachedSpec(key, () => {
    const extra: [string, "read" | "rw", string][] = [];
    if (init) extra.push(["h0", "read", "f32"]);
    if (mode !== "local") extra.push(["ys", "rw", T]);
    if (writeCk || mode === "local") extra.push(["ck", "rw", "f32"]);
    if (mode === "chunk") extra.push(["ck", "read", "f32"]);
    if (writeHL) extra.push(["hl", "rw", "f32"]);
    if (mode === "local") extra.push(["dsum", "rw", "f32"]);
    const bindings = ["read", "read", "read", "read", "read", "read", ...extra.map((e) => e[1])] as const;
    const decls = extra.map(([name, acc, ty], i) =>
      `@group(0) @binding(${6 + i}) var<storage, ${
        acc === "rw" ? "read_write" : "read"
      }> ${name}: array<${ty}>;`
    ).join("\n");
    const ckIdx = (k: string) => `((b * p.nck + ${k}) * N + n) * p.Dn + c`;
    return {
      bindings: [...bindings],
      uniformBytes: UNIFORM_BYTES,
      code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
@group(0) @binding(0) var<storage, read> xs: array<${T}>;
@group(0) @binding(1) var<storage, read> delta: array<${T}>;
@group(0) @binding(2) var<storage, read> am: array<${T}>;
@group(0) @binding(3) var<storage, read> bm: array<${T}>;
@group(0) @binding(4) var<storage, read> cm: array<${T}>;
@group(0) @binding(5) var<storage, read> dm: array<${T}>;
${decls}
@group(0) @binding(${6 + extra.length}) var<uniform> p: P;
${STEP_FN}
@compute @workgroup_size(${FWD_W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let c = wid.x * ${FWD_W}u + lid.x;
  if (c >= p.Dn) { return; }
  let b = wid.z;
  ${seq ? "let k0 = 0u; let k1 = p.nck;" : "let k0 = wid.y; let k1 = wid.y + 1u;"}
  var a: array<f32, N>;
  var h: array<f32, N>;
  for (var n = 0u; n < N; n++) {
    a[n] = f32(am[c * N + n]);
    ${
        init
          ? "h[n] = h0[(b * p.Dn + c) * N + n];"
          : mode === "chunk"
          ? `h[n] = ck[${ckIdx("k0")}];`
          : "h[n] = 0.0;"
      }
  }
  let gb = c / p.cpgB;
  let gc = c / p.cpgC;
  let dd = f32(dm[c]);
  for (var k = k0; k < k1; k++) {
    ${writeCk ? `for (var n = 0u; n < N; n++) { ck[${ckIdx("k")}] = h[n]; }` : ""}
    let t1 = min(p.L, (k + 1u) * p.tc);
    var ds = 0.0;
    for (var t = k * p.tc; t < t1; t++) {
      let row = b * p.L + t;
      ${
        mode === "local"
          ? `state_step(row, c, gb, &a, &h);
      ds += f32(delta[row * p.Dn + c]);`
          : "ys[row * p.Dn + c] = T(scan_step(row, c, gb, gc, &a, &h) + dd * f32(xs[row * p.Dn + c]));"
      }
    }
    ${
        mode === "local"
          ? `for (var n = 0u; n < N; n++) { ck[${ckIdx("k")}] = h[n]; }
    dsum[(b * p.nck + k) * p.Dn + c] = ds;`
          : ""
      }
  }
  ${writeHL ? "for (var n = 0u; n < N; n++) { hl[(b * p.Dn + c) * N + n] = h[n]; }" : ""}
}
alias T = ${T};
`,
    };
  });
  return {
    spec,
    uniforms: scanUniforms(shape, ch),
    workgroups: [
      ceilDiv(shape.channels, FWD_W),
      ch.parallel && mode !== "sequential" ? ch.chunks : 1,
      shape.batch,
    ],
  };
}

/**
 * Parallel pass 2 (forward): chains chunk states in place. `ck[k]` holds chunk k's end state from a zero start;
 * afterwards it holds chunk k's true start state: s_0 = h0, s_{k+1} = exp(A sum_k delta) s_k + end_k.
 * Bindings: A, dsum `[B, chunks, Dn]` f32, (h0 f32), ck (rw), (hL `[B, Dn, N]` f32 (rw)).
 */
export function scanChain(
  dtype: DType,
  shape: ScanShape,
  ch: ScanChunking,
  initialState: boolean,
  finalState: boolean,
): Launch {
  const T = wgslType(dtype);
  const N = shape.states;
  const spec = cachedSpec(
    `scan_chain_${dtype}_n${N}${initialState ? "_h0" : ""}${finalState ? "_hl" : ""}`,
    () => {
      let n = 0;
      const bindings: ("read" | "rw")[] = ["read", "read"];
      if (initialState) bindings.push("read");
      bindings.push("rw");
      if (finalState) bindings.push("rw");
      return {
        bindings,
        uniformBytes: UNIFORM_BYTES,
        code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
@group(0) @binding(${n++}) var<storage, read> am: array<${T}>;
@group(0) @binding(${n++}) var<storage, read> dsum: array<f32>;
${initialState ? `@group(0) @binding(${n++}) var<storage, read> h0: array<f32>;` : ""}
@group(0) @binding(${n++}) var<storage, read_write> ck: array<f32>;
${finalState ? `@group(0) @binding(${n++}) var<storage, read_write> hl: array<f32>;` : ""}
@group(0) @binding(${n++}) var<uniform> p: P;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wid.y * nwg.x + wid.x) * 64u + lid.x;
  if (i >= p.B * N * p.Dn) { return; }
  // thread (b, n, c), c fastest: checkpoint loads coalesce
  let c = i % p.Dn;
  let n = (i / p.Dn) % N;
  let b = i / (p.Dn * N);
  let a = f32(am[c * N + n]);
  var s = ${initialState ? "h0[(b * p.Dn + c) * N + n]" : "0.0"};
  for (var k = 0u; k < p.nck; k++) {
    let idx = ((b * p.nck + k) * N + n) * p.Dn + c;
    let end_local = ck[idx];
    ck[idx] = s;
    s = exp(a * dsum[(b * p.nck + k) * p.Dn + c]) * s + end_local;
  }
  ${finalState ? "hl[(b * p.Dn + c) * N + n] = s;" : ""}
}
`,
      };
    },
  );
  return {
    spec,
    uniforms: scanUniforms(shape, ch),
    workgroups: grid2d(ceilDiv(shape.batch * N * shape.channels, 64)),
  };
}

/**
 * Parallel backward pass 1: each chunk's adjoint carried to its start from a zero carry at its end,
 * q = sum over the chunk of (prod of later decays) C gy, and the chunk's sum of delta.
 * Bindings: delta, A, C, gy `[B, L, Dn]`, qk `[B, chunks, N, Dn]` f32 (rw), dsum `[B, chunks, Dn]` f32 (rw).
 */
export function scanAdjointLocal(dtype: DType, shape: ScanShape, ch: ScanChunking): Launch {
  const T = wgslType(dtype);
  const N = shape.states;
  const spec = cachedSpec(`scan_adj_local_${dtype}_n${N}`, () => ({
    bindings: ["read", "read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
@group(0) @binding(0) var<storage, read> delta: array<${T}>;
@group(0) @binding(1) var<storage, read> am: array<${T}>;
@group(0) @binding(2) var<storage, read> cm: array<${T}>;
@group(0) @binding(3) var<storage, read> gy: array<${T}>;
@group(0) @binding(4) var<storage, read_write> qk: array<f32>;
@group(0) @binding(5) var<storage, read_write> dsum: array<f32>;
@group(0) @binding(6) var<uniform> p: P;
@compute @workgroup_size(${FWD_W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let c = wid.x * ${FWD_W}u + lid.x;
  if (c >= p.Dn) { return; }
  let b = wid.z;
  let k = wid.y;
  let gc = c / p.cpgC;
  var a: array<f32, N>;
  var q: array<f32, N>;
  for (var n = 0u; n < N; n++) { a[n] = f32(am[c * N + n]); q[n] = 0.0; }
  var ds = 0.0;
  let t0 = k * p.tc;
  for (var t = min(p.L, t0 + p.tc); t > t0; t--) {
    let row = b * p.L + t - 1u;
    let dv = f32(delta[row * p.Dn + c]);
    let g = f32(gy[row * p.Dn + c]);
    let cb = (row * p.GC + gc) * N;
    for (var n = 0u; n < N; n++) { q[n] = exp(dv * a[n]) * (q[n] + f32(cm[cb + n]) * g); }
    ds += dv;
  }
  for (var n = 0u; n < N; n++) { qk[((b * p.nck + k) * N + n) * p.Dn + c] = q[n]; }
  dsum[(b * p.nck + k) * p.Dn + c] = ds;
}
`,
  }));
  return {
    spec,
    uniforms: scanUniforms(shape, ch),
    workgroups: [ceilDiv(shape.channels, FWD_W), ch.chunks, shape.batch],
  };
}

/**
 * Parallel backward pass 2: chains adjoints backwards in place. `qk[k]` holds chunk k's local adjoint at its
 * start; afterwards it holds the adjoint arriving at chunk k's last step from everything later:
 * Q_last = gFinal (or 0), Q_{k-1} = local_k + exp(A sum_k delta) Q_k.
 * Bindings: A, dsum f32, (gFinal `[B, Dn, N]` f32), qk (rw).
 */
export function scanAdjointChain(
  dtype: DType,
  shape: ScanShape,
  ch: ScanChunking,
  finalGrad: boolean,
): Launch {
  const T = wgslType(dtype);
  const N = shape.states;
  const spec = cachedSpec(`scan_adj_chain_${dtype}_n${N}${finalGrad ? "_gfin" : ""}`, () => ({
    bindings: finalGrad ? ["read", "read", "read", "rw"] : ["read", "read", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
@group(0) @binding(0) var<storage, read> am: array<${T}>;
@group(0) @binding(1) var<storage, read> dsum: array<f32>;
${
      finalGrad
        ? `@group(0) @binding(2) var<storage, read> gfin: array<f32>;
@group(0) @binding(3) var<storage, read_write> qk: array<f32>;
@group(0) @binding(4) var<uniform> p: P;`
        : `@group(0) @binding(2) var<storage, read_write> qk: array<f32>;
@group(0) @binding(3) var<uniform> p: P;`
    }
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wid.y * nwg.x + wid.x) * 64u + lid.x;
  if (i >= p.B * N * p.Dn) { return; }
  let c = i % p.Dn;
  let n = (i / p.Dn) % N;
  let b = i / (p.Dn * N);
  let a = f32(am[c * N + n]);
  var q = ${finalGrad ? "gfin[(b * p.Dn + c) * N + n]" : "0.0"};
  for (var k = p.nck; k > 0u; k--) {
    let idx = ((b * p.nck + k - 1u) * N + n) * p.Dn + c;
    let local_q = qk[idx];
    qk[idx] = q;
    q = local_q + exp(a * dsum[(b * p.nck + k - 1u) * p.Dn + c]) * q;
  }
}
`,
  }));
  return {
    spec,
    uniforms: scanUniforms(shape, ch),
    workgroups: grid2d(ceilDiv(shape.batch * N * shape.channels, 64)),
  };
}

/** Flags of {@linkcode scanBackward}. */
export interface ScanBackwardFlags {
  /** The carry into each chunk comes from `qk` (parallel chunks) instead of the final-state grad / zero. */
  parallel: boolean;
  /** Sequential only: a final-state grad `[B, Dn, N]` f32 is bound. */
  finalGrad: boolean;
  /** Write the initial state's grad `[B, Dn, N]` f32. */
  initialGrad: boolean;
  /** B's groups are wider than the workgroup: write per-workgroup partial sums (f32) for {@linkcode scanGroupSum}. */
  partialB: boolean;
  /** Same for C. */
  partialC: boolean;
}

/**
 * Backward, main pass: per thread (batch, chunk range, channel) in reverse time, with the checkpoints of the
 * forward. Bindings, in order: x, delta, A, B, C, D, gy `[B, L, Dn]`, ck `[B, chunks, N, Dn]` f32,
 * (qk f32 if parallel), (gFinal f32 if finalGrad), gx (rw), gdelta (rw), gB (rw: `[B, L, GB, N]`, or f32
 * `[B, L, Dn / W, N]` partials), gC (rw, same), gA partials `[B * ranges, Dn, N]` f32 (rw), gD partials
 * `[B * ranges, Dn]` f32 (rw), (gh0 `[B, Dn, N]` f32 (rw) if initialGrad).
 */
export function scanBackward(
  dtype: DType,
  shape: ScanShape,
  ch: ScanChunking,
  flags: ScanBackwardFlags,
): Launch & { width: number; ranges: number } {
  const T = wgslType(dtype);
  const N = shape.states;
  const W = scanGroupWidth(shape);
  const { sub: SUB, nsub: NSUB } = ch;
  const key = `scan_bwd_${dtype}_n${N}_w${W}_s${SUB}x${NSUB}_${flags.parallel ? "par" : "seq"}${
    flags.finalGrad ? "_gfin" : ""
  }${flags.initialGrad ? "_gh0" : ""}${flags.partialB ? "_pb" : ""}${flags.partialC ? "_pc" : ""}`;
  const spec = cachedSpec(key, () => {
    const decl: [string, "read" | "rw", string][] = [
      ["xs", "read", T],
      ["delta", "read", T],
      ["am", "read", T],
      ["bm", "read", T],
      ["cm", "read", T],
      ["dm", "read", T],
      ["gy", "read", T],
      ["ck", "read", "f32"],
    ];
    if (flags.parallel) decl.push(["qk", "read", "f32"]);
    if (flags.finalGrad) decl.push(["gfin", "read", "f32"]);
    decl.push(
      ["gx", "rw", T],
      ["gdelta", "rw", T],
      ["gbm", "rw", flags.partialB ? "f32" : T],
      ["gcm", "rw", flags.partialC ? "f32" : T],
      ["gap", "rw", "f32"],
      ["gdp", "rw", "f32"],
    );
    if (flags.initialGrad) decl.push(["gh0", "rw", "f32"]);
    const decls = decl.map(([name, acc, ty], i) =>
      `@group(0) @binding(${i}) var<storage, ${acc === "rw" ? "read_write" : "read"}> ${name}: array<${ty}>;`
    ).join("\n");
    // Sums one step's per-channel contributions over groups of `sb` channels (sb divides W); out-of-range
    // groups are skipped. `ng` is the number of such groups across all channels.
    const groupReduce = (shared: string, out: string, sb: string, ng: string, cast: string) => `
    for (var o = lid; o < (${W}u / ${sb}) * N; o += ${W}u) {
      let gl = o / N;
      let n = o % N;
      let gi = (wid.x * ${W}u) / ${sb} + gl;
      if (gi < ${ng}) {
        var s = 0.0;
        for (var j = gl * ${sb}; j < (gl + 1u) * ${sb}; j++) { s += ${shared}[j * N + n]; }
        ${out}[(row * ${ng} + gi) * N + n] = ${cast}(s);
      }
    }`;
    return {
      bindings: decl.map((d) => d[1]),
      uniformBytes: UNIFORM_BYTES,
      code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
const SUB: u32 = ${SUB}u;
const NSUB: u32 = ${NSUB}u;
${UNIFORMS}
${decls}
@group(0) @binding(${decl.length}) var<uniform> p: P;
var<workgroup> sb_b: array<f32, ${W * N}>;
var<workgroup> sb_c: array<f32, ${W * N}>;
${STEP_FN}
@compute @workgroup_size(${W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
  let lid = lid3.x;
  let c_raw = wid.x * ${W}u + lid;
  // threads past the last channel mirror a real channel and contribute zeros: every thread must reach the
  // workgroup barriers of the group reductions
  let live = c_raw < p.Dn;
  let c = min(c_raw, p.Dn - 1u);
  let b = wid.z;
  ${flags.parallel ? "let k0 = wid.y; let k1 = wid.y + 1u;" : "let k0 = 0u; let k1 = p.nck;"}
  let gb = c / p.cpgB;
  let gc = c / p.cpgC;
  let dd = f32(dm[c]);
  var a: array<f32, N>;
  var q: array<f32, N>;     // adjoint arriving at the current step from later steps
  var ga: array<f32, N>;
  for (var n = 0u; n < N; n++) {
    a[n] = f32(am[c * N + n]);
    ga[n] = 0.0;
    ${
        flags.parallel
          ? "q[n] = qk[((b * p.nck + k0) * N + n) * p.Dn + c];"
          : flags.finalGrad
          ? "q[n] = gfin[(b * p.Dn + c) * N + n];"
          : "q[n] = 0.0;"
      }
  }
  var gdsum = 0.0;
  var hsub: array<array<f32, N>, NSUB>;  // state before each sub-chunk
  var hs: array<array<f32, N>, SUB>;     // state after each step of the current sub-chunk
  var h: array<f32, N>;
  for (var k = k1; k > k0; k--) {
    let t0 = (k - 1u) * p.tc;
    let t1 = min(p.L, t0 + p.tc);
    let nsub = (t1 - t0 + SUB - 1u) / SUB;
    // level 1: the state before every sub-chunk, from the chunk's checkpoint
    for (var n = 0u; n < N; n++) { h[n] = ck[((b * p.nck + k - 1u) * N + n) * p.Dn + c]; }
    for (var s = 0u; s < nsub; s++) {
      hsub[s] = h;
      if (s + 1u < nsub) {
        for (var t = t0 + s * SUB; t < t0 + (s + 1u) * SUB; t++) { state_step(b * p.L + t, c, gb, &a, &h); }
      }
    }
    for (var s = nsub; s > 0u; s--) {
      let ts = t0 + (s - 1u) * SUB;
      let te = min(t1, ts + SUB);
      // level 2: the states after each step of this sub-chunk
      h = hsub[s - 1u];
      for (var t = ts; t < te; t++) {
        state_step(b * p.L + t, c, gb, &a, &h);
        hs[t - ts] = h;
      }
      for (var t = te; t > ts; t--) {
        let j = t - 1u - ts;
        let row = b * p.L + t - 1u;
        let xv = f32(xs[row * p.Dn + c]);
        let dv = f32(delta[row * p.Dn + c]);
        let g = select(0.0, f32(gy[row * p.Dn + c]), live);
        let bb = (row * p.GB + gb) * N;
        let cb = (row * p.GC + gc) * N;
        var gxs = 0.0;
        var gds = 0.0;
        for (var n = 0u; n < N; n++) {
          var hprev = hsub[s - 1u][n];
          if (j > 0u) { hprev = hs[j - 1u][n]; }
          let bn = f32(bm[bb + n]);
          let at = exp(dv * a[n]);
          let gh = select(0.0, q[n], live) + f32(cm[cb + n]) * g;  // dL/dh_t
          let dh = at * hprev;
          gxs += bn * gh;
          gds += gh * (a[n] * dh + bn * xv);
          ga[n] += gh * dv * dh;
          sb_b[lid * N + n] = gh * dv * xv;
          sb_c[lid * N + n] = g * hs[j][n];
          q[n] = at * gh;
        }
        if (live) {
          gx[row * p.Dn + c] = T(dd * g + dv * gxs);
          gdelta[row * p.Dn + c] = T(gds);
        }
        gdsum += g * xv;
        workgroupBarrier();
        ${groupReduce("sb_b", "gbm", "p.sbB", "(p.Dn / p.sbB)", flags.partialB ? "f32" : "T")}
        ${groupReduce("sb_c", "gcm", "p.sbC", "(p.Dn / p.sbC)", flags.partialC ? "f32" : "T")}
        workgroupBarrier();
      }
    }
  }
  if (!live) { return; }
  let r = b * ${flags.parallel ? "p.nck + k0" : "1u"};
  for (var n = 0u; n < N; n++) { gap[(r * p.Dn + c) * N + n] = ga[n]; }
  gdp[r * p.Dn + c] = gdsum;
  ${
        flags.initialGrad
          ? `if (k0 == 0u) { for (var n = 0u; n < N; n++) { gh0[(b * p.Dn + c) * N + n] = q[n]; } }`
          : ""
      }
}
alias T = ${T};
`,
    };
  });
  return {
    spec,
    uniforms: scanUniforms(shape, ch, W),
    workgroups: [ceilDiv(shape.channels, W), flags.parallel ? ch.chunks : 1, shape.batch],
    width: W,
    ranges: flags.parallel ? ch.chunks : 1,
  };
}

/**
 * Fixed-order sums over a middle axis: `out[o, m] = sum_{i < f} part[o, i, m]` (f32 partials in, dtype out).
 * Used for the A and D grads (o = 1, over batch x chunk rows) and for B/C grads of groups wider than a
 * backward workgroup. Bindings: part (read), out (rw).
 */
export function scanGroupSum(dtype: DType, outer: number, f: number, inner: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`scan_group_sum_${dtype}`, () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { outer: u32, f: u32, inner: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<${T}>;
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
  if (i >= p.outer * p.inner) { return; }
  let m = i % p.inner;
  let o = i / p.inner;
  var s = 0.0;
  for (var j = 0u; j < p.f; j++) { s += part[(o * p.f + j) * p.inner + m]; }
  out[i] = ${T}(s);
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(outer).u32(f).u32(inner).buffer,
    workgroups: grid2d(ceilDiv(outer * inner, 256)),
  };
}

/**
 * One decode token, state updated in place. Bindings: x `[B, Dn]`, delta `[B, Dn]`, A `[Dn, N]`, B `[B, GB, N]`,
 * C `[B, GC, N]`, D `[Dn]`, state `[B, Dn, N]` f32 (rw), y `[B, Dn]` (rw).
 */
export function scanStep(
  dtype: DType,
  batch: number,
  channels: number,
  states: number,
  groupsB: number,
  groupsC: number,
): Launch {
  const T = wgslType(dtype);
  const N = states;
  const spec = cachedSpec(`scan_step_${dtype}_n${N}`, () => ({
    bindings: ["read", "read", "read", "read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
@group(0) @binding(0) var<storage, read> xs: array<${T}>;
@group(0) @binding(1) var<storage, read> delta: array<${T}>;
@group(0) @binding(2) var<storage, read> am: array<${T}>;
@group(0) @binding(3) var<storage, read> bm: array<${T}>;
@group(0) @binding(4) var<storage, read> cm: array<${T}>;
@group(0) @binding(5) var<storage, read> dm: array<${T}>;
@group(0) @binding(6) var<storage, read_write> state: array<f32>;
@group(0) @binding(7) var<storage, read_write> ys: array<${T}>;
@group(0) @binding(8) var<uniform> p: P;
${STEP_FN}
@compute @workgroup_size(${FWD_W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let c = wid.x * ${FWD_W}u + lid.x;
  if (c >= p.Dn) { return; }
  let b = wid.z;
  var a: array<f32, N>;
  var h: array<f32, N>;
  let base = (b * p.Dn + c) * N;
  for (var n = 0u; n < N; n++) { a[n] = f32(am[c * N + n]); h[n] = state[base + n]; }
  let yv = scan_step(b, c, c / p.cpgB, c / p.cpgC, &a, &h);
  for (var n = 0u; n < N; n++) { state[base + n] = h[n]; }
  ys[b * p.Dn + c] = ${T}(yv + f32(dm[c]) * f32(xs[b * p.Dn + c]));
}
`,
  }));
  const shape: ScanShape = { batch, length: 1, channels, states, groupsB, groupsC };
  return {
    spec,
    uniforms: scanUniforms(shape, { sub: 1, nsub: 1, chunks: 1, parallel: false }),
    workgroups: [ceilDiv(channels, FWD_W), 1, batch],
  };
}

/** Shape of a speculative verification step. */
export interface ScanVerifyShape {
  /** Batch size. */
  batch: number;
  /** New tokens to advance through (K + 1 for K drafts; 0 to only commit accepted steps). */
  tokens: number;
  /** Steps the cache of the previous call holds (its `tokens`; 0 when there is no cache). */
  cached: number;
  /** Channels. */
  channels: number;
  /** States per channel. */
  states: number;
  /** Groups of B. */
  groupsB: number;
  /** Groups of C. */
  groupsC: number;
}

/**
 * The fused multi-step kernel of speculative decoding for Mamba1 (method.md 3). Per (batch row, channel): start
 * from the state snapshot, re-apply the first `counts[b]` cached steps of the previous call (its accepted
 * tokens), write the result back as the new snapshot, then advance through the new tokens producing y, keeping
 * the intermediate states in registers only. The caller keeps this call's x, delta and B as the next call's
 * cache, so rejected drafts cost nothing to undo.
 *
 * Bindings, in order: A `[Dn, N]`, D `[Dn]`, state `[B, Dn, N]` f32 (rw); if `cached > 0`: cached x and delta
 * `[B, cached, Dn]`, cached B `[B, cached, GB, N]`, counts `[B]` u32; if `tokens > 0`: x, delta `[B, T, Dn]`,
 * B `[B, T, GB, N]`, C `[B, T, GC, N]`, y `[B, T, Dn]` (rw).
 */
export function scanVerify(dtype: DType, shape: ScanVerifyShape): Launch {
  const T = wgslType(dtype);
  const N = shape.states;
  const cache = shape.cached > 0, next = shape.tokens > 0;
  const spec = cachedSpec(`scan_verify_${dtype}_n${N}${cache ? "_cache" : ""}${next ? "_next" : ""}`, () => {
    const decl: [string, "read" | "rw", string][] = [["am", "read", T], ["dm", "read", T], [
      "state",
      "rw",
      "f32",
    ]];
    if (cache) decl.push(["xc", "read", T], ["dc", "read", T], ["bc", "read", T], ["counts", "read", "u32"]);
    if (next) {
      decl.push(["xs", "read", T], ["delta", "read", T], ["bm", "read", T], ["cm", "read", T], [
        "ys",
        "rw",
        T,
      ]);
    }
    const decls = decl.map(([name, acc, ty], i) =>
      `@group(0) @binding(${i}) var<storage, ${acc === "rw" ? "read_write" : "read"}> ${name}: array<${ty}>;`
    ).join("\n");
    return {
      bindings: decl.map((d) => d[1]),
      uniformBytes: UNIFORM_BYTES,
      code: `${wgslHeader(dtype)}
const N: u32 = ${N}u;
${UNIFORMS}
${decls}
@group(0) @binding(${decl.length}) var<uniform> p: P;
${next ? STEP_FN : ""}
@compute @workgroup_size(${FWD_W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let c = wid.x * ${FWD_W}u + lid.x;
  if (c >= p.Dn) { return; }
  let b = wid.z;
  let gb = c / p.cpgB;
  var a: array<f32, N>;
  var h: array<f32, N>;
  let base = (b * p.Dn + c) * N;
  for (var n = 0u; n < N; n++) { a[n] = f32(am[c * N + n]); h[n] = state[base + n]; }
  ${
        cache
          ? `// re-apply the accepted steps of the previous call (p.tc = its token count)
  let m = min(counts[b], p.tc);
  for (var i = 0u; i < m; i++) {
    let row = b * p.tc + i;
    let dv = f32(dc[row * p.Dn + c]);
    let dx = dv * f32(xc[row * p.Dn + c]);
    let bb = (row * p.GB + gb) * N;
    for (var n = 0u; n < N; n++) { h[n] = exp(dv * a[n]) * h[n] + dx * f32(bc[bb + n]); }
  }
  for (var n = 0u; n < N; n++) { state[base + n] = h[n]; }`
          : ""
      }
  ${
        next
          ? `let gc = c / p.cpgC;
  let dd = f32(dm[c]);
  for (var t = 0u; t < p.L; t++) {
    let row = b * p.L + t;
    let yv = scan_step(row, c, gb, gc, &a, &h);
    ys[row * p.Dn + c] = ${T}(yv + dd * f32(xs[row * p.Dn + c]));
  }`
          : ""
      }
}
`,
    };
  });
  const u = new Uniforms(UNIFORM_BYTES)
    .u32(shape.batch).u32(shape.tokens).u32(shape.channels).u32(shape.groupsB).u32(shape.groupsC)
    .u32(shape.channels / shape.groupsB).u32(shape.channels / shape.groupsC).u32(shape.cached).u32(1).buffer;
  return { spec, uniforms: u, workgroups: [ceilDiv(shape.channels, FWD_W), 1, shape.batch] };
}
