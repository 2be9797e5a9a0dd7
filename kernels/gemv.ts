/**
 * Matrix-vector products for decode: `y[r, n] = alpha * sum_k x[r, k] * W[n, k]` for a few rows `r` (one token,
 * or the handful of a speculative verification step), W in the PyTorch weight layout [N, K].
 *
 * Decode is bound by reading W once, so the kernel is shaped for memory bandwidth: a workgroup of 256 threads
 * takes `256 / TPR` output rows, TPR threads stride along one row of W with 16-byte loads (vec4 of f32, or eight
 * f16 values unpacked from a vec4<u32>, which also works without `shader-f16`), every loaded W vector is used
 * for all rows of x, and the TPR partial sums meet in a shared-memory tree. Sizes whose K is not a multiple of
 * the vector width take a scalar variant.
 *
 * Decoding is also bound by the number of dispatches (each costs tens of microseconds to record and launch, more
 * than a 2048 x 2048 GEMV's 6 us of GPU time on the H200), so the variants fuse what surrounds a projection:
 *
 * - `normIn`: the RMSNorm that precedes a projection in a pre-norm block. Every workgroup first reduces the
 *   sums of squares of the rows of x over all its 256 threads, then normalises each x item as it loads it. The
 *   row (2048-8192 values) is read once more per workgroup, from cache: the product already reads it
 *   `256 / TPR` times per workgroup (once per output row), so this adds 1/8 at the default TPR of 32. A separate
 *   norm dispatch would instead cost its launch, a write of the normalised row and a read of it back, and a
 *   barrier between the two kernels - each larger than the redundant reduction.
 * - `residual` (single product only): `y = r + x W^T`, the projection that closes a block writing the next value
 *   of the residual stream, instead of a separate add.
 *
 * Both keep the unfused rounding in the storage type T: the normalised value is rounded to T before and after
 * the norm weight multiplies it (kernels/rmsnorm.ts), and the product is rounded to T before the residual add.
 *
 * @module
 */
import {
  type BindingAccess,
  ceilDiv,
  type DType,
  grid2d,
  type KernelSpec,
  Uniforms,
  wgslHeader,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the GEMV kernels. */
export const GEMV_WORKGROUP = 256;
/**
 * Most rows of x one GEMV dispatch takes (more rows go through the tiled matmul). 16 covers batch-1 speculative
 * verification up to K = 15 and small decode batches; the reduction buffer then fills 16 KiB, WebGPU's default
 * workgroup-storage limit.
 */
export const GEMV_MAX_ROWS = 16;

/** Options of a GEMV dispatch. */
export interface GemvOptions {
  /** Threads cooperating on one output (power of two, 4..256; default 32). */
  threadsPerRow?: number;
  /** Scale of the product (default 1). */
  alpha?: number;
  /**
   * RMS-normalise the rows of x inside the kernel before the product (HF Llama semantics, as
   * `kernels/rmsnorm.ts`: `x <- w * T(x / sqrt(mean(x^2) + eps))` with T the storage type). The norm weight w [K]
   * is bound right after x. Every workgroup reduces the sums of squares of the rows itself: see the module
   * comment for why that beats a separate norm dispatch.
   */
  normIn?: { eps: number };
}

/** The vector width the fast path of a dtype needs K to be a multiple of. */
export function gemvVectorWidth(dtype: DType): number {
  return dtype === "f16" ? 8 : 4;
}

const specs = new Map<string, KernelSpec>();

/**
 * y = alpha * x W^T for `rows` rows of x [rows, K], W [N, K], y [rows, N]. Bindings: x (read), [norm weight
 * (read) with `normIn`,] W (read), [residual (read) with `residual`,] y (rw). With `residual`, the output is
 * `y = r + T(alpha * x W^T)` for r [rows, N] (a residual add in the storage type T, as an unfused `add` of the
 * stored product): the projection that closes a decoder block writes the residual stream's next value.
 */
export function gemvKernel(
  dtype: DType,
  rows: number,
  n: number,
  k: number,
  opts: GemvOptions & { residual?: boolean } = {},
): Launch {
  if (rows < 1 || rows > GEMV_MAX_ROWS) {
    throw new Error(`gemv: rows must be 1..${GEMV_MAX_ROWS}, got ${rows}`);
  }
  return gemvLaunch(dtype, rows, n, k, opts, { mode: "single", residual: opts.residual ?? false });
}

/** What one GEMV dispatch computes: one product, the SwiGLU gate/up pair, or the q/k/v projections. */
type GemvMode = "single" | "swiglu" | "qkv";

/** A GEMV variant: the mode, and the fused prologue (norm of x) and epilogue (residual add). */
interface GemvVariant {
  mode: GemvMode;
  residual: boolean;
}

/** The storage bindings of a variant in order: name, access, and whether it holds vector items or scalars. */
function gemvBindings(mode: GemvMode, norm: boolean, residual: boolean): [string, BindingAccess, boolean][] {
  const weights = mode === "qkv" ? ["WQ", "WK", "WV"] : mode === "swiglu" ? ["W", "V"] : ["W"];
  const outs = mode === "qkv" ? ["Q", "K", "V"] : ["Y"];
  return [
    ["X", "read", true],
    ...(norm ? [["NW", "read", true] as [string, BindingAccess, boolean]] : []),
    ...weights.map((w) => [w, "read", true] as [string, BindingAccess, boolean]),
    ...(residual ? [["R", "read", false] as [string, BindingAccess, boolean]] : []),
    ...outs.map((o) => [o, "rw", false] as [string, BindingAccess, boolean]),
  ];
}

function gemvLaunch(
  dtype: DType,
  rows: number,
  n: number,
  k: number,
  opts: GemvOptions,
  variant: GemvVariant,
  nq = 0,
): Launch {
  const tpr = opts.threadsPerRow ?? 32;
  if (tpr < 4 || tpr > GEMV_WORKGROUP || (tpr & (tpr - 1)) !== 0) {
    throw new Error(`gemv: threadsPerRow must be a power of two in 4..${GEMV_WORKGROUP}, got ${tpr}`);
  }
  const { mode, residual } = variant;
  const norm = opts.normIn !== undefined;
  if (norm && !(opts.normIn!.eps >= 0)) {
    throw new Error(`gemv: normIn.eps must be >= 0, got ${opts.normIn!.eps}`);
  }
  const vec = k % gemvVectorWidth(dtype) === 0;
  const key = `gemv${mode === "single" ? "" : `_${mode}`}${norm ? "_norm" : ""}${
    residual ? "_res" : ""
  }_${dtype}_r${rows}_t${tpr}_${vec ? "v" : "s"}`;
  let spec = specs.get(key);
  if (!spec) {
    spec = {
      key,
      bindings: gemvBindings(mode, norm, residual).map(([, access]) => access),
      uniformBytes: 32,
      code: gemvWgsl(dtype, rows, tpr, vec, mode, norm, residual),
    };
    specs.set(key, spec);
  }
  const rowsPerWg = GEMV_WORKGROUP / tpr;
  return {
    spec,
    uniforms: new Uniforms(32).u32(n).u32(k).f32(opts.alpha ?? 1).u32(nq).f32(opts.normIn?.eps ?? 0).buffer,
    workgroups: grid2d(ceilDiv(n, rowsPerWg)),
  };
}

/** Most rows of x one fused gate/up GEMV takes (two accumulators per row fill 16 KiB of reduction memory). */
export const GEMV_SWIGLU_MAX_ROWS = 8;

/**
 * The SwiGLU MLP's first half in one pass over both weights: `y = silu(alpha * x Wg^T) * (alpha * x Wu^T)` for
 * `rows` rows of x [rows, K], Wg and Wu [N, K], y [rows, N]. Decoding reads each weight once either way; fusing
 * saves two of the three dispatches (gate, up, combine), and decoding is bound by dispatches. Bindings: x, [norm
 * weight with `normIn`,] Wg, Wu (read), y (rw).
 */
export function gemvSwigluKernel(
  dtype: DType,
  rows: number,
  n: number,
  k: number,
  opts: GemvOptions = {},
): Launch {
  if (rows < 1 || rows > GEMV_SWIGLU_MAX_ROWS) {
    throw new Error(`gemvSwiglu: rows must be 1..${GEMV_SWIGLU_MAX_ROWS}, got ${rows}`);
  }
  return gemvLaunch(dtype, rows, n, k, opts, { mode: "swiglu", residual: false });
}

/**
 * The attention projections in one dispatch: `q = alpha * x Wq^T`, `k = alpha * x Wk^T`, `v = alpha * x Wv^T` for
 * `rows` rows of x [rows, K], Wq [nq, K], Wk and Wv [nkv, K]; q [rows, nq], k and v [rows, nkv]. Output rows are
 * spread over the three weights, so one dispatch streams all of them. Bindings: x, [norm weight with `normIn`,] Wq,
 * Wk, Wv (read), q, k, v (rw): eight storage buffers with the norm, WebGPU's default per-stage limit.
 */
export function gemvQkvKernel(
  dtype: DType,
  rows: number,
  nq: number,
  nkv: number,
  k: number,
  opts: GemvOptions = {},
): Launch {
  if (rows < 1 || rows > GEMV_MAX_ROWS) {
    throw new Error(`gemvQkv: rows must be 1..${GEMV_MAX_ROWS}, got ${rows}`);
  }
  return gemvLaunch(dtype, rows, nq + 2 * nkv, k, opts, { mode: "qkv", residual: false }, nq);
}

function gemvWgsl(
  dtype: DType,
  rows: number,
  tpr: number,
  vec: boolean,
  mode: GemvMode,
  norm: boolean,
  residual: boolean,
): string {
  const swigluPair = mode === "swiglu", qkv = mode === "qkv";
  const T = wgslType(dtype);
  const rowsPerWg = GEMV_WORKGROUP / tpr;
  const f16vec = vec && dtype === "f16";
  // The element type the vector buffers are declared with, and how one loaded item becomes f32 values.
  const elem = vec ? (f16vec ? "vec4<u32>" : "vec4<f32>") : T;
  const width = vec ? (f16vec ? 8 : 4) : 1;
  const dotItem = (w: string, x: string) =>
    f16vec ? `${norm ? "dot8n" : "dot8"}(${w}, ${x})` : vec ? `dot(${w}, ${x})` : `f32(${w}) * f32(${x})`;
  // one weight matrix (W), or the gate/up pair (W, V): accumulator slot m * rows + r for matrix m, x row r
  const mats = swigluPair ? ["w", "v"] : ["w"];
  const slots = rows * mats.length;
  // the x item of row r at item index idx, normalised in the prologue's variant with the norm weight item g
  const xItem = (r: number, idx: string, g: string) =>
    norm ? `nrm(X[${r}u * kv + ${idx}], ${g}, rs[${r}])` : `X[${r}u * kv + ${idx}]`;
  // one step of the loop over K: x items are read (and normalised) once and used for every weight matrix
  const step = (suffix: string, idx: string): string[] => {
    const out: string[] = [];
    for (let r = 0; r < rows; r++) {
      out.push(
        `{ let xr = ${xItem(r, idx, `g${suffix}`)}; ${
          mats.map((w, m) => `acc[${m * rows + r}] += ${dotItem(`${w}${suffix}`, "xr")};`).join(" ")
        } }`,
      );
    }
    return out;
  };
  const unrolled: string[] = [];
  for (let u = 0; u < 4; u++) unrolled.push(...step(`${u}`, `i + ${u * tpr}u`));
  const accum = step("", "i");
  const loads: string[] = [], load1: string[] = [];
  mats.forEach((w) => {
    // q/k/v: the weight is picked per output row (uniform across the row's thread group)
    const at = (idx: string) => qkv ? `wload(sel, ${idx})` : `${w.toUpperCase()}[${idx}]`;
    for (let u = 0; u < 4; u++) loads.push(`let ${w}${u} = ${at(`wrow + i${u ? ` + ${u * tpr}u` : ""}`)};`);
    load1.push(`let ${w} = ${at("wrow + i")};`);
  });
  if (norm) {
    for (let u = 0; u < 4; u++) loads.push(`let g${u} = NW[i${u ? ` + ${u * tpr}u` : ""}];`);
    load1.push("let g = NW[i];");
  }
  const reduce: string[] = [], treeStep: string[] = [];
  for (let a = 0; a < slots; a++) {
    reduce.push(`red[${a}u * ${GEMV_WORKGROUP}u + lid] = acc[${a}];`);
    treeStep.push(`red[${a}u * ${GEMV_WORKGROUP}u + lid] += red[${a}u * ${GEMV_WORKGROUP}u + lid + s];`);
  }
  const sum = (a: number) => `p.alpha * red[${a}u * ${GEMV_WORKGROUP}u + lid]`;
  const writes: string[] = [];
  for (let r = 0; r < rows; r++) {
    writes.push(
      swigluPair
        ? `{ let g = ${sum(r)}; Y[${r}u * p.n + n] = ${T}(g / (1.0 + exp(-g)) * ${sum(rows + r)}); }`
        : qkv
        ? `if (sel == 0u) { Q[${r}u * p.nq + nl] = ${T}(${sum(r)}); } ` +
          `else if (sel == 1u) { K[${r}u * nkv + nl] = ${T}(${sum(r)}); } ` +
          `else { V[${r}u * nkv + nl] = ${T}(${sum(r)}); }`
        : residual
        // the product rounds to T first, as the unfused path stores it before the add
        ? `Y[${r}u * p.n + n] = ${T}(f32(R[${r}u * p.n + n]) + f32(${T}(${sum(r)})));`
        : `Y[${r}u * p.n + n] = ${T}(${sum(r)});`,
    );
  }
  const bindings = gemvBindings(mode, norm, residual);
  const decls = bindings.map(([name, access, item], i) =>
    `@group(0) @binding(${i}) var<storage, ${access === "read" ? "read" : "read_write"}> ${name}: array<${
      item ? elem : T
    }>;`
  ).join("\n");
  const wload = qkv
    ? `
fn wload(sel: u32, idx: u32) -> ${elem} {
  if (sel == 0u) { return WQ[idx]; }
  if (sel == 1u) { return WK[idx]; }
  return WV[idx];
}
`
    : "";
  // the norm's helpers: the sum of squares of one item, and one item times rstd and the norm weight, rounded to
  // T after each product as kernels/rmsnorm.ts rounds (no-ops for f32)
  const normFns = !norm ? "" : f16vec
    ? `
fn sq(a: vec4<u32>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { let v = unpack2x16float(a[j]); s += dot(v, v); }
  return s;
}
fn nrm(a: vec4<u32>, g: vec4<u32>, r: f32) -> array<vec2<f32>, 4> {
  var o: array<vec2<f32>, 4>;
  for (var j = 0u; j < 4u; j++) {
    let h = vec2<f32>(vec2<f16>(unpack2x16float(a[j]) * r));
    o[j] = vec2<f32>(vec2<f16>(unpack2x16float(g[j]) * h));
  }
  return o;
}
// dot8 with the second operand already unpacked (a normalised x item)
fn dot8n(a: vec4<u32>, b: array<vec2<f32>, 4>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { s += dot(unpack2x16float(a[j]), b[j]); }
  return s;
}
`
    : vec
    ? `
fn sq(a: vec4<f32>) -> f32 { return dot(a, a); }
fn nrm(a: vec4<f32>, g: vec4<f32>, r: f32) -> vec4<f32> { return g * (a * r); }
`
    : `
fn sq(a: ${T}) -> f32 { let v = f32(a); return v * v; }
fn nrm(a: ${T}, g: ${T}, r: f32) -> ${T} { return ${T}(f32(g) * f32(${T}(f32(a) * r))); }
`;
  const ssq: string[] = [], ssqStore: string[] = [], ssqTree: string[] = [], rsLoad: string[] = [];
  for (let r = 0; r < rows; r++) {
    ssq.push(`ss[${r}] += sq(X[${r}u * kv + i]);`);
    ssqStore.push(`red[${r}u * ${GEMV_WORKGROUP}u + lid] = ss[${r}];`);
    ssqTree.push(`red[${r}u * ${GEMV_WORKGROUP}u + lid] += red[${r}u * ${GEMV_WORKGROUP}u + lid + s];`);
    rsLoad.push(`rs[${r}] = inverseSqrt(red[${r}u * ${GEMV_WORKGROUP}u] / f32(p.k) + p.eps);`);
  }
  // Every workgroup reduces the rows' sums of squares over the whole workgroup before its product; all of them
  // read the same items in the same order, so every workgroup gets the same rstd.
  const prologue = !norm ? "" : `
  var rs: array<f32, ${rows}>;
  {
    var ss: array<f32, ${rows}>;
    for (var i = lid; i < kv; i += ${GEMV_WORKGROUP}u) {
      ${ssq.join("\n      ")}
    }
    ${ssqStore.join("\n    ")}
    for (var s = ${GEMV_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
      workgroupBarrier();
      if (lid < s) {
        ${ssqTree.join("\n        ")}
      }
    }
    workgroupBarrier();
    ${rsLoad.join("\n    ")}
    // the product's reduction below reuses red
    workgroupBarrier();
  }`;
  return `${wgslHeader(dtype)}
struct P { n: u32, k: u32, alpha: f32, nq: u32, eps: f32, _a: u32, _b: u32, _c: u32 }
${decls}
@group(0) @binding(${bindings.length}) var<uniform> p: P;
${wload}
var<workgroup> red: array<f32, ${slots * GEMV_WORKGROUP}>;

// eight f16 values packed in a vec4<u32>: two per word
fn dot8(a: vec4<u32>, b: vec4<u32>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { s += dot(unpack2x16float(a[j]), unpack2x16float(b[j])); }
  return s;
}
${normFns}
@compute @workgroup_size(${GEMV_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let t = lid % ${tpr}u;                   // position inside the row's thread group
  let n = (wid.y * nwg.x + wid.x) * ${rowsPerWg}u + lid / ${tpr}u;
  let kv = p.k / ${width}u;                 // loaded items per row
  var acc: array<f32, ${slots}>;${prologue}
  ${
    qkv
      ? `let nkv = (p.n - p.nq) / 2u;
  // which weight this output row reads (0 q, 1 k, 2 v) and its row inside that weight
  let sel = select(select(2u, 1u, n < p.nq + nkv), 0u, n < p.nq);
  let nl = select(select(n - p.nq - nkv, n - p.nq, n < p.nq + nkv), n, n < p.nq);`
      : "let nl = n;"
  }
  if (n < p.n) {
    let wrow = nl * kv;
    // consecutive threads read consecutive 16-byte items, so each warp streams a contiguous span of W; four
    // independent loads per iteration keep enough bytes in flight to cover memory latency
    var i = t;
    for (; i + ${3 * tpr}u < kv; i += ${4 * tpr}u) {
      ${loads.join("\n      ")}
      ${unrolled.join("\n      ")}
    }
    for (; i < kv; i += ${tpr}u) {
      ${load1.join("\n      ")}
      ${accum.join("\n      ")}
    }
  }
  ${reduce.join("\n  ")}
  for (var s = ${tpr / 2}u; s > 0u; s >>= 1u) {
    workgroupBarrier();
    if (t < s) {
      ${treeStep.join("\n      ")}
    }
  }
  if (t == 0u && n < p.n) {
    ${writes.join("\n    ")}
  }
}
`;
}
