/**
 * Register-tiled matrix multiplication: `C[b] = alpha * op(A[b]) op(B[b])` (or `C[b] += ...`), with op a
 * transpose chosen per operand by flag, a batch over workgroup z, and per-batch element strides (0 broadcasts an
 * operand across the batch).
 *
 * Shapes: op(A) is [M, K], op(B) is [K, N], C is [M, N], all row-major. `transA` means A is stored [K, M];
 * `transB` means B is stored [N, K] (the PyTorch weight layout of `linear`). Backward passes are the same kernel
 * with other flags, so no transpose is ever materialised.
 *
 * The kernel (one variant per {@linkcode MatmulConfig} and layout):
 * - a workgroup computes a BM x BN block of C with (BM/TM) * (BN/TN) threads, each owning TM x TN outputs in
 *   registers (f32, whatever the storage type);
 * - K advances in steps of BK through workgroup-shared tiles: with two buffers, the next tile's global loads
 *   are in registers while the threads multiply out of the current one (one barrier a step); with one buffer
 *   (the H200's fastest configs) those registers go to occupancy instead, and each step takes two barriers;
 * - both tiles are stored k-major (`As[k][m]`, `Bs[k][n]`) so a thread reads its TM (TN) values as vec4s;
 *   a thread's rows are interleaved in groups of 4 (`(g * threadsM + tm) * 4 + i`) so neighbouring threads read
 *   neighbouring vec4s of shared memory; optionally the vec4 columns are XOR-swizzled by k row, so the
 *   transposing stores of an operand that runs along K hit distinct banks (`MatmulConfig.swizzle`);
 * - global loads are vec4 along an operand's contiguous dimension when that dimension is a multiple of 4 (then
 *   a vec4 is either wholly inside or wholly outside the matrix), else scalar with per-element bounds checks.
 *
 * Everything is generated unrolled from TypeScript so the driver compiler sees constant indices into the
 * accumulator array and keeps it in registers.
 *
 * @module
 */
import {
  ceilDiv,
  type DType,
  type KernelSpec,
  linearKernelSpec,
  linearWorkgroups,
  Uniforms,
  wgslHeader,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Tile configuration of the register-tiled matmul. */
export interface MatmulConfig {
  /** Rows of C per workgroup. */
  bm: number;
  /** Columns of C per workgroup. */
  bn: number;
  /** K step per shared tile. */
  bk: number;
  /** Rows per thread (multiple of 4). */
  tm: number;
  /** Columns per thread (multiple of 4). */
  tn: number;
  /**
   * Unroll the k step in the generated WGSL (constant shared-memory offsets for the driver compiler). Default:
   * for blocks of 64x64 and larger, where speed matters; small blocks keep a loop, which compiles much faster
   * on software adapters.
   */
  unrollK?: boolean;
  /**
   * Shared tiles per operand. 2 (default) loads the next K step into registers while multiplying out of the
   * current tile (one barrier a step); 1 saves those registers for occupancy (two barriers a step).
   */
  buffers?: 1 | 2;
  /**
   * XOR-swizzle the columns of the shared tiles by k row. Without it, the transposing stores of an operand that
   * runs along K (A, and B in the `linear` layout) write four k rows whose words share banks: a 4-way conflict
   * on every store. The swizzle is a permutation of vec4 columns within a row, so the multiply's vec4 reads stay
   * conflict-free, and its k offsets are constants in the unrolled loop.
   */
  swizzle?: boolean;
  /**
   * Rows of threads one 32-thread subgroup covers (default: the whole subgroup in one row of `bn / tn` threads
   * when that is 32 or fewer, i.e. row-major thread order). 4 makes each subgroup a 4 x 8 block of threads, so
   * its shared-memory reads touch 4 A vectors and 8 B vectors a step instead of 2 and 16.
   */
  warpRows?: number;
}

function unrolls(c: MatmulConfig): boolean {
  return c.unrollK ?? c.bm * c.bn >= 64 * 64;
}

function buffersOf(c: MatmulConfig): 1 | 2 {
  return c.buffers ?? 2;
}

/** Layout and storage of one matmul variant. */
export interface MatmulLayout {
  /** Storage type of A, B and C (accumulation is always f32). */
  dtype: DType;
  /** A is stored [K, M]. */
  transA: boolean;
  /** B is stored [N, K]. */
  transB: boolean;
  /** C += alpha * A B instead of C = alpha * A B. */
  accumulate: boolean;
}

/** Sizes of one matmul dispatch, in elements. */
export interface MatmulShape {
  /** Rows of C. */
  m: number;
  /** Columns of C. */
  n: number;
  /** Reduction length. */
  k: number;
  /** Batch count (workgroup z). */
  batch: number;
  /** Elements between consecutive batches of A (0: A broadcast over the batch). */
  strideA: number;
  /** Elements between consecutive batches of B (0: broadcast). */
  strideB: number;
  /** Elements between consecutive batches of C. */
  strideC: number;
  /** Element offset of A's first batch in its buffer (default 0). */
  offsetA?: number;
  /** Element offset of B's first batch (default 0). */
  offsetB?: number;
  /** Element offset of C's first batch (default 0). */
  offsetC?: number;
  /** Scale of the product (default 1). */
  alpha?: number;
}

/**
 * 128x256 blocks, 8x16 per thread, 256 threads in 4x8 subgroup blocks, one swizzled buffer with K slices of 32
 * (48 KiB shared): the fastest config of the H200 sweep, 38.2 TFLOP/s at 8192^3 f32 against 29.6 for the
 * double-buffered 128x128x16 (BENCHMARKS.md). Used where the device offers 48 KiB of workgroup memory.
 */
export const MATMUL_XL: MatmulConfig = {
  bm: 128,
  bn: 256,
  bk: 32,
  tm: 8,
  tn: 16,
  buffers: 1,
  swizzle: true,
  warpRows: 4,
};
/** The same scheme on 128x128 blocks, 8x8 per thread (32 KiB shared): 35.6 TFLOP/s at 8192^3 on the H200. */
export const MATMUL_LARGE: MatmulConfig = { ...MATMUL_XL, bn: 128, tn: 8 };
/** The double-buffered 128x128x16 design the sweep started from (32 KiB shared). */
export const MATMUL_DOUBLE_BUFFERED: MatmulConfig = { bm: 128, bn: 128, bk: 16, tm: 8, tn: 8 };
/** 64x64 blocks, 4x4 per thread, 256 threads: medium matrices, or when 128x128 blocks would leave SMs idle. */
export const MATMUL_MEDIUM: MatmulConfig = { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 };
/** 32x32 blocks, 4x4 per thread, 64 threads: small and skinny matrices. */
export const MATMUL_SMALL: MatmulConfig = { bm: 32, bn: 32, bk: 16, tm: 4, tn: 4 };

/** Configurations worth sweeping on a large GPU (the benchmark runs them all). */
export const MATMUL_SWEEP: readonly MatmulConfig[] = [
  MATMUL_LARGE,
  MATMUL_XL,
  MATMUL_DOUBLE_BUFFERED,
  { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8 },
  { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 },
  { bm: 64, bn: 128, bk: 16, tm: 4, tn: 8 },
  { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 },
  { bm: 128, bn: 256, bk: 8, tm: 8, tn: 16 },
  // conflict-free transposing stores, subgroup blocks of 4 x 8 threads, one buffer with deeper K
  { ...MATMUL_DOUBLE_BUFFERED, swizzle: true },
  { ...MATMUL_DOUBLE_BUFFERED, swizzle: true, warpRows: 4 },
  { ...MATMUL_DOUBLE_BUFFERED, bk: 8, swizzle: true },
  { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4, swizzle: true },
  { ...MATMUL_DOUBLE_BUFFERED, buffers: 1, swizzle: true },
  { ...MATMUL_LARGE, warpRows: undefined },
  { ...MATMUL_LARGE, swizzle: false },
  { ...MATMUL_XL, warpRows: undefined },
  { bm: 128, bn: 64, bk: 32, tm: 8, tn: 4, buffers: 1, swizzle: true, warpRows: 4 },
];

/** Short name of a config, e.g. `128x128x16_8x8`. */
export function matmulConfigName(c: MatmulConfig): string {
  return `${c.bm}x${c.bn}x${c.bk}_${c.tm}x${c.tn}${unrolls(c) ? "" : "_loop"}` +
    `${buffersOf(c) === 1 ? "_b1" : ""}${c.swizzle ? "_sw" : ""}${c.warpRows ? `_w${c.warpRows}` : ""}`;
}

/** Parses {@linkcode matmulConfigName}'s output back into a config (for benchmark command lines). */
export function parseMatmulConfig(name: string): MatmulConfig {
  const m = /^(\d+)x(\d+)x(\d+)_(\d+)x(\d+)((?:_loop|_b1|_sw|_w\d+)*)$/.exec(name);
  if (!m) throw new Error(`matmul config '${name}': expected BMxBNxBK_TMxTN[_loop][_b1][_sw][_wR]`);
  const [bm, bn, bk, tm, tn] = m.slice(1, 6).map(Number);
  const flags = m[6];
  const c: MatmulConfig = { bm, bn, bk, tm, tn };
  if (flags.includes("_loop")) c.unrollK = false;
  if (flags.includes("_b1")) c.buffers = 1;
  if (flags.includes("_sw")) c.swizzle = true;
  const w = /_w(\d+)/.exec(flags);
  if (w) c.warpRows = Number(w[1]);
  validateMatmulConfig(c);
  return c;
}

/** Shared-memory bytes a config needs (one or two f32 tiles of A and B). */
export function matmulSharedBytes(c: MatmulConfig): number {
  return buffersOf(c) * c.bk * (c.bm + c.bn) * 4;
}

/** Throws if a config is malformed or does not fit the device limits. */
export function validateMatmulConfig(
  c: MatmulConfig,
  limits?: { maxComputeWorkgroupStorageSize: number; maxComputeInvocationsPerWorkgroup: number },
): void {
  const name = matmulConfigName(c);
  if (c.tm % 4 || c.tn % 4 || c.bk % 4) {
    throw new Error(`matmul config ${name}: tm, tn, bk must be multiples of 4`);
  }
  if (c.bm % c.tm || c.bn % c.tn) {
    throw new Error(`matmul config ${name}: bm, bn must be multiples of tm, tn`);
  }
  const threads = (c.bm / c.tm) * (c.bn / c.tn);
  if (c.warpRows !== undefined) {
    const cols = 32 / c.warpRows;
    if (!Number.isInteger(cols) || (c.bm / c.tm) % c.warpRows || (c.bn / c.tn) % cols) {
      throw new Error(`matmul config ${name}: warpRows must tile the thread grid in 32-thread blocks`);
    }
  }
  if (c.swizzle) {
    // the swizzle XORs vec4 columns with values up to (bk/4 - 1) * 32/bk: they must stay inside one thread's
    // column stride (bm/tm, bn/tn: powers of two) so a thread's g-th vector keeps its own group
    const span = Math.max(1, 32 / c.bk) * (c.bk / 4);
    const pow2 = (x: number) => (x & (x - 1)) === 0;
    if (
      !pow2(c.bk) || !pow2(c.bm / c.tm) || !pow2(c.bn / c.tn) || span > Math.min(c.bm / c.tm, c.bn / c.tn)
    ) {
      throw new Error(`matmul config ${name}: swizzle needs powers of two and bm/tm, bn/tn >= ${span}`);
    }
  }
  if (limits) {
    if (threads > limits.maxComputeInvocationsPerWorkgroup) {
      throw new Error(`matmul config ${name}: ${threads} threads exceed the device limit`);
    }
    if (matmulSharedBytes(c) > limits.maxComputeWorkgroupStorageSize) {
      throw new Error(
        `matmul config ${name}: ${matmulSharedBytes(c)} bytes of shared memory exceed the limit`,
      );
    }
  }
}

/**
 * Picks a configuration for a problem size: the largest block that still gives enough workgroups to fill a
 * large GPU and fits the device's workgroup memory (`maxSharedBytes`), else smaller blocks (a 4096-token prefill
 * through a 2048-wide projection is 256 blocks of 128x256; a 64-token chunk is not).
 */
export function pickMatmulConfig(m: number, n: number, batch = 1, maxSharedBytes = 32768): MatmulConfig {
  const blocks = (c: MatmulConfig) => ceilDiv(m, c.bm) * ceilDiv(n, c.bn) * batch;
  const fits = (c: MatmulConfig) => matmulSharedBytes(c) <= maxSharedBytes;
  if (m >= 128 && n >= 256 && blocks(MATMUL_XL) >= 256 && fits(MATMUL_XL)) return MATMUL_XL;
  if (m >= 128 && n >= 128 && blocks(MATMUL_LARGE) >= 256 && fits(MATMUL_LARGE)) return MATMUL_LARGE;
  if (m >= 64 && n >= 64 && blocks(MATMUL_MEDIUM) >= 128) return MATMUL_MEDIUM;
  return MATMUL_SMALL;
}

const specs = new Map<string, KernelSpec>();

/**
 * The kernel variant for a config and layout. `vecA`/`vecB`/`vecC` select vec4 global access for an operand
 * (legal only when its contiguous dimension, its batch stride and its offset are multiples of 4).
 * Bindings: A (read), B (read), C (rw, read too when accumulating).
 */
export function matmulSpec(
  c: MatmulConfig,
  layout: MatmulLayout,
  vecA: boolean,
  vecB: boolean,
  vecC: boolean,
): KernelSpec {
  const key = `matmul_${layout.dtype}_${layout.transA ? "t" : "n"}${layout.transB ? "t" : "n"}` +
    `${layout.accumulate ? "_acc" : ""}_v${+vecA}${+vecB}${+vecC}_${matmulConfigName(c)}`;
  let spec = specs.get(key);
  if (!spec) {
    validateMatmulConfig(c);
    spec = {
      key,
      bindings: ["read", "read", "rw"],
      uniformBytes: 48,
      code: matmulWgsl(c, layout, vecA, vecB, vecC),
    };
    specs.set(key, spec);
  }
  return spec;
}

/** A matmul dispatch: workgroups (N blocks, M blocks, batch) and uniforms. Bindings: A, B, C. */
export function matmulKernel(
  shape: MatmulShape,
  layout: MatmulLayout,
  config: MatmulConfig = pickMatmulConfig(shape.m, shape.n, shape.batch),
): Launch {
  const { m, n, k, batch, strideA, strideB, strideC } = shape;
  const offA = shape.offsetA ?? 0, offB = shape.offsetB ?? 0, offC = shape.offsetC ?? 0;
  const aligned = (...xs: number[]) => xs.every((x) => x % 4 === 0);
  const vecA = aligned(layout.transA ? m : k, strideA, offA);
  const vecB = aligned(layout.transB ? k : n, strideB, offB);
  const vecC = aligned(n, strideC, offC);
  return {
    spec: matmulSpec(config, layout, vecA, vecB, vecC),
    uniforms: new Uniforms(48).u32(m).u32(n).u32(k).u32(strideA).u32(strideB).u32(strideC)
      .u32(offA).u32(offB).u32(offC).f32(shape.alpha ?? 1).buffer,
    workgroups: [ceilDiv(n, config.bn), ceilDiv(m, config.bm), batch],
  };
}

/** Workgroups a split-K product aims for: about two per streaming multiprocessor of a large GPU. */
export const SPLIT_K_TARGET_WORKGROUPS = 256;
/** Shortest K slice worth a workgroup of its own (shorter slices spend more on the partial sums). */
export const SPLIT_K_MIN_SLICE = 256;

/**
 * How many K slices a product should be cut into, 1 for none. A weight gradient `dW = dY^T X` of a narrow layer
 * has a tiny output (a few blocks of C) and a long reduction over every token of the batch; one workgroup per
 * block would then walk all of K alone while the rest of the GPU idles. Slicing K gives each slice its own
 * workgroups; {@linkcode splitKSumKernel} adds the partial products. `maxPartialBytes` bounds the f32 partials.
 */
export function splitKSlices(
  m: number,
  n: number,
  k: number,
  config: MatmulConfig,
  maxPartialBytes: number,
): number {
  const blocks = ceilDiv(m, config.bm) * ceilDiv(n, config.bn);
  if (blocks * 4 >= SPLIT_K_TARGET_WORKGROUPS) return 1;
  const byWork = ceilDiv(SPLIT_K_TARGET_WORKGROUPS, blocks);
  const byLength = Math.floor(k / SPLIT_K_MIN_SLICE);
  const byMemory = Math.floor(maxPartialBytes / (m * n * 4));
  const slices = Math.min(byWork, byLength, byMemory);
  return slices >= 2 ? slices : 1;
}

const sumSpecs = new Map<string, KernelSpec>();

/**
 * Sums split-K partials: `C[i] (+)= sum_s P[s * mn + i]` over `slices` f32 partial products of `mn` elements
 * (the partials already carry alpha). Bindings: P (read), C (rw).
 */
export function splitKSumKernel(mn: number, slices: number, accumulate: boolean): Launch {
  const key = `matmul_splitk_sum${accumulate ? "_acc" : ""}`;
  let spec = sumSpecs.get(key);
  if (!spec) {
    spec = linearKernelSpec(
      key,
      "f32",
      [["parts", "read", "f32"], ["c", "rw", "f32"]],
      "n: u32, slices: u32, _a: u32, _b: u32",
      `if (i >= p.n) { return; }
  var acc = ${accumulate ? "c[i]" : "0.0"};
  for (var s = 0u; s < p.slices; s++) { acc += parts[s * p.n + i]; }
  c[i] = acc;`,
    );
    sumSpecs.set(key, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(16).u32(mn).u32(slices).u32(0).u32(0).buffer,
    workgroups: linearWorkgroups(mn),
  };
}

/** Generates the WGSL of one variant (see the module comment for the scheme). */
function matmulWgsl(c: MatmulConfig, L: MatmulLayout, vecA: boolean, vecB: boolean, vecC: boolean): string {
  const T = wgslType(L.dtype);
  const { bm, bn, bk, tm, tn } = c;
  const thrM = bm / tm, thrN = bn / tn, NT = thrM * thrN;
  const bm4 = bm / 4, bn4 = bn / 4, tm4 = tm / 4, tn4 = tn / 4;
  const tileA4 = bk * bm4, tileB4 = bk * bn4; // vec4s per shared tile
  const nbuf = buffersOf(c);
  // the column swizzle of k row r: ((r >> 2) * swStep), see MatmulConfig.swizzle
  const swStep = Math.max(1, 32 / bk);
  const swOf = (row: string) => (c.swizzle ? ` ^ ((${row} >> 2u) * ${swStep}u)` : "");

  // ---- global -> registers -> shared, for one operand ---------------------------------------------------
  // `rows` x `cols` of the tile in its stored orientation; `contiguousIsK`: the stored layout runs along k.
  // The shared tile is always k-major: S[buf][k * (outer/4) + o/4][o % 4], o being the m (or n) index.
  interface Operand {
    name: "A" | "B";
    vec: boolean;
    contiguousIsK: boolean; // A not transposed, or B transposed
    outer: number; // bm or bn
    outerSize: string; // "p.m" or "p.n"
    ld: string; // row length of the stored matrix
    base: string; // element offset of this batch
    origin: string; // first outer index of this workgroup's block
  }
  const opA: Operand = {
    name: "A",
    vec: vecA,
    contiguousIsK: !L.transA,
    outer: bm,
    outerSize: "p.m",
    ld: L.transA ? "p.m" : "p.k",
    base: "baseA",
    origin: "m0",
  };
  const opB: Operand = {
    name: "B",
    vec: vecB,
    contiguousIsK: L.transB,
    outer: bn,
    outerSize: "p.n",
    ld: L.transB ? "p.k" : "p.n",
    base: "baseB",
    origin: "n0",
  };

  // number of load slots per thread (registers holding the next tile)
  const slots = (o: Operand) => Math.ceil((o.vec ? (bk * o.outer) / 4 : bk * o.outer) / NT);
  const total = (o: Operand) => (o.vec ? (bk * o.outer) / 4 : bk * o.outer);

  function regDecl(o: Operand): string {
    return o.vec
      ? `var ld${o.name}: array<vec4<f32>, ${slots(o)}>;`
      : `var ld${o.name}: array<f32, ${slots(o)}>;`;
  }

  // Loads tile `kt` of an operand into registers.
  function load(o: Operand): string {
    const out: string[] = [];
    const tot = total(o);
    for (let s = 0; s < slots(o); s++) {
      const guard = (s + 1) * NT > tot ? `if (lid + ${s * NT}u < ${tot}u) ` : "";
      const idx = `(lid + ${s * NT}u)`;
      if (o.vec) {
        // contiguous along k: idx -> (outer row, k quad); contiguous along outer: idx -> (k row, outer quad)
        const [oi, ki] = o.contiguousIsK
          ? [`${idx} / ${bk / 4}u`, `(${idx} % ${bk / 4}u) * 4u`]
          : [`(${idx} % ${o.outer / 4}u) * 4u`, `${idx} / ${o.outer / 4}u`];
        const addr = o.contiguousIsK ? `${o.base} + go * ${o.ld} + gk` : `${o.base} + gk * ${o.ld} + go`;
        out.push(`${guard}{
      let go = ${o.origin} + ${oi}; let gk = k0 + ${ki};
      var v = vec4<f32>(0.0);
      if (go < ${o.outerSize} && gk < p.k) { v = vec4<f32>(${o.name}4[(${addr}) / 4u]); }
      ld${o.name}[${s}] = v;
    }`);
      } else {
        const [oi, ki] = o.contiguousIsK
          ? [`${idx} / ${bk}u`, `${idx} % ${bk}u`]
          : [`${idx} % ${o.outer}u`, `${idx} / ${o.outer}u`];
        const addr = o.contiguousIsK ? `${o.base} + go * ${o.ld} + gk` : `${o.base} + gk * ${o.ld} + go`;
        out.push(`${guard}{
      let go = ${o.origin} + ${oi}; let gk = k0 + ${ki};
      var v = 0.0;
      if (go < ${o.outerSize} && gk < p.k) { v = f32(${o.name}[${addr}]); }
      ld${o.name}[${s}] = v;
    }`);
      }
    }
    return out.join("\n    ");
  }

  // Stores the registers into shared buffer `buf` (k-major).
  function store(o: Operand): string {
    const out: string[] = [];
    const tot = total(o);
    const S = `S${o.name}`;
    const o4 = o.outer / 4;
    const tile4 = o.name === "A" ? tileA4 : tileB4;
    for (let s = 0; s < slots(o); s++) {
      const guard = (s + 1) * NT > tot ? `if (lid + ${s * NT}u < ${tot}u) ` : "";
      const idx = `(lid + ${s * NT}u)`;
      if (o.vec && o.contiguousIsK) {
        // a vec4 along k lands in four k rows of the k-major tile: transpose on the way in
        out.push(`${guard}{
      let oi = ${idx} / ${bk / 4}u; let ki = (${idx} % ${bk / 4}u) * 4u;
      let v = ld${o.name}[${s}];
      let q = (oi / 4u)${swOf("ki")};
      for (var j = 0u; j < 4u; j++) { ${S}[buf * ${tile4}u + (ki + j) * ${o4}u + q][oi % 4u] = v[j]; }
    }`);
      } else if (o.vec) {
        out.push(`${guard}{
      let oq = ${idx} % ${o4}u; let ki = ${idx} / ${o4}u;
      ${S}[buf * ${tile4}u + ki * ${o4}u + (oq${swOf("ki")})] = ld${o.name}[${s}];
    }`);
      } else {
        const [oi, ki] = o.contiguousIsK
          ? [`${idx} / ${bk}u`, `${idx} % ${bk}u`]
          : [`${idx} % ${o.outer}u`, `${idx} / ${o.outer}u`];
        out.push(`${guard}{
      let oi = ${oi}; let ki = ${ki};
      ${S}[buf * ${tile4}u + ki * ${o4}u + ((oi / 4u)${swOf("ki")})][oi % 4u] = ld${o.name}[${s}];
    }`);
      }
    }
    return out.join("\n    ");
  }

  // ---- the multiply-accumulate of one shared tile, fully unrolled over the thread's TM x TN block -------
  const kSteps: string[] = [];
  const unroll = unrolls(c);
  for (let kk = 0; kk < (unroll ? bk : 1); kk++) {
    const fma: string[] = [];
    const koff = (w: number) => (unroll ? `${kk * w}u` : `kk * ${w}u`);
    // the thread's column within its group of vectors, swizzled for this k row (a constant when unrolled)
    const sw = !c.swizzle ? 0 : unroll ? (kk >> 2) * swStep : -1;
    const col = (
      t: string,
    ) => (sw === 0 ? t : sw > 0 ? `(${t} ^ ${sw}u)` : `(${t} ^ ((kk >> 2u) * ${swStep}u))`);
    for (let g = 0; g < tm4; g++) {
      fma.push(`let a${g} = SA[ab + ${koff(bm4)} + ${g * thrM}u + ${col("tm")}];`);
    }
    for (let h = 0; h < tn4; h++) {
      fma.push(`let b${h} = SB[bb + ${koff(bn4)} + ${h * thrN}u + ${col("tn")}];`);
    }
    for (let g = 0; g < tm4; g++) {
      for (let i = 0; i < 4; i++) {
        for (let h = 0; h < tn4; h++) {
          const r = (g * 4 + i) * tn4 + h;
          fma.push(`acc[${r}] = fma(vec4<f32>(a${g}[${i}]), b${h}, acc[${r}]);`);
        }
      }
    }
    kSteps.push(
      unroll
        ? `{\n      ${fma.join("\n      ")}\n    }`
        : `for (var kk = 0u; kk < ${bk}u; kk++) {\n      ${fma.join("\n      ")}\n    }`,
    );
  }

  // ---- epilogue: alpha, optional accumulate, bounds-checked stores --------------------------------------
  const epi: string[] = [];
  for (let g = 0; g < tm4; g++) {
    for (let i = 0; i < 4; i++) {
      const row = `m0 + ${(g * thrM) * 4 + i}u + tm * 4u`;
      const body: string[] = [];
      for (let h = 0; h < tn4; h++) {
        const r = (g * 4 + i) * tn4 + h;
        const col = `n0 + ${h * thrN * 4}u + tn * 4u`;
        if (vecC) {
          const cur = L.accumulate ? ` + vec4<f32>(C4[ci])` : "";
          body.push(`{ let col = ${col};
          if (col < p.n) { let ci = (baseC + row * p.n + col) / 4u; C4[ci] = vec4<${T}>(p.alpha * acc[${r}]${cur}); } }`);
        } else {
          const cur = L.accumulate ? ` + f32(C[ci])` : "";
          body.push(`{ let col = ${col};
          for (var j = 0u; j < 4u; j++) {
            if (col + j < p.n) { let ci = baseC + row * p.n + col + j; C[ci] = ${T}(p.alpha * acc[${r}][j]${cur}); }
          } }`);
        }
      }
      epi.push(`{ let row = ${row};
      if (row < p.m) {
        ${body.join("\n        ")}
      } }`);
    }
  }

  // which TM x TN block of the workgroup's tile this thread owns
  let threadPosition = `let tn = lid % ${thrN}u;
  let tm = lid / ${thrN}u;`;
  if (c.warpRows) {
    const cols = 32 / c.warpRows;
    threadPosition = `let lane = lid % 32u; let warp = lid / 32u;
  let tm = (warp / ${thrN / cols}u) * ${c.warpRows}u + lane / ${cols}u;
  let tn = (warp % ${thrN / cols}u) * ${cols}u + lane % ${cols}u;`;
  }
  const multiply = `// the k step (unrolled for large tiles: constant shared-memory offsets)
    let ab = buf * ${tileA4}u;
    let bb = buf * ${tileB4}u;
    ${kSteps.join("\n    ")}`;
  const doubleBuffered = `var k0 = 0u;
  var buf = 0u;
  ${load(opA)}
  ${load(opB)}
  ${store(opA)}
  ${store(opB)}
  workgroupBarrier();
  for (var t = 0u; t < ntiles; t++) {
    buf = t & 1u;
    let more = t + 1u < ntiles;
    if (more) {
      k0 = (t + 1u) * ${bk}u;
      ${load(opA)}
      ${load(opB)}
    }
    ${multiply}
    if (more) {
      buf = 1u - buf;
      ${store(opA)}
      ${store(opB)}
    }
    workgroupBarrier();
  }`;
  // one buffer: the global loads are issued before the barrier that ends the previous step's reads
  const singleBuffered = `let buf = 0u;
  for (var t = 0u; t < ntiles; t++) {
    let k0 = t * ${bk}u;
    ${load(opA)}
    ${load(opB)}
    workgroupBarrier();
    ${store(opA)}
    ${store(opB)}
    workgroupBarrier();
    ${multiply}
  }`;

  const binding = (name: string, i: number, vec: boolean, rw: boolean) =>
    `@group(0) @binding(${i}) var<storage, ${rw ? "read_write" : "read"}> ${name}${vec ? "4" : ""}: array<${
      vec ? `vec4<${T}>` : T
    }>;`;

  return `${wgslHeader(L.dtype)}
// matmul ${L.transA ? "A^T" : "A"} x ${L.transB ? "B^T" : "B"}${
    L.accumulate ? " (accumulate)" : ""
  }, config ${matmulConfigName(c)}
struct P { m: u32, n: u32, k: u32, strideA: u32, strideB: u32, strideC: u32,
           offA: u32, offB: u32, offC: u32, alpha: f32, _a: u32, _b: u32 }
${binding("A", 0, vecA, false)}
${binding("B", 1, vecB, false)}
${binding("C", 2, vecC, true)}
@group(0) @binding(3) var<uniform> p: P;

// k-major shared tiles, ${nbuf} buffer(s) each
var<workgroup> SA: array<vec4<f32>, ${nbuf * tileA4}>;
var<workgroup> SB: array<vec4<f32>, ${nbuf * tileB4}>;

@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${threadPosition}
  let m0 = wid.y * ${bm}u;
  let n0 = wid.x * ${bn}u;
  let baseA = p.offA + wid.z * p.strideA;
  let baseB = p.offB + wid.z * p.strideB;
  let baseC = p.offC + wid.z * p.strideC;
  ${regDecl(opA)}
  ${regDecl(opB)}
  var acc: array<vec4<f32>, ${tm * tn4}>;  // zero-initialised

  let ntiles = (p.k + ${bk - 1}u) / ${bk}u;
  ${nbuf === 2 ? doubleBuffered : singleBuffered}
  ${epi.join("\n  ")}
}
`;
}
