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
 * @module
 */
import { ceilDiv, type DType, grid2d, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
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
}

/** The vector width the fast path of a dtype needs K to be a multiple of. */
export function gemvVectorWidth(dtype: DType): number {
  return dtype === "f16" ? 8 : 4;
}

const specs = new Map<string, KernelSpec>();

/**
 * y = alpha * x W^T for `rows` rows of x [rows, K], W [N, K], y [rows, N]. Bindings: x (read), W (read), y (rw).
 */
export function gemvKernel(dtype: DType, rows: number, n: number, k: number, opts: GemvOptions = {}): Launch {
  if (rows < 1 || rows > GEMV_MAX_ROWS) {
    throw new Error(`gemv: rows must be 1..${GEMV_MAX_ROWS}, got ${rows}`);
  }
  return gemvLaunch(dtype, rows, n, k, opts, "single");
}

/** What one GEMV dispatch computes: one product, the SwiGLU gate/up pair, or the q/k/v projections. */
type GemvMode = "single" | "swiglu" | "qkv";

function gemvLaunch(
  dtype: DType,
  rows: number,
  n: number,
  k: number,
  opts: GemvOptions,
  mode: GemvMode,
  nq = 0,
): Launch {
  const tpr = opts.threadsPerRow ?? 32;
  if (tpr < 4 || tpr > GEMV_WORKGROUP || (tpr & (tpr - 1)) !== 0) {
    throw new Error(`gemv: threadsPerRow must be a power of two in 4..${GEMV_WORKGROUP}, got ${tpr}`);
  }
  const vec = k % gemvVectorWidth(dtype) === 0;
  const key = `gemv${mode === "single" ? "" : `_${mode}`}_${dtype}_r${rows}_t${tpr}_${vec ? "v" : "s"}`;
  let spec = specs.get(key);
  if (!spec) {
    spec = {
      key,
      bindings: mode === "single"
        ? ["read", "read", "rw"]
        : mode === "swiglu"
        ? ["read", "read", "read", "rw"]
        : ["read", "read", "read", "read", "rw", "rw", "rw"],
      uniformBytes: 16,
      code: gemvWgsl(dtype, rows, tpr, vec, mode),
    };
    specs.set(key, spec);
  }
  const rowsPerWg = GEMV_WORKGROUP / tpr;
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(k).f32(opts.alpha ?? 1).u32(nq).buffer,
    workgroups: grid2d(ceilDiv(n, rowsPerWg)),
  };
}

/** Most rows of x one fused gate/up GEMV takes (two accumulators per row fill 16 KiB of reduction memory). */
export const GEMV_SWIGLU_MAX_ROWS = 8;

/**
 * The SwiGLU MLP's first half in one pass over both weights: `y = silu(alpha * x Wg^T) * (alpha * x Wu^T)` for
 * `rows` rows of x [rows, K], Wg and Wu [N, K], y [rows, N]. Decoding reads each weight once either way; fusing
 * saves two of the three dispatches (gate, up, combine), and decoding is bound by dispatches. Bindings: x, Wg,
 * Wu (read), y (rw).
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
  return gemvLaunch(dtype, rows, n, k, opts, "swiglu");
}

/**
 * The attention projections in one dispatch: `q = alpha * x Wq^T`, `k = alpha * x Wk^T`, `v = alpha * x Wv^T` for
 * `rows` rows of x [rows, K], Wq [nq, K], Wk and Wv [nkv, K]; q [rows, nq], k and v [rows, nkv]. Output rows are
 * spread over the three weights, so one dispatch streams all of them. Bindings: x, Wq, Wk, Wv (read), q, k, v (rw).
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
  return gemvLaunch(dtype, rows, nq + 2 * nkv, k, opts, "qkv", nq);
}

function gemvWgsl(dtype: DType, rows: number, tpr: number, vec: boolean, mode: GemvMode): string {
  const swigluPair = mode === "swiglu", qkv = mode === "qkv";
  const T = wgslType(dtype);
  const rowsPerWg = GEMV_WORKGROUP / tpr;
  const f16vec = vec && dtype === "f16";
  // The element type the buffers are declared with, and how one loaded item becomes f32 values.
  const elem = vec ? (f16vec ? "vec4<u32>" : "vec4<f32>") : T;
  const width = vec ? (f16vec ? 8 : 4) : 1;
  const dotItem = (w: string, x: string) =>
    f16vec ? `dot8(${w}, ${x})` : vec ? `dot(${w}, ${x})` : `f32(${w}) * f32(${x})`;
  // one weight matrix (W), or the gate/up pair (W, V): accumulator slot m * rows + r for matrix m, x row r
  const mats = swigluPair ? ["w", "v"] : ["w"];
  const slots = rows * mats.length;
  const accum: string[] = [];
  const unrolled: string[] = [];
  mats.forEach((w, m) => {
    for (let r = 0; r < rows; r++) accum.push(`acc[${m * rows + r}] += ${dotItem(w, `X[${r}u * kv + i]`)};`);
    for (let u = 0; u < 4; u++) {
      for (let r = 0; r < rows; r++) {
        unrolled.push(`acc[${m * rows + r}] += ${dotItem(`${w}${u}`, `X[${r}u * kv + i + ${u * tpr}u]`)};`);
      }
    }
  });
  const loads: string[] = [], load1: string[] = [];
  mats.forEach((w) => {
    // q/k/v: the weight is picked per output row (uniform across the row's thread group)
    const at = (idx: string) => qkv ? `wload(sel, ${idx})` : `${w.toUpperCase()}[${idx}]`;
    for (let u = 0; u < 4; u++) loads.push(`let ${w}${u} = ${at(`wrow + i${u ? ` + ${u * tpr}u` : ""}`)};`);
    load1.push(`let ${w} = ${at("wrow + i")};`);
  });
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
        : `Y[${r}u * p.n + n] = ${T}(${sum(r)});`,
    );
  }
  const decls = qkv
    ? `@group(0) @binding(1) var<storage, read> WQ: array<${elem}>;
@group(0) @binding(2) var<storage, read> WK: array<${elem}>;
@group(0) @binding(3) var<storage, read> WV: array<${elem}>;
@group(0) @binding(4) var<storage, read_write> Q: array<${T}>;
@group(0) @binding(5) var<storage, read_write> K: array<${T}>;
@group(0) @binding(6) var<storage, read_write> V: array<${T}>;
@group(0) @binding(7) var<uniform> p: P;

fn wload(sel: u32, idx: u32) -> ${elem} {
  if (sel == 0u) { return WQ[idx]; }
  if (sel == 1u) { return WK[idx]; }
  return WV[idx];
}`
    : swigluPair
    ? `@group(0) @binding(1) var<storage, read> W: array<${elem}>;
@group(0) @binding(2) var<storage, read> V: array<${elem}>;
@group(0) @binding(3) var<storage, read_write> Y: array<${T}>;
@group(0) @binding(4) var<uniform> p: P;`
    : `@group(0) @binding(1) var<storage, read> W: array<${elem}>;
@group(0) @binding(2) var<storage, read_write> Y: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;`;
  return `${wgslHeader(dtype)}
struct P { n: u32, k: u32, alpha: f32, nq: u32 }
@group(0) @binding(0) var<storage, read> X: array<${elem}>;
${decls}

var<workgroup> red: array<f32, ${slots * GEMV_WORKGROUP}>;

// eight f16 values packed in a vec4<u32>: two per word
fn dot8(a: vec4<u32>, b: vec4<u32>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { s += dot(unpack2x16float(a[j]), unpack2x16float(b[j])); }
  return s;
}

@compute @workgroup_size(${GEMV_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let t = lid % ${tpr}u;                   // position inside the row's thread group
  let n = (wid.y * nwg.x + wid.x) * ${rowsPerWg}u + lid / ${tpr}u;
  let kv = p.k / ${width}u;                 // loaded items per row
  var acc: array<f32, ${slots}>;
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
