/**
 * Causal grouped-query attention (HF Llama/Mistral semantics), forward and backward, flash-attention style:
 * tiled online softmax, no [T, T] matrix in global memory, no float atomics, all math in f32.
 *
 * Layouts (row-major, contiguous):
 * - q, o, dq, do: `[B, T, H, hd]`; k, v, dk, dv: `[B, Tk, Hkv, hd]` (a KV cache `[B, maxT, Hkv, hd]` is the same
 *   layout with a larger position stride, so decoding reuses the forward kernel, see `attention_decode.ts`).
 * - lse, delta: `[B, T, H]` f32 (natural-log log-sum-exp of the scaled scores of each query row).
 *
 * Query head h reads kv head `floor(h / G)`, G = H / Hkv. The kernels pack the G query heads that share a kv head
 * into one "row" dimension, row R = t * G + g (token t, head hk * G + g), so one workgroup loads a K/V tile once
 * for all heads of its group. Query token t sits at position `qoff + t` (0 for training; the cache length for
 * decoding); key j at position j. Row R attends key j iff `j <= pos` and, with a sliding window W > 0,
 * `j > pos - W` (W keys including itself: transformers' `sliding_window_overlay`, `kv_idx > q_idx - W`).
 *
 * Shared-memory tiles are stored as vec4 so the inner loops issue 128-bit loads. Tiles read "down a column"
 * (Q^T, K^T, V^T, dO^T: element (d, n) holds dimension d of row n) are indexed `d * N4 + (n4 ^ (d & SW))`: the XOR
 * swizzle spreads both access patterns (consecutive d for one n4 when storing and when reading per-dimension,
 * consecutive n4 for one d in the score loops) over all banks, without padding that would not fit 48 KiB.
 *
 * Forward: one workgroup per (row block, batch * kv head, key split); thread (ty, tx) owns rows ty*TM.. and the
 * key vec4 groups q*CG + tx of the score tile, and vec4 chunks tx + CG*k of the output dims.
 * Backward (FlashAttention-2): delta = rowsum(dO * O); dQ per row block looping over key tiles; dK/dV per key
 * block looping over the row tiles (all query heads of the group) that can see it.
 *
 * @module
 */
import { ceilDiv, type DType, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Shapes of one attention call. */
export interface AttentionShape {
  /** Batch size. */
  B: number;
  /** Query tokens per sequence. */
  T: number;
  /** Query heads. */
  H: number;
  /** Key/value heads (divides H). */
  Hkv: number;
  /** Head dimension (1..128 supported by the tile choices; any value works, HD > 128 just uses small tiles). */
  hd: number;
  /** Position of query token 0 (0 for training/prefill, the cached length before the new tokens in decoding). */
  qoff: number;
  /** Keys visible: positions 0..kvLen-1 (qoff + T for causal self-attention). */
  kvLen: number;
  /** Elements between batch entries of k/v (Tk * Hkv * hd for a plain tensor, maxT * Hkv * hd for a cache). */
  kvBatchStride: number;
  /** Sliding window W (attend j > pos - W), 0 for none. */
  window: number;
  /** Softmax scale (1/sqrt(hd) in Llama/Mistral). */
  scale: number;
}

/** Tiles of the forward / dQ kernels: BR rows x BC keys, thread micro-tile TM rows x TN keys. */
export interface RowTiles {
  /** Rows per workgroup. */
  br: number;
  /** Keys per tile (multiple of 4). */
  bc: number;
  /** Rows per thread (1, 2, 4 or 8). */
  tm: number;
  /** Keys per thread (multiple of 4). */
  tn: number;
}

/** Tiles of the dK/dV kernel: BC keys x BR rows, thread micro-tile TK keys x TR rows. */
export interface KeyTiles {
  /** Keys per workgroup (multiple of 4). */
  bc: number;
  /** Rows per tile (multiple of 4). */
  br: number;
  /** Keys per thread (1, 2, 4 or 8). */
  tk: number;
  /** Rows per thread (multiple of 4). */
  tr: number;
}

const NEG = "-1.0e30";

function pad4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

function assertPow2Groups(n4: number, what: string): void {
  // the swizzle XORs with d & (min(8, n4) - 1): stays inside the row when n4 is a multiple of that power of 2
  const sw = Math.min(8, n4);
  if ((sw & (sw - 1)) !== 0 || n4 % sw !== 0) {
    throw new Error(`attention: ${what}/4 = ${n4} cannot be swizzled`);
  }
}

function checkRowTiles(t: RowTiles): void {
  if (t.bc % 4 || t.tn % 4 || t.bc % t.tn || t.br % t.tm || ![1, 2, 4, 8].includes(t.tm)) {
    throw new Error(`attention: invalid row tiles ${JSON.stringify(t)}`);
  }
  if (t.br % 4 && t.br > 4) throw new Error(`attention: br ${t.br} must be a multiple of 4`);
  assertPow2Groups(t.bc / 4, "bc");
  assertPow2Groups(Math.max(1, t.br / 4), "br");
}

function checkKeyTiles(t: KeyTiles): void {
  if (t.bc % 4 || t.br % 4 || t.tr % 4 || t.br % t.tr || t.bc % t.tk || ![1, 2, 4, 8].includes(t.tk)) {
    throw new Error(`attention: invalid key tiles ${JSON.stringify(t)}`);
  }
  assertPow2Groups(t.bc / 4, "bc");
  assertPow2Groups(t.br / 4, "br");
}

/** Bytes of workgroup memory the forward kernel needs. */
export function forwardSharedBytes(hd: number, t: RowTiles): number {
  const hdp = pad4(hd);
  return 4 * (hdp * pad4(t.br) + hdp * t.bc + pad4(t.br) * t.bc);
}

/** Bytes of workgroup memory the dQ kernel needs. */
export function dqSharedBytes(hd: number, t: RowTiles): number {
  const hdp = pad4(hd);
  return 4 * (2 * hdp * pad4(t.br) + 2 * hdp * t.bc + pad4(t.br) * t.bc);
}

/** Bytes of workgroup memory the dK/dV kernel needs. */
export function dkvSharedBytes(hd: number, t: KeyTiles): number {
  const hdp = pad4(hd);
  return 4 * (2 * hdp * t.bc + 2 * hdp * t.br + 2 * t.bc * t.br + 2 * t.br);
}

// Candidate tiles, best first (fastest where they fit). The first that fits the device's workgroup memory wins.
const FWD_TILES: RowTiles[] = [
  { br: 64, bc: 64, tm: 4, tn: 8 },
  { br: 64, bc: 32, tm: 4, tn: 4 },
  { br: 32, bc: 32, tm: 2, tn: 4 },
  { br: 32, bc: 16, tm: 2, tn: 4 },
  { br: 16, bc: 16, tm: 1, tn: 4 },
  { br: 8, bc: 8, tm: 1, tn: 4 },
];
const DQ_TILES: RowTiles[] = [
  { br: 64, bc: 32, tm: 4, tn: 4 },
  { br: 32, bc: 32, tm: 2, tn: 4 },
  { br: 32, bc: 16, tm: 2, tn: 4 },
  { br: 16, bc: 16, tm: 1, tn: 4 },
  { br: 16, bc: 8, tm: 1, tn: 4 },
  { br: 8, bc: 8, tm: 1, tn: 4 },
];
const DKV_TILES: KeyTiles[] = [
  { bc: 64, br: 32, tk: 4, tr: 4 },
  { bc: 32, br: 32, tk: 2, tr: 4 },
  { bc: 32, br: 16, tk: 2, tr: 4 },
  { bc: 16, br: 16, tk: 1, tr: 4 },
  { bc: 16, br: 8, tk: 1, tr: 4 },
  { bc: 8, br: 8, tk: 1, tr: 4 },
];

/** The fastest forward tiles whose workgroup memory fits `limitBytes`. */
export function chooseForwardTiles(hd: number, limitBytes: number): RowTiles {
  return FWD_TILES.find((t) => forwardSharedBytes(hd, t) <= limitBytes) ?? FWD_TILES[FWD_TILES.length - 1];
}

/** The fastest dQ tiles whose workgroup memory fits `limitBytes`. */
export function chooseDqTiles(hd: number, limitBytes: number): RowTiles {
  return DQ_TILES.find((t) => dqSharedBytes(hd, t) <= limitBytes) ?? DQ_TILES[DQ_TILES.length - 1];
}

/** The fastest dK/dV tiles whose workgroup memory fits `limitBytes`. */
export function chooseDkvTiles(hd: number, limitBytes: number): KeyTiles {
  return DKV_TILES.find((t) => dkvSharedBytes(hd, t) <= limitBytes) ?? DKV_TILES[DKV_TILES.length - 1];
}

/**
 * Tiles for few query rows (decoding: rows = new tokens * G). Measured on the H200 (bench/few_rows.ts, H=32/8,
 * hd=64, 1..9 new tokens against 257 and 1024 cached keys): 8-row blocks with 64-key tiles were the fastest or
 * within a few microseconds of it at every size (18-46 us), while blocks sized to cover all rows at once (16 or
 * 32 rows) ran up to 2x slower; more rows simply take more 8-row blocks.
 */
export function chooseDecodeTiles(hd: number, rows: number, limitBytes: number): RowTiles {
  const cands: RowTiles[] = [
    { br: 8, bc: 64, tm: 1, tn: 4 },
    { br: 4, bc: 64, tm: 1, tn: 4 },
    { br: 4, bc: 32, tm: 1, tn: 4 },
  ];
  if (rows <= 64) {
    for (const t of cands) if (forwardSharedBytes(hd, t) <= limitBytes) return t;
  }
  return chooseForwardTiles(hd, limitBytes);
}

// Uniform struct shared by all attention kernels (16 words).
const UNIFORM_STRUCT = `struct P {
  T: u32, H: u32, Hkv: u32, G: u32,
  qoff: u32, kv_len: u32, window: u32, row_blocks: u32,
  scale: f32, kv_bstride: u32, kv_pstride: u32, split_len: u32,
  split_ostride: u32, split_lstride: u32, n_splits: u32, _pad: u32,
}`;
const UNIFORM_BYTES = 64;

function packUniforms(
  s: AttentionShape,
  rowBlocks: number,
  splitLen: number,
  oStride: number,
  lStride: number,
  nSplits: number,
): ArrayBuffer {
  return new Uniforms(UNIFORM_BYTES)
    .u32(s.T).u32(s.H).u32(s.Hkv).u32(s.H / s.Hkv)
    .u32(s.qoff).u32(s.kvLen).u32(s.window).u32(rowBlocks)
    .f32(s.scale).u32(s.kvBatchStride).u32(s.Hkv * s.hd).u32(splitLen)
    .u32(oStride).u32(lStride).u32(nSplits).u32(0).buffer;
}

// WGSL shared by the row-block kernels: packed-row addressing, masks and the swizzled transposed index.
function rowHelpers(hd: number): string {
  return `
const HD: u32 = ${hd}u;
const HDP: u32 = ${pad4(hd)}u;
const NEG: f32 = ${NEG};
// first element of packed row R (token R / G, head hk * G + R % G) of a [B, T, H, hd] tensor
fn row_addr(b: u32, hk: u32, R: u32) -> u32 {
  let t = R / p.G;
  return ((b * p.T + t) * p.H + hk * p.G + R % p.G) * HD;
}
fn row_stat(b: u32, hk: u32, R: u32) -> u32 {
  return (b * p.T + R / p.G) * p.H + hk * p.G + R % p.G;
}
fn kv_addr(b: u32, hk: u32, j: u32) -> u32 {
  return b * p.kv_bstride + j * p.kv_pstride + hk * HD;
}
// key j is visible from query position pos (causal, optional sliding window)
fn visible(j: u32, pos: u32) -> bool {
  return j <= pos && (p.window == 0u || j + p.window > pos);
}
`;
}

// transposed swizzled index (see the module comment): element (d, n4) of an [HDP][N4] vec4 tile
function tix(name: string, n4: number): string {
  const sw = Math.min(8, n4) - 1;
  return `fn ${name}(d: u32, n4: u32) -> u32 { return d * ${n4}u + (n4 ^ (d & ${sw}u)); }`;
}

// ---- forward --------------------------------------------------------------------------------------------

const fwdSpecs = new Map<string, KernelSpec>();

function forwardSpec(dtype: DType, hd: number, t: RowTiles, partial: boolean): KernelSpec {
  const key = `attn_fwd_${dtype}_hd${hd}_${t.br}x${t.bc}_${t.tm}x${t.tn}${partial ? "_split" : ""}`;
  let spec = fwdSpecs.get(key);
  if (spec) return spec;
  checkRowTiles(t);
  const T = wgslType(dtype);
  const OT = partial ? "f32" : T; // split partials stay f32 until combined
  const hdp = pad4(hd), nch = hdp / 4;
  const br4 = Math.max(1, t.br / 4), bc4 = t.bc / 4, tn4 = t.tn / 4;
  const rg = t.br / t.tm, cg = t.bc / t.tn, nt = rg * cg;
  const och = Math.ceil(nch / cg);
  const qv = Math.ceil(t.tm / 4); // vec4 reads of Q^T per d for a thread's TM rows
  spec = {
    key,
    bindings: ["read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read_write> o: array<${OT}>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> p: P;
${rowHelpers(hd)}
const NCH: u32 = ${nch}u;
const BR: u32 = ${t.br}u;
const BR4: u32 = ${br4}u;
const BC: u32 = ${t.bc}u;
const BC4: u32 = ${bc4}u;
const TM: u32 = ${t.tm}u;
const TN4: u32 = ${tn4}u;
const CG: u32 = ${cg}u;
const NT: u32 = ${nt}u;
const OCH: u32 = ${och}u;
var<workgroup> qs: array<vec4<f32>, ${hdp * br4}>;   // Q^T * scale, swizzled
var<workgroup> kvs: array<vec4<f32>, ${hdp * bc4}>;  // K^T swizzled, then V row-major [BC][NCH]
var<workgroup> ps: array<vec4<f32>, ${Math.max(t.br, 1) * bc4}>; // scores, then probabilities [BR][BC4]
${tix("qix", br4)}
${tix("kix", bc4)}

@compute @workgroup_size(${nt})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  // heavy (late) row blocks first: they have the most keys
  let blk = p.row_blocks - 1u - wid.x;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let nrows = p.T * p.G;
  let r0 = blk * BR;
  let r_last = min(r0 + BR, nrows) - 1u;
  let p_lo = p.qoff + r0 / p.G;
  let p_hi = p.qoff + r_last / p.G;
  var k_begin = 0u;
  if (p.window > 0u && p_lo + 1u > p.window) { k_begin = p_lo + 1u - p.window; }
  let k_end = min(p_hi + 1u, p.kv_len);
  let s_begin = k_begin + wid.z * p.split_len;
  let s_end = min(k_end, s_begin + p.split_len);

  let ty = lid / CG;
  let tx = lid % CG;

  // Q^T tile, pre-scaled so scores come out scaled
  for (var idx = lid; idx < HDP * BR4; idx += NT) {
    let d = idx % HDP;
    let r4 = idx / HDP;
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
      let R = r0 + r4 * 4u + e;
      if (R < nrows && d < HD && r4 * 4u + e < BR) { x[e] = f32(q[row_addr(b, hk, R) + d]) * p.scale; }
    }
    qs[qix(d, r4)] = x;
  }

  var m: array<f32, ${t.tm}>;
  var l: array<f32, ${t.tm}>;
  var pos: array<u32, ${t.tm}>;
  var acc: array<array<vec4<f32>, ${och}>, ${t.tm}>;
  for (var i = 0u; i < TM; i++) {
    m[i] = NEG;
    l[i] = 0.0;
    pos[i] = p.qoff + (r0 + ty * TM + i) / p.G;
    for (var c = 0u; c < OCH; c++) { acc[i][c] = vec4<f32>(0.0); }
  }

  for (var kt = s_begin; kt < s_end; kt += BC) {
    for (var idx = lid; idx < HDP * BC4; idx += NT) {
      let d = idx % HDP;
      let c4 = idx / HDP;
      var x = vec4<f32>(0.0);
      for (var e = 0u; e < 4u; e++) {
        let j = kt + c4 * 4u + e;
        if (j < s_end && d < HD) { x[e] = f32(k[kv_addr(b, hk, j) + d]); }
      }
      kvs[kix(d, c4)] = x;
    }
    workgroupBarrier();

    var s: array<array<vec4<f32>, ${tn4}>, ${t.tm}>;
    for (var i = 0u; i < TM; i++) { for (var c = 0u; c < TN4; c++) { s[i][c] = vec4<f32>(0.0); } }
    for (var d = 0u; d < HD; d++) {
      var qr: array<f32, ${t.tm}>;
      for (var u = 0u; u < ${qv}u; u++) {
        let x = qs[qix(d, (ty * TM) / 4u + u)];
        for (var e = 0u; e < min(4u, TM); e++) { qr[u * 4u + e] = x[(ty * TM) % 4u + e]; }
      }
      for (var c = 0u; c < TN4; c++) {
        let kk = kvs[kix(d, c * CG + tx)];
        for (var i = 0u; i < TM; i++) { s[i][c] = fma(vec4<f32>(qr[i]), kk, s[i][c]); }
      }
    }
    for (var i = 0u; i < TM; i++) {
      for (var c = 0u; c < TN4; c++) {
        var x = s[i][c];
        for (var e = 0u; e < 4u; e++) {
          let j = kt + (c * CG + tx) * 4u + e;
          if (!(j < s_end && visible(j, pos[i]))) { x[e] = NEG; }
        }
        s[i][c] = x;
        ps[(ty * TM + i) * BC4 + c * CG + tx] = x;
      }
    }
    workgroupBarrier();

    // K^T is consumed: V goes into the same tile, row-major
    for (var idx = lid; idx < BC * NCH; idx += NT) {
      let ch = idx % NCH;
      let c = idx / NCH;
      let j = kt + c;
      var x = vec4<f32>(0.0);
      for (var e = 0u; e < 4u; e++) {
        if (j < s_end && ch * 4u + e < HD) { x[e] = f32(v[kv_addr(b, hk, j) + ch * 4u + e]); }
      }
      kvs[c * NCH + ch] = x;
    }
    var alpha: array<f32, ${t.tm}>;
    for (var i = 0u; i < TM; i++) {
      var mx = NEG;
      for (var c4 = 0u; c4 < BC4; c4++) {
        let x = ps[(ty * TM + i) * BC4 + c4];
        mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
      }
      let m_new = max(m[i], mx);
      alpha[i] = exp(m[i] - m_new);
      m[i] = m_new;
    }
    workgroupBarrier();

    for (var i = 0u; i < TM; i++) {
      for (var c = 0u; c < TN4; c++) {
        // masked scores hold NEG; the select keeps them at exactly 0 even while m is still NEG
        let x = s[i][c];
        ps[(ty * TM + i) * BC4 + c * CG + tx] = select(vec4<f32>(0.0), exp(x - vec4<f32>(m[i])), x > vec4<f32>(-1.0e29));
      }
    }
    workgroupBarrier();

    for (var i = 0u; i < TM; i++) {
      l[i] *= alpha[i];
      for (var oc = 0u; oc < OCH; oc++) { acc[i][oc] *= alpha[i]; }
    }
    for (var c4 = 0u; c4 < BC4; c4++) {
      var pr: array<vec4<f32>, ${t.tm}>;
      for (var i = 0u; i < TM; i++) {
        pr[i] = ps[(ty * TM + i) * BC4 + c4];
        l[i] += pr[i].x + pr[i].y + pr[i].z + pr[i].w;
      }
      for (var e = 0u; e < 4u; e++) {
        for (var oc = 0u; oc < OCH; oc++) {
          let ch = tx + CG * oc;
          if (ch < NCH) {
            let vv = kvs[(c4 * 4u + e) * NCH + ch];
            for (var i = 0u; i < TM; i++) { acc[i][oc] = fma(vec4<f32>(pr[i][e]), vv, acc[i][oc]); }
          }
        }
      }
    }
    workgroupBarrier();
  }

  for (var i = 0u; i < TM; i++) {
    let R = r0 + ty * TM + i;
    if (R >= nrows || ty * TM + i >= BR) { continue; }
    let inv = select(0.0, 1.0 / l[i], l[i] > 0.0);
    let base = row_addr(b, hk, R) + wid.z * p.split_ostride;
    for (var oc = 0u; oc < OCH; oc++) {
      let ch = tx + CG * oc;
      if (ch >= NCH) { continue; }
      let y = acc[i][oc] * inv;
      for (var e = 0u; e < 4u; e++) {
        if (ch * 4u + e < HD) { o[base + ch * 4u + e] = ${OT}(y[e]); }
      }
    }
    if (tx == 0u) {
      lse[row_stat(b, hk, R) + wid.z * p.split_lstride] = select(NEG, m[i] + log(l[i]), l[i] > 0.0);
    }
  }
}
`,
  };
  fwdSpecs.set(key, spec);
  return spec;
}

/**
 * Forward attention. Bindings: q, k, v (read), o (rw), lse (rw, f32). With `nSplits > 1` the key range of each
 * row block is cut into `nSplits` pieces of `splitLen` keys (a multiple of the tile), o/lse receive f32 partial
 * results `[nSplits, B, T, H, hd]` / `[nSplits, B, T, H]` (each normalised by its own sum), and
 * {@linkcode attentionCombineSplits} merges them.
 */
export function attentionForward(
  dtype: DType,
  s: AttentionShape,
  tiles: RowTiles,
  split: { nSplits: number; splitLen: number } = { nSplits: 1, splitLen: 0 },
): Launch {
  validateShape(s);
  const partial = split.nSplits > 1;
  if (partial && split.splitLen % tiles.bc) throw new Error("attention: splitLen must be a multiple of bc");
  const spec = forwardSpec(dtype, s.hd, tiles, partial);
  const rows = s.T * (s.H / s.Hkv);
  const rowBlocks = ceilDiv(rows, tiles.br);
  const splitLen = partial ? split.splitLen : 0x7fffffff;
  return {
    spec,
    uniforms: packUniforms(
      s,
      rowBlocks,
      splitLen,
      partial ? s.B * s.T * s.H * s.hd : 0,
      partial ? s.B * s.T * s.H : 0,
      split.nSplits,
    ),
    workgroups: [rowBlocks, s.B * s.Hkv, split.nSplits],
  };
}

function validateShape(s: AttentionShape): void {
  if (s.H % s.Hkv !== 0) throw new Error(`attention: H=${s.H} is not a multiple of Hkv=${s.Hkv}`);
  if (s.T < 1 || s.hd < 1 || s.B < 1) throw new Error(`attention: empty shape ${JSON.stringify(s)}`);
  if (s.kvLen < s.qoff + s.T) throw new Error(`attention: kvLen ${s.kvLen} < qoff + T = ${s.qoff + s.T}`);
}

const combineSpecs = new Map<string, KernelSpec>();

/**
 * Merges split-K partials: `lse = log sum_s exp(lse_s)`, `o = sum_s exp(lse_s - lse) o_s`. Bindings: o_part,
 * lse_part (read, f32), o (rw, dtype), lse (rw, f32). One thread per output element.
 */
export function attentionCombineSplits(dtype: DType, rows: number, hd: number, nSplits: number): Launch {
  const key = `attn_combine_${dtype}`;
  let spec = combineSpecs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key,
      bindings: ["read", "read", "rw", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { rows: u32, hd: u32, n_splits: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> o_part: array<f32>;
@group(0) @binding(1) var<storage, read> lse_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<${T}>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid;
  if (i >= p.rows * p.hd) { return; }
  let r = i / p.hd;
  var mx = ${NEG};
  for (var s = 0u; s < p.n_splits; s++) { mx = max(mx, lse_part[s * p.rows + r]); }
  var den = 0.0;
  var num = 0.0;
  for (var s = 0u; s < p.n_splits; s++) {
    let ls = lse_part[s * p.rows + r];
    // empty splits carry lse = NEG and contribute nothing
    let w = select(0.0, exp(ls - mx), ls > -1.0e29);
    den += w;
    num += w * o_part[s * p.rows * p.hd + i];
  }
  o[i] = ${T}(num / den);
  if (i % p.hd == 0u) { lse[r] = mx + log(den); }
}
`,
    };
    combineSpecs.set(key, spec);
  }
  const n = rows * hd;
  const wg = ceilDiv(n, 256);
  const y = ceilDiv(wg, 65535);
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(hd).u32(nSplits).buffer,
    workgroups: [ceilDiv(wg, y), y],
  };
}

// ---- backward -------------------------------------------------------------------------------------------

const deltaSpecs = new Map<string, KernelSpec>();

/** Threads that share one row of the delta kernel (each takes every 16th element of the row). */
const DELTA_LANES = 16;

/**
 * `delta[row] = sum_d dO[row, d] * O[row, d]` for rows = B*T*H. Bindings: o, do (read), delta (rw, f32).
 * 16 threads share a row, so that neighbouring threads read neighbouring elements: with one thread per row every
 * load of a subgroup touched 32 rows' cache lines (3.9 ms for 8 layers of a 1B training step on the H200).
 */
export function attentionBackwardDelta(dtype: DType, rows: number, hd: number): Launch {
  const key = `attn_delta_${dtype}`;
  let spec = deltaSpecs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key,
      bindings: ["read", "read", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { rows: u32, hd: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> o: array<${T}>;
@group(0) @binding(1) var<storage, read> go: array<${T}>;
@group(0) @binding(2) var<storage, read_write> delta: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
var<workgroup> part: array<f32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = (wid.y * nwg.x + wid.x) * ${256 / DELTA_LANES}u + lid / ${DELTA_LANES}u;
  let j = lid % ${DELTA_LANES}u;
  var acc = 0.0;
  if (r < p.rows) {
    for (var d = j; d < p.hd; d += ${DELTA_LANES}u) { acc = fma(f32(o[r * p.hd + d]), f32(go[r * p.hd + d]), acc); }
  }
  part[lid] = acc;
  workgroupBarrier();
  if (j == 0u && r < p.rows) {
    var sum = 0.0;
    for (var i = 0u; i < ${DELTA_LANES}u; i++) { sum += part[lid + i]; }
    delta[r] = sum;
  }
}
`,
    };
    deltaSpecs.set(key, spec);
  }
  const wg = ceilDiv(rows, 256 / DELTA_LANES);
  const y = ceilDiv(wg, 65535);
  return { spec, uniforms: new Uniforms(16).u32(rows).u32(hd).buffer, workgroups: [ceilDiv(wg, y), y] };
}

const dqSpecs = new Map<string, KernelSpec>();

function dqSpec(dtype: DType, hd: number, t: RowTiles): KernelSpec {
  const key = `attn_dq_${dtype}_hd${hd}_${t.br}x${t.bc}_${t.tm}x${t.tn}`;
  let spec = dqSpecs.get(key);
  if (spec) return spec;
  checkRowTiles(t);
  const T = wgslType(dtype);
  const hdp = pad4(hd);
  const br4 = Math.max(1, t.br / 4), bc4 = t.bc / 4, tn4 = t.tn / 4;
  const rg = t.br / t.tm, cg = t.bc / t.tn, nt = rg * cg;
  const dpt = Math.ceil(hdp / cg);
  const qv = Math.ceil(t.tm / 4);
  spec = {
    key,
    bindings: ["read", "read", "read", "read", "read", "read", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read> go: array<${T}>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<${T}>;
@group(0) @binding(7) var<uniform> p: P;
${rowHelpers(hd)}
const BR: u32 = ${t.br}u;
const BR4: u32 = ${br4}u;
const BC: u32 = ${t.bc}u;
const BC4: u32 = ${bc4}u;
const TM: u32 = ${t.tm}u;
const TN4: u32 = ${tn4}u;
const CG: u32 = ${cg}u;
const NT: u32 = ${nt}u;
const DPT: u32 = ${dpt}u;
var<workgroup> qs: array<vec4<f32>, ${hdp * br4}>;   // Q^T * scale
var<workgroup> dos: array<vec4<f32>, ${hdp * br4}>;  // dO^T
var<workgroup> ks: array<vec4<f32>, ${hdp * bc4}>;   // K^T
var<workgroup> vs: array<vec4<f32>, ${hdp * bc4}>;   // V^T
var<workgroup> dss: array<vec4<f32>, ${Math.max(t.br, 1) * bc4}>; // dS [BR][BC4]
${tix("qix", br4)}
${tix("kix", bc4)}

fn load_rows_t(b: u32, hk: u32, r0: u32, nrows: u32, lid: u32) {
  for (var idx = lid; idx < HDP * BR4; idx += NT) {
    let d = idx % HDP;
    let r4 = idx / HDP;
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
      let R = r0 + r4 * 4u + e;
      if (R < nrows && d < HD && r4 * 4u + e < BR) {
        let a = row_addr(b, hk, R) + d;
        x[e] = f32(q[a]) * p.scale;
        y[e] = f32(go[a]);
      }
    }
    qs[qix(d, r4)] = x;
    dos[qix(d, r4)] = y;
  }
}

@compute @workgroup_size(${nt})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let blk = p.row_blocks - 1u - wid.x;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let nrows = p.T * p.G;
  let r0 = blk * BR;
  let r_last = min(r0 + BR, nrows) - 1u;
  let p_lo = p.qoff + r0 / p.G;
  let p_hi = p.qoff + r_last / p.G;
  var k_begin = 0u;
  if (p.window > 0u && p_lo + 1u > p.window) { k_begin = p_lo + 1u - p.window; }
  let k_end = min(p_hi + 1u, p.kv_len);
  let ty = lid / CG;
  let tx = lid % CG;

  load_rows_t(b, hk, r0, nrows, lid);
  var pos: array<u32, ${t.tm}>;
  var lrow: array<f32, ${t.tm}>;
  var drow: array<f32, ${t.tm}>;
  var acc: array<array<f32, ${dpt}>, ${t.tm}>;
  for (var i = 0u; i < TM; i++) {
    let R = min(r0 + ty * TM + i, nrows - 1u);
    pos[i] = p.qoff + (r0 + ty * TM + i) / p.G;
    lrow[i] = lse[row_stat(b, hk, R)];
    drow[i] = delta[row_stat(b, hk, R)];
    for (var c = 0u; c < DPT; c++) { acc[i][c] = 0.0; }
  }

  for (var kt = k_begin; kt < k_end; kt += BC) {
    for (var idx = lid; idx < HDP * BC4; idx += NT) {
      let d = idx % HDP;
      let c4 = idx / HDP;
      var x = vec4<f32>(0.0);
      var y = vec4<f32>(0.0);
      for (var e = 0u; e < 4u; e++) {
        let j = kt + c4 * 4u + e;
        if (j < k_end && d < HD) {
          let a = kv_addr(b, hk, j) + d;
          x[e] = f32(k[a]);
          y[e] = f32(v[a]);
        }
      }
      ks[kix(d, c4)] = x;
      vs[kix(d, c4)] = y;
    }
    workgroupBarrier();

    var s: array<array<vec4<f32>, ${tn4}>, ${t.tm}>;
    var dp: array<array<vec4<f32>, ${tn4}>, ${t.tm}>;
    for (var i = 0u; i < TM; i++) {
      for (var c = 0u; c < TN4; c++) { s[i][c] = vec4<f32>(0.0); dp[i][c] = vec4<f32>(0.0); }
    }
    for (var d = 0u; d < HD; d++) {
      var qr: array<f32, ${t.tm}>;
      var dr: array<f32, ${t.tm}>;
      for (var u = 0u; u < ${qv}u; u++) {
        let x = qs[qix(d, (ty * TM) / 4u + u)];
        let y = dos[qix(d, (ty * TM) / 4u + u)];
        for (var e = 0u; e < min(4u, TM); e++) {
          qr[u * 4u + e] = x[(ty * TM) % 4u + e];
          dr[u * 4u + e] = y[(ty * TM) % 4u + e];
        }
      }
      for (var c = 0u; c < TN4; c++) {
        let kk = ks[kix(d, c * CG + tx)];
        let vv = vs[kix(d, c * CG + tx)];
        for (var i = 0u; i < TM; i++) {
          s[i][c] = fma(vec4<f32>(qr[i]), kk, s[i][c]);
          dp[i][c] = fma(vec4<f32>(dr[i]), vv, dp[i][c]);
        }
      }
    }
    for (var i = 0u; i < TM; i++) {
      for (var c = 0u; c < TN4; c++) {
        var ds = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
          let j = kt + (c * CG + tx) * 4u + e;
          if (j < k_end && visible(j, pos[i])) {
            let pr = exp(s[i][c][e] - lrow[i]);
            ds[e] = pr * (dp[i][c][e] - drow[i]);
          }
        }
        dss[(ty * TM + i) * BC4 + c * CG + tx] = ds;
      }
    }
    workgroupBarrier();

    for (var c4 = 0u; c4 < BC4; c4++) {
      var dr: array<vec4<f32>, ${t.tm}>;
      for (var i = 0u; i < TM; i++) { dr[i] = dss[(ty * TM + i) * BC4 + c4]; }
      for (var c = 0u; c < DPT; c++) {
        let d = tx + CG * c;
        if (d < HD) {
          let kk = ks[kix(d, c4)];
          for (var i = 0u; i < TM; i++) { acc[i][c] += dot(dr[i], kk); }
        }
      }
    }
    workgroupBarrier();
  }

  for (var i = 0u; i < TM; i++) {
    let R = r0 + ty * TM + i;
    if (R >= nrows || ty * TM + i >= BR) { continue; }
    let base = row_addr(b, hk, R);
    for (var c = 0u; c < DPT; c++) {
      let d = tx + CG * c;
      if (d < HD) { dq[base + d] = ${T}(acc[i][c] * p.scale); }
    }
  }
}
`,
  };
  dqSpecs.set(key, spec);
  return spec;
}

/** dQ. Bindings: q, k, v, do (read), lse, delta (read, f32), dq (rw). */
export function attentionBackwardDq(dtype: DType, s: AttentionShape, tiles: RowTiles): Launch {
  validateShape(s);
  const spec = dqSpec(dtype, s.hd, tiles);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), tiles.br);
  return {
    spec,
    uniforms: packUniforms(s, rowBlocks, 0, 0, 0, 1),
    workgroups: [rowBlocks, s.B * s.Hkv, 1],
  };
}

const dkvSpecs = new Map<string, KernelSpec>();

function dkvSpec(dtype: DType, hd: number, t: KeyTiles): KernelSpec {
  const key = `attn_dkv_${dtype}_hd${hd}_${t.bc}x${t.br}_${t.tk}x${t.tr}`;
  let spec = dkvSpecs.get(key);
  if (spec) return spec;
  checkKeyTiles(t);
  const T = wgslType(dtype);
  const hdp = pad4(hd);
  const br4 = t.br / 4, bc4 = t.bc / 4, tr4 = t.tr / 4;
  const kg = t.bc / t.tk, cg = t.br / t.tr, nt = kg * cg;
  const dpt = Math.ceil(hdp / cg);
  const kvec = Math.ceil(t.tk / 4);
  spec = {
    key,
    bindings: ["read", "read", "read", "read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read> go: array<${T}>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> dk: array<${T}>;
@group(0) @binding(7) var<storage, read_write> dv: array<${T}>;
@group(0) @binding(8) var<uniform> p: P;
${rowHelpers(hd)}
const BR: u32 = ${t.br}u;
const BR4: u32 = ${br4}u;
const BC: u32 = ${t.bc}u;
const BC4: u32 = ${bc4}u;
const TK: u32 = ${t.tk}u;
const TR4: u32 = ${tr4}u;
const CG: u32 = ${cg}u;
const NT: u32 = ${nt}u;
const DPT: u32 = ${dpt}u;
var<workgroup> ks: array<vec4<f32>, ${hdp * bc4}>;   // K^T
var<workgroup> vs: array<vec4<f32>, ${hdp * bc4}>;   // V^T
var<workgroup> qs: array<vec4<f32>, ${hdp * br4}>;   // Q^T * scale
var<workgroup> dos: array<vec4<f32>, ${hdp * br4}>;  // dO^T
var<workgroup> pts: array<vec4<f32>, ${t.bc * br4}>; // P^T [BC][BR4]
var<workgroup> dsts: array<vec4<f32>, ${t.bc * br4}>; // dS^T [BC][BR4]
var<workgroup> lsh: array<f32, ${t.br}>;
var<workgroup> dsh: array<f32, ${t.br}>;
${tix("qix", br4)}
${tix("kix", bc4)}

@compute @workgroup_size(${nt})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let k0 = wid.x * BC;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let nrows = p.T * p.G;
  let k_last = min(k0 + BC, p.kv_len) - 1u;
  // query tokens that can see keys k0..k_last: positions k0 .. k_last + W - 1
  var t_lo = 0u;
  if (k0 > p.qoff) { t_lo = k0 - p.qoff; }
  var t_end = p.T;
  if (p.window > 0u) { t_end = min(p.T, k_last + p.window - p.qoff); }
  let r_begin = t_lo * p.G;
  let r_end = t_end * p.G;
  let ty = lid / CG;
  let tx = lid % CG;

  for (var idx = lid; idx < HDP * BC4; idx += NT) {
    let d = idx % HDP;
    let c4 = idx / HDP;
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
      let j = k0 + c4 * 4u + e;
      if (j < p.kv_len && d < HD) {
        let a = kv_addr(b, hk, j) + d;
        x[e] = f32(k[a]);
        y[e] = f32(v[a]);
      }
    }
    ks[kix(d, c4)] = x;
    vs[kix(d, c4)] = y;
  }
  var dka: array<array<f32, ${dpt}>, ${t.tk}>;
  var dva: array<array<f32, ${dpt}>, ${t.tk}>;
  for (var i = 0u; i < TK; i++) {
    for (var c = 0u; c < DPT; c++) { dka[i][c] = 0.0; dva[i][c] = 0.0; }
  }

  for (var rt = r_begin; rt < r_end; rt += BR) {
    for (var idx = lid; idx < HDP * BR4; idx += NT) {
      let d = idx % HDP;
      let r4 = idx / HDP;
      var x = vec4<f32>(0.0);
      var y = vec4<f32>(0.0);
      for (var e = 0u; e < 4u; e++) {
        let R = rt + r4 * 4u + e;
        if (R < r_end && d < HD) {
          let a = row_addr(b, hk, R) + d;
          x[e] = f32(q[a]) * p.scale;
          y[e] = f32(go[a]);
        }
      }
      qs[qix(d, r4)] = x;
      dos[qix(d, r4)] = y;
    }
    for (var r = lid; r < BR; r += NT) {
      let R = min(rt + r, nrows - 1u);
      lsh[r] = lse[row_stat(b, hk, R)];
      dsh[r] = delta[row_stat(b, hk, R)];
    }
    workgroupBarrier();

    var s: array<array<vec4<f32>, ${tr4}>, ${t.tk}>;
    var dp: array<array<vec4<f32>, ${tr4}>, ${t.tk}>;
    for (var i = 0u; i < TK; i++) {
      for (var c = 0u; c < TR4; c++) { s[i][c] = vec4<f32>(0.0); dp[i][c] = vec4<f32>(0.0); }
    }
    for (var d = 0u; d < HD; d++) {
      var kr: array<f32, ${t.tk}>;
      var vr: array<f32, ${t.tk}>;
      for (var u = 0u; u < ${kvec}u; u++) {
        let x = ks[kix(d, (ty * TK) / 4u + u)];
        let y = vs[kix(d, (ty * TK) / 4u + u)];
        for (var e = 0u; e < min(4u, TK); e++) {
          kr[u * 4u + e] = x[(ty * TK) % 4u + e];
          vr[u * 4u + e] = y[(ty * TK) % 4u + e];
        }
      }
      for (var c = 0u; c < TR4; c++) {
        let qq = qs[qix(d, c * CG + tx)];
        let dd = dos[qix(d, c * CG + tx)];
        for (var i = 0u; i < TK; i++) {
          s[i][c] = fma(vec4<f32>(kr[i]), qq, s[i][c]);
          dp[i][c] = fma(vec4<f32>(vr[i]), dd, dp[i][c]);
        }
      }
    }
    for (var i = 0u; i < TK; i++) {
      let j = k0 + ty * TK + i;
      for (var c = 0u; c < TR4; c++) {
        var pv = vec4<f32>(0.0);
        var dv4 = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
          let r = (c * CG + tx) * 4u + e;
          let R = rt + r;
          if (R < r_end && j < p.kv_len && visible(j, p.qoff + R / p.G)) {
            pv[e] = exp(s[i][c][e] - lsh[r]);
            dv4[e] = pv[e] * (dp[i][c][e] - dsh[r]);
          }
        }
        pts[(ty * TK + i) * BR4 + c * CG + tx] = pv;
        dsts[(ty * TK + i) * BR4 + c * CG + tx] = dv4;
      }
    }
    workgroupBarrier();

    for (var r4 = 0u; r4 < BR4; r4++) {
      var pr: array<vec4<f32>, ${t.tk}>;
      var dr: array<vec4<f32>, ${t.tk}>;
      for (var i = 0u; i < TK; i++) {
        pr[i] = pts[(ty * TK + i) * BR4 + r4];
        dr[i] = dsts[(ty * TK + i) * BR4 + r4];
      }
      for (var c = 0u; c < DPT; c++) {
        let d = tx + CG * c;
        if (d < HD) {
          let dd = dos[qix(d, r4)];
          let qq = qs[qix(d, r4)];
          for (var i = 0u; i < TK; i++) {
            dva[i][c] += dot(pr[i], dd);
            dka[i][c] += dot(dr[i], qq);
          }
        }
      }
    }
    workgroupBarrier();
  }

  for (var i = 0u; i < TK; i++) {
    let j = k0 + ty * TK + i;
    if (j >= p.kv_len) { continue; }
    let base = kv_addr(b, hk, j);
    for (var c = 0u; c < DPT; c++) {
      let d = tx + CG * c;
      if (d < HD) {
        dk[base + d] = ${T}(dka[i][c]);
        dv[base + d] = ${T}(dva[i][c]);
      }
    }
  }
}
`,
  };
  dkvSpecs.set(key, spec);
  return spec;
}

/**
 * dK and dV. Bindings: q, k, v, do (read), lse, delta (read, f32), dk, dv (rw). dk/dv have k's layout with
 * `kvBatchStride`; every key < kvLen is written (zero where no query sees it).
 */
export function attentionBackwardDkv(dtype: DType, s: AttentionShape, tiles: KeyTiles): Launch {
  validateShape(s);
  const spec = dkvSpec(dtype, s.hd, tiles);
  return {
    spec,
    uniforms: packUniforms(s, 0, 0, 0, 0, 1),
    workgroups: [ceilDiv(s.kvLen, tiles.bc), s.B * s.Hkv, 1],
  };
}
