/**
 * The Mamba2 state-space scan in its chunked ("SSD") form, forward and backward, as WGSL kernels.
 *
 * The recurrence, per batch b and head h (P = head dim of x and y, N = state dim of B and C):
 *
 *     a_t = exp(delta_t A);  S_t (P x N) = a_t S_{t-1} + delta_t x_t B_t^T;  y_t = S_t C_t + D x_t
 *
 * Head h reads group floor(h / (H / Hg)) of x, B and C, so grouped (GQA-style) inputs are never repeated in
 * memory. x, B and C are read through an (offset, token stride) pair each, so they may be three tensors or three
 * column ranges of one packed `xBC` tensor (the conv output of the mixer); their gradients are written with the
 * same layout.
 *
 * ## Forward (chunks of Q steps; cs = inclusive cumulative sum of l = delta A within a chunk, T = its last value)
 *
 * 1. {@linkcode ssdChunkCumsum}: delta (optionally softplus(dt + dt_bias), fused here) and cs per step.
 * 2. {@linkcode ssdChunkState}: each chunk's own end state from a zero start,
 *    states_c[p, n] = sum_s exp(T - cs_s) delta_s x_s[p] B_s[n]: a (P x Q)(Q x N) product per chunk.
 * 3. {@linkcode ssdStatePass}: the only sequential loop, over chunks, elementwise in (p, n):
 *    Sin_0 = S_init, Sin_{c+1} = exp(T_c) Sin_c + states_c; the final state is Sin_{nc}. Done in place, so the
 *    states buffer afterwards holds the state entering each chunk.
 * 4. {@linkcode ssdChunkRows} variant `y`: y_q = exp(cs_q) Sin C_q + sum_{s<=q} (C_q . B_s) exp(cs_q - cs_s)
 *    delta_s x_s + D x_q: the intra-chunk part is a masked, decay-weighted (C B^T) x product.
 * Every exponent is <= 0 (A < 0, delta > 0, and only differences cs_q - cs_s with s <= q are formed, masked
 * before exp), so nothing overflows however long the chunk.
 *
 * ## Backward (derivation)
 *
 * With upstream dy and dS_final, write the per-chunk dependencies of the loss: y through Sin_c (inter term),
 * through the intra term, and the states through the chunk recurrence. Then:
 *
 * - dSin_c (local) = sum_q exp(cs_q) dy_q C_q^T: the same chunk product as step 2 with (dy, C, exp(cs)):
 *   {@linkcode ssdChunkState} mode `output`.
 * - Reverse chunk recurrence ({@linkcode ssdStatePassBackward}): G_{nc} = dS_final,
 *   G_c = dSin_c(local) + exp(T_c) G_{c+1}; d states_c = G_{c+1}; dS_init = G_0.
 * - Differentiating the intra term and the chunk states gives, with dstates_c = G_{c+1}
 *   (variants of {@linkcode ssdChunkRows}, each a "rows x masked block" product like the forward):
 *     dx_s = delta_s [exp(T - cs_s) dstates_c B_s + sum_{q>=s} (C_q . B_s) exp(cs_q - cs_s) dy_q] + D dy_s
 *     dB_s = delta_s [exp(T - cs_s) dstates_c^T x_s + sum_{q>=s} exp(cs_q - cs_s) (dy_q . x_s) C_q]
 *     dC_q = exp(cs_q) Sin_c^T dy_q + sum_{s<=q} exp(cs_q - cs_s) delta_s (dy_q . x_s) B_s
 *     d delta_s (direct) = x_s . (the bracket of dx_s);   dD = sum dy . x
 * - The decays. Every exponent is a difference of cumulative sums, and one can check term by term that
 *   d loss / d cs_q = C_q . dC_q - B_q . dB_q (per head, before summing heads into groups): the C-side terms carry
 *   +cs_q, the B-side terms -cs_s, and the state terms pair up the same way. T_c = cs at the chunk's last step
 *   additionally feeds states_c (as exp(T - cs_s)) and the chunk recurrence (as exp(T_c)); both together give
 *   d loss / d T_c = <G_{c+1}, Sin_{c+1}> ({@linkcode ssdStateDecayGrad}). Since cs_q = sum_{t<=q} l_t within
 *   the chunk,
 *     d loss / d l_t = sum_{q>=t in chunk} (C_q . dC_q - B_q . dB_q) + <G_{c+1}, Sin_{c+1}>,
 *   and l_t = delta_t A gives d delta_t += A dl_t, dA += delta_t dl_t ({@linkcode ssdDecayGrad}); with the fused
 *   bias, d dt = d delta * sigmoid(dt + dt_bias) and d dt_bias sums it.
 * The dot products over columns (n for dB/dC, p for d delta and dD) are reduced per 64-column tile into a
 * "row partials" buffer that the per-chunk decay kernel sums; per-(b, chunk) head partials are summed by
 * {@linkcode ssdHeadReduce}, and per-head gradients of grouped inputs by {@linkcode ssdGroupSum}.
 *
 * ## Tiling
 *
 * The chunk products run on 256-thread workgroups that own a 64 x 64 output tile (4 x 4 per thread, rows and
 * columns interleaved by 16 so shared-memory reads are broadcasts or consecutive). The Q x Q intra-chunk block is
 * formed 64 x 64 at a time in workgroup memory (the "W" block), then multiplied into the accumulators, so the
 * workgroup memory stays at 32 KiB for any chunk size, head dim or state dim (dims above 64 use more tiles or
 * k slices); a thread's 4 rows or 4 columns of each tile are one vec4 there. Devices that allow less (WebGPU's
 * default is 16 KiB) get the `narrow` tiling of the row products: 64 x 32 W blocks and scalar k slices of 8,
 * 15 KB ({@linkcode SsdRowsTiling}). Every other scan kernel needs at most 8 KB. On devices with subgroup
 * matrices, f16 scans can run the row products' three matrix products on the matrix units instead (the `sgm`
 * tiling, f16 operands and f32 accumulation, 36 KB, P and N up to 64), the masks, decays and epilogues staying
 * f32 in threads; the op does so only when asked (runtime/ops/ssd.ts, `DISTILLERY_SSD_SGM`).
 *
 * Working buffers (f32, allocated by the op): `csd` = [cs (B,H,L) | delta (B,H,L) | A (H) | D (H)];
 * `states` [B, nc, H, P, N]; row partials [4, B, L, H, CT]; dT [B, H, nc]; head partials
 * [3, H, B * nc].
 *
 * @module
 */
import { cachedSpec, ceilDiv, grid2d, LINEAR_WORKGROUP, Uniforms } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { SGM_FRAG, SGM_SUBGROUP } from "./matmul_subgroup_matrix.ts";

/** Sizes of a chunked scan. */
export interface SsdShape {
  /** Batch size B. */
  batch: number;
  /** Sequence length L. */
  seqlen: number;
  /** Heads H of the recurrence (of y, delta, A, D). */
  heads: number;
  /** Head dim P of x and y. */
  dimP: number;
  /** State dim N of B and C. */
  dimN: number;
  /** Chunk length Q (any positive integer; 64 or 128 suit the 64-row tiles best). */
  chunk: number;
}

/** Where one token's row of a grouped operand lives: element (b, t, g, k) is at `offset + (b L + t) stride + g dim + k`. */
export interface SsdOperand {
  /** Element offset of (0, 0, 0, 0). */
  offset: number;
  /** Elements from one token to the next. */
  stride: number;
  /** Number of groups (divides H). */
  heads: number;
  /** Elements per group. */
  dim: number;
}

/** A writable per-head (b, t, h, k) layout: `offset + (b L + t) stride + h dim + k`. */
export interface SsdOutputLayout {
  /** Element offset. */
  offset: number;
  /** Elements from one token to the next. */
  stride: number;
}

/** Where dt lives: element (b, t, h) is at `offset + (b L + t) stride + h`. */
export interface SsdDtLayout {
  /** Element offset. */
  offset: number;
  /** Elements from one token to the next. */
  stride: number;
}

/** Rows and columns of one workgroup tile of the chunk products. */
export const SSD_TILE = 64;
const TK = 16;

/**
 * Workgroup tilings of {@linkcode ssdChunkRows}; all own 64 x 64 output tiles (so the launch grid and the row
 * partials are the same) and differ in the intra-chunk block, the k slices and the arithmetic:
 * - `wide`: 64 x 64 blocks of positions, k slices of 64 (the whole dim in the 64-dim case), every tile in
 *   `vec4<f32>` workgroup arrays; 32,768 bytes of workgroup memory. The fast path of f32 FMA kernels.
 * - `narrow`: 64 x 32 blocks, scalar slices of 8; 15,136 bytes, within WebGPU's default 16 KiB
 *   `maxComputeWorkgroupStorageSize` (Dawn's null backend, many mobile GPUs), with many more barriers per product.
 * - `sgm`: the three products on the matrix units (Dawn's subgroup matrices, f16 operands, f32 accumulation),
 *   the elementwise parts in f32 by threads; 64 x 64 blocks, U's whole dim (at most {@linkcode SSD_SGM_MAX_DIM})
 *   in one slice; 36,864 bytes. See {@linkcode rowsCodeSgm}.
 */
export type SsdRowsTiling = "wide" | "narrow" | "sgm";

/** Positions per intra-chunk block and the depth of one k slice of the `narrow` tiling. */
const NARROW_TILES = { block: 32, slice: 8 };

/** Bytes of workgroup memory one {@linkcode ssdChunkRows} workgroup declares with this tiling. */
export function ssdRowsSharedBytes(tiling: SsdRowsTiling): number {
  // wide: two 64 x 64 f32 tiles (sP, sQ); the cs and delta values live in registers
  if (tiling === "wide") return 2 * 4 * SSD_TILE * SSD_TILE;
  if (tiling === "sgm") return sharedBytes(sgmRowsArrays());
  const { block, slice } = NARROW_TILES;
  // sA, sB (rows padded by one), sW, sZ, then the per-row and per-position cs/delta
  const floats = SSD_TILE * slice + (SSD_TILE + 1) * slice + SSD_TILE * block + slice * SSD_TILE +
    2 * SSD_TILE + 2 * block;
  return 4 * floats;
}

/**
 * Whether the `sgm` row products take a scan with these dims on a device with `limitBytes` of workgroup memory:
 * P and N at most {@linkcode SSD_SGM_MAX_DIM} (U's whole dim, N for `y` and `dx`, P for `dB` and `dC`, is one k
 * slice). Whether the device has subgroup matrices at all is the op's question.
 */
export function ssdRowsSgmApplies(dims: { dimP: number; dimN: number }, limitBytes: number): boolean {
  return dims.dimP <= SSD_SGM_MAX_DIM && dims.dimN <= SSD_SGM_MAX_DIM &&
    ssdRowsSharedBytes("sgm") <= limitBytes;
}

/** Elements of (p, n) one state-pass workgroup reduces (its dT partial). */
export const SSD_STATE_BLOCK = 256;

/** Number of chunks. */
export function ssdChunks(s: SsdShape): number {
  return ceilDiv(s.seqlen, s.chunk);
}

/** Column tiles of the row-partials buffer (the wider of P and N). */
export function ssdColTiles(s: SsdShape): number {
  return Math.max(ceilDiv(s.dimP, SSD_TILE), ceilDiv(s.dimN, SSD_TILE));
}

/** Element counts of the working buffers, for the op to allocate. */
export function ssdWorkspaceSizes(s: SsdShape): {
  csd: number;
  states: number;
  rowPartials: number;
  stateDecayGrads: number;
  headPartials: number;
} {
  const nc = ssdChunks(s);
  const bhl = s.batch * s.heads * s.seqlen;
  return {
    csd: 2 * bhl + 2 * s.heads,
    states: s.batch * nc * s.heads * s.dimP * s.dimN,
    rowPartials: 4 * bhl * ssdColTiles(s),
    stateDecayGrads: s.batch * s.heads * nc,
    headPartials: 3 * s.heads * s.batch * nc,
  };
}

// ---- uniforms: one struct for every scan kernel, generated from this list so WGSL and packer agree ----------

const DIM_FIELDS = [
  "batch",
  "seqlen",
  "heads",
  "chunk",
  "nchunks",
  "dim_p",
  "dim_n",
  "dt_off",
  "dt_stride",
  "flags",
  "col_tiles",
  "e_blocks",
  "u_off",
  "u_stride",
  "u_heads",
  "u_dim",
  "v_off",
  "v_stride",
  "v_heads",
  "v_dim",
  "z_off",
  "z_stride",
  "z_heads",
  "z_dim",
  "e_off",
  "e_stride",
  "e_heads",
  "o_off",
  "o_stride",
  "row_tiles",
  "tiles_a",
  "tiles_b",
] as const;
type DimField = typeof DIM_FIELDS[number];
const DIMS_BYTES = DIM_FIELDS.length * 4;

/** Flag bits of the `flags` uniform. */
export const SSD_FLAG = {
  /** An initial state is given. */
  initialState: 1,
  /** A gradient of the final state is given. */
  finalGrad: 2,
  /** dt is raw: delta = softplus(dt + dt_bias) is computed in the kernel. */
  dtSoftplus: 4,
} as const;

const DIMS_STRUCT = `struct Dims { ${DIM_FIELDS.map((f) => `${f}: u32`).join(", ")} }`;

function packDims(s: SsdShape, extra: Partial<Record<DimField, number>>): ArrayBuffer {
  const base: Partial<Record<DimField, number>> = {
    batch: s.batch,
    seqlen: s.seqlen,
    heads: s.heads,
    chunk: s.chunk,
    nchunks: ssdChunks(s),
    dim_p: s.dimP,
    dim_n: s.dimN,
    col_tiles: ssdColTiles(s),
    e_blocks: ceilDiv(s.dimP * s.dimN, SSD_STATE_BLOCK),
    ...extra,
  };
  const u = new Uniforms(DIMS_BYTES);
  for (const f of DIM_FIELDS) u.u32(base[f] ?? 0);
  return u.buffer;
}

function operandFields(prefix: "u" | "v" | "z" | "e", o: SsdOperand): Partial<Record<DimField, number>> {
  const r: Partial<Record<DimField, number>> = {
    [`${prefix}_off`]: o.offset,
    [`${prefix}_stride`]: o.stride,
    [`${prefix}_heads`]: o.heads,
  };
  if (prefix !== "e") r[`${prefix}_dim` as DimField] = o.dim;
  return r;
}

// Reading the packed cs/delta/A/D buffer; `bht` is (b H + h) L + t.
const CSD_HELPERS = `
fn bhl() -> u32 { return d.batch * d.heads * d.seqlen; }
fn cs_at(bht: u32) -> f32 { return csd[bht]; }
fn delta_at(bht: u32) -> f32 { return csd[bhl() + bht]; }
fn a_of(h: u32) -> f32 { return csd[2u * bhl() + h]; }
fn d_of(h: u32) -> f32 { return csd[2u * bhl() + d.heads + h]; }
fn grp(h: u32, groups: u32) -> u32 { return h / (d.heads / groups); }
`;

/**
 * WGSL that sums `red[0..n)` of a workgroup of n threads (a power of 2) into `red[0]`, once each thread has
 * written its own `red[li]`: barriers included, so every thread must reach it.
 */
function treeSum(n: number): string {
  return `workgroupBarrier();
  for (var half = ${n / 2}u; half > 0u; half = half / 2u) {
    if (li < half) { red[li] += red[li + half]; }
    workgroupBarrier();
  }`;
}

const WG_INDEX = `var w = wid.y * nwg.x + wid.x;`;
const ENTRY_ARGS = `@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32`;

// ---- 1. delta and the within-chunk cumulative sum of delta A ---------------------------------------------------

/** Heads per workgroup of the per-position scans (cumsum, decay gradients). */
const SCAN_HEADS = 16;
/** Segments a chunk is split into by those scans (one thread each). */
const SCAN_SEGMENTS = 16;

/**
 * WGSL shared by the chunk products: the workgroup index decoded into tile indices (`tiles`: WGSL name and the
 * `Dims` field counting them, innermost first), then head h, chunk c and batch b; padding workgroups return; t0
 * and clen are the chunk's first position and length.
 */
function chunkGridPrologue(tiles: readonly (readonly [name: string, count: string])[]): string {
  return `${WG_INDEX}
  ${tiles.map(([name, count]) => `let ${name} = w % d.${count}; w = w / d.${count};`).join("\n  ")}
  let h = w % d.heads; w = w / d.heads;
  let c = w % d.nchunks;
  let b = w / d.nchunks;
  if (b >= d.batch) { return; }
  let t0 = c * d.chunk;
  let clen = min(d.chunk, d.seqlen - t0);`;
}

// Shared prologue of the two per-position scans: 16 heads x 16 segments of a chunk per workgroup; each thread owns
// positions [s0, s1) of its chunk for head h, so the sequential part is Q / 16 steps, and reads of one position
// are 16 consecutive heads.
const SCAN_PROLOGUE = `
  ${WG_INDEX}
  let first = w == 0u;
  let hb = w % d.tiles_a; w = w / d.tiles_a;
  let c = w % d.nchunks;
  let b = w / d.nchunks;
  if (b >= d.batch) { return; }
  let hl = li % ${SCAN_HEADS}u;
  let sg = li / ${SCAN_HEADS}u;
  let h = hb * ${SCAN_HEADS}u + hl;
  let hv = h < d.heads;
  let t0 = c * d.chunk;
  let clen = min(d.chunk, d.seqlen - t0);
  let seg = (clen + ${SCAN_SEGMENTS - 1}u) / ${SCAN_SEGMENTS}u;
  let s0 = min(sg * seg, clen);
  let s1 = min(s0 + seg, clen);
`;

function scanWorkgroups(s: SsdShape): [number, number] {
  return grid2d(ceilDiv(s.heads, SCAN_HEADS) * ssdChunks(s) * s.batch);
}

/**
 * delta = dt (or softplus(dt + dt_bias) when `softplus`) and cs = the within-chunk inclusive cumulative sum of
 * delta A, as a two-level scan (segment sums, then their prefix). Also copies A and D into the tail of `csd` so
 * later kernels need one binding for all per-head scalars.
 * Bindings: dt, A, D, dt_bias (any read buffer when unused), csd (rw).
 */
export function ssdChunkCumsum(s: SsdShape, dt: SsdDtLayout, softplus: boolean): Launch {
  const spec = cachedSpec("ssd_cumsum", () => ({
    bindings: ["read", "read", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> dt: array<f32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> Dp: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> csd: array<f32>;
@group(0) @binding(5) var<uniform> d: Dims;
${CSD_HELPERS}
${WGSL_SOFTPLUS}
var<workgroup> segSum: array<f32, ${SCAN_HEADS * SCAN_SEGMENTS}>;
@compute @workgroup_size(${SCAN_HEADS * SCAN_SEGMENTS})
fn main(${ENTRY_ARGS}) {
  ${SCAN_PROLOGUE}
  if (first) {
    for (var i = li; i < d.heads; i += ${SCAN_HEADS * SCAN_SEGMENTS}u) {
      csd[2u * bhl() + i] = A[i];
      csd[2u * bhl() + d.heads + i] = Dp[i];
    }
  }
  let row = (b * d.heads + h) * d.seqlen;
  var a = 0.0;
  var sum = 0.0;
  if (hv) {
    a = A[h];
    for (var q = s0; q < s1; q++) {
      let t = t0 + q;
      var v = dt[d.dt_off + (b * d.seqlen + t) * d.dt_stride + h];
      if ((d.flags & ${SSD_FLAG.dtSoftplus}u) != 0u) { v = softplus(v + bias[h]); }
      csd[bhl() + row + t] = v;
      sum += v * a;
    }
  }
  segSum[sg * ${SCAN_HEADS}u + hl] = sum;
  workgroupBarrier();
  if (hv) {
    var run = 0.0;
    for (var k = 0u; k < sg; k++) { run += segSum[k * ${SCAN_HEADS}u + hl]; }
    for (var q = s0; q < s1; q++) {
      let t = t0 + q;
      run += csd[bhl() + row + t] * a;
      csd[row + t] = run;
    }
  }
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, {
      dt_off: dt.offset,
      dt_stride: dt.stride,
      flags: softplus ? SSD_FLAG.dtSoftplus : 0,
      tiles_a: ceilDiv(s.heads, SCAN_HEADS),
    }),
    workgroups: scanWorkgroups(s),
  };
}

/**
 * softplus(v) = max(v, 0) + log1p(exp(-|v|)), with log1p of e in (0, 1] as 2 atanh(e / (2 + e)) by its series
 * (relative error < 2e-9): GPU `log` near 1 may carry an absolute error of 2^-21 (WGSL allows it), which would be
 * a large relative error for the small deltas Mamba uses. Agrees with PyTorch's thresholded softplus in f32.
 */
export const WGSL_SOFTPLUS = `
fn softplus(v: f32) -> f32 {
  let e = exp(-abs(v));
  let z = e / (2.0 + e);
  let z2 = z * z;
  let series = 1.0 + z2 * (1.0 / 3.0 + z2 * (1.0 / 5.0 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0 + z2 * (1.0 / 11.0 +
    z2 * (1.0 / 13.0 + z2 * (1.0 / 15.0)))))));
  return max(v, 0.0) + 2.0 * z * series;
}
fn sigmoid(v: f32) -> f32 { return 1.0 / (1.0 + exp(-v)); }
`;

// ---- 2. chunk states (and, in the backward, the local gradient of each chunk's entering state) --------------

/** Which weights the chunk product applies: `state` exp(T - cs_s) delta_s, `output` exp(cs_s). */
export type SsdChunkStateMode = "state" | "output";

/**
 * out[b, c, h, p, n] = sum_{s in chunk c} w_s X[b, s, gx(h), p] Y[b, s, gy(h), n] with X of dim P and Y of dim N.
 * Forward: X = x, Y = B, mode `state` (the chunk's own end state). Backward: X = dy, Y = C, mode `output` (the
 * gradient of the chunk's entering state from its outputs). One 64 x 64 (p, n) tile per workgroup, over s in
 * slices of 16. Bindings: X, Y, csd, out (rw) [B, nc, H, P, N].
 */
export function ssdChunkState(s: SsdShape, X: SsdOperand, Y: SsdOperand, mode: SsdChunkStateMode): Launch {
  const spec = cachedSpec(`ssd_chunk_state_${mode}`, () => ({
    bindings: ["read", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> Y: array<f32>;
@group(0) @binding(2) var<storage, read> csd: array<f32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;
@group(0) @binding(4) var<uniform> d: Dims;
${CSD_HELPERS}
const TT = ${SSD_TILE}u;
const TK = ${TK}u;
var<workgroup> sX: array<f32, ${TK * SSD_TILE}>;
var<workgroup> sY: array<f32, ${TK * SSD_TILE}>;
var<workgroup> sw: array<f32, ${TK}>;

@compute @workgroup_size(256)
fn main(${ENTRY_ARGS}) {
  ${chunkGridPrologue([["pt", "tiles_a"], ["nt", "tiles_b"]])}
  let base = (b * d.heads + h) * d.seqlen + t0;
  let T = cs_at(base + clen - 1u);
  let tx = li % 16u;
  let ty = li / 16u;
  let gx = grp(h, d.u_heads);
  let gy = grp(h, d.v_heads);
  var acc: array<vec4<f32>, 4>;
  for (var s0 = 0u; s0 < clen; s0 += TK) {
    if (li < TK) {
      let s = s0 + li;
      var wt = 0.0;
      if (s < clen) {
        ${
      mode === "state" ? "wt = exp(T - cs_at(base + s)) * delta_at(base + s);" : "wt = exp(cs_at(base + s));"
    }
      }
      sw[li] = wt;
    }
    // element e = li + 256 j of the slice: step kk = (li >> 6) + 4 j, column li & 63; every load before the
    // first store, so their latencies overlap
    {
      let col = li & 63u;
      let p = pt * TT + col;
      let n = nt * TT + col;
      ${
      range((TK * SSD_TILE) / 256).map((j) =>
        `var x${j} = 0.0;
      var y${j} = 0.0;
      if (s0 + (li >> 6u) + ${4 * j}u < clen) {
        let tok = b * d.seqlen + t0 + s0 + (li >> 6u) + ${4 * j}u;
        if (p < d.u_dim) { x${j} = X[d.u_off + tok * d.u_stride + gx * d.u_dim + p]; }
        if (n < d.v_dim) { y${j} = Y[d.v_off + tok * d.v_stride + gy * d.v_dim + n]; }
      }`
      ).join("\n      ")
    }
      ${
      range((TK * SSD_TILE) / 256).map((j) => `sX[li + ${256 * j}u] = x${j}; sY[li + ${256 * j}u] = y${j};`)
        .join("\n      ")
    }
    }
    workgroupBarrier();
    for (var kk = 0u; kk < TK; kk++) {
      let r = kk * TT;
      let a = vec4<f32>(sX[r + ty], sX[r + ty + 16u], sX[r + ty + 32u], sX[r + ty + 48u]) * sw[kk];
      let bv = vec4<f32>(sY[r + tx], sY[r + tx + 16u], sY[r + tx + 32u], sY[r + tx + 48u]);
      acc[0] += a.x * bv;
      acc[1] += a.y * bv;
      acc[2] += a.z * bv;
      acc[3] += a.w * bv;
    }
    workgroupBarrier();
  }
  let obase = ((b * d.nchunks + c) * d.heads + h) * d.dim_p * d.dim_n;
  for (var i = 0u; i < 4u; i++) {
    let p = pt * TT + ty + 16u * i;
    if (p >= d.dim_p) { continue; }
    for (var j = 0u; j < 4u; j++) {
      let n = nt * TT + tx + 16u * j;
      if (n < d.dim_n) { O[obase + p * d.dim_n + n] = acc[i][j]; }
    }
  }
}
`,
  }));
  const tilesA = ceilDiv(s.dimP, SSD_TILE), tilesB = ceilDiv(s.dimN, SSD_TILE);
  return {
    spec,
    uniforms: packDims(s, {
      ...operandFields("u", X),
      ...operandFields("v", Y),
      tiles_a: tilesA,
      tiles_b: tilesB,
    }),
    workgroups: grid2d(tilesA * tilesB * s.heads * ssdChunks(s) * s.batch),
  };
}

// ---- 3. the sequential pass over chunks ---------------------------------------------------------------------

/**
 * In place over `states`: on entry chunk c's own state, on exit the state entering chunk c. One thread per
 * (b, h, p, n), sequential over chunks: Sin_{c+1} = exp(T_c) Sin_c + states_c. Writes the final state.
 * Bindings: states (rw) [B, nc, H, P, N], csd, init (read; any read buffer when absent) [B, H, P, N],
 * final (rw) [B, H, P, N].
 */
export function ssdStatePass(s: SsdShape, hasInit: boolean): Launch {
  const spec = cachedSpec("ssd_state_pass", () => ({
    bindings: ["rw", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read_write> st: array<f32>;
@group(0) @binding(1) var<storage, read> csd: array<f32>;
@group(0) @binding(2) var<storage, read> init: array<f32>;
@group(0) @binding(3) var<storage, read_write> fin: array<f32>;
@group(0) @binding(4) var<uniform> d: Dims;
${CSD_HELPERS}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(${ENTRY_ARGS}) {
  let i = (wid.y * nwg.x + wid.x) * ${LINEAR_WORKGROUP}u + li;
  let pn = d.dim_p * d.dim_n;
  let e = i % pn;
  let bh = i / pn;
  if (bh >= d.batch * d.heads) { return; }
  let h = bh % d.heads;
  let b = bh / d.heads;
  var S = 0.0;
  if ((d.flags & ${SSD_FLAG.initialState}u) != 0u) { S = init[bh * pn + e]; }
  for (var c = 0u; c < d.nchunks; c++) {
    let last = min(d.seqlen, (c + 1u) * d.chunk) - 1u;
    let idx = ((b * d.nchunks + c) * d.heads + h) * pn + e;
    let own = st[idx];
    st[idx] = S;
    S = exp(cs_at(bh * d.seqlen + last)) * S + own;
  }
  fin[bh * pn + e] = S;
}
`,
  }));
  const n = s.batch * s.heads * s.dimP * s.dimN;
  return {
    spec,
    uniforms: packDims(s, { flags: hasInit ? SSD_FLAG.initialState : 0 }),
    workgroups: grid2d(ceilDiv(n, LINEAR_WORKGROUP)),
  };
}

// ---- 4. the row products: forward output and the x, B, C gradients --------------------------------------------

/**
 * Variants of the rows kernel. Each computes, for the rows r of one chunk and one 64-column tile,
 *   acc[r, col] = rowScale_r sum_k U_r[k] S(k, col) + sum_{k in mask(r)} (U_r . V_k) decay(r, k) Z_k[col]
 * then an epilogue:
 * - `y`:  U = C, V = B, Z = x, S = Sin^T, mask k <= r, decay exp(cs_r - cs_k) delta_k, rowScale exp(cs_r);
 *         y = acc + D x.
 * - `dx`: U = B, V = C, Z = dy, S = dstates^T, mask k >= r, decay exp(cs_k - cs_r), rowScale exp(T - cs_r);
 *         dx = delta_r acc + D dy; row partials x . acc (d delta direct) and x . dy (dD).
 * - `dB`: U = x, V = dy, Z = C, S = dstates, mask k >= r, decay exp(cs_k - cs_r), rowScale exp(T - cs_r);
 *         dB = delta_r acc; row partial -B . dB.
 * - `dC`: U = dy, V = x, Z = B, S = Sin, mask k <= r, decay exp(cs_r - cs_k) delta_k, rowScale exp(cs_r);
 *         dC = acc; row partial C . dC.
 */
export type SsdRowsVariant = "y" | "dx" | "dB" | "dC";

const ROW_SLOTS: Record<SsdRowsVariant, string> = {
  y: "",
  dx: "0u",
  dB: "2u",
  dC: "3u",
};

/** Bindings, per-head operand bases, operand loaders and the row-partials index: what both tilings share. */
function rowsHeader(v: SsdRowsVariant): string {
  const hasE = v !== "y";
  const oBinding = hasE ? 6 : 5;
  return `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> U: array<f32>;
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read> Z: array<f32>;
@group(0) @binding(3) var<storage, read> S: array<f32>;
@group(0) @binding(4) var<storage, read> csd: array<f32>;
${hasE ? "@group(0) @binding(5) var<storage, read> E: array<f32>;" : ""}
@group(0) @binding(${oBinding}) var<storage, read_write> O: array<f32>;
${hasE ? "@group(0) @binding(7) var<storage, read_write> R: array<f32>;" : ""}
@group(0) @binding(${hasE ? 8 : 6}) var<uniform> d: Dims;
${CSD_HELPERS}

// Group offsets of this workgroup's head, computed once (integer division is slow on GPUs).
var<private> uBase: u32;
var<private> vBase: u32;
var<private> zBase: u32;
var<private> eBase: u32;
fn tok(b: u32, t: u32) -> u32 { return b * d.seqlen + t; }
fn ld_u(b: u32, t: u32, k: u32) -> f32 { return U[uBase + tok(b, t) * d.u_stride + k]; }
fn ld_v(b: u32, t: u32, k: u32) -> f32 { return V[vBase + tok(b, t) * d.v_stride + k]; }
fn ld_z(b: u32, t: u32, k: u32) -> f32 { return Z[zBase + tok(b, t) * d.z_stride + k]; }
${
    hasE
      ? `fn ld_e(b: u32, t: u32, k: u32) -> f32 { return E[eBase + tok(b, t) * d.e_stride + k]; }
// row partials [slot, B, L, H, CT]: heads innermost, so the decay scan reads 16 heads of a position together
fn rp(slot: u32, b: u32, h: u32, t: u32, ct: u32) -> u32 {
  return (((slot * d.batch + b) * d.seqlen + t) * d.heads + h) * d.col_tiles + ct;
}`
      : ""
  }`;
}

/** The start of `main` up to the thread's place in the tile: which (b, c, h, row tile, column tile) it owns. */
function rowsPrologue(v: SsdRowsVariant): string {
  return `${chunkGridPrologue([["ct", "tiles_a"], ["rt", "row_tiles"]])}
  let r0 = rt * TR;
  if (r0 >= clen) { return; }
  uBase = d.u_off + grp(h, d.u_heads) * d.u_dim;
  vBase = d.v_off + grp(h, d.v_heads) * d.u_dim;
  zBase = d.z_off + grp(h, d.z_heads) * d.z_dim;
  ${v !== "y" ? "eBase = d.e_off + grp(h, d.e_heads) * d.z_dim;" : ""}
  let col0 = ct * TC;
  let kdim = d.u_dim;
  let ncols = d.z_dim;
  let base = (b * d.heads + h) * d.seqlen + t0;
  let T = cs_at(base + clen - 1u);
  let sBase = ((b * d.nchunks + c) * d.heads + h) * d.dim_p * d.dim_n;`;
}

/**
 * The epilogue: outputs (and row partials) from `acc[i][j]`, rows `ty + 16 i`, columns `tx + 16 j`.
 * `rowDelta` reads delta of row `rl` (local row, loop index `i`); `rowSums` sums the 16 per-thread row partials
 * `rs0`, `rs1` of each row into `s0`, `s1` for local row `li` (threads `li < TR`), barriers included.
 */
function rowsEpilogue(v: SsdRowsVariant, rowDelta: string, rowSums: string): string {
  if (v === "y") {
    return `
  let dh = d_of(h);
  for (var i = 0u; i < 4u; i++) {
    let row = r0 + ty + 16u * i;
    if (row >= clen) { continue; }
    let t = t0 + row;
    for (var j = 0u; j < 4u; j++) {
      let gc = col0 + tx + 16u * j;
      if (gc < ncols) { O[d.o_off + (b * d.seqlen + t) * d.o_stride + h * ncols + gc] = acc[i][j] + dh * ld_z(b, t, gc); }
    }
  }`;
  }
  const body = v === "dx"
    ? `let g = acc[i][j];
        let dyv = ld_z(b, t, gc);
        let xv = ld_e(b, t, gc);
        O[oi] = ${rowDelta} * g + dh * dyv;
        rs0[i] += xv * g;
        rs1[i] += xv * dyv;`
    : v === "dB"
    ? `let g = ${rowDelta} * acc[i][j];
        O[oi] = g;
        rs0[i] -= ld_e(b, t, gc) * g;`
    : `let g = acc[i][j];
        O[oi] = g;
        rs0[i] += ld_e(b, t, gc) * g;`;
  return `
  let dh = d_of(h);
  var rs0 = vec4<f32>();
  var rs1 = vec4<f32>();
  for (var i = 0u; i < 4u; i++) {
    let rl = ty + 16u * i;
    let row = r0 + rl;
    if (row >= clen) { continue; }
    let t = t0 + row;
    for (var j = 0u; j < 4u; j++) {
      let gc = col0 + tx + 16u * j;
      if (gc < ncols) {
        let oi = d.o_off + (b * d.seqlen + t) * d.o_stride + h * ncols + gc;
        ${body}
      }
    }
  }
  ${rowSums}
  if (li < TR && r0 + li < clen) {
    let t = t0 + r0 + li;
    R[rp(${ROW_SLOTS[v]}, b, h, t, ct)] = s0;
    ${v === "dx" ? "R[rp(1u, b, h, t, ct)] = s1;" : ""}
  }`;
}

/**
 * acc[i][j] += sum_k sP[row ty + 16 i, k] sQ[col tx + 16 j, k] over the first `kqn` k quads of two k-major
 * tiles (see `kv` in {@linkcode rowsCodeWide}): 8 vec4 loads per 64 FMAs. `indent` is that of the
 * nesting it goes in.
 */
function kMajorProduct(acc: string, indent: string): string {
  const a = [0, 1, 2, 3].map((i) => `let a${i} = sP[(ty + ${16 * i}u) * KV + qa];`).join("\n      ");
  const bs = [0, 1, 2, 3].map((j) => `let b${j} = sQ[(tx + ${16 * j}u) * KV + qb];`).join("\n      ");
  // b's component m across the four columns, so each row's update is a vec4 FMA
  const bt = [..."xyzw"].map((m) => `let b${m} = vec4<f32>(b0.${m}, b1.${m}, b2.${m}, b3.${m});`).join(
    "\n      ",
  );
  const fma = [0, 1, 2, 3].flatMap((i) => [..."xyzw"].map((m) => `${acc}[${i}] += a${i}.${m} * b${m};`)).join(
    "\n      ",
  );
  return `for (var kq = 0u; kq < kqn; kq++) {
      let qa = kq ^ (ty & 7u);
      let qb = kq ^ (tx & 7u);
      ${a}
      ${bs}
      ${bt}
      ${fma}
    }`.replaceAll("\n", `\n${indent}`);
}

/** Where {@linkcode stageKMajor} finds slot `s`'s element and whether it exists. */
interface KMajorSource {
  /** Tile row (a position or a column) and k of slot s, as WGSL expressions of `sr` and `sk`. */
  slot: (s: number) => { row: string; k: string };
  /** Whether the row exists (else the element is zero). */
  valid: (row: string) => string;
  /** The element's load. */
  load: (row: string, k: string) => string;
  /** True when the slots step k (thread li holds row li & 63 and k (li >> 6) + 4 s), else rows. */
  swapped?: boolean;
}

/**
 * Stages a 64 x 64 k-major tile (see `kv` in {@linkcode rowsCodeWide}) of slice k0 into `dst`: 16 elements per
 * thread, zero past the dim (k >= kn) or where the row does not exist, and nothing written from kw on. Written
 * out with every load issued before the first store: a loop of load-then-store waits out a global load's latency
 * per element.
 */
function stageKMajor(dst: string, src: KMajorSource): string {
  const slots = range(16).map((s) => src.slot(s));
  const loads = slots.map(({ row, k }, s) =>
    `var g${s} = 0.0;
    if (${src.valid(row)} && ${k} < kn) { g${s} = ${src.load(row, k)}; }`
  );
  const store = (s: number) => `${dst}[kv(${slots[s].row}, ${slots[s].k})][(${slots[s].k}) & 3u] = g${s};`;
  // with k stepping per slot, a slot past kw writes nothing; with rows stepping, k is the thread's own
  const stores = src.swapped
    ? range(16).map((s) => `if (${slots[s].k} < kw) { ${store(s)} }`).join("\n    ")
    : `if (sk < kw) {
      ${range(16).map(store).join("\n      ")}
    }`;
  return `{
    let sr = ${src.swapped ? "li & 63u" : "li >> 6u"};
    let sk = ${src.swapped ? "li >> 6u" : "li & 63u"};
    ${loads.join("\n    ")}
    ${stores}
  }`;
}

/**
 * The `wide` row products. Two 64 x 64 tiles of workgroup memory, each an array of vec4<f32>:
 * - `sP`: U (k-major: row r, 16 vec4 of consecutive k), then W^T (position-major: 16 vec4 of the rows
 *   ty + 16 i a thread owns), then the row partials;
 * - `sQ`: S or V (k-major, by column or position), then Z (position-major: 16 vec4 of the columns tx + 16 j).
 * Per 64-position block and per 64 of k: load U and V, barrier, W in registers, barrier, W^T and Z stored,
 * barrier, W Z, barrier: 4 barriers where 16-deep scalar slices took 17. Every inner step is two (W: eight)
 * vec4 loads per 16 (W: 64) FMAs.
 */
function rowsCodeWide(v: SsdRowsVariant): string {
  const lower = v === "y" || v === "dC";
  const transposedS = v === "y" || v === "dx";
  const maskCond = lower ? "k <= row" : "k >= row";
  const decay = lower ? "exp(crow[i] - ck) * dk" : "exp(ck - crow[i])";
  const rowScale = lower ? "exp(crow[i])" : "exp(T - crow[i])";
  // S is [c, p, n]: S^T (y, dx) has k (= n) contiguous per column, S (dB, dC) has the columns (n) contiguous
  const loadS = transposedS
    ? stageKMajor("sQ", {
      slot: (s) => ({ row: `sr + ${4 * s}u`, k: "sk" }),
      valid: (row) => `col0 + ${row} < ncols`,
      load: (row, k) => `S[sBase + (col0 + ${row}) * kdim + k0 + ${k}]`,
    })
    : stageKMajor("sQ", {
      // consecutive threads read consecutive columns: the tile's k is the slot's row of S
      slot: (s) => ({ row: "sr", k: `sk + ${4 * s}u` }),
      valid: (row) => `col0 + ${row} < ncols`,
      load: (row, k) => `S[sBase + (k0 + ${k}) * ncols + col0 + ${row}]`,
      swapped: true,
    });
  const loadU = stageKMajor("sP", {
    slot: (s) => ({ row: `sr + ${4 * s}u`, k: "sk" }),
    valid: (row) => `r0 + ${row} < clen`,
    load: (row, k) => `ld_u(b, t0 + r0 + ${row}, k0 + ${k})`,
  });
  const loadV = stageKMajor("sQ", {
    slot: (s) => ({ row: `sr + ${4 * s}u`, k: "sk" }),
    valid: (row) => `kb + ${row} < clen`,
    load: (row, k) => `ld_v(b, t0 + kb + ${row}, k0 + ${k})`,
  });
  const rowSums = v === "y"
    ? ""
    : `// Row sums over this column tile: 16 threads share a row; their partials meet in sP.
  sP[tx * 16u + ty] = rs0;
  sP[256u + tx * 16u + ty] = rs1;
  workgroupBarrier();
  var s0 = 0.0;
  var s1 = 0.0;
  if (li < TR) {
    for (var q = 0u; q < 16u; q++) {
      s0 += sP[q * 16u + (li & 15u)][li >> 4u];
      s1 += sP[256u + q * 16u + (li & 15u)][li >> 4u];
    }
  }`;
  return `${rowsHeader(v)}
const TR = ${SSD_TILE}u;
const TC = ${SSD_TILE}u;
const TB = ${SSD_TILE}u;
const KS = ${SSD_TILE}u;
const KV = ${SSD_TILE / 4}u;
var<workgroup> sP: array<vec4<f32>, ${SSD_TILE * SSD_TILE / 4}>;
var<workgroup> sQ: array<vec4<f32>, ${SSD_TILE * SSD_TILE / 4}>;

// Element (r, k) of a k-major tile: row r holds KV vec4 of consecutive k, the vec4 index xored with r % 8 so the
// 4 rows (8 columns) a warp reads at one k quad lie in distinct banks.
fn kv(r: u32, k: u32) -> u32 { return r * KV + ((k >> 2u) ^ (r & 7u)); }

@compute @workgroup_size(256)
fn main(${ENTRY_ARGS}) {
  ${rowsPrologue(v)}
  // A warp covers 4 ty x 8 tx, so a vec4 read of either operand touches at most 128 distinct bytes.
  let tx = (li & 7u) | ((li >> 2u) & 8u);
  let ty = ((li >> 3u) & 3u) | ((li >> 4u) & 12u);
  var crow = vec4<f32>();
  var drow = vec4<f32>();
  for (var i = 0u; i < 4u; i++) {
    let row = r0 + ty + 16u * i;
    if (row < clen) {
      crow[i] = cs_at(base + row);
      drow[i] = delta_at(base + row);
    }
  }

  // Inter-chunk term: the state (entering the chunk, or its gradient) applied to each row.
  var acc: array<vec4<f32>, 4>;
  for (var k0 = 0u; k0 < kdim; k0 += KS) {
    let kn = min(KS, kdim - k0);
    let kw = (kn + 3u) & ~3u;
    let kqn = kw >> 2u;
    ${loadU}
    ${loadS}
    workgroupBarrier();
    ${kMajorProduct("acc", "")}
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    acc[i] *= ${rowScale};
  }

  // Intra-chunk term, one 64 x 64 block of positions at a time: W = mask(U V^T) * decay, then acc += W Z.
  let kbStart = ${lower ? "0u" : "r0"};
  let kbEnd = ${lower ? "min(r0 + TR, clen)" : "clen"};
  for (var kb = kbStart; kb < kbEnd; kb += TB) {
    // zeroed by assignment each block: a loop-local declaration may be hoisted and initialised only once
    var wacc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { wacc[i] = vec4<f32>(); }
    for (var k0 = 0u; k0 < kdim; k0 += KS) {
      let kn = min(KS, kdim - k0);
      let kw = (kn + 3u) & ~3u;
      let kqn = kw >> 2u;
      // U of a dim within one slice is still in sP from the inter-chunk term in the first block
      if (kb != kbStart || kdim > KS) {
        ${loadU.replaceAll("\n", "\n    ")}
      }
      ${loadV.replaceAll("\n", "\n  ")}
      workgroupBarrier();
      ${kMajorProduct("wacc", "  ")}
      workgroupBarrier();
    }
    // W^T into sP, a thread's 4 rows as one vec4, the vec4 index xored with the position so the stores of a warp
    // spread over the banks. Mask before exp: only exponents <= 0 are ever evaluated.
    for (var j = 0u; j < 4u; j++) {
      let p = tx + 16u * j;
      let k = kb + p;
      var wt = vec4<f32>();
      if (k < clen) {
        let ck = cs_at(base + k);
        ${lower ? "let dk = delta_at(base + k);" : ""}
        for (var i = 0u; i < 4u; i++) {
          let row = r0 + ty + 16u * i;
          if (row < clen && ${maskCond}) { wt[i] = wacc[i][j] * ${decay}; }
        }
      }
      sP[p * KV + (ty ^ (p & 15u))] = wt;
    }
    let kbLen = min(TB, clen - kb);
    // Z, position-major: element e = li + 256 s is position (li >> 4) + 16 s, columns (li & 15) + 16 j; loads
    // first, then stores (see stageKMajor)
    {
      let zp = li >> 4u;
      let zc = li & 15u;
      ${
    [0, 1, 2, 3].map((s) =>
      `var z${s} = vec4<f32>();
      if (zp + ${16 * s}u < kbLen) {
        ${
        [0, 1, 2, 3].map((j) =>
          `if (col0 + zc + ${16 * j}u < ncols) { z${s}[${j}] = ld_z(b, t0 + kb + zp + ${
            16 * s
          }u, col0 + zc + ${16 * j}u); }`
        ).join("\n        ")
      }
      }`
    ).join("\n      ")
  }
      ${[0, 1, 2, 3].map((s) => `sQ[li + ${256 * s}u] = z${s};`).join(" ")}
    }
    workgroupBarrier();
    for (var q = 0u; q < kbLen; q++) {
      let a = sP[q * KV + (ty ^ (q & 15u))];
      let z = sQ[q * KV + tx];
      acc[0] += a.x * z;
      acc[1] += a.y * z;
      acc[2] += a.z * z;
      acc[3] += a.w * z;
    }
    workgroupBarrier();
  }
${rowsEpilogue(v, "drow[i]", rowSums)}
}
`;
}

/** The `narrow` row products: scalar k slices of 8 and 64 x 32 blocks, for 16 KiB of workgroup memory. */
function rowsCodeNarrow(v: SsdRowsVariant): string {
  const { block, slice } = NARROW_TILES;
  // The row-sum epilogue reuses sW for 2 x 64 rows x 16 threads of partials.
  if (SSD_TILE * block < 2 * SSD_TILE * 16) {
    throw new Error(`ssd rows: a ${block}-wide block cannot hold the row sums`);
  }
  // Each thread owns 4 rows x (block / 16) positions of the W block, interleaved by 16 like the output tile.
  const wj = block / 16;
  const wvec = `vec${wj}<f32>`;
  const wcols = Array.from({ length: wj }, (_, j) => `sB[kk * SBS + tx${j ? ` + ${16 * j}u` : ""}]`).join(
    ", ",
  );
  const wsum = Array.from({ length: 4 }, (_, i) => `wacc[${i}] += a.${"xyzw"[i]} * bv;`).join("\n        ");
  const lower = v === "y" || v === "dC";
  const transposedS = v === "y" || v === "dx";
  const decay = lower ? "exp(cr - sKCs[pl]) * sKD[pl]" : "exp(sKCs[pl] - cr)";
  const rowScale = lower ? "exp(sRowCs[rl])" : "exp(T - sRowCs[rl])";
  const loadS = transposedS
    ? `let col = e / TK;
      let kk = e % TK;
      let gc = col0 + col;
      let k = k0 + kk;
      var sv = 0.0;
      if (gc < ncols && k < kdim) { sv = S[sBase + gc * kdim + k]; }
      sB[kk * SBS + col] = sv;`
    : `let kk = e / TC;
      let col = e % TC;
      let gc = col0 + col;
      let k = k0 + kk;
      var sv = 0.0;
      if (gc < ncols && k < kdim) { sv = S[sBase + k * ncols + gc]; }
      sB[kk * SBS + col] = sv;`;
  const rowSums = v === "y"
    ? ""
    : `// Row sums over this column tile: 16 threads share a row; sum their partials through workgroup memory.
  for (var i = 0u; i < 4u; i++) {
    let rl = ty + 16u * i;
    sW[rl * 16u + tx] = rs0[i];
    sW[1024u + rl * 16u + tx] = rs1[i];
  }
  workgroupBarrier();
  var s0 = 0.0;
  var s1 = 0.0;
  if (li < TR) {
    for (var q = 0u; q < 16u; q++) {
      s0 += sW[li * 16u + q];
      s1 += sW[1024u + li * 16u + q];
    }
  }`;
  return `${rowsHeader(v)}
const TR = ${SSD_TILE}u;
const TC = ${SSD_TILE}u;
const TB = ${block}u;
const TK = ${slice}u;
const SBS = ${SSD_TILE + 1}u;
var<workgroup> sA: array<f32, ${SSD_TILE * slice}>;
// rows padded to 65: the transposing stores below would hit one bank 16 times with a stride of 64
var<workgroup> sB: array<f32, ${(SSD_TILE + 1) * slice}>;
var<workgroup> sW: array<f32, ${SSD_TILE * block}>;
var<workgroup> sZ: array<f32, ${SSD_TILE * slice}>;
var<workgroup> sRowCs: array<f32, ${SSD_TILE}>;
var<workgroup> sRowD: array<f32, ${SSD_TILE}>;
var<workgroup> sKCs: array<f32, ${block}>;
var<workgroup> sKD: array<f32, ${block}>;

// sA[r][k] = U[row r0 + r, k0 + k] (zero outside the chunk or past the dim)
fn load_rows(b: u32, t0: u32, r0: u32, clen: u32, k0: u32, li: u32) {
  for (var e = li; e < TR * TK; e += 256u) {
    let r = e / TK;
    let k = k0 + e % TK;
    var v = 0.0;
    if (r0 + r < clen && k < d.u_dim) { v = ld_u(b, t0 + r0 + r, k); }
    sA[e] = v;
  }
}

@compute @workgroup_size(256)
fn main(${ENTRY_ARGS}) {
  ${rowsPrologue(v)}
  let tx = li % 16u;
  let ty = li / 16u;
  if (li < TR) {
    var cr = 0.0;
    var dr = 0.0;
    if (r0 + li < clen) {
      cr = cs_at(base + r0 + li);
      dr = delta_at(base + r0 + li);
    }
    sRowCs[li] = cr;
    sRowD[li] = dr;
  }
  workgroupBarrier();

  // Inter-chunk term: the state (entering the chunk, or its gradient) applied to each row.
  var acc: array<vec4<f32>, 4>;
  for (var k0 = 0u; k0 < kdim; k0 += TK) {
    load_rows(b, t0, r0, clen, k0, li);
    for (var e = li; e < TK * TC; e += 256u) {
      ${loadS}
    }
    workgroupBarrier();
    for (var kk = 0u; kk < TK; kk++) {
      let a = vec4<f32>(sA[ty * TK + kk], sA[(ty + 16u) * TK + kk], sA[(ty + 32u) * TK + kk], sA[(ty + 48u) * TK + kk]);
      let bv = vec4<f32>(sB[kk * SBS + tx], sB[kk * SBS + tx + 16u], sB[kk * SBS + tx + 32u], sB[kk * SBS + tx + 48u]);
      acc[0] += a.x * bv;
      acc[1] += a.y * bv;
      acc[2] += a.z * bv;
      acc[3] += a.w * bv;
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let rl = ty + 16u * i;
    acc[i] *= ${rowScale};
  }

  // Intra-chunk term, one 64 x ${block} block of positions at a time: W = mask(U V^T) * decay, then acc += W Z.
  let kbEnd = ${lower ? "min(r0 + TR, clen)" : "clen"};
  for (var kb = ${lower ? "0u" : "r0"}; kb < kbEnd; kb += TB) {
    if (li < TB) {
      var ck = 0.0;
      var dk = 0.0;
      if (kb + li < clen) {
        ck = cs_at(base + kb + li);
        dk = delta_at(base + kb + li);
      }
      sKCs[li] = ck;
      sKD[li] = dk;
    }
    // zeroed by assignment each block: a loop-local declaration may be hoisted and initialised only once
    var wacc: array<${wvec}, 4>;
    for (var i = 0u; i < 4u; i++) { wacc[i] = ${wvec}(); }
    for (var k0 = 0u; k0 < kdim; k0 += TK) {
      load_rows(b, t0, r0, clen, k0, li);
      for (var e = li; e < TK * TB; e += 256u) {
        let pos = e / TK;
        let kk = e % TK;
        var vv = 0.0;
        if (kb + pos < clen && k0 + kk < kdim) { vv = ld_v(b, t0 + kb + pos, k0 + kk); }
        sB[kk * SBS + pos] = vv;
      }
      workgroupBarrier();
      for (var kk = 0u; kk < TK; kk++) {
        let a = vec4<f32>(sA[ty * TK + kk], sA[(ty + 16u) * TK + kk], sA[(ty + 32u) * TK + kk], sA[(ty + 48u) * TK + kk]);
        let bv = ${wvec}(${wcols});
        ${wsum}
      }
      workgroupBarrier();
    }
    // Mask before exp: only exponents <= 0 are ever evaluated.
    for (var i = 0u; i < 4u; i++) {
      let rl = ty + 16u * i;
      let row = r0 + rl;
      let cr = sRowCs[rl];
      for (var j = 0u; j < ${wj}u; j++) {
        let pl = tx + 16u * j;
        let k = kb + pl;
        var val = 0.0;
        if (row < clen && k < clen && ${lower ? "k <= row" : "k >= row"}) { val = wacc[i][j] * ${decay}; }
        sW[rl * TB + pl] = val;
      }
    }
    workgroupBarrier();
    let kbLen = min(TB, clen - kb);
    for (var z0 = 0u; z0 < kbLen; z0 += TK) {
      for (var e = li; e < TK * TC; e += 256u) {
        let kk = e / TC;
        let gc = col0 + e % TC;
        let k = kb + z0 + kk;
        var zv = 0.0;
        if (k < clen && gc < ncols) { zv = ld_z(b, t0 + k, gc); }
        sZ[e] = zv;
      }
      workgroupBarrier();
      for (var kk = 0u; kk < TK; kk++) {
        let q = z0 + kk;
        let a = vec4<f32>(sW[ty * TB + q], sW[(ty + 16u) * TB + q], sW[(ty + 32u) * TB + q], sW[(ty + 48u) * TB + q]);
        let bv = vec4<f32>(sZ[kk * TC + tx], sZ[kk * TC + tx + 16u], sZ[kk * TC + tx + 32u], sZ[kk * TC + tx + 48u]);
        acc[0] += a.x * bv;
        acc[1] += a.y * bv;
        acc[2] += a.z * bv;
        acc[3] += a.w * bv;
      }
      workgroupBarrier();
    }
  }
${rowsEpilogue(v, "sRowD[rl]", rowSums)}
}
`;
}

// ---- the `sgm` row products: the three products on the matrix units ------------------------------------------

/** Most columns of U (the dot-product length: N for `y` and `dx`, P for `dB` and `dC`) the `sgm` tiling takes. */
export const SSD_SGM_MAX_DIM = SSD_TILE;
/** Subgroups of an `sgm` workgroup: 4 row strips of 16 x 2 column halves of 32. */
const SGM_ROWS_SUBGROUPS = 8;
const SGM_ROWS_THREADS = SGM_ROWS_SUBGROUPS * SGM_SUBGROUP;
/** Row stride (halves) of the staged 64-wide f16 tiles: 16-byte aligned fragment rows, 8 halves of padding. */
const SGM_TILE_STRIDE = SSD_TILE + 8;
/** Row stride (floats) of the f32 scratch: 16-byte aligned rows, 4 floats of padding. */
const SGM_SCRATCH_STRIDE = SSD_TILE + 4;

/** A workgroup array of the `sgm` kernels: name, element type and length. */
type SharedArray = [name: string, type: "f16" | "f32", length: number];

/**
 * The `sgm` kernels' workgroup memory: two f16 tiles (`sA`: U, then V, then the masked W; `sB`: the state tile,
 * then Z), the f32 scratch the subgroups store results to for the threads, and the cs and delta of the tile's rows
 * and of the block's positions. Each f16 tile holds 64 rows of up to 64 halves (U and V at their own stride).
 */
function sgmRowsArrays(): SharedArray[] {
  return [
    ["sA", "f16", SSD_TILE * SGM_TILE_STRIDE],
    ["sB", "f16", SSD_TILE * SGM_TILE_STRIDE],
    ["sF", "f32", SSD_TILE * SGM_SCRATCH_STRIDE],
    ["sRow", "f32", 2 * SSD_TILE],
    ["sPos", "f32", 2 * SSD_TILE],
  ];
}

function sharedBytes(arrays: SharedArray[]): number {
  return arrays.reduce((sum, [, type, n]) => sum + n * (type === "f16" ? 2 : 4), 0);
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

const SGM_LEFT = `subgroup_matrix_left<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const SGM_RIGHT = `subgroup_matrix_right<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const SGM_RESULT = `subgroup_matrix_result<f32, ${SGM_FRAG}, ${SGM_FRAG}>`;

/**
 * A barrier-free section emitted once per subgroup (`if (sg == 0u) {...} else if ...`), so that every fragment
 * load and store in it has a literal offset: Tint then proves it in bounds and skips the `if` and function
 * variable robustness otherwise wraps around each subgroup-matrix access. Subgroup `sg` owns rows
 * 16 (sg % 4) .. + 16 of the tile and columns (or positions) 32 (sg / 4) .. + 32, as two 16 x 16 fragments.
 */
function perSubgroup(indent: string, body: (strip: number, half: number) => string[]): string {
  return range(SGM_ROWS_SUBGROUPS).map((sg) =>
    `${sg ? " else " : ""}if (sg == ${sg}u) {\n${
      body(sg % 4, Math.floor(sg / 4)).map((line) => `${indent}  ${line}\n`).join("")
    }${indent}}`
  ).join("");
}

/** Offset in the scratch of fragment `j` of a subgroup's 16 x 32 block. */
function scratchAt(strip: number, half: number, j: number): number {
  return strip * SGM_FRAG * SGM_SCRATCH_STRIDE + half * 32 + j * SGM_FRAG;
}

/** WGSL staging the state tile as f16: S^T (`y`, `dx`; S is [p, n], n = k) as [col][k], read column major; S
 * (`dB`, `dC`) as [k][col]. */
function sgmStageState(transposedS: boolean): string {
  return transposedS
    ? `for (var e = li; e < TC * KD; e += ${SGM_ROWS_THREADS}u) {
    let col = e / KD;
    let k = e % KD;
    var sv = 0.0;
    if (col0 + col < ncols && k < kdim) { sv = S[sBase + (col0 + col) * kdim + k]; }
    sB[col * KDP + k] = f16(sv);
  }`
    : `for (var e = li; e < KD * TC; e += ${SGM_ROWS_THREADS}u) {
    let k = e / TC;
    let col = e % TC;
    var sv = 0.0;
    if (col0 + col < ncols && k < kdim) { sv = S[sBase + k * ncols + col0 + col]; }
    sB[k * TS + col] = f16(sv);
  }`;
}

/**
 * The five barrier-free sections of the `sgm` kernels, each once per subgroup with literal offsets
 * ({@linkcode perSubgroup}): `inter` (U's fragments, then U S^(T) into the scratch), `reload` (the scaled
 * inter-chunk term back into the accumulators), `wBlock` (W = U V^T into the scratch; V staged [position][k],
 * read column major), `wz` (acc += W Z) and `store` (the accumulators to the scratch for the epilogue).
 */
function sgmSections(
  transposedS: boolean,
  kf: number,
): { inter: string; reload: string; wBlock: string; wz: string; store: string } {
  const kdp = kf * SGM_FRAG + 8, ts = SGM_TILE_STRIDE, fs = SGM_SCRATCH_STRIDE;
  const sFrag = (i: number, col: number) =>
    transposedS
      ? `subgroupMatrixLoad<${SGM_RIGHT}, col_major>(&sB, ${col * kdp + i * SGM_FRAG}u, ${kdp}u)`
      : `subgroupMatrixLoad<${SGM_RIGHT}, row_major>(&sB, ${i * SGM_FRAG * ts + col}u, ${ts}u)`;

  const inter = perSubgroup("  ", (strip, half) => [
    ...range(kf).map((i) =>
      `u${i} = subgroupMatrixLoad<${SGM_LEFT}, row_major>(&sA, ${
        strip * SGM_FRAG * kdp + i * SGM_FRAG
      }u, ${kdp}u);`
    ),
    ...range(2).flatMap((j) => [
      `acc${j} = ${SGM_RESULT}();`,
      ...range(kf).map((i) =>
        `acc${j} = subgroupMatrixMultiplyAccumulate(u${i}, ${sFrag(i, half * 32 + j * 16)}, acc${j});`
      ),
      `subgroupMatrixStore<row_major>(&sF, ${scratchAt(strip, half, j)}u, acc${j}, ${fs}u);`,
    ]),
  ]);
  const reload = perSubgroup(
    "  ",
    (strip, half) =>
      range(2).map((j) =>
        `acc${j} = subgroupMatrixLoad<${SGM_RESULT}, row_major>(&sF, ${scratchAt(strip, half, j)}u, ${fs}u);`
      ),
  );
  const wBlock = perSubgroup("    ", (strip, half) =>
    range(2).flatMap((j) => [
      `{`,
      `  var w = ${SGM_RESULT}();`,
      ...range(kf).map((i) =>
        `  w = subgroupMatrixMultiplyAccumulate(u${i}, subgroupMatrixLoad<${SGM_RIGHT}, col_major>(&sA, ${
          (half * 32 + j * 16) * kdp + i * SGM_FRAG
        }u, ${kdp}u), w);`
      ),
      `  subgroupMatrixStore<row_major>(&sF, ${scratchAt(strip, half, j)}u, w, ${fs}u);`,
      `}`,
    ]));
  const wz = perSubgroup("    ", (strip, half) =>
    range(SSD_TILE / SGM_FRAG).flatMap((q) => [
      `{`,
      `  let wq = subgroupMatrixLoad<${SGM_LEFT}, row_major>(&sA, ${
        strip * SGM_FRAG * ts + q * SGM_FRAG
      }u, ${ts}u);`,
      ...range(2).map((j) =>
        `  acc${j} = subgroupMatrixMultiplyAccumulate(wq, subgroupMatrixLoad<${SGM_RIGHT}, row_major>(&sB, ${
          q * SGM_FRAG * ts + half * 32 + j * 16
        }u, ${ts}u), acc${j});`
      ),
      `}`,
    ]));
  const store = perSubgroup(
    "  ",
    (strip, half) =>
      range(2).map((j) =>
        `subgroupMatrixStore<row_major>(&sF, ${scratchAt(strip, half, j)}u, acc${j}, ${fs}u);`
      ),
  );
  return { inter, reload, wBlock, wz, store };
}

/**
 * The `sgm` row products (see {@linkcode SsdRowsVariant} for what each computes). One workgroup of 8 subgroups
 * per 64 x 64 output tile, as the other tilings; U's dim is padded to `16 kf` (zeros), Z's columns and the chunk's
 * positions to the 64-wide tile. Per workgroup:
 * 1. U's rows and the state tile are staged as f16; each subgroup loads its U rows into `kf` left fragments, kept
 *    for every block, and computes its part of U S^(T) into the scratch;
 * 2. threads scale the scratch's rows by rowScale (exp(cs_r) or exp(T - cs_r), in f32: an f16 U scaled first could
 *    underflow), and the subgroups load it back as their accumulators;
 * 3. per 64-position block: V and Z are staged; W = U V^T goes through the scratch, where threads apply the
 *    causal mask and the decay (exp only of exponents <= 0) and store W as f16; the subgroups add W Z;
 * 4. the accumulators go through the scratch once more and threads write the outputs and row partials exactly as
 *    {@linkcode rowsEpilogue} does, 8 threads a row (8 columns each, whose partial sums meet by shuffles).
 * Operands are f16 (x, B, C and dy are f16 values anyway when the model runs in f16; the states and W are
 * rounded), everything else f32. W = (dy . x) decay of `dB`/`dC` is as small as dy: like the official Triton
 * kernels' casts of the scores to the input dtype, it loses precision below f16's normal range (6.1e-5).
 */
/**
 * WGSL: cs and delta of `n` chunk positions from `start` into `arr` ([cs x n | delta x n]), zero past the chunk.
 */
function sgmStageCsDelta(arr: string, n: string, start: string): string {
  return `if (li < ${n}) {
    var c = 0.0;
    var dl = 0.0;
    if (${start} + li < clen) {
      c = cs_at(base + ${start} + li);
      dl = delta_at(base + ${start} + li);
    }
    ${arr}[li] = c;
    ${arr}[${n} + li] = dl;
  }`;
}

/**
 * WGSL: `n` rows from chunk position `start` of the operand `load` reads ([row][k], k < kdim), as f16 into `arr`
 * at row stride KDP; zero past the chunk and past kdim.
 */
function sgmStageRowsF16(arr: string, n: string, start: string, load: string): string {
  return `for (var e = li; e < ${n} * KD; e += ${SGM_ROWS_THREADS}u) {
    let r = e / KD;
    let k = e % KD;
    var v = 0.0;
    if (${start} + r < clen && k < kdim) { v = ${load}(b, t0 + ${start} + r, k); }
    ${arr}[r * KDP + k] = f16(v);
  }`;
}

function rowsCodeSgm(v: SsdRowsVariant, kf: number): string {
  const lower = v === "y" || v === "dC";
  const transposedS = v === "y" || v === "dx";
  const rowScale = lower ? "exp(sRow[r])" : "exp(T - sRow[r])";
  const decay = lower ? "exp(cr - sPos[p]) * sPos[TB + p]" : "exp(sPos[p] - cr)";
  const { inter, reload, wBlock, wz, store } = sgmSections(transposedS, kf);
  const kd = kf * SGM_FRAG;

  return `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
${rowsHeader(v)}
const TR = ${SSD_TILE}u;
const TC = ${SSD_TILE}u;
const TB = ${SSD_TILE}u;
// U's dim as staged (a multiple of 16, zeros past the operand's dim) and the row stride of U and V
const KD = ${kd}u;
const KDP = ${kd + 8}u;
const TS = ${SGM_TILE_STRIDE}u;
const FS = ${SGM_SCRATCH_STRIDE}u;
${sgmRowsArrays().map(([name, type, n]) => `var<workgroup> ${name}: array<${type}, ${n}>;`).join("\n")}

@compute @workgroup_size(${SGM_ROWS_THREADS})
fn main(${ENTRY_ARGS}, @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {
  ${rowsPrologue(v)}
  // the rows' cs and delta (zero past the chunk)
  ${sgmStageCsDelta("sRow", "TR", "r0")}
  // U's rows ([row][k]) and the state tile, as f16
  ${sgmStageRowsF16("sA", "TR", "r0", "ld_u")}
  ${sgmStageState(transposedS)}
  workgroupBarrier();

  // Inter-chunk term: U's fragments stay in registers for every block.
  ${range(kf).map((i) => `var u${i} = ${SGM_LEFT}();`).join("\n  ")}
  var acc0 = ${SGM_RESULT}();
  var acc1 = ${SGM_RESULT}();
  ${inter}
  workgroupBarrier();
  {
    let r = li / 4u;
    let scale = ${rowScale};
    for (var i = 0u; i < 16u; i++) {
      let at = r * FS + li % 4u + 4u * i;
      sF[at] = sF[at] * scale;
    }
  }
  workgroupBarrier();
  ${reload}

  // Intra-chunk term, one 64 x 64 block of positions at a time: W = mask(U V^T) * decay, then acc += W Z.
  let kbEnd = ${lower ? "min(r0 + TR, clen)" : "clen"};
  for (var kb = ${lower ? "0u" : "r0"}; kb < kbEnd; kb += TB) {
    ${sgmStageCsDelta("sPos", "TB", "kb")}
    ${sgmStageRowsF16("sA", "TB", "kb", "ld_v")}
    for (var e = li; e < TB * TC; e += ${SGM_ROWS_THREADS}u) {
      let p = e / TC;
      let c = e % TC;
      var zv = 0.0;
      if (kb + p < clen && col0 + c < ncols) { zv = ld_z(b, t0 + kb + p, col0 + c); }
      sB[p * TS + c] = f16(zv);
    }
    workgroupBarrier();
    ${wBlock}
    workgroupBarrier();
    // Mask before exp: only exponents <= 0 are ever evaluated. A warp's 8 rows x 4 columns hit 32 banks.
    {
      let r = li / 4u;
      let row = r0 + r;
      let cr = sRow[r];
      for (var i = 0u; i < 16u; i++) {
        let p = li % 4u + 4u * i;
        let k = kb + p;
        var wv = 0.0;
        if (row < clen && k < clen && ${lower ? "k <= row" : "k >= row"}) { wv = sF[r * FS + p] * ${decay}; }
        sA[r * TS + p] = f16(wv);
      }
    }
    workgroupBarrier();
    ${wz}
    workgroupBarrier();
  }
  ${store}
  workgroupBarrier();
${sgmEpilogue(v)}
}
`;
}

/**
 * The `sgm` epilogue: the outputs and row partials of {@linkcode rowsEpilogue} from the scratch. Subgroup `sg`
 * takes rows 8 sg .. + 8, 8 lanes a row (rows two apart across lane groups, so a warp's scratch reads hit 32
 * banks) and 8 columns a lane, lane % 8 + 8 j (a warp reads 4 rows x 32 bytes of each global row); a row's
 * partial sums meet by three shuffles, outside any branch (they need uniform control flow).
 */
function sgmEpilogue(v: SsdRowsVariant): string {
  const body = v === "y" ? `O[oi] = a + dh * ld_z(b, t, gc);` : v === "dx"
    ? `let dyv = ld_z(b, t, gc);
          let xv = ld_e(b, t, gc);
          O[oi] = sRow[TR + rl] * a + dh * dyv;
          s0 += xv * a;
          s1 += xv * dyv;`
    : v === "dB"
    ? `let g = sRow[TR + rl] * a;
          O[oi] = g;
          s0 -= ld_e(b, t, gc) * g;`
    : `O[oi] = a;
          s0 += ld_e(b, t, gc) * a;`;
  const sums = v === "y" ? [] : v === "dx" ? ["s0", "s1"] : ["s0"];
  const reduce = sums.flatMap((s) => [1, 2, 4].map((m) => `${s} += subgroupShuffleXor(${s}, ${m}u);`));
  const write = v === "y" ? "" : `
    if (lane % 8u == 0u && row < clen) {
      R[rp(${ROW_SLOTS[v]}, b, h, t, ct)] = s0;
      ${v === "dx" ? "R[rp(1u, b, h, t, ct)] = s1;" : ""}
    }`;
  return `  let dh = d_of(h);
  for (var i = 0u; i < 2u; i++) {
    let rl = 8u * sg + 2u * (lane / 8u) + i;
    let row = r0 + rl;
    let t = t0 + row;
    ${sums.map((s) => `var ${s} = 0.0;`).join("\n    ")}
    if (row < clen) {
      for (var j = 0u; j < 8u; j++) {
        let c = lane % 8u + 8u * j;
        let gc = col0 + c;
        if (gc < ncols) {
          let oi = d.o_off + (b * d.seqlen + t) * d.o_stride + h * ncols + gc;
          let a = sF[rl * FS + c];
          ${body}
        }
      }
    }
    ${reduce.join("\n    ")}${write}
  }`;
}

function rowsCode(v: SsdRowsVariant, tiling: SsdRowsTiling, kf: number): string {
  if (tiling === "sgm") return rowsCodeSgm(v, kf);
  return tiling === "wide" ? rowsCodeWide(v) : rowsCodeNarrow(v);
}

/**
 * One of the four row products (see {@linkcode SsdRowsVariant}). `U`, `V`, `Z` (and `E`, the operand of the
 * epilogue: x for `dx`, B for `dB`, C for `dC`; unused for `y`, whose skip term reads Z = x) are grouped
 * operands; `U` and `V` share a dim (the dot-product length), `Z` and `E` have the output's dim. `out` is written
 * per head h: `out.offset + (b L + t) out.stride + h Z.dim + col`. `tiling` picks the workgroup memory footprint
 * ({@linkcode SsdRowsTiling}; `wide` and `narrow` give the same results up to f32 summation order, `sgm` rounds
 * the operands to f16); each tiling has its own kernel key, and `sgm` one per U dim rounded up to 16 (at most
 * {@linkcode SSD_SGM_MAX_DIM}; needs a device with subgroup matrices: {@linkcode ssdRowsSgmApplies}).
 * Bindings: U, V, Z, S [B, nc, H, P, N], csd, [E], out (rw), [row partials (rw) [4, B, L, H, CT]].
 */
export function ssdChunkRows(
  variant: SsdRowsVariant,
  s: SsdShape,
  U: SsdOperand,
  V: SsdOperand,
  Z: SsdOperand,
  E: SsdOperand | null,
  out: SsdOutputLayout,
  tiling: SsdRowsTiling = "wide",
): Launch {
  if (U.dim !== V.dim) throw new Error(`ssdChunkRows: U dim ${U.dim} != V dim ${V.dim}`);
  if (tiling === "sgm" && !(U.dim >= 1 && U.dim <= SSD_SGM_MAX_DIM)) {
    throw new Error(`ssdChunkRows: the sgm tiling takes U dims up to ${SSD_SGM_MAX_DIM}, found ${U.dim}`);
  }
  const hasE = variant !== "y";
  // the sgm kernels are specialised to U's fragments along k
  const kf = ceilDiv(U.dim, SGM_FRAG);
  const suffix = tiling === "wide" ? "" : tiling === "sgm" ? `_sgm_k${kf * SGM_FRAG}` : `_${tiling}`;
  const spec = cachedSpec(`ssd_rows_${variant}${suffix}`, () => ({
    bindings: hasE
      ? ["read", "read", "read", "read", "read", "read", "rw", "rw"]
      : ["read", "read", "read", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: rowsCode(variant, tiling, kf),
  }));
  const colTiles = ceilDiv(Z.dim, SSD_TILE);
  const rowTiles = ceilDiv(s.chunk, SSD_TILE);
  return {
    spec,
    uniforms: packDims(s, {
      ...operandFields("u", U),
      ...operandFields("v", V),
      ...operandFields("z", Z),
      ...(E ? operandFields("e", E) : {}),
      o_off: out.offset,
      o_stride: out.stride,
      row_tiles: rowTiles,
      tiles_a: colTiles,
    }),
    workgroups: grid2d(colTiles * rowTiles * s.heads * ssdChunks(s) * s.batch),
  };
}

// ---- backward: the reverse pass over chunks ---------------------------------------------------------------

/**
 * Reverse of {@linkcode ssdStatePass}, in place over `ds`: on entry the local gradients dSin_c from the chunk
 * outputs, on exit d states_c = G_{c+1} with G_{nc} = dS_final and G_c = dSin_c + exp(T_c) G_{c+1}; dS_init = G_0.
 * One thread per (b, h, p, n) and no barriers: the decay gradients dT_c = <G_{c+1}, Sin_{c+1}> read only what
 * this pass leaves in `ds`, so {@linkcode ssdStateDecayGrad} reduces them afterwards, for all chunks at once
 * (a tree reduction per chunk inside this sequential loop cost 8 barriers a step).
 * Bindings: ds (rw), dfinal (any read buffer when absent), csd, dinit (rw; a scratch buffer when absent).
 */
export function ssdStatePassBackward(s: SsdShape, hasInit: boolean, hasFinalGrad: boolean): Launch {
  const spec = cachedSpec("ssd_state_pass_bwd", () => ({
    bindings: ["rw", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read_write> ds: array<f32>;
@group(0) @binding(1) var<storage, read> dfin: array<f32>;
@group(0) @binding(2) var<storage, read> csd: array<f32>;
@group(0) @binding(3) var<storage, read_write> dinit: array<f32>;
@group(0) @binding(4) var<uniform> d: Dims;
${CSD_HELPERS}
@compute @workgroup_size(${SSD_STATE_BLOCK})
fn main(${ENTRY_ARGS}) {
  ${WG_INDEX}
  let eb = w % d.e_blocks;
  let bh = w / d.e_blocks;
  let pn = d.dim_p * d.dim_n;
  let e = eb * ${SSD_STATE_BLOCK}u + li;
  if (bh >= d.batch * d.heads || e >= pn) { return; }
  let h = bh % d.heads;
  let b = bh / d.heads;
  var g = 0.0;
  if ((d.flags & ${SSD_FLAG.finalGrad}u) != 0u) { g = dfin[bh * pn + e]; }
  for (var ci = 0u; ci < d.nchunks; ci++) {
    let c = d.nchunks - 1u - ci;
    let idx = ((b * d.nchunks + c) * d.heads + h) * pn + e;
    let local = ds[idx];
    ds[idx] = g;
    let last = min(d.seqlen, (c + 1u) * d.chunk) - 1u;
    g = local + exp(cs_at(bh * d.seqlen + last)) * g;
  }
  if ((d.flags & ${SSD_FLAG.initialState}u) != 0u) { dinit[bh * pn + e] = g; }
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, {
      flags: (hasInit ? SSD_FLAG.initialState : 0) | (hasFinalGrad ? SSD_FLAG.finalGrad : 0),
    }),
    workgroups: grid2d(ceilDiv(s.dimP * s.dimN, SSD_STATE_BLOCK) * s.batch * s.heads),
  };
}

/**
 * After {@linkcode ssdStatePassBackward}: dT_c = <G_{c+1}, Sin_{c+1}> (G_{c+1} is what that pass left in `ds` for
 * chunk c; Sin_{nc} is the final state) into dT [B, H, nc], one workgroup per (b, h, chunk), each thread summing
 * every 256th element before the tree sum (a workgroup per 256 elements ran 65,536 workgroups of 8 barriers each at
 * the 1B shape, 5x slower than the reads). Bindings: ds, Sin (the forward's states buffer), final (read), dT (rw).
 */
export function ssdStateDecayGrad(s: SsdShape): Launch {
  const spec = cachedSpec("ssd_state_decay_grad", () => ({
    bindings: ["read", "read", "read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> ds: array<f32>;
@group(0) @binding(1) var<storage, read> sin: array<f32>;
@group(0) @binding(2) var<storage, read> fin: array<f32>;
@group(0) @binding(3) var<storage, read_write> dT: array<f32>;
@group(0) @binding(4) var<uniform> d: Dims;
var<workgroup> red: array<f32, ${SSD_STATE_BLOCK}>;
@compute @workgroup_size(${SSD_STATE_BLOCK})
fn main(${ENTRY_ARGS}) {
  ${WG_INDEX}
  // workgroup-uniform: the whole workgroup leaves together, before any barrier
  if (w >= d.batch * d.heads * d.nchunks) { return; }
  let c = w % d.nchunks;
  let bh = w / d.nchunks;
  let h = bh % d.heads;
  let b = bh / d.heads;
  let pn = d.dim_p * d.dim_n;
  let g = ((b * d.nchunks + c) * d.heads + h) * pn;
  // the states after chunk c: the next chunk's input, or the final state
  var v = 0.0;
  if (c + 1u == d.nchunks) {
    for (var e = li; e < pn; e += ${SSD_STATE_BLOCK}u) { v += ds[g + e] * fin[bh * pn + e]; }
  } else {
    let next = g + d.heads * pn;
    for (var e = li; e < pn; e += ${SSD_STATE_BLOCK}u) { v += ds[g + e] * sin[next + e]; }
  }
  red[li] = v;
  ${treeSum(SSD_STATE_BLOCK)}
  if (li == 0u) { dT[bh * d.nchunks + c] = red[0]; }
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, {}),
    workgroups: grid2d(s.batch * s.heads * ssdChunks(s)),
  };
}

// ---- backward: decay gradients ----------------------------------------------------------------------------

/**
 * Per (b, h, chunk): dl_t = sum_{q>=t in chunk} (C.dC - B.dB)_q + dT_c (a reverse cumulative sum, two-level like
 * {@linkcode ssdChunkCumsum}), d delta_t = direct_t + A dl_t (times sigmoid(dt + dt_bias) with the fused softplus,
 * giving d dt), written to `ddt` with dt's layout; per-(b, chunk) partials of dA = sum delta dl, dD = sum x.dy and
 * d dt_bias go to the head partials [3, H, B nc]. Bindings: row partials [4, B, L, H, CT], dT, csd, dt
 * (raw; any read buffer unless `softplus`), dt_bias (likewise), ddt (rw), head partials (rw).
 */
export function ssdDecayGrad(s: SsdShape, dt: SsdDtLayout, softplus: boolean): Launch {
  const spec = cachedSpec("ssd_decay_grad", () => ({
    bindings: ["read", "read", "read", "read", "read", "rw", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> R: array<f32>;
@group(0) @binding(1) var<storage, read> dTc: array<f32>;
@group(0) @binding(2) var<storage, read> csd: array<f32>;
@group(0) @binding(3) var<storage, read> dt: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> ddt: array<f32>;
@group(0) @binding(6) var<storage, read_write> hp: array<f32>;
@group(0) @binding(7) var<uniform> d: Dims;
${CSD_HELPERS}
${WGSL_SOFTPLUS}
const NT = ${SCAN_HEADS * SCAN_SEGMENTS}u;
var<workgroup> segSum: array<f32, NT>;
var<workgroup> dTs: array<f32, ${SCAN_HEADS}>;
var<workgroup> red: array<f32, ${3 * SCAN_HEADS * SCAN_SEGMENTS}>;
fn rsum(slot: u32, b: u32, t: u32, h: u32, tiles: u32) -> f32 {
  let base = (((slot * d.batch + b) * d.seqlen + t) * d.heads + h) * d.col_tiles;
  var s = 0.0;
  for (var ct = 0u; ct < tiles; ct++) { s += R[base + ct]; }
  return s;
}
@compute @workgroup_size(${SCAN_HEADS * SCAN_SEGMENTS})
fn main(${ENTRY_ARGS}) {
  ${SCAN_PROLOGUE}
  let pTiles = (d.dim_p + ${SSD_TILE - 1}u) / ${SSD_TILE}u;
  let nTiles = (d.dim_n + ${SSD_TILE - 1}u) / ${SSD_TILE}u;
  let bh = b * d.heads + h;
  if (sg == 0u) {
    var dT = 0.0;
    if (hv) { dT = dTc[bh * d.nchunks + c]; }
    dTs[hl] = dT;
  }
  var sum = 0.0;
  if (hv) {
    for (var q = s0; q < s1; q++) { sum += rsum(2u, b, t0 + q, h, nTiles) + rsum(3u, b, t0 + q, h, nTiles); }
  }
  segSum[sg * ${SCAN_HEADS}u + hl] = sum;
  workgroupBarrier();
  var dA = 0.0;
  var dD = 0.0;
  var dBias = 0.0;
  if (hv) {
    // dl at the end of this segment: the chunk's dT plus everything after the segment
    var run = dTs[hl];
    for (var k = sg + 1u; k < ${SCAN_SEGMENTS}u; k++) { run += segSum[k * ${SCAN_HEADS}u + hl]; }
    let a = a_of(h);
    for (var q = s1; q > s0; q--) {
      let t = t0 + q - 1u;
      run += rsum(2u, b, t, h, nTiles) + rsum(3u, b, t, h, nTiles);
      var dd = rsum(0u, b, t, h, pTiles) + a * run;
      dA += run * delta_at(bh * d.seqlen + t);
      dD += rsum(1u, b, t, h, pTiles);
      let di = d.dt_off + (b * d.seqlen + t) * d.dt_stride + h;
      if ((d.flags & ${SSD_FLAG.dtSoftplus}u) != 0u) {
        dd *= sigmoid(dt[di] + bias[h]);
        dBias += dd;
      }
      ddt[di] = dd;
    }
  }
  red[li] = dA;
  red[NT + li] = dD;
  red[2u * NT + li] = dBias;
  workgroupBarrier();
  if (sg == 0u && hv) {
    var s = vec3<f32>();
    for (var k = 0u; k < ${SCAN_SEGMENTS}u; k++) {
      let i = k * ${SCAN_HEADS}u + hl;
      s += vec3<f32>(red[i], red[NT + i], red[2u * NT + i]);
    }
    let bc = b * d.nchunks + c;
    let nbc = d.batch * d.nchunks;
    hp[h * nbc + bc] = s.x;
    hp[(d.heads + h) * nbc + bc] = s.y;
    hp[(2u * d.heads + h) * nbc + bc] = s.z;
  }
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, {
      dt_off: dt.offset,
      dt_stride: dt.stride,
      flags: softplus ? SSD_FLAG.dtSoftplus : 0,
      tiles_a: ceilDiv(s.heads, SCAN_HEADS),
    }),
    workgroups: scanWorkgroups(s),
  };
}

/**
 * Sums the head partials [3, H, B nc] into dA [H], dD [H] and d dt_bias [H] (one workgroup per (which, h)).
 * Bindings: head partials, dA (rw), dD (rw), d dt_bias (rw; a scratch buffer when `softplus` is false).
 */
export function ssdHeadReduce(s: SsdShape, softplus: boolean): Launch {
  const spec = cachedSpec("ssd_head_reduce", () => ({
    bindings: ["read", "rw", "rw", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> hp: array<f32>;
@group(0) @binding(1) var<storage, read_write> dA: array<f32>;
@group(0) @binding(2) var<storage, read_write> dD: array<f32>;
@group(0) @binding(3) var<storage, read_write> dBias: array<f32>;
@group(0) @binding(4) var<uniform> d: Dims;
var<workgroup> red: array<f32, 256>;
@compute @workgroup_size(256)
fn main(${ENTRY_ARGS}) {
  ${WG_INDEX}
  let h = w % d.heads;
  let which = w / d.heads;
  if (which >= 3u) { return; }
  let n = d.batch * d.nchunks;
  var s = 0.0;
  for (var i = li; i < n; i += 256u) { s += hp[(which * d.heads + h) * n + i]; }
  red[li] = s;
  ${treeSum(256)}
  if (li == 0u) {
    if (which == 0u) { dA[h] = red[0]; }
    else if (which == 1u) { dD[h] = red[0]; }
    else if ((d.flags & ${SSD_FLAG.dtSoftplus}u) != 0u) { dBias[h] = red[0]; }
  }
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, { flags: softplus ? SSD_FLAG.dtSoftplus : 0 }),
    workgroups: grid2d(3 * s.heads),
  };
}

/**
 * Sums per-head gradients [B, L, H, dim] over the heads of each group into a grouped gradient written with the
 * operand's layout (`out.offset + (b L + t) out.stride + g dim + k`). Bindings: per-head (read), out (rw).
 */
export function ssdGroupSum(s: SsdShape, groups: number, dim: number, out: SsdOutputLayout): Launch {
  const spec = cachedSpec("ssd_group_sum", () => ({
    bindings: ["read", "rw"],
    uniformBytes: DIMS_BYTES,
    code: `${DIMS_STRUCT}
@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read_write> O: array<f32>;
@group(0) @binding(2) var<uniform> d: Dims;
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(${ENTRY_ARGS}) {
  let i = (wid.y * nwg.x + wid.x) * ${LINEAR_WORKGROUP}u + li;
  let k = i % d.u_dim;
  let r = i / d.u_dim;
  let gi = r % d.u_heads;
  let bt = r / d.u_heads;
  if (bt >= d.batch * d.seqlen) { return; }
  let rep = d.heads / d.u_heads;
  var s = 0.0;
  for (var j = 0u; j < rep; j++) { s += g[(bt * d.heads + gi * rep + j) * d.u_dim + k]; }
  O[d.o_off + bt * d.o_stride + gi * d.u_dim + k] = s;
}
`,
  }));
  return {
    spec,
    uniforms: packDims(s, { u_heads: groups, u_dim: dim, o_off: out.offset, o_stride: out.stride }),
    workgroups: grid2d(ceilDiv(s.batch * s.seqlen * groups * dim, LINEAR_WORKGROUP)),
  };
}
