/**
 * Causal GQA attention forward on the matrix units (Dawn's `chromium-experimental-subgroup-matrix`: tensor cores
 * on NVIDIA), for f16 q, k, v with f32 softmax statistics and accumulation. Same layouts, packed rows and outputs
 * (o, and the natural-log `lse` the backward kernels read) as `attention.ts`, whose kernels stay the portable path
 * and the one for sliding windows, decoding offsets and head dims the tiles below do not fit.
 *
 * Why: on the H200 the FMA forward ran at about 10 TFLOP/s, 162 ms of a 1,162 ms 1B-shape distill step
 * (BENCHMARKS.md); the QK^T and PV products are exactly what the matrix units do.
 *
 * One workgroup per (block of 64 packed rows, batch * kv head): 4 subgroups of 32, each owning 16 rows.
 * - Q's 64 x hd block is staged once through workgroup memory into hd/16 left fragments per subgroup, kept in
 *   registers for the whole key loop.
 * - Per key tile of BC keys: all threads stage K and V (16-byte loads, zero past the sequence); each subgroup
 *   computes its 16 x BC scores as BC/16 result fragments and stores them (f32) to workgroup memory; then the two
 *   threads of each row (lanes 2r, 2r+1 of the row's subgroup, combined with one shuffle) apply scale and causal
 *   mask, update the running max m and sum l (online softmax), and write P = exp(s - m) as f16; each subgroup
 *   multiplies its P rows by V (result fragments, stored f32 again), and the two threads of each row fold that
 *   into the output they hold in registers: O = O * exp(m_old - m_new) + P V. WGSL gives no per-row access to a
 *   result fragment, which is why O lives in threads and P V makes a trip through workgroup memory.
 * - Row blocks are walked longest first (the causal last blocks see the most keys), so the tail of the dispatch is
 *   short blocks.
 *
 * Workgroup memory: K and V tiles (BC x (hd + 8) halves each; Q is staged in the same space before the loop),
 * P (64 x (BC + 8) halves) and one f32 scratch of 64 x (max(BC, chunk) + 4) for scores and P V, where P V runs
 * in column chunks (the widest multiple of 16 up to 64 dividing hd), so hd 128 fits with BC = 32.
 *
 * Each generator has a `constOffsets` form ({@linkcode SGM_ATTN_CONST_OFFSETS}): the fragment sections between
 * barriers are emitted once per subgroup, so that every fragment load and store on workgroup memory has a literal
 * offset that Tint's robustness pass need not guard ({@linkcode perSubgroup}).
 *
 * @module
 */
import { cachedSpec, ceilDiv, type KernelSpec, Uniforms } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import type { AttentionShape } from "./attention.ts";
import { SGM_FRAG, SGM_SUBGROUP } from "./matmul_subgroup_matrix.ts";

/** Packed rows per workgroup: 4 subgroups of 16 rows. */
export const SGM_ATTN_ROWS = 64;
const SUBGROUPS = SGM_ATTN_ROWS / SGM_FRAG;
const THREADS = SUBGROUPS * SGM_SUBGROUP;
/** Halves of padding after each staged row (16-byte aligned fragment rows, fewer bank conflicts). */
const PAD = 8;
/** Widest column chunk of one P V pass. */
const PV_CHUNK = 64;

/**
 * Default of the generators' `constOffsets` parameter (forward, dQ, dK/dV and their WGSL getters): false emits
 * each fragment section once over the runtime `subgroup_id`, true once per subgroup with literal offsets
 * ({@linkcode perSubgroup}). The two forms are distinct kernels (cache keys end in `_k` for the second). On the
 * H200 (ms of a 1B training step, A/B in one call): forward 11.7 -> 11.3, dQ 17.2 -> 14.2, dK/dV 32.0 -> 31.1.
 */
export const SGM_ATTN_CONST_OFFSETS = true;

/** The entry point's signature, shared by the three kernels. */
const MAIN = `@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {`;

/**
 * Every elementwise step runs two threads per row of a subgroup's 16-row block: lanes 2r and 2r+1 hold row r
 * (a query row, or a key in the dK/dV kernel), half of its columns each (`hh`, {@linkcode scoreStep}).
 */
const THREAD_ROW = `let r = sg * ${SGM_FRAG}u + lane / 2u;
  let hh = lane & 1u;`;

/**
 * Which scores of its row a thread takes in its elementwise steps: step `i` reads (and writes P or dS at) column
 * `c0 + scoreStep(i)`, with `c0` from {@linkcode scoreStart}. The scratch's rows are 4 mod 32 words apart (16-byte
 * aligned fragment rows), so when each of the two threads of a row takes a contiguous half, the 32 lanes of a
 * step read 8 banks (4-way conflicts); `alternate` columns spread them over 16. A/B on the H200 in one call (ms of
 * a 1B training step, addresses as a per-thread base plus these constants): forward 11.7 with halves against
 * 13.4 alternating, dQ 17.8 against 17.0; dK/dV 33.4 against 31.5-32.0 (other calls). So the forward takes
 * halves and the backward kernels alternate. (Shifting rows 8-15 by a word as well, conflict-free, needs a wrap
 * per step and measured slower still.)
 */
function scoreStep(i: number, alternate: boolean): string {
  return `${alternate ? 2 * i : i}u`;
}

/** The thread's first score column (WGSL): `hh` alternating, else the start of its half of `n` columns. */
function scoreStart(n: number, alternate: boolean): string {
  return alternate ? "hh" : `hh * ${n / 2}u`;
}

/** A workgroup array of a kernel: name, element type and length. */
type SharedArray = [name: string, type: "f16" | "f32", length: number];

/** WGSL declarations of workgroup arrays. */
function declare(arrays: SharedArray[]): string {
  return arrays.map(([name, type, n]) => `var<workgroup> ${name}: array<${type}, ${n}>;`).join("\n");
}

/** Their bytes. */
function sharedBytes(arrays: SharedArray[]): number {
  return arrays.reduce((sum, [, type, n]) => sum + n * (type === "f16" ? 2 : 4), 0);
}

/**
 * The row-block kernels' (forward, dQ) workgroup memory: K and V tiles (Q staged there first), P, and the f32
 * scratch for scores and products.
 */
function rowBlockArrays(hd: number, bc: number): SharedArray[] {
  const hdp = hd + PAD;
  return [
    ["KV", "f16", Math.max(2 * bc * hdp, SGM_ATTN_ROWS * hdp)],
    ["PS", "f16", SGM_ATTN_ROWS * (bc + PAD)],
    ["SS", "f32", SGM_ATTN_ROWS * scratchStride(hd, bc)],
  ];
}

/** Bytes of workgroup memory the kernel needs for head dim `hd` and key tile `bc`. */
export function sgmAttentionSharedBytes(hd: number, bc: number): number {
  return sharedBytes(rowBlockArrays(hd, bc));
}

/** Columns of one P V pass: the widest multiple of 16 up to 64 that divides hd. */
function pvChunk(hd: number): number {
  for (let c = Math.min(hd, PV_CHUNK); c >= SGM_FRAG; c -= SGM_FRAG) if (hd % c === 0) return c;
  throw new Error(`subgroup-matrix attention: hd ${hd} is not a multiple of ${SGM_FRAG}`);
}

function scratchStride(hd: number, bc: number): number {
  return Math.max(bc, pvChunk(hd)) + 4;
}

/**
 * The key tile for a head dim under a workgroup-memory limit (64 keys when they fit, else 32), or 0 when the
 * kernel does not apply: hd must be a multiple of 16 up to 128.
 */
export function chooseSgmAttentionKeyTile(hd: number, limitBytes: number): number {
  if (hd % SGM_FRAG !== 0 || hd > 128 || hd <= 0) return 0;
  for (const bc of [64, 32]) if (sgmAttentionSharedBytes(hd, bc) <= limitBytes) return bc;
  return 0;
}

/**
 * Whether an attention call is one this kernel runs: f16, training/prefill geometry (queries at positions 0..T-1
 * over their own T keys), no sliding window, and a head dim with a key tile.
 */
export function sgmAttentionApplies(s: AttentionShape, limitBytes: number): boolean {
  return s.qoff === 0 && s.kvLen === s.T && s.window === 0 && s.H % s.Hkv === 0 &&
    chooseSgmAttentionKeyTile(s.hd, limitBytes) > 0;
}

/** Suffix of a kernel's cache key for its form: `_k` with constant fragment offsets. */
function formKey(constOffsets: boolean): string {
  return constOffsets ? "_k" : "";
}

function sgmAttentionSpec(hd: number, bc: number, constOffsets: boolean): KernelSpec {
  return cachedSpec(`attn_sgm_fwd_f16_hd${hd}_bc${bc}${formKey(constOffsets)}`, () => ({
    bindings: ["read", "read", "read", "rw", "rw"],
    uniformBytes: 48,
    code: sgmAttentionWgsl(hd, bc, constOffsets),
  }));
}

/**
 * The forward dispatch. Bindings: q, k, v (f16, read; 16-byte aligned rows: hd a multiple of 8), o (f16, rw),
 * lse (f32, rw). Throws when {@linkcode sgmAttentionApplies} does not hold for `bc`. `constOffsets`: which form
 * ({@linkcode SGM_ATTN_CONST_OFFSETS}).
 */
export function attentionForwardSgm(
  s: AttentionShape,
  bc: number,
  constOffsets: boolean = SGM_ATTN_CONST_OFFSETS,
): Launch {
  checkSgmShape(s, bc);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), SGM_ATTN_ROWS);
  return {
    spec: sgmAttentionSpec(s.hd, bc, constOffsets),
    uniforms: sgmUniforms(s, rowBlocks),
    workgroups: [rowBlocks, s.B * s.Hkv],
  };
}

function checkSgmShape(s: AttentionShape, bc: number): void {
  if (s.qoff !== 0 || s.kvLen !== s.T || s.window !== 0) {
    throw new Error("subgroup-matrix attention: only causal self-attention over 0..T-1 without a window");
  }
  if (s.hd % SGM_FRAG || s.hd > 128 || (bc !== 32 && bc !== 64) || s.H % s.Hkv) {
    throw new Error(
      `subgroup-matrix attention: hd ${s.hd} (multiple of 16 up to 128), key tile ${bc} (32, 64)`,
    );
  }
}

/**
 * WGSL shared by the row-block kernels (forward, dQ): the block this workgroup takes (longest first: the causal
 * last blocks see the most keys), its batch and kv head, and how many key tiles its rows can see.
 */
function rowBlockStart(hd: number, bc: number): string {
  return `let block = p.row_blocks - 1u - wid.x;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let R0 = block * ${SGM_ATTN_ROWS}u;
  let rLast = min(R0 + ${SGM_ATTN_ROWS - 1}u, p.rows - 1u);
  let ntiles = min(rLast / p.G / ${bc}u + 1u, (p.kv_len + ${bc - 1}u) / ${bc}u);
  let kvBase = b * p.kv_bstride + hk * ${hd}u;`;
}

const LEFT = `subgroup_matrix_left<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const RIGHT = `subgroup_matrix_right<f16, ${SGM_FRAG}, ${SGM_FRAG}>`;
const RESULT = `subgroup_matrix_result<f32, ${SGM_FRAG}, ${SGM_FRAG}>`;

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

/**
 * The subgroup whose copy of a fragment section is being emitted ({@linkcode perSubgroup}), or null for the one
 * copy over the runtime `sg`.
 */
type Sg = number | null;

/**
 * Element offset of the subgroup's first row in a workgroup array of row stride `stride` (16 rows per subgroup):
 * `runtime` (WGSL in `sg`, or a let of the kernel holding it) for the runtime copy, else subgroup `sgi`'s as a
 * literal.
 */
function rowAt(sgi: Sg, stride: number, runtime: string): string {
  return sgi === null ? runtime : `${sgi * SGM_FRAG * stride}u`;
}

/** WGSL comment where the runtime form declares its row offsets (`srow`, `prow`, `trow`). */
const PER_SUBGROUP_NOTE = "// fragment row offsets: literals in per-subgroup copies (constOffsets)";

/**
 * A section of fragment loads, products and stores, `body(sgi)`: once over the runtime `sg` (`sgi` null), or with
 * `constOffsets` once per subgroup, chosen by `if (sg == 0u) {...} else if (sg == 1u) {...} else {...}` (the
 * interpreter has no `switch`), each copy's workgroup-memory offsets literals ({@linkcode rowAt}).
 *
 * Why: with robustness on, Tint wraps every `subgroupMatrixLoad` / `subgroupMatrixStore` whose offset is not a
 * compile-time constant in a bounds predicate (`if (offset + (major - 1) * stride + minor <= arrayLength)`, the
 * load going through a function variable); it skips that only when the array length, offset and stride all fold
 * to constants, e.g. `0u + 4608u + 16u`. Loads from the storage bindings (runtime-sized) stay guarded either way.
 * The matmul's multiply loop went from 316 to 363 TFLOP/s on the H200 this way (`SgmConfig.constOffsets` in
 * `matmul_subgroup_matrix.ts`). A branch on `sg` is not workgroup-uniform, so WGSL allows no barrier inside it:
 * only barrier-free sections are copied, and fragments that outlive one are declared before it.
 */
function perSubgroup(constOffsets: boolean, indent: string, body: (sgi: Sg) => string): string {
  if (!constOffsets) return body(null);
  return range(SUBGROUPS).map((sgi) =>
    `${sgi < SUBGROUPS - 1 ? `if (sg == ${sgi}u) ` : ""}{
${indent}  ${body(sgi).replaceAll("\n", `\n  `)}
${indent}}`
  ).join(" else ");
}

/**
 * Where stageRows finds the rows it stages: `word(row)` is the index of a row's first 8 halves in the vec4<u32>
 * binding, `valid(row)` whether the row exists (else zeros); `stride(step)`, when given, is the word distance
 * from a row to the row `step` further on, with the WGSL condition under which that distance holds.
 */
interface RowSource {
  word: (row: string) => string;
  valid: (row: string) => string;
  stride?: (step: number) => { when: string | null; words: string };
}

// The staged rows of the kernels (the names are WGSL lets of the kernels): packed query rows of the block or tile
// at R0, and keys of the tile at k0. Packed rows `step` apart are a fixed distance apart when G divides `step`
// (R0 is a multiple of the tile, which G divides then too).
const packedRows = (hd: number): RowSource => ({
  word: (row) => `row_addr(b, hk, R0 + ${row}) / 8u`,
  valid: (row) => `R0 + ${row} < p.rows`,
  stride: (step) => ({ when: `${step}u % p.G == 0u`, words: `(${step}u / p.G) * p.H * ${hd / 8}u` }),
});
const keyRows: RowSource = {
  word: (row) => `(kvBase + (k0 + ${row}) * p.kv_pstride) / 8u`,
  valid: (row) => `k0 + ${row} < p.kv_len`,
  stride: (step) => ({ when: null, words: `${step}u * (p.kv_pstride / 8u)` }),
};

function sgmAttentionWgsl(hd: number, bc: number, constOffsets: boolean): string {
  const hdp = hd + PAD, pstr = bc + PAD, sstr = scratchStride(hd, bc);
  const kFrags = bc / SGM_FRAG;
  const chunk = pvChunk(hd), chunks = hd / chunk;
  const half = bc / 2; // scores per thread (two threads per row)
  const ohalf = chunk / 2; // output columns per thread and chunk

  // P V for one column chunk: P's fragments (loaded once per chunk) times V's, into the scratch
  const pvFragments = (c: number, sgi: Sg) =>
    `{
      ${
      range(kFrags).map((kk) =>
        `let p${kk} = subgroupMatrixLoad<${LEFT}, row_major>(&PS, ${rowAt(sgi, pstr, "prow")} + ${
          kk * SGM_FRAG
        }u, ${pstr}u);`
      ).join("\n      ")
    }
      ${
      range(chunk / SGM_FRAG).map((f) =>
        `{
        var acc = ${RESULT}();
        ${
          range(kFrags).map((kk) =>
            `acc = subgroupMatrixMultiplyAccumulate(p${kk}, subgroupMatrixLoad<${RIGHT}, row_major>(&KV, ${
              bc * hdp + kk * SGM_FRAG * hdp + c * chunk + f * SGM_FRAG
            }u, ${hdp}u), acc);`
          ).join("\n        ")
        }
        subgroupMatrixStore<row_major>(&SS, ${rowAt(sgi, sstr, "srow")} + ${f * SGM_FRAG}u, acc, ${sstr}u);
      }`
      ).join("\n      ")
    }
    }`;
  const pv = (c: number) =>
    `${perSubgroup(constOffsets, "    ", (sgi) => pvFragments(c, sgi))}
    workgroupBarrier();
    ${
      range(ohalf).map((e) =>
        `o${c * ohalf + e} = o${c * ohalf + e} * alpha + SS[r * ${sstr}u + hh * ${ohalf}u + ${e}u];`
      ).join("\n    ")
    }
    ${c + 1 < chunks ? "workgroupBarrier();" : ""}`;

  const outWords = range(ohalf / 8).flatMap((w) => range(chunks).map((c) => ({ w, c })));
  return `${commonWgsl(hd)}
// causal GQA attention forward on subgroup matrices, hd ${hd}, key tile ${bc}
@group(0) @binding(0) var<storage, read> Q: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> K: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> V: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> O: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(5) var<uniform> p: P;
${declare(rowBlockArrays(hd, bc))}

${MAIN}
${rowBlockStart(hd, bc)}

  // Q block -> workgroup memory -> fragments in registers
  ${stagedLeftFragments("q", "KV", "Q", packedRows(hd), hd, constOffsets)}
  ${
    constOffsets ? PER_SUBGROUP_NOTE : `let srow = sg * ${SGM_FRAG * sstr}u;
  let prow = sg * ${SGM_FRAG * pstr}u;`
  }

  ${THREAD_ROW}
  let R = R0 + r;
  let pos = R / p.G;
  let c0 = ${scoreStart(bc, false)};
  let sAt = r * ${sstr}u + c0;
  let pAt = r * ${pstr}u + c0;
  var m = NEG;
  var l = 0.0;
  ${range(hd / 2).map((e) => `var o${e} = 0.0;`).join(" ")}

  for (var kt = 0u; kt < ntiles; kt++) {
    let k0 = kt * ${bc}u;
    ${stageRows("KV", "0u", bc, hd, "K", keyRows)}
    ${stageRows("KV", `${bc * hdp}u`, bc, hd, "V", keyRows)}
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => productOverHd("q", "KV", 0, bc, hd, sstr, sgi))}
    workgroupBarrier();

    // online softmax of this thread's half row; P as f16. Each score is read from workgroup memory once, into
    // registers (masked scores become NEG, whose exp is 0), in written-out statements the compiler can schedule.
    let visible = min(pos + 1u, p.kv_len);
    let kc = k0 + c0;
    ${
    range(half).map((i) =>
      `let s${i} = select(NEG, SS[sAt + ${scoreStep(i, false)}] * p.scale, kc + ${
        scoreStep(i, false)
      } < visible);`
    ).join("\n    ")
  }
    var mx = NEG;
    ${range(half).map((i) => `mx = max(mx, s${i});`).join(" ")}
    mx = max(mx, subgroupShuffleXor(mx, 1u));
    let mNew = max(m, mx);
    let alpha = exp(m - mNew);
    var sum = 0.0;
    ${
    range(half).map((i) =>
      `{ let e = select(0.0, exp(s${i} - mNew), s${i} > NEG); PS[pAt + ${
        scoreStep(i, false)
      }] = f16(e); sum += e; }`
    ).join("\n    ")
  }
    sum += subgroupShuffleXor(sum, 1u);
    l = l * alpha + sum;
    m = mNew;
    workgroupBarrier();

    ${range(chunks).map(pv).join("\n    ")}
  }

  if (R < p.rows) {
    let inv = 1.0 / l;
    let base = row_addr(b, hk, R) / 8u;
    ${
    outWords.map(({ w, c }) => {
      const e = c * ohalf + w * 8;
      const pair = (x: number) => `pack2x16float(vec2<f32>(o${e + x} * inv, o${e + x + 1} * inv))`;
      return `O[base + (${c * chunk}u + hh * ${ohalf}u + ${w * 8}u) / 8u] = vec4<u32>(${pair(0)}, ${
        pair(2)
      }, ${pair(4)}, ${pair(6)});`;
    }).join("\n    ")
  }
    if (hh == 0u) { LSE[row_stat(b, hk, R)] = m + log(l); }
  }
}
`;
}

/** WGSL source for a head dim and key tile, for compile checks; `constOffsets` as in {@linkcode attentionForwardSgm}. */
export function sgmAttentionWgslFor(
  hd: number,
  bc: number,
  constOffsets: boolean = SGM_ATTN_CONST_OFFSETS,
): string {
  return sgmAttentionSpec(hd, bc, constOffsets).code;
}

// ---- backward --------------------------------------------------------------------------------------------
//
// FlashAttention-2's split, on the matrix units, for the same geometry as the forward (delta = rowsum(dO * O) comes
// from `attentionBackwardDelta` in attention.ts):
// - dQ: one workgroup per 64 packed rows (4 subgroups of 16), Q and dO held as left fragments; per key tile it
//   recomputes S = Q K^T and P = exp(S * scale - lse), computes dP = dO V^T, dS = P (dP - delta) scale (f16 in
//   workgroup memory) and accumulates dQ += dS K in result fragments;
// - dK, dV: one workgroup per 64 keys (4 subgroups of 16), K and V held as left fragments; per tile of packed rows
//   that can see those keys it computes S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T and dK += dS^T Q.
// As in the forward, every elementwise step runs in threads (two per row of a subgroup's 16 x N block) on f32
// scores that the subgroups stored to workgroup memory; results leave through the same scratch, converted to f16.

/** Rows of Q and dO per tile of the dK/dV kernel for a head dim (64 when the workgroup memory allows, else 32). */
function dkvRowTile(hd: number, limitBytes: number): number {
  for (const br of [64, 32]) if (sgmDkvSharedBytes(hd, br) <= limitBytes) return br;
  return 0;
}

/**
 * The dK/dV kernel's workgroup memory with row tiles of `br`: Q and dO tiles (K and V staged there first), P^T
 * then dS^T, the f32 scratch, and the tile's lse and delta.
 */
function dkvArrays(hd: number, br: number): SharedArray[] {
  const hdp = hd + PAD;
  return [
    ["QD", "f16", Math.max(2 * br * hdp, SGM_ATTN_ROWS * hdp)],
    ["PT", "f16", SGM_ATTN_ROWS * (br + PAD)],
    ["SS", "f32", SGM_ATTN_ROWS * scratchStride(hd, br)],
    ["LD", "f32", 2 * br],
  ];
}

/** Workgroup memory of the dK/dV kernel with row tiles of `br`. */
export function sgmDkvSharedBytes(hd: number, br: number): number {
  return sharedBytes(dkvArrays(hd, br));
}

/** The tiles of both backward kernels for a head dim, or null when the backward does not apply. */
export function chooseSgmAttentionBackwardTiles(
  hd: number,
  limitBytes: number,
): { bc: number; br: number } | null {
  const bc = chooseSgmAttentionKeyTile(hd, limitBytes);
  const br = bc ? dkvRowTile(hd, limitBytes) : 0;
  return bc && br ? { bc, br } : null;
}

/** WGSL shared by the kernels: uniforms, the bindings' packed-row addressing. */
function commonWgsl(hd: number): string {
  return `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
struct P { T: u32, H: u32, Hkv: u32, G: u32, kv_len: u32, kv_bstride: u32, kv_pstride: u32, row_blocks: u32,
           scale: f32, rows: u32, _a: u32, _b: u32 }
const NEG: f32 = -1.0e30;
// first element of packed row R (token R / G, head hk * G + R % G) of a [B, T, H, hd] tensor
fn row_addr(b: u32, hk: u32, R: u32) -> u32 {
  return ((b * p.T + R / p.G) * p.H + hk * p.G + R % p.G) * ${hd}u;
}
fn row_stat(b: u32, hk: u32, R: u32) -> u32 {
  return (b * p.T + R / p.G) * p.H + hk * p.G + R % p.G;
}`;
}

/**
 * Statements that stage `rows` rows of `hd` halves into workgroup array `dst` (row stride hd + 8, from element
 * `dstOff`) with 16-byte loads by all threads from the vec4<u32> binding `src`, rows found through `from`. The
 * stores are 4-way bank conflicted; rotating each lane's word order as the matmul does (`SgmConfig.rotate`)
 * measured no faster here (forward 12.7 against 11.6 ms of a training step on the H200), so they stay plain.
 *
 * When the threads cover whole rows, each thread takes the same column chunk in rows `step` apart, written out
 * per slot: its staging offsets are its first row's plus constants, and where `from` knows the rows' word
 * stride, so are its load indices. That replaces a packed row's address (a division and a remainder by G) per
 * load with one per thread and call (the matmul measured the same change at 233 -> 248 TFLOP/s).
 */
function stageRows(
  dst: string,
  dstOff: string,
  rows: number,
  hd: number,
  src: string,
  from: RowSource,
): string {
  const loads = (rows * hd) / 8, perRow = hd / 8, hdp = hd + PAD;
  const stores = (d: string) =>
    `let h0 = bitcast<vec2<f16>>(w.x); let h1 = bitcast<vec2<f16>>(w.y);
      let h2 = bitcast<vec2<f16>>(w.z); let h3 = bitcast<vec2<f16>>(w.w);
      ${dst}[${d}] = h0.x; ${dst}[${d} + 1u] = h0.y; ${dst}[${d} + 2u] = h1.x; ${dst}[${d} + 3u] = h1.y;
      ${dst}[${d} + 4u] = h2.x; ${dst}[${d} + 5u] = h2.y; ${dst}[${d} + 6u] = h3.x; ${dst}[${d} + 7u] = h3.y;`;
  if (THREADS % perRow !== 0) {
    return `for (var s = 0u; s < ${ceilDiv(loads, THREADS)}u; s++) {
    let idx = lid + s * ${THREADS}u;
    if (idx < ${loads}u) {
      let row = idx / ${perRow}u;
      let ch = idx % ${perRow}u;
      var w = vec4<u32>();
      if (${from.valid("row")}) { w = ${src}[${from.word("row")} + ch]; }
      let d = ${dstOff} + row * ${hdp}u + ch * 8u;
      ${stores("d")}
    }
  }`;
  }
  const step = THREADS / perRow;
  // every load before the first store (as the matmul's staging), so the loads' latencies overlap
  const slots = (word: (s: number) => string) => {
    const n = ceilDiv(rows, step);
    // the last slot may reach past the block's rows (the threads cover more rows than it has)
    const inBlock = (s: number) => (s + 1) * step > rows ? `lrow + ${s * step}u < ${rows}u && ` : "";
    const loads = range(n).map((s) =>
      `var g${s} = vec4<u32>();
    if (${inBlock(s)}${from.valid(`lrow + ${s * step}u`)}) { g${s} = ${src}[${word(s)} + lch]; }`
    );
    const writes = range(n).map((s) => {
      const body = `{ let w = g${s}; ${stores(`lat + ${s * step * hdp}u`)} }`;
      return (s + 1) * step > rows ? `if (lrow + ${s * step}u < ${rows}u) ${body}` : body;
    });
    return [...loads, ...writes].join("\n    ");
  };
  const perSlot = slots((s) => from.word(`lrow + ${s * step}u`));
  const stride = from.stride?.(step);
  const strided = stride &&
    `let w0 = ${from.word("lrow")}; let ws = ${stride.words};
    ${slots((s) => (s === 0 ? "w0" : `w0 + ${s}u * ws`))}`;
  return `{
    let lrow = lid / ${perRow}u; let lch = lid % ${perRow}u; let lat = ${dstOff} + lrow * ${hdp}u + lch * 8u;
    ${
    !strided ? perSlot : stride.when === null ? strided : `if (${stride.when}) {
    ${strided}
    } else {
    ${perSlot}
    }`
  }
  }`;
}

/**
 * `let name{i} = <hd/16 left fragments of this subgroup's 16 rows>` from a staged block at element `off`; for a
 * per-subgroup copy (`sgi` not null), assignments to vars declared before it.
 */
function leftFragments(name: string, src: string, off: string, hd: number, sgi: Sg): string {
  const hdp = hd + PAD;
  return range(hd / SGM_FRAG).map((i) =>
    `${sgi === null ? "let " : ""}${name}${i} = subgroupMatrixLoad<${LEFT}, row_major>(&${src}, ${off} + ${
      rowAt(sgi, hdp, `sg * ${SGM_FRAG * hdp}u`)
    } + ${i * SGM_FRAG}u, ${hdp}u);`
  ).join("\n  ");
}

/**
 * A 64-row block of `src` (see {@linkcode stageRows}) through workgroup array `shared` into this subgroup's
 * left fragments `name{0..hd/16}`, with the barriers on both sides (the array is reused right after). With
 * `constOffsets` the fragments are vars, declared before the per-subgroup copies that load them.
 */
function stagedLeftFragments(
  name: string,
  shared: string,
  src: string,
  from: RowSource,
  hd: number,
  constOffsets: boolean,
): string {
  const decls = constOffsets
    ? `${range(hd / SGM_FRAG).map((i) => `var ${name}${i} = ${LEFT}();`).join(" ")}
  `
    : "";
  return `${stageRows(shared, "0u", SGM_ATTN_ROWS, hd, src, from)}
  workgroupBarrier();
  ${decls}${perSubgroup(constOffsets, "  ", (sgi) => leftFragments(name, shared, "0u", hd, sgi))}
  workgroupBarrier();`;
}

/**
 * The subgroup's 16 x n product `left{0..} x B^T` (B: n staged rows of hd halves at element `off` of `src`),
 * stored f32 into the scratch at `srow` (or subgroup `sgi`'s literal row): scores-like products over the head dim.
 */
function productOverHd(
  left: string,
  src: string,
  off: number | string,
  n: number,
  hd: number,
  sstr: number,
  sgi: Sg,
) {
  const hdp = hd + PAD;
  return range(n / SGM_FRAG).map((f) =>
    `{
      var acc = ${RESULT}();
      ${
      range(hd / SGM_FRAG).map((i) =>
        `acc = subgroupMatrixMultiplyAccumulate(${left}${i}, subgroupMatrixLoad<${RIGHT}, col_major>(&${src}, ${off} + ${
          f * SGM_FRAG * hdp + i * SGM_FRAG
        }u, ${hdp}u), acc);`
      ).join("\n      ")
    }
      subgroupMatrixStore<row_major>(&SS, ${rowAt(sgi, sstr, "srow")} + ${f * SGM_FRAG}u, acc, ${sstr}u);
    }`
  ).join("\n    ");
}

/**
 * `acc{f} += L (16 x n, f16 rows of the subgroup in workgroup array `lsrc` at `prow` or `trow`, or subgroup `sgi`'s
 * literal row; stride `lstr`) x B (n staged rows of hd halves at element `off` of `src`)`, for the hd/16 result
 * fragments `acc{f}`.
 */
function accumulateOverRows(
  acc: string,
  lsrc: string,
  lstr: number,
  src: string,
  off: number | string,
  n: number,
  hd: number,
  sgi: Sg,
): string {
  const hdp = hd + PAD;
  return `{
      ${
    range(n / SGM_FRAG).map((kk) =>
      `let l${kk} = subgroupMatrixLoad<${LEFT}, row_major>(&${lsrc}, ${
        rowAt(sgi, lstr, lsrc === "PS" ? "prow" : "trow")
      } + ${kk * SGM_FRAG}u, ${lstr}u);`
    ).join("\n      ")
  }
      ${
    range(hd / SGM_FRAG).flatMap((f) =>
      range(n / SGM_FRAG).map((kk) =>
        `${acc}${f} = subgroupMatrixMultiplyAccumulate(l${kk}, subgroupMatrixLoad<${RIGHT}, row_major>(&${src}, ${off} + ${
          kk * SGM_FRAG * hdp + f * SGM_FRAG
        }u, ${hdp}u), ${acc}${f});`
      )
    ).join("\n      ")
  }
    }`;
}

/**
 * Writes result fragments `acc{0..hd/16}` (16 rows per subgroup) to global f16 rows through the scratch, in column
 * chunks: each thread packs its half of its row. `dst(row)` is the WGSL word index of a row's first 8 halves (the
 * row is this thread's `r`), `valid` whether it exists; `constOffsets` as in {@linkcode perSubgroup}.
 */
function storeRows(
  acc: string,
  out: string,
  hd: number,
  sstr: number,
  dst: string,
  valid: string,
  constOffsets: boolean,
): string {
  const chunk = pvChunk(hd), ohalf = chunk / 2;
  return range(hd / chunk).map((c) =>
    `${
      perSubgroup(constOffsets, "  ", (sgi) =>
        range(chunk / SGM_FRAG).map((f) =>
          `subgroupMatrixStore<row_major>(&SS, ${rowAt(sgi, sstr, "srow")} + ${f * SGM_FRAG}u, ${acc}${
            c * (chunk / SGM_FRAG) + f
          }, ${sstr}u);`
        ).join("\n  "))
    }
  workgroupBarrier();
  if (${valid}) {
    ${
      range(ohalf / 8).map((w) => {
        const pair = (x: number) =>
          `pack2x16float(vec2<f32>(SS[r * ${sstr}u + hh * ${ohalf}u + ${
            w * 8 + x
          }u], SS[r * ${sstr}u + hh * ${ohalf}u + ${w * 8 + x + 1}u]))`;
        return `${out}[${dst} + (${c * chunk}u + hh * ${ohalf}u + ${w * 8}u) / 8u] = vec4<u32>(${pair(0)}, ${
          pair(2)
        }, ${pair(4)}, ${pair(6)});`;
      }).join("\n    ")
    }
  }
  workgroupBarrier();`
  ).join("\n  ");
}

function resultDecls(name: string, hd: number): string {
  return range(hd / SGM_FRAG).map((f) => `var ${name}${f} = ${RESULT}();`).join("\n  ");
}

/** The backward kernels' inputs: q, k, v, dO (f16 as 16-byte words), lse and delta (f32). */
const BACKWARD_INPUTS = `@group(0) @binding(0) var<storage, read> Q: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> K: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> V: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> DO: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> LSE: array<f32>;
@group(0) @binding(5) var<storage, read> DELTA: array<f32>;`;

function dqWgsl(hd: number, bc: number, constOffsets: boolean): string {
  const hdp = hd + PAD, pstr = bc + PAD, sstr = scratchStride(hd, bc);
  const half = bc / 2;
  // P of the thread's step-i score: exp(S * scale - lse of the thread's row)
  const probability = (i: number) => `p${i} = exp(SS[sAt + ${scoreStep(i, true)}] * p.scale - lse);`;
  return `${commonWgsl(hd)}
// causal GQA attention dQ on subgroup matrices, hd ${hd}, key tile ${bc}
${BACKWARD_INPUTS}
@group(0) @binding(6) var<storage, read_write> DQ: array<vec4<u32>>;
@group(0) @binding(7) var<uniform> p: P;
${declare(rowBlockArrays(hd, bc))}

${MAIN}
${rowBlockStart(hd, bc)}
  ${
    constOffsets ? PER_SUBGROUP_NOTE : `let srow = sg * ${SGM_FRAG * sstr}u;
  let prow = sg * ${SGM_FRAG * pstr}u;`
  }

  ${stagedLeftFragments("q", "KV", "Q", packedRows(hd), hd, constOffsets)}
  ${stagedLeftFragments("g", "KV", "DO", packedRows(hd), hd, constOffsets)}

  ${THREAD_ROW}
  let R = R0 + r;
  let pos = R / p.G;
  var lse = 0.0;
  var delta = 0.0;
  if (R < p.rows) {
    lse = LSE[row_stat(b, hk, R)];
    delta = DELTA[row_stat(b, hk, R)];
  }
  let visible = min(pos + 1u, p.kv_len); // keys this row sees
  let c0 = ${scoreStart(bc, true)};
  let sAt = r * ${sstr}u + c0;
  let pAt = r * ${pstr}u + c0;
  ${resultDecls("dq", hd)}

  for (var kt = 0u; kt < ntiles; kt++) {
    let k0 = kt * ${bc}u;
    ${stageRows("KV", "0u", bc, hd, "K", keyRows)}
    ${stageRows("KV", `${bc * hdp}u`, bc, hd, "V", keyRows)}
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => productOverHd("q", "KV", 0, bc, hd, sstr, sgi))}
    workgroupBarrier();
    let kc = k0 + c0;
    // left of the diagonal the row sees the whole tile: no mask per score there
    ${range(half).map((i) => `var p${i} = 0.0;`).join(" ")}
    if (k0 + ${bc}u <= visible) {
      ${range(half).map((i) => probability(i)).join("\n      ")}
    } else {
      ${
    range(half).map((i) => `if (kc + ${scoreStep(i, true)} < visible) { ${probability(i)} }`).join("\n      ")
  }
    }
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => productOverHd("g", "KV", bc * hdp, bc, hd, sstr, sgi))}
    workgroupBarrier();
    ${
    range(half).map((i) =>
      `PS[pAt + ${scoreStep(i, true)}] = f16(p${i} * (SS[sAt + ${scoreStep(i, true)}] - delta) * p.scale);`
    ).join("\n    ")
  }
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => accumulateOverRows("dq", "PS", pstr, "KV", 0, bc, hd, sgi))}
    workgroupBarrier();
  }
  ${storeRows("dq", "DQ", hd, sstr, "row_addr(b, hk, R) / 8u", "R < p.rows", constOffsets)}
}
`;
}

function dkvWgsl(hd: number, br: number, constOffsets: boolean): string {
  const hdp = hd + PAD, tstr = br + PAD, sstr = scratchStride(hd, br);
  const half = br / 2;
  // P of the thread's step-i score: exp(S * scale - lse of its row)
  const probability = (i: number) =>
    `p${i} = exp(SS[sAt + ${scoreStep(i, true)}] * p.scale - LD[c0 + ${scoreStep(i, true)}]);`;
  return `${commonWgsl(hd)}
// causal GQA attention dK, dV on subgroup matrices, hd ${hd}, row tile ${br}
${BACKWARD_INPUTS}
@group(0) @binding(6) var<storage, read_write> DK: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read_write> DV: array<vec4<u32>>;
@group(0) @binding(8) var<uniform> p: P;
${declare(dkvArrays(hd, br))}

${MAIN}
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let k0 = wid.x * ${SGM_ATTN_ROWS}u;
  let kvBase = b * p.kv_bstride + hk * ${hd}u;
  ${
    constOffsets ? PER_SUBGROUP_NOTE : `let srow = sg * ${SGM_FRAG * sstr}u;
  let trow = sg * ${SGM_FRAG * tstr}u;`
  }

  ${stagedLeftFragments("kf", "QD", "K", keyRows, hd, constOffsets)}
  ${stagedLeftFragments("vf", "QD", "V", keyRows, hd, constOffsets)}

  // this thread's key, and half of each row tile (alternate columns: scoreStep)
  ${THREAD_ROW}
  let j = k0 + r;
  let c0 = ${scoreStart(br, true)};
  let sAt = r * ${sstr}u + c0;
  let tAt = r * ${tstr}u + c0;
  ${resultDecls("dk", hd)}
  ${resultDecls("dv", hd)}
  // packed rows R see key j iff R / G >= j: tiles from the first row of the block's first key
  let t0 = (k0 * p.G) / ${br}u;
  let t1 = (p.rows + ${br - 1}u) / ${br}u;
  for (var t = t0; t < t1; t++) {
    let R0 = t * ${br}u;
    ${stageRows("QD", "0u", br, hd, "Q", packedRows(hd))}
    ${stageRows("QD", `${br * hdp}u`, br, hd, "DO", packedRows(hd))}
    if (lid < ${br}u) {
      var l = 0.0;
      var d = 0.0;
      if (R0 + lid < p.rows) {
        l = LSE[row_stat(b, hk, R0 + lid)];
        d = DELTA[row_stat(b, hk, R0 + lid)];
      }
      LD[lid] = l;
      LD[${br}u + lid] = d;
    }
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => productOverHd("kf", "QD", 0, br, hd, sstr, sgi))}
    workgroupBarrier();
    // packed row R sees key j iff R / G >= j, i.e. R >= j G: no integer division per score
    let rowsFrom = select(p.rows, j * p.G, j < p.kv_len);
    let x0 = R0 + c0;
    // past the diagonal every row of the tile sees the thread's key: no mask per score there
    ${range(half).map((i) => `var p${i} = 0.0;`).join(" ")}
    if (x0 >= rowsFrom && R0 + ${br}u <= p.rows) {
      ${range(half).map((i) => probability(i)).join("\n      ")}
    } else {
      ${
    range(half).map((i) => {
      const k = scoreStep(i, true);
      return `if (x0 + ${k} >= rowsFrom && x0 + ${k} < p.rows) { ${probability(i)} }`;
    }).join("\n      ")
  }
    }
    ${range(half).map((i) => `PT[tAt + ${scoreStep(i, true)}] = f16(p${i});`).join("\n    ")}
    workgroupBarrier();
    ${
    perSubgroup(constOffsets, "    ", (sgi) =>
      `${accumulateOverRows("dv", "PT", tstr, "QD", br * hdp, br, hd, sgi)}
    ${productOverHd("vf", "QD", br * hdp, br, hd, sstr, sgi)}`)
  }
    workgroupBarrier();
    ${
    range(half).map((i) =>
      `PT[tAt + ${scoreStep(i, true)}] = f16(p${i} * (SS[sAt + ${scoreStep(i, true)}] - LD[${br}u + c0 + ${
        scoreStep(i, true)
      }]) * p.scale);`
    ).join("\n    ")
  }
    workgroupBarrier();
    ${perSubgroup(constOffsets, "    ", (sgi) => accumulateOverRows("dk", "PT", tstr, "QD", 0, br, hd, sgi))}
    workgroupBarrier();
  }
  ${storeRows("dk", "DK", hd, sstr, "(kvBase + j * p.kv_pstride) / 8u", "j < p.kv_len", constOffsets)}
  ${storeRows("dv", "DV", hd, sstr, "(kvBase + j * p.kv_pstride) / 8u", "j < p.kv_len", constOffsets)}
}
`;
}

function backwardSpec(kind: "dq" | "dkv", hd: number, tile: number, constOffsets: boolean): KernelSpec {
  const dq = kind === "dq";
  return cachedSpec(
    `attn_sgm_${kind}_f16_hd${hd}_${dq ? "bc" : "br"}${tile}${formKey(constOffsets)}`,
    () => ({
      // q, k, v, dO, lse, delta, then dQ or dK and dV
      bindings: ["read", "read", "read", "read", "read", "read", "rw", ...(dq ? [] : ["rw" as const])],
      uniformBytes: 48,
      code: dq ? dqWgsl(hd, tile, constOffsets) : dkvWgsl(hd, tile, constOffsets),
    }),
  );
}

function sgmUniforms(s: AttentionShape, rowBlocks: number): ArrayBuffer {
  const G = s.H / s.Hkv;
  return new Uniforms(48)
    .u32(s.T).u32(s.H).u32(s.Hkv).u32(G)
    .u32(s.kvLen).u32(s.kvBatchStride).u32(s.Hkv * s.hd).u32(rowBlocks)
    .f32(s.scale).u32(s.T * G).buffer;
}

/**
 * dQ. Bindings: q, k, v, dO (f16), lse, delta (f32) (read), dq (f16, rw). `bc` from
 * {@linkcode chooseSgmAttentionBackwardTiles}; `constOffsets`: which form ({@linkcode SGM_ATTN_CONST_OFFSETS}).
 */
export function attentionBackwardDqSgm(
  s: AttentionShape,
  bc: number,
  constOffsets: boolean = SGM_ATTN_CONST_OFFSETS,
): Launch {
  checkSgmShape(s, bc);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), SGM_ATTN_ROWS);
  return {
    spec: backwardSpec("dq", s.hd, bc, constOffsets),
    uniforms: sgmUniforms(s, rowBlocks),
    workgroups: [rowBlocks, s.B * s.Hkv],
  };
}

/**
 * dK and dV. Bindings: q, k, v, dO (f16), lse, delta (f32) (read), dk, dv (f16, rw). `br` from
 * {@linkcode chooseSgmAttentionBackwardTiles}; `constOffsets`: which form ({@linkcode SGM_ATTN_CONST_OFFSETS}).
 */
export function attentionBackwardDkvSgm(
  s: AttentionShape,
  br: number,
  constOffsets: boolean = SGM_ATTN_CONST_OFFSETS,
): Launch {
  checkSgmShape(s, 64);
  if (br !== 32 && br !== 64) throw new Error(`subgroup-matrix attention: row tile ${br} (32, 64)`);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), SGM_ATTN_ROWS);
  return {
    spec: backwardSpec("dkv", s.hd, br, constOffsets),
    uniforms: sgmUniforms(s, rowBlocks),
    workgroups: [ceilDiv(s.kvLen, SGM_ATTN_ROWS), s.B * s.Hkv],
  };
}

/** WGSL of a backward kernel, for compile checks; `constOffsets` as in {@linkcode attentionBackwardDqSgm}. */
export function sgmAttentionBackwardWgslFor(
  kind: "dq" | "dkv",
  hd: number,
  tile: number,
  constOffsets: boolean = SGM_ATTN_CONST_OFFSETS,
): string {
  return backwardSpec(kind, hd, tile, constOffsets).code;
}
