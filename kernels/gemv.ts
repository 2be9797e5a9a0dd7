/**
 * Matrix-vector products for decode: `y[r, n] = alpha * sum_k x[r, k] * W[n, k]` for a few rows `r` (one token,
 * or the handful of a speculative verification step), W in the PyTorch weight layout [N, K].
 *
 * Decode is bound by reading W once, so the kernel is shaped for memory bandwidth: a workgroup of 256 threads
 * takes `256 / TPR` output rows, TPR threads stride along one row of W with 16-byte loads (vec4 of f32, or eight
 * f16 values unpacked from a vec4<u32>, which also works without `shader-f16`), every loaded W vector is used
 * for all rows of x, and the TPR partial sums meet in a shared-memory tree, or, on devices with fixed-size
 * subgroups, in `subgroupAdd` (one exchange through workgroup memory when a row spans several subgroups) instead
 * of a barrier per tree level. Sizes whose K is not a multiple of the vector width take a scalar variant.
 *
 * Decoding is also bound by the number of dispatches (each costs tens of microseconds to record and launch, more
 * than a 2048 x 2048 GEMV's 9 us of GPU time on the H200), so the variants fuse what surrounds a projection:
 *
 * - `normIn`: the RMSNorm that precedes a projection in a pre-norm block. Every workgroup first reduces the
 *   sums of squares of the rows of x over all its 256 threads, then normalises each x item as it loads it. The
 *   row (2048-8192 values) is read once more per workgroup, from cache: the product already reads it
 *   `256 / TPR` times per workgroup (once per output row), so this adds 1/8 at 32 threads per row. A separate
 *   norm dispatch would instead cost its launch, a write of the normalised row and a read of it back, and a
 *   barrier between the two kernels - each larger than the redundant reduction.
 * - `gatedNormIn` (single product only): Mamba2's z-gated grouped RMSNorm (kernels/gated_rmsnorm.ts) before its
 *   out_proj. The input row is `T(SiLU-gated y, normalised per group of channels, times the norm weight)`,
 *   built from y and z as each item is loaded; every workgroup first reduces each (row, group)'s sum of squares
 *   of the gated values into workgroup memory, for the same reason as `normIn`.
 * - `residual` (single product only): `y = r + x W^T`, the projection that closes a block writing the next value
 *   of the residual stream, instead of a separate add.
 * - `conv` (split3 only): Mamba2's one-token causal depthwise conv of the xBC part (kernels/conv1d.ts
 *   `conv1dStep`), shifting its conv state in place. The conv is per channel and each output column of each row
 *   is finished by one thread, which can then read and shift that channel's state alone.
 *
 * All keep the unfused rounding in the storage type T: the normalised value is rounded to T before and after
 * the norm weight multiplies it (kernels/rmsnorm.ts), the gated norm's output once (its kernel computes in f32
 * and stores T), and the product is rounded to T before the residual add and before the conv reads it.
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
  /** Threads cooperating on one output (power of two, 4..256; default by shape, {@linkcode gemvShapeDefaults}). */
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
  /**
   * Independent 16-byte loads each thread issues per loop step (1, 2, 4, 8 or 16; default 4). More loads in
   * flight hide more of the memory latency, at the cost of registers; a short row (K = 2048 is 16 items per thread
   * at 32 threads) is otherwise walked in several latency-bound steps. Default by shape,
   * {@linkcode gemvShapeDefaults}.
   */
  unroll?: number;
  /**
   * The device's subgroup size when it is fixed (`subgroupMinSize == subgroupMaxSize`) and the `subgroups`
   * feature is on; 0 or absent for none. Row sums and the norm's sum of squares then reduce with `subgroupAdd`
   * and one exchange through workgroup memory, instead of a tree with a barrier per level (5-8 barriers).
   * Taken when threadsPerRow is a multiple of it. Assumes subgroups are consecutive local invocation indices,
   * as on NVIDIA's and Apple's GPUs; the tests compare against float64 on the device that runs them.
   */
  subgroupSize?: number;
}

/**
 * Threads per row and loads in flight for a product with `n` outputs: up to 128 threads a row, as many as keep
 * the dispatch near 1,024 workgroups, and 4 loads in flight. Timed on the H200 with every dispatch reading its W
 * from memory, as in a decode step (f32, one row, BENCHMARKS.md): 2048 x 8192 (down_proj) 23.3 -> 19.2 us at 128
 * threads instead of 32; 2048 x 2048 9.5 -> 8.7; 3072 x 2048 10.6 -> 9.9 at 64; 5152 and more outputs are fastest
 * at 32. Deeper unrolls only helped weights that stay in the L2 cache (a benchmark artefact), within 3% otherwise.
 */
export function gemvShapeDefaults(n: number): { threadsPerRow: number; unroll: number } {
  let threadsPerRow = 32;
  while (threadsPerRow < 128 && (n * threadsPerRow * 2) / GEMV_WORKGROUP <= 1024) threadsPerRow *= 2;
  return { threadsPerRow, unroll: 4 };
}

/**
 * Mamba2's gated grouped RMSNorm as the input transform of a GEMV (kernels/gated_rmsnorm.ts semantics): the
 * product's input row is `T(g / sqrt(mean_group(g^2) + eps) * w)` with `g = y * SiLU(z)` in f32, the mean over
 * each group of `group` consecutive channels. K must be a multiple of `group`, with at most
 * {@linkcode GEMV_GATED_MAX_GROUPS} groups per row.
 */
export interface GemvGatedNorm {
  /** Channels per normalised group (Mamba2: head_dim). */
  group: number;
  /** Epsilon inside the square root (Mamba2: 1e-5). */
  eps: number;
}

/**
 * Most groups per row of the gated-norm prologue: each workgroup keeps a 1/rms per (row, group) in its
 * reduction memory (256 floats per row) while it streams W.
 */
export const GEMV_GATED_MAX_GROUPS = 256;

/**
 * Mamba2's one-token causal depthwise conv as the epilogue of a split GEMV (kernels/conv1d.ts `conv1dStep`
 * semantics, any width): for each channel c of the middle output, with y the product's value rounded to T and the
 * conv state's `width - 1` earlier inputs s[0..width-2] (oldest first),
 *
 *     out = act(bias[c] + sum_{j < width-1} w[c, j] s[j] + w[c, width-1] y),   s <- (s[1..width-2], y)
 *
 * in f32, summed in that order; the state keeps the pre-conv y.
 */
export interface GemvConvStep {
  /** Taps of the convolution (Mamba's `d_conv`), at least 2. */
  width: number;
  /** Apply SiLU after the bias (Mamba2's `xBC = SiLU(conv(xBC) + bias)`). */
  silu: boolean;
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
 *
 * With `gatedNormIn` the input is `gatedRmsNorm(y, z, w)` instead of x. Bindings: y [rows, K], z [rows, K], norm
 * weight w [K] (read), W (read), [residual (read),] out (rw).
 */
export function gemvKernel(
  dtype: DType,
  rows: number,
  n: number,
  k: number,
  opts: GemvOptions & { residual?: boolean; gatedNormIn?: GemvGatedNorm } = {},
): Launch {
  if (rows < 1 || rows > GEMV_MAX_ROWS) {
    throw new Error(`gemv: rows must be 1..${GEMV_MAX_ROWS}, got ${rows}`);
  }
  const gated = opts.gatedNormIn;
  if (gated) {
    if (opts.normIn) throw new Error("gemv: normIn and gatedNormIn exclude each other");
    const { group, eps } = gated;
    if (!(Number.isInteger(group) && group > 0 && k % group === 0 && k / group <= GEMV_GATED_MAX_GROUPS)) {
      throw new Error(
        `gemv: gatedNormIn.group ${group} must divide K = ${k} into at most ${GEMV_GATED_MAX_GROUPS} groups`,
      );
    }
    if (!(eps >= 0)) throw new Error(`gemv: gatedNormIn.eps must be >= 0, got ${eps}`);
  }
  return gemvLaunch(dtype, rows, n, k, opts, {
    mode: "single",
    residual: opts.residual ?? false,
    gated: gated ? { group: gated.group, groups: k / gated.group, eps: gated.eps } : null,
  });
}

/** What one GEMV dispatch computes: one product, the SwiGLU gate/up pair, or the q/k/v projections. */
type GemvMode = "single" | "swiglu" | "qkv" | "split3";

/** A GEMV variant: the mode, and the fused prologue (norm of x) and epilogues (residual add, conv step). */
interface GemvVariant {
  mode: GemvMode;
  residual: boolean;
  /** The gated-norm input transform (single mode only): its shape and eps. */
  gated?: (GatedShape & { eps: number }) | null;
  /** The conv step on the middle output (split3 mode only). */
  conv?: GemvConvStep | null;
}

/** The shape of a gated-norm prologue, fixed in the kernel: channels per group and groups per row. */
interface GatedShape {
  group: number;
  groups: number;
}

/** The input transform of a GEMV: none, the RMSNorm of x, or the gated grouped norm of (y, z). */
type GemvPrologue = "none" | "rms" | GatedShape;

/** The storage bindings of a variant in order: name, access, and whether it holds vector items or scalars. */
function gemvBindings(
  mode: GemvMode,
  pro: GemvPrologue,
  residual: boolean,
  conv: boolean,
): [string, BindingAccess, boolean][] {
  const weights = mode === "qkv" ? ["WQ", "WK", "WV"] : mode === "swiglu" ? ["W", "V"] : ["W"];
  const outs = mode === "qkv" ? ["Q", "K", "V"] : mode === "split3" ? ["A", "B", "C"] : ["Y"];
  return [
    ["X", "read", true],
    ...(typeof pro === "object" ? [["Z", "read", true] as [string, BindingAccess, boolean]] : []),
    ...(pro !== "none" ? [["NW", "read", true] as [string, BindingAccess, boolean]] : []),
    ...weights.map((w) => [w, "read", true] as [string, BindingAccess, boolean]),
    ...(residual ? [["R", "read", false] as [string, BindingAccess, boolean]] : []),
    // the conv epilogue's taps [C, width + 1] (each channel's weights, then its bias)
    ...(conv ? [["CT", "read", false] as [string, BindingAccess, boolean]] : []),
    ...outs.map((o) => [o, "rw", false] as [string, BindingAccess, boolean]),
    // and its state [rows, C, width - 1], shifted in place
    ...(conv ? [["CS", "rw", false] as [string, BindingAccess, boolean]] : []),
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
  n1 = 0,
): Launch {
  const width = gemvVectorWidth(dtype);
  // a vector item must not straddle two norm groups
  const vec = k % width === 0 && (!variant.gated || variant.gated.group % width === 0);
  const shaped = gemvShapeDefaults(n);
  const tpr = opts.threadsPerRow ?? shaped.threadsPerRow;
  if (tpr < 4 || tpr > GEMV_WORKGROUP || (tpr & (tpr - 1)) !== 0) {
    throw new Error(`gemv: threadsPerRow must be a power of two in 4..${GEMV_WORKGROUP}, got ${tpr}`);
  }
  const unroll = opts.unroll ?? shaped.unroll;
  if (![1, 2, 4, 8, 16].includes(unroll)) {
    throw new Error(`gemv: unroll must be 1, 2, 4, 8 or 16, got ${unroll}`);
  }
  const sgSize = opts.subgroupSize ?? 0;
  if (sgSize !== 0 && !(sgSize >= 4 && sgSize <= GEMV_WORKGROUP && (sgSize & (sgSize - 1)) === 0)) {
    throw new Error(`gemv: subgroupSize must be 0 or a power of two in 4..${GEMV_WORKGROUP}, got ${sgSize}`);
  }
  // subgroup sums need whole subgroups per row
  const sg = sgSize > 0 && tpr % sgSize === 0 ? sgSize : 0;
  const { mode, residual } = variant;
  const gated = variant.gated ?? null;
  const conv = variant.conv ?? null;
  const norm = opts.normIn !== undefined;
  if (norm && !(opts.normIn!.eps >= 0)) {
    throw new Error(`gemv: normIn.eps must be >= 0, got ${opts.normIn!.eps}`);
  }
  const pro: GemvPrologue = gated ? { group: gated.group, groups: gated.groups } : norm ? "rms" : "none";
  const proKey = gated ? `_gnorm${gated.group}x${gated.groups}` : norm ? "_norm" : "";
  const convKey = conv ? `_conv${conv.width}${conv.silu ? "_silu" : ""}` : "";
  const key = `gemv${mode === "single" ? "" : `_${mode}`}${proKey}${
    residual ? "_res" : ""
  }${convKey}_${dtype}_r${rows}_t${tpr}_${vec ? "v" : "s"}${unroll === 4 ? "" : `_u${unroll}`}${
    sg ? `_sg${sg}` : ""
  }`;
  let spec = specs.get(key);
  if (!spec) {
    spec = {
      key,
      bindings: gemvBindings(mode, pro, residual, conv !== null).map(([, access]) => access),
      uniformBytes: 32,
      code: gemvWgsl(dtype, rows, tpr, vec, mode, pro, residual, unroll, sg, conv),
    };
    specs.set(key, spec);
  }
  const rowsPerWg = GEMV_WORKGROUP / tpr;
  return {
    spec,
    uniforms:
      new Uniforms(32).u32(n).u32(k).f32(opts.alpha ?? 1).u32(nq).f32(gated?.eps ?? opts.normIn?.eps ?? 0)
        .u32(n1).buffer,
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

/**
 * One weight W [n0 + n1 + n2, K] whose output columns go to three tensors: a [rows, n0], b [rows, n1] and
 * c [rows, n2] hold `alpha * x W^T` split along its last dimension (Mamba2's in_proj output z | xBC | dt), without
 * a split dispatch after the product. Bindings: x, [norm weight with `normIn`,] W (read), a, b, c (rw).
 *
 * With `conv`, b holds the one-token conv of the product's middle part instead ({@linkcode GemvConvStep}: Mamba2's
 * xBC after its conv, without the conv dispatch), and the conv state advances in place. Bindings: x, [norm
 * weight,] W, taps [n1, width + 1] (read: each channel's `width` weights, then its bias), a, b, c, state
 * [rows, n1, width - 1] (rw): eight storage buffers with the norm, WebGPU's default per-stage limit, which is why
 * the weights and the bias come packed in one tensor.
 */
export function gemvSplit3Kernel(
  dtype: DType,
  rows: number,
  widths: readonly [number, number, number],
  k: number,
  opts: GemvOptions & { conv?: GemvConvStep } = {},
): Launch {
  if (rows < 1 || rows > GEMV_MAX_ROWS) {
    throw new Error(`gemvSplit3: rows must be 1..${GEMV_MAX_ROWS}, got ${rows}`);
  }
  const [n0, n1, n2] = widths;
  if (!(n0 > 0 && n1 > 0 && n2 > 0)) throw new Error(`gemvSplit3: widths must be positive, got ${widths}`);
  const conv = opts.conv ?? null;
  if (conv && !(Number.isInteger(conv.width) && conv.width >= 2)) {
    throw new Error(`gemvSplit3: conv.width must be an integer >= 2, got ${conv.width}`);
  }
  return gemvLaunch(dtype, rows, n0 + n1 + n2, k, opts, { mode: "split3", residual: false, conv }, n0, n1);
}

function gemvWgsl(
  dtype: DType,
  rows: number,
  tpr: number,
  vec: boolean,
  mode: GemvMode,
  pro: GemvPrologue,
  residual: boolean,
  unroll: number,
  sg: number,
  conv: GemvConvStep | null,
): string {
  const swigluPair = mode === "swiglu", qkv = mode === "qkv", split3 = mode === "split3";
  const gated = typeof pro === "object" ? pro : null;
  // either norm scales the x items with a weight item loaded beside W's
  const norm = pro !== "none";
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
  // the x item of row r at item index idx, normalised in the prologue's variant with the norm weight item g; the
  // gated norm builds it from the y (X) and z items with its (row, group)'s 1/rms, kept in red by the prologue
  const xItem = (r: number, idx: string, g: string) =>
    gated
      ? `gnrm(X[${r}u * kv + ${idx}], Z[${r}u * kv + ${idx}], ${g}, red[${
        r * gated.groups
      }u + (${idx}) / GI])`
      : norm
      ? `nrm(X[${r}u * kv + ${idx}], ${g}, rs[${r}])`
      : `X[${r}u * kv + ${idx}]`;
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
  for (let u = 0; u < unroll; u++) unrolled.push(...step(`${u}`, `i + ${u * tpr}u`));
  const accum = step("", "i");
  const loads: string[] = [], load1: string[] = [];
  mats.forEach((w) => {
    // q/k/v: the weight is picked per output row (uniform across the row's thread group)
    const at = (idx: string) => qkv ? `wload(sel, ${idx})` : `${w.toUpperCase()}[${idx}]`;
    for (let u = 0; u < unroll; u++) {
      loads.push(`let ${w}${u} = ${at(`wrow + i${u ? ` + ${u * tpr}u` : ""}`)};`);
    }
    load1.push(`let ${w} = ${at("wrow + i")};`);
  });
  if (norm) {
    for (let u = 0; u < unroll; u++) loads.push(`let g${u} = NW[i${u ? ` + ${u * tpr}u` : ""}];`);
    load1.push("let g = NW[i];");
  }
  // Row sums. Tree: each level halves the row's partials in workgroup memory, a barrier apart. Subgroups: each
  // subgroup adds its lanes' partials at once; with more than one subgroup per row, their sums meet in red.
  const perRow = sg ? tpr / sg : 0; // subgroups per row
  const nsg = sg ? GEMV_WORKGROUP / sg : 0; // subgroups per workgroup
  // a subgroup's sum of `value`, stored by its first lane in slot `slot` of red (one entry per subgroup)
  const subgroupPartial = (value: string, slot: number) =>
    `{ let v = subgroupAdd(${value}); if (lid % ${sg}u == 0u) { red[${slot}u * ${nsg}u + lid / ${sg}u] = v; } }`;
  const reduce: string[] = [], treeStep: string[] = [], gather: string[] = [];
  for (let a = 0; a < slots; a++) {
    if (!sg) {
      reduce.push(`red[${a}u * ${GEMV_WORKGROUP}u + lid] = acc[${a}];`);
      treeStep.push(`red[${a}u * ${GEMV_WORKGROUP}u + lid] += red[${a}u * ${GEMV_WORKGROUP}u + lid + s];`);
    } else if (perRow === 1) {
      reduce.push(`rsum[${a}] = subgroupAdd(acc[${a}]);`);
    } else {
      reduce.push(subgroupPartial(`acc[${a}]`, a));
      gather.push(
        `for (var j = 0u; j < ${perRow}u; j++) { rsum[${a}] += red[${a}u * ${nsg}u + lid / ${sg}u + j]; }`,
      );
    }
  }
  const sum = (a: number) => sg ? `p.alpha * rsum[${a}]` : `p.alpha * red[${a}u * ${GEMV_WORKGROUP}u + lid]`;
  const rowSums = !sg
    ? `${reduce.join("\n  ")}
  for (var s = ${tpr / 2}u; s > 0u; s >>= 1u) {
    workgroupBarrier();
    if (t < s) {
      ${treeStep.join("\n      ")}
    }
  }`
    : perRow === 1
    ? `var rsum: array<f32, ${slots}>;
  ${reduce.join("\n  ")}`
    : `var rsum: array<f32, ${slots}>;
  ${reduce.join("\n  ")}
  workgroupBarrier();
  if (t == 0u) {
    ${gather.join("\n    ")}
  }`;
  const writes: string[] = [];
  for (let r = 0; r < rows; r++) {
    writes.push(
      swigluPair
        ? `{ let g = ${sum(r)}; Y[${r}u * p.n + n] = ${T}(g / (1.0 + exp(-g)) * ${sum(rows + r)}); }`
        : qkv
        ? `if (sel == 0u) { Q[${r}u * p.nq + nl] = ${T}(${sum(r)}); } ` +
          `else if (sel == 1u) { K[${r}u * nkv + nl] = ${T}(${sum(r)}); } ` +
          `else { V[${r}u * nkv + nl] = ${T}(${sum(r)}); }`
        : split3
        ? `if (sel == 0u) { A[${r}u * p.nq + col] = ${T}(${sum(r)}); } ` +
          `else if (sel == 1u) { B[${r}u * p.n1 + col] = ${T}(${
            conv ? `conv_step(${r}u, col, ${T}(${sum(r)}))` : sum(r)
          }); } ` +
          `else { C[${r}u * (p.n - p.nq - p.n1) + col] = ${T}(${sum(r)}); }`
        : residual
        // the product rounds to T first, as the unfused path stores it before the add
        ? `Y[${r}u * p.n + n] = ${T}(f32(R[${r}u * p.n + n]) + f32(${T}(${sum(r)})));`
        : `Y[${r}u * p.n + n] = ${T}(${sum(r)});`,
    );
  }
  const bindings = gemvBindings(mode, pro, residual, conv !== null);
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
  const normFns = gated ? gatedNormFns(T, vec, f16vec) : !norm ? "" : f16vec
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
    if (!sg) {
      ssqStore.push(`red[${r}u * ${GEMV_WORKGROUP}u + lid] = ss[${r}];`);
      ssqTree.push(`red[${r}u * ${GEMV_WORKGROUP}u + lid] += red[${r}u * ${GEMV_WORKGROUP}u + lid + s];`);
      rsLoad.push(`rs[${r}] = inverseSqrt(red[${r}u * ${GEMV_WORKGROUP}u] / f32(p.k) + p.eps);`);
    } else {
      ssqStore.push(subgroupPartial(`ss[${r}]`, r));
      rsLoad.push(
        `{ var w = 0.0; for (var j = 0u; j < ${nsg}u; j++) { w += red[${r}u * ${nsg}u + j]; } ` +
          `rs[${r}] = inverseSqrt(w / f32(p.k) + p.eps); }`,
      );
    }
  }
  // Every workgroup reduces the rows' sums of squares over the whole workgroup before its product; all of them
  // read the same items in the same order, so every workgroup gets the same rstd.
  const ssqReduce = sg
    ? `${ssqStore.join("\n    ")}
    workgroupBarrier();`
    : `${ssqStore.join("\n    ")}
    for (var s = ${GEMV_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
      workgroupBarrier();
      if (lid < s) {
        ${ssqTree.join("\n        ")}
      }
    }
    workgroupBarrier();`;
  const prologue = gated ? gatedPrologue(rows, width, gated) : !norm ? "" : `
  var rs: array<f32, ${rows}>;
  {
    var ss: array<f32, ${rows}>;
    for (var i = lid; i < kv; i += ${GEMV_WORKGROUP}u) {
      ${ssq.join("\n      ")}
    }
    ${ssqReduce}
    ${rsLoad.join("\n    ")}
    // the product's reduction below reuses red
    workgroupBarrier();
  }`;
  // subgroup sums exchange one value per subgroup; the tree and the gated prologue need one per thread
  const redSize = sg && !gated ? Math.max(slots, rows) * nsg : slots * GEMV_WORKGROUP;
  return `${wgslHeader(dtype)}${sg ? "enable subgroups;\n" : ""}
struct P { n: u32, k: u32, alpha: f32, nq: u32, eps: f32, n1: u32, _b: u32, _c: u32 }
${decls}
@group(0) @binding(${bindings.length}) var<uniform> p: P;
${wload}
var<workgroup> red: array<f32, ${redSize}>;

// eight f16 values packed in a vec4<u32>: two per word
fn dot8(a: vec4<u32>, b: vec4<u32>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { s += dot(unpack2x16float(a[j]), unpack2x16float(b[j])); }
  return s;
}
${normFns}${conv ? convStepFn(T, conv) : ""}
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
      : split3
      ? `let nl = n;
  // which output this column goes to (0 a, 1 b, 2 c) and its column there
  let sel = select(select(2u, 1u, n < p.nq + p.n1), 0u, n < p.nq);
  let col = select(select(n - p.nq - p.n1, n - p.nq, n < p.nq + p.n1), n, n < p.nq);`
      : "let nl = n;"
  }
  if (n < p.n) {
    let wrow = nl * kv;
    // consecutive threads read consecutive 16-byte items, so each warp streams a contiguous span of W;
    // unroll independent loads per iteration keep bytes in flight to cover memory latency
    var i = t;
    for (; i + ${(unroll - 1) * tpr}u < kv; i += ${unroll * tpr}u) {
      ${loads.join("\n      ")}
      ${unrolled.join("\n      ")}
    }
    for (; i < kv; i += ${tpr}u) {
      ${load1.join("\n      ")}
      ${accum.join("\n      ")}
    }
  }${
    gated ? "\n  // the gated prologue's 1/rms values in red are read up to here\n  workgroupBarrier();" : ""
  }
  ${rowSums}
  if (t == 0u && n < p.n) {
    ${writes.join("\n    ")}
  }
}
`;
}

/**
 * The conv epilogue's helper (see {@linkcode GemvConvStep}): `conv_step(r, c, y)` convolves channel c of row r
 * over its state and the new value y (the product rounded to T, as the unfused conv reads it from memory), shifts
 * the state and returns the activation. The thread that finished output column c of row r is the only one that
 * calls it for that channel, so the state's read and shift need no synchronisation.
 */
function convStepFn(T: string, conv: GemvConvStep): string {
  const slots = conv.width - 1;
  return `
// one token of the causal depthwise conv of channel c in row r; the window is the state's ${slots} earlier inputs
// (oldest first) then y, summed in that order as kernels/conv1d.ts conv1dStep sums them
fn conv_step(r: u32, c: u32, y: ${T}) -> f32 {
  let taps = c * ${conv.width + 1}u; // the channel's weights, then its bias
  let st = (r * p.n1 + c) * ${slots}u;
  var pre = f32(CT[taps + ${conv.width}u]);
  for (var j = 0u; j < ${slots}u; j++) { pre += f32(CT[taps + j]) * f32(CS[st + j]); }
  pre += f32(CT[taps + ${slots}u]) * f32(y);
  // the state keeps pre-conv inputs: drop the oldest, append y (in T, as stored)
  for (var j = 0u; j + 1u < ${slots}u; j++) { CS[st + j] = CS[st + j + 1u]; }
  CS[st + ${slots - 1}u] = y;
  // SiLU as kernels/conv1d.ts computes it: pre * sigmoid(pre)
  return ${conv.silu ? "pre * (1.0 / (1.0 + exp(-pre)))" : "pre"};
}
`;
}

/**
 * The gated norm's helpers for one loaded item of y (a) and z (b): `gsq`, the sum of squares of the gated values
 * g = y * SiLU(z); `gnrm`, T(g * r * w) as kernels/gated_rmsnorm.ts computes and stores it (f32 math, one rounding
 * to T), in the form the product's dot takes (unpacked pairs for packed f16).
 */
function gatedNormFns(T: string, vec: boolean, f16vec: boolean): string {
  if (f16vec) {
    return `
fn gate2(y: u32, z: u32) -> vec2<f32> {
  let zz = unpack2x16float(z);
  return unpack2x16float(y) * zz * (1.0 / (1.0 + exp(-zz)));
}
fn gsq(a: vec4<u32>, b: vec4<u32>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { let g = gate2(a[j], b[j]); s += dot(g, g); }
  return s;
}
fn gnrm(a: vec4<u32>, b: vec4<u32>, w: vec4<u32>, r: f32) -> array<vec2<f32>, 4> {
  var o: array<vec2<f32>, 4>;
  for (var j = 0u; j < 4u; j++) { o[j] = vec2<f32>(vec2<f16>(gate2(a[j], b[j]) * r * unpack2x16float(w[j]))); }
  return o;
}
// dot8 with the second operand already unpacked (a normalised x item)
fn dot8n(a: vec4<u32>, b: array<vec2<f32>, 4>) -> f32 {
  var s = 0.0;
  for (var j = 0u; j < 4u; j++) { s += dot(unpack2x16float(a[j]), b[j]); }
  return s;
}
`;
  }
  if (vec) {
    return `
fn gate(y: vec4<f32>, z: vec4<f32>) -> vec4<f32> { return y * z * (1.0 / (1.0 + exp(-z))); }
fn gsq(a: vec4<f32>, b: vec4<f32>) -> f32 { let g = gate(a, b); return dot(g, g); }
fn gnrm(a: vec4<f32>, b: vec4<f32>, w: vec4<f32>, r: f32) -> vec4<f32> { return gate(a, b) * r * w; }
`;
  }
  return `
fn gate(y: ${T}, z: ${T}) -> f32 { let zz = f32(z); return f32(y) * zz * (1.0 / (1.0 + exp(-zz))); }
fn gsq(a: ${T}, b: ${T}) -> f32 { let g = gate(a, b); return g * g; }
fn gnrm(a: ${T}, b: ${T}, w: ${T}, r: f32) -> ${T} { return ${T}(gate(a, b) * r * f32(w)); }
`;
}

/**
 * The gated norm's prologue: the 1/rms of every (row, group) unit u = row * groups + group into red[u], the same
 * in every workgroup (same items, same order). S threads split a unit's items (strided, then summed in a fixed
 * order) when the units leave threads for that; with 128 units or more one thread takes a whole unit, in passes
 * of 256 units.
 */
function gatedPrologue(rows: number, width: number, g: GatedShape): string {
  const units = rows * g.groups;
  const gi = g.group / width; // items per group
  let split = 1;
  while (split < 64 && split < gi && units * split * 2 <= GEMV_WORKGROUP) split *= 2;
  const unitSum = (u: string, first: string, step: string) => `
      let base = (${u} / ${g.groups}u) * kv + (${u} % ${g.groups}u) * GI;
      for (var e = ${first}; e < GI; e += ${step}) { ss += gsq(X[base + e], Z[base + e]); }`;
  const rstd = (ss: string) => `inverseSqrt(${ss} / ${g.group}.0 + p.eps)`;
  const body = split === 1
    ? `
  for (var u = lid; u < ${units}u; u += ${GEMV_WORKGROUP}u) {
    var ss = 0.0;${unitSum("u", "0u", "1u")}
    red[u] = ${rstd("ss")};
  }`
    : `
  {
    // ${split} threads per unit: partial sums, then each unit's thread adds its ${split} partials in order
    let u = lid / ${split}u;
    var ss = 0.0;
    if (u < ${units}u) {${unitSum("u", `lid % ${split}u`, `${split}u`)}
    }
    red[lid] = ss;
    workgroupBarrier();
    var tot = 0.0;
    if (lid < ${units}u) {
      for (var j = 0u; j < ${split}u; j++) { tot += red[lid * ${split}u + j]; }
    }
    workgroupBarrier();
    if (lid < ${units}u) { red[lid] = ${rstd("tot")}; }
  }`;
  return `
  // items per norm group (a vector item never straddles two)
  const GI = ${gi}u;${body}
  workgroupBarrier();`;
}
