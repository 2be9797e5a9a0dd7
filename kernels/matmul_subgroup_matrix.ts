/**
 * f16 matrix multiplication on the GPU's matrix units through Dawn's `chromium-experimental-subgroup-matrix`
 * (Vulkan cooperative matrices, i.e. tensor cores on NVIDIA): `C[b] = alpha * op(A[b]) op(B[b])` (or `C += ...`)
 * with f16 operands, f32 accumulation and an f32 or f16 C. Same shapes, transposes, batch strides and uniforms
 * as the plain kernel in `matmul.ts`, which stays the portable fallback.
 *
 * WGSL facts this relies on (Dawn's subgroup-matrix proposal and Tint, as shipped in `npm:webgpu` 0.6.2):
 * - `subgroup_matrix_left<f16, K, M>` is M x K, `subgroup_matrix_right<f16, N, K>` is K x N,
 *   `subgroup_matrix_result<f32, N, M>` is M x N; each must match an adapter config (f16 -> f32 16x16x16 here);
 * - `subgroupMatrixLoad<T, row_major|col_major>(&arr, offset, stride)` and
 *   `subgroupMatrixStore<row_major|col_major>(&arr, offset, value, stride)` read and write an `array<f16>` (or
 *   `array<f32>`) in storage or workgroup memory; element [r][c] sits at `offset + r*stride + c` (row major) or
 *   `offset + c*stride + r` (column major); offsets and strides count elements, and Vulkan wants pointers and
 *   strides 16-byte aligned, hence multiples of 8 halves everywhere below;
 * - the workgroup's x size must be a multiple of the adapter's largest subgroup size, and every call must be in
 *   subgroup-uniform control flow with subgroup-uniform operands. WGSL can only prove workgroup uniformity, so
 *   offsets computed from `subgroup_id` need `diagnostic(off, chromium.subgroup_matrix_uniformity)`.
 *
 * The kernel (one variant per {@linkcode SgmConfig}, {@linkcode SgmLayout} and shape class):
 * - a workgroup computes a BM x BN block of C with `sgM * sgN` subgroups of 32, each owning a
 *   (BM/sgM) x (BN/sgN) sub-block as a grid of 16x16 f32 result fragments (register accumulators);
 * - K advances in BK steps. Each operand's BK slice is staged in workgroup memory in its stored orientation
 *   (rows padded by `pad` halves against bank conflicts), so a transpose is only a column-major fragment load;
 *   staging is either by all threads with 4/8/16-byte global loads (`threads`; each lane stores its 16 bytes in a
 *   rotated word order, `rotate`, so the f16 stores are free of bank conflicts), or by subgroups copying 16x16
 *   fragments (`fragments`); `global` skips staging and loads fragments straight from global memory (the first
 *   kernel of issue 9, kept as a control);
 * - with two buffers, the next slice's global loads are issued before the current slice's multiplies and stored
 *   to the other buffer after them, so one barrier per step suffices; the loop is unrolled by two so that both
 *   buffers sit at constant offsets (a buffer picked at run time made the fragment loads 2.5x slower);
 * - with `producers`, extra subgroups do all the staging and the others only multiply (warp specialization;
 *   measured slower, kept in the sweep);
 * - `constOffsets` emits each slice's multiplies once per subgroup, so that every fragment load from workgroup
 *   memory has a constant offset: Tint's robustness then proves it in bounds and drops the `if` it otherwise
 *   wraps around each subgroup-matrix load (the op's configs use it: 221 -> 240 TFLOP/s at 8192^3);
 * - the epilogue stores fragments straight into an f32 C when the block is whole and nothing is accumulated, or
 *   stages each fragment through a small f32 scratch so that threads can apply alpha, accumulate and convert to
 *   f16: where C's rows and offset are 16-byte aligned each lane writes 16 bytes of its own subgroup's fragment
 *   (`vecOut`; in partial blocks a lane checks its row and its 8 columns at once), otherwise threads write single
 *   elements, checking bounds one by one in partial blocks.
 *
 * Shapes: `threads` staging handles any M, N, K (loads are bounds-checked and zero-filled where a slice leaves
 * C's block or K, stores checked) as long as each operand's contiguous dimension, batch stride and offset are
 * multiples of the load width `vec`;
 * `fragments` and `global` need M, N, K multiples of BM, BN, BK and 8-aligned offsets. {@linkcode sgmLaunch}
 * throws on anything else; {@linkcode pickSgmConfig} returns null for shapes the op should leave to the plain
 * kernel.
 *
 * The index maps (which thread loads which element into which shared slot, where each fragment starts) are pure
 * functions ({@linkcode sgmOperandPlan}, {@linkcode sgmThreadSlot}, ...) shared by the generator and the CPU
 * emulation in the tests.
 *
 * @module
 */
import { ceilDiv, type KernelSpec, Uniforms } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import type { MatmulShape } from "./matmul.ts";

/** Fragment edge: the 16x16x16 f16 -> f32 subgroup-matrix configuration. */
export const SGM_FRAG = 16;

/** Subgroup size the kernel is generated for (NVIDIA's warp; the op checks the adapter's min and max). */
export const SGM_SUBGROUP = 32;

/** How operand tiles reach the fragments. */
export type SgmStaging = "threads" | "fragments" | "global";

/** Tile configuration of the subgroup-matrix matmul. */
export interface SgmConfig {
  /** Rows of C per workgroup. */
  bm: number;
  /** Columns of C per workgroup. */
  bn: number;
  /** K step per staged slice (multiple of 16). */
  bk: number;
  /** Subgroups along M. */
  sgM: number;
  /** Subgroups along N. */
  sgN: number;
  /** How tiles are staged (see the module comment). */
  stage: SgmStaging;
  /** Halves per thread global load when `stage` is `threads`: 2 (u32), 4 (vec2<u32>) or 8 (vec4<u32>). */
  vec: 2 | 4 | 8;
  /** Halves of padding after each staged row (multiple of 8; 8 keeps fragment loads free of bank conflicts). */
  pad: number;
  /** Staging buffers: 2 overlaps the next slice's loads with this slice's multiplies (one barrier a step). */
  buffers: 1 | 2;
  /** Workgroups walk C in groups of this many block rows (L2 reuse of B); 1 is plain row-major order. */
  swizzle: number;
  /**
   * With one buffer: issue the next slice's global loads before this slice's multiplies (true, the default), or
   * load each slice right before storing it (false). Holding the next slice in registers costs occupancy.
   */
  prefetch?: boolean;
  /**
   * With 16-byte thread loads (`vec` 8): lane l writes the four words of its load in the order starting at word
   * (l / 8) % 4. A thread's 8 halves land in 4 consecutive banks, so in the plain order every store of a subgroup
   * hits only the 8 banks of one word position (a 4-way conflict); rotated, the 32 lanes of each store hit 32
   * different banks whenever a staged row is a multiple of 64 halves.
   */
  rotate?: boolean;
  /**
   * Benchmark ablations only (wrong results): `stage` leaves out the global loads and staging stores (the
   * multiplies read whatever workgroup memory holds), `compute` leaves out the fragment loads and multiplies,
   * `store` writes only the first half of each staged load, `load` stages a per-thread constant instead of
   * loading A and B.
   */
  ablate?: "stage" | "compute" | "store" | "load";
  /**
   * Warp specialization: this many extra subgroups only stage (global loads into registers, one slice ahead,
   * then stores to the free buffer) while the `sgM * sgN` compute subgroups only multiply. Needs two buffers and
   * `threads` staging. 0 or absent: every thread does both.
   */
  producers?: number;
  /**
   * Give every fragment load a constant offset by emitting the slice's multiplies once per subgroup, chosen by
   * `subgroup_id`: Tint then proves the loads in bounds and skips the bounds predication robustness otherwise
   * wraps around each subgroup-matrix load (an `if` and a function variable per fragment).
   */
  constOffsets?: boolean;
  /**
   * Scratch slots per subgroup for the 16-byte epilogue (`vecOut`): with 2, fragment rounds alternate slots, so
   * a round needs one barrier (between a subgroup's store and its lanes' reads) instead of two.
   */
  epilogueSlots?: 1 | 2;
}

/** Layout and output of one variant. */
export interface SgmLayout {
  /** A is stored [K, M]. */
  transA: boolean;
  /** B is stored [N, K] (the `linear` weight layout). */
  transB: boolean;
  /** Storage type of C (A and B are always f16; accumulation is always f32). */
  out: "f32" | "f16";
  /** C += alpha * A B instead of C = alpha * A B. */
  accumulate: boolean;
}

/** Threads per workgroup of a config. */
export function sgmThreads(c: SgmConfig): number {
  return (c.sgM * c.sgN + (c.producers ?? 0)) * SGM_SUBGROUP;
}

/** Threads that multiply (the compute subgroups; they also run the epilogue). */
export function sgmComputeThreads(c: SgmConfig): number {
  return c.sgM * c.sgN * SGM_SUBGROUP;
}

/** Threads that stage operand tiles: the producer subgroups when there are any, else every thread. */
export function sgmStagingThreads(c: SgmConfig): number {
  return c.producers ? c.producers * SGM_SUBGROUP : sgmThreads(c);
}

/** Short name of a config, e.g. `128x128x32_2x4_threads_v8_p8_b2_s8`. */
export function sgmConfigName(c: SgmConfig): string {
  const stage = c.stage === "threads" ? `threads_v${c.vec}` : c.stage;
  const prefetch = c.prefetch === false ? "_np" : "";
  const rotate = c.rotate ? "_r" : "";
  const ablate = c.ablate ? `_no-${c.ablate}` : "";
  const producers = (c.producers ? `+${c.producers}` : "") + (c.constOffsets ? "_k" : "") +
    (c.epilogueSlots === 2 ? "_e2" : "");
  return `${c.bm}x${c.bn}x${c.bk}_${c.sgM}x${c.sgN}${producers}_${stage}_p${c.pad}_b${c.buffers}_s${c.swizzle}${prefetch}${rotate}${ablate}`;
}

// ---- the index maps (pure; shared by the WGSL generator and the CPU emulation) ------------------------------

/** How one operand's BK slice is laid out in workgroup memory and read as fragments. */
export interface SgmOperandPlan {
  /** "A" (left fragments, M side) or "B" (right fragments, N side). */
  name: "A" | "B";
  /** The stored matrix runs along K (A not transposed, or B transposed). */
  kContiguous: boolean;
  /** Rows of the staged tile in stored orientation (BM/BN if `kContiguous`, else BK). */
  rows: number;
  /** Contiguous columns of the staged tile (BK if `kContiguous`, else BM/BN). */
  cols: number;
  /** Elements between staged rows (`cols + pad`). */
  stride: number;
  /** Elements of one staging buffer. */
  bufferElems: number;
  /** Fragment loads are column major (an operand stored across its fragment's natural rows). */
  colMajor: boolean;
  /** Rows (A) or columns (B) of C owned by one subgroup. */
  warpTile: number;
  /** Fragments per subgroup along M (A) or N (B). */
  frags: number;
}

/** The staging plan of operand A or B under a config and layout. */
export function sgmOperandPlan(c: SgmConfig, layout: SgmLayout, name: "A" | "B"): SgmOperandPlan {
  const outer = name === "A" ? c.bm : c.bn;
  const kContiguous = name === "A" ? !layout.transA : layout.transB;
  const rows = kContiguous ? outer : c.bk, cols = kContiguous ? c.bk : outer;
  const stride = cols + c.pad;
  const warpTile = name === "A" ? c.bm / c.sgM : c.bn / c.sgN;
  return {
    name,
    kContiguous,
    rows,
    cols,
    stride,
    bufferElems: rows * stride,
    // left [m][k]: row major when k is contiguous; right [k][n]: row major when n is contiguous
    colMajor: name === "A" ? !kContiguous : kContiguous,
    warpTile,
    frags: warpTile / SGM_FRAG,
  };
}

/** Row and column of a point in a staged tile (stored orientation). */
export interface TileCoord {
  /** Row. */
  row: number;
  /** Column (contiguous dimension). */
  col: number;
}

/**
 * Top-left corner, in the staged tile, of fragment `i` of subgroup index `w` (along M for A, N for B) at k-step
 * `kk` (16 elements of K each). Its element offset is `row * stride + col`.
 */
export function sgmFragmentOrigin(plan: SgmOperandPlan, w: number, i: number, kk: number): TileCoord {
  const outer = w * plan.warpTile + i * SGM_FRAG, k = kk * SGM_FRAG;
  return plan.kContiguous ? { row: outer, col: k } : { row: k, col: outer };
}

/** Global-to-shared vectors each thread moves per slice (`threads` staging). */
export function sgmThreadSlots(c: SgmConfig, plan: SgmOperandPlan): number {
  return (plan.rows * plan.cols) / c.vec / sgmStagingThreads(c);
}

/**
 * The first element of the `vec` halves staging thread `lid` (counted among {@linkcode sgmStagingThreads})
 * loads in slot `s` (`threads` staging).
 */
export function sgmThreadSlot(c: SgmConfig, plan: SgmOperandPlan, lid: number, s: number): TileCoord {
  const perRow = plan.cols / c.vec, v = lid + s * sgmStagingThreads(c);
  return { row: Math.floor(v / perRow), col: (v % perRow) * c.vec };
}

/** 16x16 blocks each subgroup copies per slice (`fragments` staging). */
export function sgmCopySlots(c: SgmConfig, plan: SgmOperandPlan): number {
  return (plan.rows / SGM_FRAG) * (plan.cols / SGM_FRAG) / (c.sgM * c.sgN);
}

/** Top-left corner of the 16x16 block subgroup `sg` copies in slot `s` (`fragments` staging). */
export function sgmCopySlot(c: SgmConfig, plan: SgmOperandPlan, sg: number, s: number): TileCoord {
  const perRow = plan.cols / SGM_FRAG, b = sg + s * c.sgM * c.sgN;
  return { row: Math.floor(b / perRow) * SGM_FRAG, col: (b % perRow) * SGM_FRAG };
}

/** Which sub-block of the workgroup's block subgroup `sg` owns: index along M and along N. */
export function sgmSubgroupTile(c: SgmConfig, sg: number): { wm: number; wn: number } {
  return { wm: sg % c.sgM, wn: Math.floor(sg / c.sgM) };
}

/**
 * The block of C (row and column of blocks) workgroup (x, y) computes for `nx` x `ny` blocks: groups of
 * `swizzle` block rows are walked column by column, so that concurrently running workgroups share columns of B
 * and rows of A in L2.
 */
export function sgmBlockOf(
  swizzle: number,
  nx: number,
  ny: number,
  x: number,
  y: number,
): { bm: number; bn: number } {
  if (swizzle <= 1) return { bm: y, bn: x };
  const l = y * nx + x, per = swizzle * nx;
  const g = Math.floor(l / per), first = g * swizzle;
  const size = Math.min(ny - first, swizzle), r = l % per;
  return { bm: first + (r % size), bn: Math.floor(r / size) };
}

/**
 * The element a thread writes in epilogue pass `e` when fragments are staged through the scratch: the scratch
 * index, whose subgroup slot it is, and its row and column inside that 16x16 fragment.
 */
export function sgmEpilogueElement(
  c: SgmConfig,
  lid: number,
  e: number,
): { index: number; slot: number; row: number; col: number } {
  const index = lid + e * sgmComputeThreads(c);
  const inFrag = index % (SGM_FRAG * SGM_FRAG);
  return {
    index,
    slot: Math.floor(index / (SGM_FRAG * SGM_FRAG)),
    row: Math.floor(inFrag / SGM_FRAG),
    col: inFrag % SGM_FRAG,
  };
}

/** Epilogue passes per fragment (each thread writes one scratch element per pass). */
export function sgmEpiloguePasses(c: SgmConfig): number {
  return (c.sgM * c.sgN * SGM_FRAG * SGM_FRAG) / sgmComputeThreads(c);
}

/** Workgroup-memory bytes of a config: staged tiles, plus the epilogue scratch when `staged`. */
export function sgmSharedBytes(c: SgmConfig, layout: SgmLayout, staged: boolean): number {
  const tiles = c.stage === "global"
    ? 0
    : c.buffers * (sgmOperandPlan(c, layout, "A").bufferElems + sgmOperandPlan(c, layout, "B").bufferElems) *
      2;
  return tiles + (staged ? (c.epilogueSlots ?? 1) * c.sgM * c.sgN * SGM_FRAG * SGM_FRAG * 4 : 0);
}

/** Throws if a config is malformed, or does not fit `limits` (when given). */
export function validateSgmConfig(
  c: SgmConfig,
  limits?: { maxComputeWorkgroupStorageSize: number; maxComputeInvocationsPerWorkgroup: number },
): void {
  const name = sgmConfigName(c);
  const fail = (why: string) => {
    throw new Error(`subgroup-matrix config ${name}: ${why}`);
  };
  if (c.bm % (c.sgM * SGM_FRAG) || c.bn % (c.sgN * SGM_FRAG)) {
    fail("bm (bn) must be a multiple of 16 * sgM (16 * sgN)");
  }
  if (c.bk % SGM_FRAG || c.bk <= 0) fail("bk must be a positive multiple of 16");
  if (c.pad % 8 || c.pad < 0) fail("pad must be a multiple of 8 halves (16-byte aligned fragment rows)");
  if (![1, 2].includes(c.buffers)) fail("buffers must be 1 or 2");
  if (![2, 4, 8].includes(c.vec)) fail("vec must be 2, 4 or 8");
  if (!(c.swizzle >= 1) || !Number.isInteger(c.swizzle)) fail("swizzle must be a positive integer");
  if (c.rotate && (c.stage !== "threads" || c.vec !== 8)) {
    fail("rotate needs threads staging with 16-byte loads");
  }
  if (c.epilogueSlots !== undefined && ![1, 2].includes(c.epilogueSlots)) {
    fail("epilogueSlots must be 1 or 2");
  }
  if (c.producers && (c.stage !== "threads" || c.buffers !== 2 || !Number.isInteger(c.producers))) {
    fail("producer subgroups need threads staging and two buffers");
  }
  if (c.prefetch === false && (c.buffers !== 1 || c.stage === "global")) {
    fail("prefetch can only be turned off for one staged buffer");
  }
  for (const transA of [false, true]) {
    for (const transB of [false, true]) {
      const layout: SgmLayout = { transA, transB, out: "f32", accumulate: false };
      for (const name of ["A", "B"] as const) {
        const plan = sgmOperandPlan(c, layout, name);
        if (c.stage === "threads" && !Number.isInteger(sgmThreadSlots(c, plan))) {
          fail(`the ${plan.rows}x${plan.cols} tile of ${name} is not a whole number of loads per thread`);
        }
        if (c.stage === "fragments" && !Number.isInteger(sgmCopySlots(c, plan))) {
          fail(`the 16x16 blocks of ${name}'s tile do not split evenly over the subgroups`);
        }
      }
      if (limits) {
        const bytes = sgmSharedBytes(c, layout, true);
        if (bytes > limits.maxComputeWorkgroupStorageSize) {
          fail(
            `${bytes} bytes of workgroup memory exceed the device's ${limits.maxComputeWorkgroupStorageSize}`,
          );
        }
      }
    }
  }
  if (limits && sgmThreads(c) > limits.maxComputeInvocationsPerWorkgroup) {
    fail(`${sgmThreads(c)} threads exceed the device limit`);
  }
}

// ---- configurations ----------------------------------------------------------------------------------------

/**
 * The double-buffered 128x128 design the sweep varies: 8 subgroups of 64x32 (4x2 fragments), K slices of 32
 * staged by 16-byte thread loads into two buffers. Exactly 48 KiB of workgroup memory with the epilogue scratch.
 */
export const SGM_DOUBLE_BUFFERED: SgmConfig = {
  bm: 128,
  bn: 128,
  bk: 32,
  sgM: 2,
  sgN: 4,
  stage: "threads",
  vec: 8,
  pad: 8,
  buffers: 2,
  swizzle: 8,
};

/**
 * The op's config until 2026-11-29 and the base of most sweep entries: {@linkcode SGM_DOUBLE_BUFFERED} with K
 * slices of 64 in one buffer (197 TFLOP/s at 4096^3 against 76 for the double-buffered one in the first H200
 * sweep: the prefetch registers of double buffering cost more occupancy than the overlap gains) and staging
 * stores rotated ({@linkcode SgmConfig.rotate}; 205 -> 221 TFLOP/s at 8192^3). BENCHMARKS.md has the figures.
 */
export const SGM_EIGHT_SUBGROUPS: SgmConfig = { ...SGM_DOUBLE_BUFFERED, bk: 64, buffers: 1, rotate: true };

/**
 * The default for large products: 128x128x64 blocks of 4 subgroups of 64x64 (4x4 fragments), one buffer,
 * rotated staging stores and constant fragment offsets ({@linkcode SgmConfig.constOffsets}). With the offsets
 * constant, Tint drops its bounds predicate around every fragment load, which made the larger warp tiles pay:
 * 240 TFLOP/s at 8192^3 against 221 for {@linkcode SGM_EIGHT_SUBGROUPS} and 128 for the same 4 subgroups without
 * constant offsets; with each thread's staging slots at constant offsets from its first, 248 (37.2% of PyTorch
 * bf16 in the same call; BENCHMARKS.md).
 */
export const SGM_LARGE: SgmConfig = { ...SGM_EIGHT_SUBGROUPS, sgM: 2, sgN: 2, constOffsets: true };

/**
 * 64x64 blocks of 4 subgroups (2x2 fragments each): products with too few 128x128 blocks to fill the GPU. One
 * buffer with K slices of 64, like {@linkcode SGM_LARGE}: 141 TFLOP/s at 8192^3 against 63 for the same blocks
 * double-buffered with slices of 32, 155 with its staging stores rotated, and 170 with constant fragment
 * offsets (BENCHMARKS.md).
 */
export const SGM_SMALL: SgmConfig = {
  bm: 64,
  bn: 64,
  bk: 64,
  sgM: 2,
  sgN: 2,
  stage: "threads",
  vec: 8,
  pad: 8,
  buffers: 1,
  swizzle: 8,
  rotate: true,
  constOffsets: true,
};

/**
 * The benchmark's sweep: block shape, fragments per subgroup (register reuse), K slice, staging mode,
 * buffering, load width, padding and block order, one or two changes from {@linkcode SGM_LARGE} or
 * {@linkcode SGM_DOUBLE_BUFFERED} each, plus the
 * unstaged control. bench/matmul_sgm.ts runs them all.
 */
export const SGM_SWEEP: readonly SgmConfig[] = [
  SGM_LARGE,
  { ...SGM_LARGE, swizzle: 16 }, // wider block groups: L2 reuse at 8192^3
  { ...SGM_LARGE, bk: 32 }, // half the workgroup memory and prefetch registers
  { ...SGM_LARGE, rotate: false }, // staging stores in the plain order (4-way bank conflicts)
  { ...SGM_LARGE, constOffsets: false }, // Tint's bounds predicate on every fragment load (128 TFLOP/s)
  { ...SGM_LARGE, epilogueSlots: 2 }, // one barrier a fragment round in the epilogue (no gain measured)
  { ...SGM_LARGE, bn: 256, bk: 32, sgN: 4 }, // 128x256x32, 8 subgroups of 64x64
  { ...SGM_LARGE, bm: 256, bk: 32, sgM: 4 }, // 256x128x32, 8 subgroups of 64x64
  { ...SGM_EIGHT_SUBGROUPS, constOffsets: true }, // 8 subgroups of 64x32 with constant offsets
  SGM_EIGHT_SUBGROUPS,
  { ...SGM_EIGHT_SUBGROUPS, rotate: false }, // the op's config until the rotated stores
  { ...SGM_EIGHT_SUBGROUPS, bm: 256, bk: 32, sgM: 4 }, // 256x128x32 single buffer, 8 subgroups of 64x64
  { ...SGM_EIGHT_SUBGROUPS, bk: 48 }, // a shallower slice: less workgroup memory, more workgroups per SM
  { ...SGM_EIGHT_SUBGROUPS, sgM: 4, sgN: 2 }, // 8 subgroups of 32x64
  { ...SGM_EIGHT_SUBGROUPS, bn: 256, bk: 32 }, // 128x256x32 single buffer (176 TFLOP/s at 4096^3 in the first sweep)
  // double buffering (both buffers at constant offsets since 2026-11-29: 56-77 -> 159 TFLOP/s at 8192^3)
  SGM_DOUBLE_BUFFERED,
  { ...SGM_DOUBLE_BUFFERED, rotate: true },
  { ...SGM_DOUBLE_BUFFERED, rotate: true, constOffsets: true },
  { ...SGM_DOUBLE_BUFFERED, sgM: 4, sgN: 2, rotate: true },
  { ...SGM_DOUBLE_BUFFERED, bk: 16, rotate: true }, // shallower slices: more workgroups per SM
  { ...SGM_DOUBLE_BUFFERED, sgM: 4, sgN: 2 }, // 8 subgroups of 32x64 (2x4 fragments)
  { ...SGM_DOUBLE_BUFFERED, sgM: 2, sgN: 2 }, // 4 subgroups of 64x64 (4x4 fragments)
  { ...SGM_DOUBLE_BUFFERED, bn: 256, bk: 16 }, // 128x256, 8 subgroups of 64x64
  { ...SGM_DOUBLE_BUFFERED, bm: 256, bk: 16, sgM: 4, sgN: 2 }, // 256x128, 8 subgroups of 64x64
  { ...SGM_DOUBLE_BUFFERED, stage: "fragments" }, // subgroups copy 16x16 blocks through fragment registers
  { ...SGM_DOUBLE_BUFFERED, vec: 4 }, // 8-byte loads
  { ...SGM_DOUBLE_BUFFERED, pad: 0 }, // bank conflicts' cost
  { ...SGM_DOUBLE_BUFFERED, swizzle: 1 }, // plain block order
  // warp specialization: 4 producer subgroups stage while 8 multiply (129 TFLOP/s: the producers fall behind)
  { ...SGM_DOUBLE_BUFFERED, rotate: true, producers: 4 },
  SGM_SMALL,
  { ...SGM_SMALL, constOffsets: false },
  { ...SGM_SMALL, bk: 32, buffers: 2 }, // the small blocks double-buffered
  { ...SGM_SMALL, rotate: false, constOffsets: false }, // the small config until 2026-11-29
  { ...SGM_EIGHT_SUBGROUPS, stage: "fragments", rotate: false }, // fragment staging, single buffered (67)
  { ...SGM_SMALL, bk: 16, stage: "global", buffers: 1, pad: 0, rotate: false, constOffsets: false }, // the 35 TFLOP/s start
  // no register prefetch: fewer registers a thread, more workgroups an SM (151 against 205; 164 against 240)
  { ...SGM_LARGE, prefetch: false },
  { ...SGM_EIGHT_SUBGROUPS, prefetch: false },
  { ...SGM_EIGHT_SUBGROUPS, bk: 32, prefetch: false }, // and half the workgroup memory
  { ...SGM_SMALL, prefetch: false },
];

// ---- choosing the kernel -------------------------------------------------------------------------------------

/** What the op needs to know about the device (a subset of `GpuDevice`). */
export interface SgmDeviceInfo {
  /** Features of the device. */
  features: { f16: boolean; subgroupMatrix: boolean };
  /** The adapter's subgroup-matrix configurations. */
  subgroupMatrixConfigs: readonly {
    componentType: string;
    resultComponentType: string;
    M: number;
    N: number;
    K: number;
  }[];
  /** Smallest and largest subgroup size of the adapter (0 when unknown). */
  subgroupMinSize: number;
  /** Largest subgroup size of the adapter (0 when unknown). */
  subgroupMaxSize: number;
  /** Device limits. */
  limits: { maxComputeWorkgroupStorageSize: number; maxComputeInvocationsPerWorkgroup: number };
}

/**
 * Whether the device can run the subgroup-matrix kernel: the feature, f16, a 16x16x16 f16 -> f32 configuration,
 * and subgroups of exactly 32 (the kernel assigns work by `subgroup_id`, assuming `threads / 32` subgroups).
 */
export function sgmSupported(dev: SgmDeviceInfo): boolean {
  return dev.features.subgroupMatrix && dev.features.f16 &&
    dev.subgroupMinSize === SGM_SUBGROUP && dev.subgroupMaxSize === SGM_SUBGROUP &&
    dev.subgroupMatrixConfigs.some((c) =>
      c.componentType === "f16" && c.resultComponentType === "f32" &&
      c.M === SGM_FRAG && c.N === SGM_FRAG && c.K === SGM_FRAG
    );
}

/** Whether a product is a whole number of blocks of a config in M, N and K (no bounds checks needed). */
export function sgmExact(c: SgmConfig, m: number, n: number, k: number): boolean {
  return m % c.bm === 0 && n % c.bn === 0 && k % c.bk === 0 && k > 0;
}

function aligned(v: number, ...xs: number[]): boolean {
  return xs.every((x) => x % v === 0);
}

/**
 * Products with at least this many 128 x 128 blocks of C take {@linkcode SGM_LARGE}, smaller ones
 * {@linkcode SGM_SMALL}. The H200 holds two large blocks per SM (264 at once); a 2048 x 2048 weight gradient
 * (256 blocks, K 8192) still ran faster in the large blocks, 8 of them in a training step 3.3 -> 2.4 ms.
 */
export const SGM_LARGE_MIN_BLOCKS = 200;

/** Contiguous dimension, batch stride and offset of A and B, which the global loads' width must divide. */
function operandAlignment(shape: MatmulShape, layout: SgmLayout): number[] {
  const { m, n, k } = shape;
  return [
    layout.transA ? m : k,
    shape.strideA,
    shape.offsetA ?? 0,
    layout.transB ? k : n,
    shape.strideB,
    shape.offsetB ?? 0,
  ];
}

/**
 * The config the op uses for a product, or null when the plain kernel should run it. The rule: f16 operands
 * whose contiguous dimensions, batch strides and offsets are multiples of 2 halves (4 bytes), and M, N >= 32,
 * K >= 16; 128x128 blocks when there are at least {@linkcode SGM_LARGE_MIN_BLOCKS} of them, else 64x64. Any M, N, K
 * otherwise (partial blocks are bounds-checked).
 */
export function pickSgmConfig(shape: MatmulShape, layout: SgmLayout): SgmConfig | null {
  const { m, n, k, batch } = shape;
  if (m < 32 || n < 32 || k < 16) return null;
  const align = operandAlignment(shape, layout);
  const vec = ([8, 4, 2] as const).find((v) => aligned(v, ...align));
  if (!vec) return null;
  const blocks = ceilDiv(m, SGM_LARGE.bm) * ceilDiv(n, SGM_LARGE.bn) * batch;
  const base = blocks >= SGM_LARGE_MIN_BLOCKS ? SGM_LARGE : SGM_SMALL;
  return vec === base.vec ? base : { ...base, vec, rotate: false };
}

// ---- kernel variants -------------------------------------------------------------------------------------------

const specs = new Map<string, KernelSpec>();

/** The shape class a variant is specialised for. */
interface Variant {
  /** M, N, K are multiples of the block: no bounds checks. */
  exact: boolean;
  /** Fragments go straight to an f32 C (exact, f32, no accumulation, C rows 16-byte aligned). */
  direct: boolean;
  /**
   * The staged epilogue writes 16 bytes a store (C rows and offset 16-byte aligned; partial blocks check each
   * store's row and columns): each lane of a subgroup reads 8 values of its own fragment back from the scratch,
   * one 16-byte store of f16 or two of f32. Otherwise every thread writes single elements of all subgroups'
   * fragments, in 8 passes a fragment for 4 subgroups.
   */
  vecOut?: boolean;
}

/**
 * A subgroup-matrix matmul dispatch: workgroups (N blocks, M blocks, batch) and the plain kernel's 48-byte
 * uniforms. Bindings: A (read), B (read), C (rw). Throws when the shape does not meet the config's requirements
 * (see the module comment).
 */
export function sgmLaunch(shape: MatmulShape, layout: SgmLayout, config: SgmConfig): Launch {
  const { m, n, k, batch, strideA, strideB, strideC } = shape;
  const offA = shape.offsetA ?? 0, offB = shape.offsetB ?? 0, offC = shape.offsetC ?? 0;
  const exact = sgmExact(config, m, n, k);
  const name = sgmConfigName(config);
  const align = operandAlignment(shape, layout);
  if (config.stage === "threads") {
    if (!aligned(config.vec, ...align)) {
      throw new Error(
        `subgroup-matrix matmul ${name}: contiguous dimensions, batch strides and offsets of A and B must be ` +
          `multiples of ${config.vec} halves (got ${align.join(", ")})`,
      );
    }
  } else if (!exact || !aligned(8, ...align)) {
    throw new Error(
      `subgroup-matrix matmul ${name}: ${config.stage} staging needs M, N, K multiples of ` +
        `${config.bm}, ${config.bn}, ${config.bk} and 8-aligned strides and offsets (got ${m}x${n}x${k})`,
    );
  }
  const direct = exact && layout.out === "f32" && !layout.accumulate && aligned(4, n, strideC, offC);
  const vecOut = !direct && aligned(layout.out === "f16" ? 8 : 4, n, strideC, offC);
  return {
    spec: sgmSpec(config, layout, { exact, direct, vecOut }),
    uniforms: new Uniforms(48).u32(m).u32(n).u32(k).u32(strideA).u32(strideB).u32(strideC)
      .u32(offA).u32(offB).u32(offC).f32(shape.alpha ?? 1).buffer,
    workgroups: [ceilDiv(n, config.bn), ceilDiv(m, config.bm), batch],
  };
}

/** The kernel variant for a config, layout and shape class (cached by key). */
function sgmSpec(c: SgmConfig, layout: SgmLayout, v: Variant): KernelSpec {
  const key = `sgm_${layout.transA ? "t" : "n"}${layout.transB ? "t" : "n"}_${layout.out}` +
    `${layout.accumulate ? "_acc" : ""}_${v.exact ? "exact" : "checked"}${v.direct ? "_direct" : ""}` +
    `${v.vecOut ? "_vo" : ""}_` +
    sgmConfigName(c);
  let spec = specs.get(key);
  if (!spec) {
    validateSgmConfig(c);
    spec = { key, bindings: ["read", "read", "rw"], uniformBytes: 48, code: sgmWgsl(c, layout, v) };
    specs.set(key, spec);
  }
  return spec;
}

/** WGSL source of a variant, for compile checks (`vecOut` as the launch picks it for an aligned C). */
export function sgmVariantWgsl(
  c: SgmConfig,
  layout: SgmLayout,
  exact: boolean,
  direct: boolean,
  vecOut = !direct,
): string {
  return sgmSpec(c, layout, { exact, direct, vecOut }).code;
}

// ---- WGSL generation ---------------------------------------------------------------------------------------

const LEFT = `subgroup_matrix_left<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const RIGHT = `subgroup_matrix_right<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const RESULT = `subgroup_matrix_result<f32, ${SGM_FRAG}, ${SGM_FRAG}>`;
const major = (colMajor: boolean) => (colMajor ? "col_major" : "row_major");

/** Global word type of `threads` staging for a load width. */
function wordType(vec: number): string {
  return vec === 8 ? "vec4<u32>" : vec === 4 ? "vec2<u32>" : "u32";
}

function sgmWgsl(c: SgmConfig, L: SgmLayout, v: Variant): string {
  const T = sgmThreads(c), NSG = c.sgM * c.sgN;
  const ST = sgmStagingThreads(c), CT = sgmComputeThreads(c);
  const producers = (c.producers ?? 0) > 0;
  const pa = sgmOperandPlan(c, L, "A"), pb = sgmOperandPlan(c, L, "B");
  const staged = !v.direct;
  const stage = c.stage;
  const W = c.vec;
  const words = W / 2; // u32 words per load

  // Per operand: names and global geometry. "outer" is M for A and N for B.
  const ops = [
    { p: pa, X: "A", S: "SA", base: "baseA", ld: "ldA", outer0: "m0", outerSize: "p.m", w: "wmI" },
    { p: pb, X: "B", S: "SB", base: "baseB", ld: "ldB", outer0: "n0", outerSize: "p.n", w: "wnI" },
  ];
  type Op = (typeof ops)[number];

  // Global element offset of a staged-tile point (row, col given as WGSL expressions) in slice k0 = `k0`.
  const globalOffset = (o: Op, row: string, col: string, k0: string) =>
    o.p.kContiguous
      ? `${o.base} + (${o.outer0} + ${row}) * ${o.ld} + ${k0} + ${col}`
      : `${o.base} + (${k0} + ${row}) * ${o.ld} + ${o.outer0} + ${col}`;
  // Bounds of a staged-tile point for `threads` staging (a load of W halves is wholly in or out: the
  // contiguous dimension is a multiple of W).
  const inBounds = (o: Op, row: string, col: string, k0: string) =>
    o.p.kContiguous
      ? `${o.outer0} + ${row} < ${o.outerSize} && ${k0} + ${col} < p.k`
      : `${k0} + ${row} < p.k && ${o.outer0} + ${col} < ${o.outerSize}`;

  // ---- declarations and per-thread constants of the staging ----
  const decls: string[] = [];
  const lets: string[] = [];
  // Staged rows between a thread's consecutive slots, when the staging threads cover whole rows (0 otherwise).
  // Then slot s is slot 0 moved down s * step rows: its staging and global offsets are slot 0's plus constants
  // the compiler folds into the stores' and loads' immediates, where `(lid + s * ST) / perRow` cost address
  // arithmetic per access (8192^3: 233 -> 248 TFLOP/s).
  const rowStep = (o: Op) => (ST % (o.p.cols / W) === 0 ? ST / (o.p.cols / W) : 0);
  if (stage === "threads") {
    for (const o of ops) {
      const perRow = o.p.cols / W, step = rowStep(o);
      for (let s = 0; s < sgmThreadSlots(c, o.p); s++) {
        const idx = `(${producers ? "slid" : "lid"} + ${s * ST}u)`;
        if (s > 0 && step) {
          lets.push(`let ${o.X}r${s} = ${o.X}r0 + ${s * step}u; let ${o.X}c${s} = ${o.X}c0;`);
          lets.push(`let ${o.X}s${s} = ${o.X}s0 + ${s * step * o.p.stride}u;`);
        } else {
          lets.push(
            `let ${o.X}r${s} = ${idx} / ${perRow}u; let ${o.X}c${s} = (${idx} % ${perRow}u) * ${W}u;`,
          );
          lets.push(`let ${o.X}s${s} = ${o.X}r${s} * ${o.p.stride}u + ${o.X}c${s};`);
        }
        decls.push(`var ${o.X}g${s}: ${wordType(W)};`);
      }
      if (step) {
        // slot 0's global index in words (the launch keeps ld, batch strides and offsets multiples of W)
        const first = o.p.kContiguous
          ? `${o.base} + (${o.outer0} + ${o.X}r0) * ${o.ld} + ${o.X}c0`
          : `${o.base} + ${o.X}r0 * ${o.ld} + ${o.outer0} + ${o.X}c0`;
        lets.push(`let ${o.ld}w = ${o.ld} / ${W}u; let ${o.X}w0 = (${first}) / ${W}u;`);
      }
    }
  } else if (stage === "fragments") {
    for (const o of ops) {
      for (let s = 0; s < sgmCopySlots(c, o.p); s++) {
        // the block's corner is a function of the subgroup index, computed in WGSL like sgmCopySlot
        const perRow = o.p.cols / SGM_FRAG;
        const b = `(sg + ${s * NSG}u)`;
        lets.push(
          `let ${o.X}r${s} = (${b} / ${perRow}u) * ${SGM_FRAG}u; let ${o.X}c${s} = (${b} % ${perRow}u) * ${SGM_FRAG}u;`,
        );
        decls.push(`var ${o.X}g${s}: ${LEFT};`);
      }
    }
  }

  // Issues the global loads of the slice starting at K offset `k0` into the staging registers.
  // A bounds-checked variant checks only where the slice leaves C's block or K: interior blocks take the
  // unchecked loads (a workgroup-uniform branch), so ragged products run nearly at the whole-block speed.
  const threadLoads = (k0: string, checked: boolean): string[] =>
    ops.flatMap((o) =>
      Array.from({ length: sgmThreadSlots(c, o.p) }, (_, s) => {
        const r = `${o.X}r${s}`, col = `${o.X}c${s}`;
        const step = rowStep(o);
        const kWords = o.p.kContiguous ? `${k0} / ${W}u` : `${k0} * ${o.ld}w`;
        const load = c.ablate === "load"
          ? `${wordType(W)}(lid ^ ${k0})`
          : step && !checked
          ? `${o.X}[${o.X}w0 + ${s * step}u * ${o.ld}w + ${kWords}]`
          : `${o.X}[(${globalOffset(o, r, col, k0)}) / ${W}u]`;
        return checked
          ? `if (${inBounds(o, r, col, k0)}) { ${o.X}g${s} = ${load}; } else { ${o.X}g${s} = ${
            wordType(W)
          }(); }`
          : `${o.X}g${s} = ${load};`;
      })
    );
  const loadSlice = (k0: string, indent: string): string => {
    if (c.ablate === "stage") return "";
    if (stage === "threads") {
      if (v.exact) return threadLoads(k0, false).join(`\n${indent}`);
      const fast = threadLoads(k0, false).join(`\n${indent}  `);
      const slow = threadLoads(k0, true).join(`\n${indent}  `);
      return `if (interior && ${k0} + ${c.bk}u <= p.k) {
${indent}  ${fast}
${indent}} else {
${indent}  ${slow}
${indent}}`;
    }
    // fragment staging: whole blocks only (sgmLaunch refuses the rest)
    const out: string[] = [];
    for (const o of ops) {
      for (let s = 0; s < sgmCopySlots(c, o.p); s++) {
        const r = `${o.X}r${s}`, col = `${o.X}c${s}`;
        out.push(
          `${o.X}g${s} = subgroupMatrixLoad<${LEFT}, row_major>(&${o.X}, ${
            globalOffset(o, r, col, k0)
          }, ${o.ld});`,
        );
      }
    }
    return out.join(`\n${indent}`);
  };

  // Writes the staging registers into buffer `buf` (an element offset expression per operand).
  const storeSlice = (bufA: string, bufB: string, indent: string): string => {
    if (c.ablate === "stage") return "";
    const out: string[] = [];
    for (const o of ops) {
      const buf = o.X === "A" ? bufA : bufB;
      if (stage === "threads") {
        const comps = ["x", "y", "z", "w"];
        for (let s = 0; s < sgmThreadSlots(c, o.p); s++) {
          const parts = [`let o = ${buf} + ${o.X}s${s};`];
          for (let w = 0; w < words; w++) {
            if (c.rotate) {
              // store w writes word (w + rot) % 4 of the load (see SgmConfig.rotate), picked by selects:
              // indexing a vector by a runtime value measured 33% slower on the H200
              if (w === 0) {
                const g = `${o.X}g${s}`;
                const turn = (k: number) =>
                  `vec4<u32>(${[0, 1, 2, 3].map((i) => `${g}.${comps[(i + k) % 4]}`)})`;
                parts.push(
                  `let gr = select(select(${g}, ${turn(1)}, rot == 1u), select(${turn(2)}, ${
                    turn(3)
                  }, rot == 3u), rot >= 2u);`,
                );
              }
              if (c.ablate === "store" && w > 0) continue;
              parts.push(
                `let h${w} = bitcast<vec2<f16>>(gr.${
                  comps[w]
                }); ${o.S}[o + rq${w}] = h${w}.x; ${o.S}[o + rq${w} + 1u] = h${w}.y;`,
              );
              continue;
            }
            const word = words === 1 ? `${o.X}g${s}` : `${o.X}g${s}.${comps[w]}`;
            parts.push(
              `let h${w} = bitcast<vec2<f16>>(${word}); ${o.S}[o + ${2 * w}u] = h${w}.x; ${o.S}[o + ${
                2 * w + 1
              }u] = h${w}.y;`,
            );
          }
          out.push(`{ ${parts.join(" ")} }`);
        }
      } else {
        for (let s = 0; s < sgmCopySlots(c, o.p); s++) {
          out.push(
            `subgroupMatrixStore<row_major>(&${o.S}, ${buf} + ${o.X}r${s} * ${o.p.stride}u + ${o.X}c${s}, ${o.X}g${s}, ${o.p.stride}u);`,
          );
        }
      }
    }
    return out.join(`\n${indent}`);
  };

  // The multiply-accumulates of one slice, reading fragments from staging buffers (or global memory).
  const warpStep = (o: Op) => (o.p.kContiguous ? o.p.warpTile * o.p.stride : o.p.warpTile);
  const computeSlice = (bufA: string, bufB: string, k0: string): string => {
    if (c.ablate === "compute") return "";
    if (!c.constOffsets || stage === "global") return computeSliceAt(bufA, bufB, k0, "aw", "bw");
    // one copy per subgroup, each with constant fragment offsets (see SgmConfig.constOffsets)
    const copies = Array.from({ length: NSG }, (_, sgi) => {
      const { wm, wn } = sgmSubgroupTile(c, sgi);
      const body = computeSliceAt(bufA, bufB, k0, `${wm * warpStep(ops[0])}u`, `${wn * warpStep(ops[1])}u`);
      return `${sgi < NSG - 1 ? `if (sg == ${sgi}u) ` : ""}{
    ${body}
    }`;
    });
    return copies.join(" else ");
  };
  const computeSliceAt = (bufA: string, bufB: string, k0: string, aw: string, bw: string): string => {
    const out: string[] = [];
    for (let kk = 0; kk < c.bk / SGM_FRAG; kk++) {
      const body: string[] = [];
      for (const o of ops) {
        const type = o.X === "A" ? LEFT : RIGHT;
        const name = o.X === "A" ? "a" : "b";
        for (let i = 0; i < o.p.frags; i++) {
          // the fragment's corner, split into the subgroup's part (runtime) and constants
          const at = sgmFragmentOrigin(o.p, 0, i, kk);
          const warpRow = o.p.kContiguous ? `${o.w} * ${o.p.warpTile}u + ` : "";
          const warpCol = o.p.kContiguous ? "" : `${o.w} * ${o.p.warpTile}u + `;
          if (stage === "global") {
            const off = globalOffset(o, `${warpRow}${at.row}u`, `${warpCol}${at.col}u`, k0);
            body.push(
              `let ${name}${i} = subgroupMatrixLoad<${type}, ${
                major(o.p.colMajor)
              }>(&${o.X}, ${off}, ${o.ld});`,
            );
          } else {
            const buf = o.X === "A" ? bufA : bufB;
            const warpOff = o.X === "A" ? aw : bw;
            const off = `${buf} + ${warpOff} + ${at.row * o.p.stride + at.col}u`;
            body.push(
              `let ${name}${i} = subgroupMatrixLoad<${type}, ${
                major(o.p.colMajor)
              }>(&${o.S}, ${off}, ${o.p.stride}u);`,
            );
          }
        }
      }
      for (let i = 0; i < pa.frags; i++) {
        for (let j = 0; j < pb.frags; j++) {
          body.push(`acc${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, acc${i}_${j});`);
        }
      }
      out.push(`{\n      ${body.join("\n      ")}\n    }`);
    }
    return out.join("\n    ");
  };

  // ---- the K loop ----
  let loop: string;
  if (stage === "global") {
    loop = `for (var t = 0u; t < ntiles; t++) {
    let k0 = t * ${c.bk}u;
    ${computeSlice("", "", "k0")}
  }`;
  } else if (producers) {
    // Producer subgroups store the slice held in registers into the free buffer and load the next one while the
    // compute subgroups multiply the other buffer; one barrier a step hands the buffers over.
    const step = (cur: number, nxt: number, ahead: number) =>
      `{
      if (producer) {
        if (t + ${ahead}u < ntiles) {
          ${storeSlice(`${nxt * pa.bufferElems}u`, `${nxt * pb.bufferElems}u`, "          ")}
          if (t + ${ahead + 1}u < ntiles) {
            let kn = (t + ${ahead + 1}u) * ${c.bk}u;
            ${loadSlice("kn", "            ")}
          }
        }
      } else {
        ${computeSlice(`${cur * pa.bufferElems}u`, `${cur * pb.bufferElems}u`, "")}
      }
      workgroupBarrier();
    }`;
    loop = `if (producer) {
    ${loadSlice("0u", "    ")}
    ${storeSlice("0u", "0u", "    ")}
    if (1u < ntiles) {
      let kn = ${c.bk}u;
      ${loadSlice("kn", "      ")}
    }
  }
  workgroupBarrier();
  for (var t = 0u; t < ntiles; t += 2u) {
    ${step(0, 1, 1)}
    if (t + 1u < ntiles) ${step(1, 0, 2)}
  }`;
  } else if (c.buffers === 2) {
    // Unrolled by two, so that each half reads and writes its buffers at constant offsets: with the buffer
    // chosen at run time ((t & 1) * size) the fragment loads ran 2.5x slower on the H200 (BENCHMARKS.md).
    const half = (cur: number, nxt: number, ahead: string) =>
      `{
      let more = t + ${ahead}u < ntiles;
      if (more) {
        let kn = (t + ${ahead}u) * ${c.bk}u;
        ${loadSlice("kn", "        ")}
      }
      ${computeSlice(`${cur * pa.bufferElems}u`, `${cur * pb.bufferElems}u`, "")}
      if (more) {
        ${storeSlice(`${nxt * pa.bufferElems}u`, `${nxt * pb.bufferElems}u`, "        ")}
      }
      workgroupBarrier();
    }`;
    loop = `${loadSlice("0u", "  ")}
  ${storeSlice("0u", "0u", "  ")}
  workgroupBarrier();
  for (var t = 0u; t < ntiles; t += 2u) {
    ${half(0, 1, "1")}
    if (t + 1u < ntiles) ${half(1, 0, "2")}
  }`;
  } else if (c.prefetch === false) {
    loop = `for (var t = 0u; t < ntiles; t++) {
    let k0 = t * ${c.bk}u;
    ${loadSlice("k0", "    ")}
    ${storeSlice("0u", "0u", "    ")}
    workgroupBarrier();
    ${computeSlice("0u", "0u", "")}
    workgroupBarrier();
  }`;
  } else {
    loop = `${loadSlice("0u", "  ")}
  for (var t = 0u; t < ntiles; t++) {
    ${storeSlice("0u", "0u", "    ")}
    workgroupBarrier();
    if (t + 1u < ntiles) {
      let kn = (t + 1u) * ${c.bk}u;
      ${loadSlice("kn", "      ")}
    }
    ${computeSlice("0u", "0u", "")}
    workgroupBarrier();
  }`;
  }

  // ---- epilogue ----
  const epi: string[] = [];
  const outT = L.out;
  // Lane l of each subgroup owns row l / 2 of its own fragment, 8 columns from 8 (l % 2): 16 bytes of an f16 C
  // (packed halves in a vec4<u32>) or two vec4<f32> of an f32 C.
  // With two scratch slots, rounds alternate between them: a slot is rewritten two rounds later, after the
  // barrier of the round in between, so the barrier after each round's reads can go.
  const slots = c.epilogueSlots ?? 1;
  // producer subgroups hold no results: they skip the epilogue's stores but not its barriers
  const computeOnly = (stmt: string) => (producers ? `if (!producer) { ${stmt} }` : stmt);
  // fragment (i, j) of this subgroup into its scratch slot (`at`: the slot's offset, a WGSL prefix)
  const toScratch = (i: number, j: number, at: string) =>
    `subgroupMatrixStore<row_major>(&SC, ${at}sg * ${SGM_FRAG * SGM_FRAG}u, acc${i}_${j}, ${SGM_FRAG}u);`;
  const vectorEpilogue = (i: number, j: number): string => {
    const slot = ((i * pb.frags + j) % slots) * NSG * SGM_FRAG * SGM_FRAG;
    const vals = Array.from({ length: 8 }, (_, e) => `p.alpha * SC[fo + ${e}u]`);
    const at = `let row = m0 + wmI * ${pa.warpTile}u + ${i * SGM_FRAG}u + lane / 2u;
    let col = n0 + wnI * ${pb.warpTile}u + ${j * SGM_FRAG}u + (lane % 2u) * 8u;
    let ci = baseC + row * p.n + col;
    let fo = ${slot}u + sg * ${SGM_FRAG * SGM_FRAG}u + (lane / 2u) * ${SGM_FRAG}u + (lane % 2u) * 8u;`;
    // scalar arithmetic only (what the CPU interpreter of the tests evaluates)
    let write: string;
    if (outT === "f16") {
      const olds = L.accumulate
        ? `let cur = C[ci / 8u]; ${
          [0, 1, 2, 3].map((w) => `let o${w} = unpack2x16float(cur.${"xyzw"[w]});`).join(" ")
        }\n    `
        : "";
      const pairs = [0, 1, 2, 3].map((w) =>
        L.accumulate
          ? `pack2x16float(vec2<f32>(${vals[2 * w]} + o${w}.x, ${vals[2 * w + 1]} + o${w}.y))`
          : `pack2x16float(vec2<f32>(${vals[2 * w]}, ${vals[2 * w + 1]}))`
      );
      write = `${olds}C[ci / 8u] = vec4<u32>(${pairs.join(", ")});`;
    } else {
      write = [0, 1].map((h) => {
        const idx = `ci / 4u + ${h}u`;
        const comps = [0, 1, 2, 3].map((e) =>
          `${vals[4 * h + e]}${L.accumulate ? ` + old${h}.${"xyzw"[e]}` : ""}`
        );
        const store = `${L.accumulate ? `let old${h} = C[${idx}]; ` : ""}C[${idx}] = vec4<f32>(${
          comps.join(", ")
        });`;
        // in a partial block each 4 columns are wholly in or out of C (N is a multiple of 4)
        return v.exact ? store : `if (row < p.m && col + ${4 * h}u < p.n) { ${store} }`;
      }).join("\n    ");
    }
    // (an f16 C: N is a multiple of 8, so a lane's 8 columns are wholly in or out)
    const guarded = v.exact || outT !== "f16"
      ? write
      : `if (row < p.m && col < p.n) {\n      ${write}\n    }`;
    return `${computeOnly(toScratch(i, j, `${slot}u + `))}
  workgroupBarrier();
  ${producers ? "if (!producer) " : ""}{
    ${at}
    ${guarded}
  }${slots === 1 ? "\n  workgroupBarrier();" : ""}`;
  };
  for (let i = 0; i < pa.frags; i++) {
    for (let j = 0; j < pb.frags; j++) {
      const row0 = `m0 + wmI * ${pa.warpTile}u + ${i * SGM_FRAG}u`;
      const col0 = `n0 + wnI * ${pb.warpTile}u + ${j * SGM_FRAG}u`;
      if (!staged) {
        const store =
          `subgroupMatrixStore<row_major>(&C, baseC + (${row0}) * p.n + ${col0}, subgroupMatrixScalarMultiply(acc${i}_${j}, p.alpha), p.n);`;
        epi.push(computeOnly(store));
        continue;
      }
      if (v.vecOut) {
        epi.push(vectorEpilogue(i, j));
        continue;
      }
      const writes: string[] = [];
      const guard = [...(v.exact ? [] : ["row < p.m && col < p.n"]), ...(producers ? ["!producer"] : [])];
      const epilogueGuard = guard.length ? `if (${guard.join(" && ")}) ` : "";
      for (let e = 0; e < sgmEpiloguePasses(c); e++) {
        const cur = L.accumulate ? ` + f32(C[ci])` : "";
        // scratch index -> subgroup slot -> that subgroup's fragment (i, j) in C (as sgmEpilogueElement)
        writes.push(`{
      let idx = lid + ${e * CT}u;
      let slot = idx / ${SGM_FRAG * SGM_FRAG}u;
      let row = m0 + (slot % ${c.sgM}u) * ${pa.warpTile}u + ${i * SGM_FRAG}u + (idx % ${
          SGM_FRAG * SGM_FRAG
        }u) / ${SGM_FRAG}u;
      let col = n0 + (slot / ${c.sgM}u) * ${pb.warpTile}u + ${j * SGM_FRAG}u + idx % ${SGM_FRAG}u;
      ${epilogueGuard}{
        let ci = baseC + row * p.n + col;
        C[ci] = ${outT}(p.alpha * SC[idx]${cur});
      }
    }`);
      }
      epi.push(`${computeOnly(toScratch(i, j, ""))}
  workgroupBarrier();
  ${writes.join("\n  ")}
  workgroupBarrier();`);
    }
  }

  // groups of `swizzle` block rows, walked column by column (sgmBlockOf)
  const swizzle = c.swizzle > 1
    ? `let l = wid.y * nx + wid.x;
  let per = ${c.swizzle}u * nx;
  let first = (l / per) * ${c.swizzle}u;
  let size = min(ny - first, ${c.swizzle}u);
  let blockM = first + (l % per) % size;
  let blockN = (l % per) / size;`
    : `let blockM = wid.y;
  let blockN = wid.x;`;
  const accDecls: string[] = [];
  for (let i = 0; i < pa.frags; i++) {
    for (let j = 0; j < pb.frags; j++) accDecls.push(`var acc${i}_${j} = ${RESULT}();`);
  }
  const globalType = stage === "threads" ? wordType(W) : "f16";
  const shared = stage === "global" ? "" : `var<workgroup> SA: array<f16, ${c.buffers * pa.bufferElems}>;
var<workgroup> SB: array<f16, ${c.buffers * pb.bufferElems}>;`;
  const scratch = staged
    ? `var<workgroup> SC: array<f32, ${(c.epilogueSlots ?? 1) * NSG * SGM_FRAG * SGM_FRAG}>;`
    : "";
  // offset of the subgroup's first fragment: its warp index times the warp tile, along rows or columns
  const warpOffsets = stage === "global" || c.constOffsets
    ? ""
    : ["aw", "bw"].map((name, x) => `let ${name} = ${ops[x].w} * ${warpStep(ops[x])}u;`).join("\n  ");

  return `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
// subgroup-matrix matmul ${L.transA ? "A^T" : "A"} x ${L.transB ? "B^T" : "B"} -> ${L.out}${
    L.accumulate ? " (accumulate)" : ""
  }, ${v.exact ? "whole blocks" : "bounds-checked"}, config ${sgmConfigName(c)}
struct P { m: u32, n: u32, k: u32, strideA: u32, strideB: u32, strideC: u32,
           offA: u32, offB: u32, offC: u32, alpha: f32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> A: array<${globalType}>;
@group(0) @binding(1) var<storage, read> B: array<${globalType}>;
@group(0) @binding(2) var<storage, read_write> C: array<${
    v.vecOut ? (outT === "f16" ? "vec4<u32>" : "vec4<f32>") : outT
  }>;
@group(0) @binding(3) var<uniform> p: P;
${shared}
${scratch}

@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {
  let nx = (p.n + ${c.bn - 1}u) / ${c.bn}u;
  let ny = (p.m + ${c.bm - 1}u) / ${c.bm}u;
  ${swizzle}
  let m0 = blockM * ${c.bm}u;
  let n0 = blockN * ${c.bn}u;${
    v.exact || stage !== "threads" ? "" : `\n  let interior = m0 + ${c.bm}u <= p.m && n0 + ${c.bn}u <= p.n;`
  }
  let baseA = p.offA + wid.z * p.strideA;
  let baseB = p.offB + wid.z * p.strideB;
  let baseC = p.offC + wid.z * p.strideC;
  let ldA = ${L.transA ? "p.m" : "p.k"};
  let ldB = ${L.transB ? "p.k" : "p.n"};
  ${
    c.rotate
      ? `let rot = (lid / 8u) % 4u;
  ${[0, 1, 2, 3].map((w) => `let rq${w} = 2u * ((${w}u + rot) % 4u);`).join(" ")}`
      : ""
  }
  ${
    producers
      ? `let producer = sg >= ${NSG}u;
  let slid = lid - ${CT}u;
  `
      : ""
  }let wmI = sg % ${c.sgM}u;
  let wnI = sg / ${c.sgM}u;
  ${warpOffsets}
  ${lets.join("\n  ")}
  ${decls.join("\n  ")}
  ${accDecls.join("\n  ")}
  let ntiles = (p.k + ${c.bk - 1}u) / ${c.bk}u;
  ${loop}
  ${epi.join("\n  ")}
}
`;
}
