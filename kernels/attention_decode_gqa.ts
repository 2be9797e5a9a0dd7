/**
 * Decode attention for one new query token per sequence, in a single dispatch.
 *
 * Why: batch-1 decoding otherwise runs the training forward kernel (kernels/attention.ts) split over the keys
 * plus a combine dispatch (kernels/attention_decode.ts). For the few hundred keys of a short context that path is
 * mostly fixed latency (about 19 us forward + 11 us combine per layer on the H200 at ~200 keys): each workgroup
 * handles an 8x64 tile, and the combine is a second dispatch. Here one workgroup takes one (batch entry, kv head)
 * and all G = H / Hkv query heads that read it, so each K/V row is loaded once for the whole group and nothing
 * has to be merged in another dispatch.
 *
 * What: for each batch entry b and query head h (kv head `floor(h / G)`), with the query at position
 * `pos = kvLen - 1`, `o = softmax(scale * q K^T) V` over the keys j in `[max(0, kvLen - W), kvLen)` with a sliding
 * window W > 0 (`j > pos - W`, as the training kernel), else over all `j < kvLen`. Layouts as in
 * kernels/attention.ts: q and o `[B, 1, H, hd]`, the caches `[B, maxT, Hkv, hd]` with batch stride
 * `kvBatchStride`; storage f32 or f16, all math in f32, o rounded to the storage type once.
 *
 * Scheme: the visible keys go by in chunks of C. In a chunk, thread t scores key t against the G pre-scaled query
 * rows (staged in workgroup memory, read as broadcasts). For the P·V product the same threads regroup as KS
 * slices of hd/4 threads, thread (s, d4) owning output dims 4*d4.. of all G heads, and slice s taking the chunk's
 * keys s*hd/4.. (as many keys as it has threads: thread (s, d4) is also the thread that scored key s*hd/4 + d4).
 * Each slice keeps its own online softmax (running max, sum, accumulator per head): its threads read the slice's
 * scores to find its max, so no workgroup-wide max reduction (log2(C) barriers) is needed, and each thread
 * exponentiates only the scores of its own key. Two barriers per chunk. At the end the KS slices merge with the
 * usual rescaling (`exp(m_s - m)`) through workgroup memory. V rows are read as 16-byte vectors, the threads of a
 * slice covering one row together; f16 rows are read as packed `vec2<u32>` (four values) like kernels/gemv.ts.
 *
 * @module
 */
import { cachedSpec, type DType, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import type { AttentionShape } from "./attention.ts";
import { WGSL_DECODE_ROTATION } from "./attention_decode.ts";

/** Largest head dimension the kernel takes (hd / 4 threads cover one row; 64 of them at most). */
export const DECODE_GQA_MAX_HD = 256;

/**
 * Most query heads per kv head: each thread keeps a running max, sum, score, rescale factor and 4-wide accumulator
 * per head (8 G registers), so larger groups would spill; they take the split path.
 */
export const DECODE_GQA_MAX_G = 16;

/**
 * Workgroup memory the kernel plans for when the caller gives no device limit: WebGPU's default
 * `maxComputeWorkgroupStorageSize`, which every adapter offers.
 */
export const DECODE_GQA_DEFAULT_STORAGE = 16384;

// Workgroup sizes tried, largest first: the largest whose workgroup memory fits the limit wins (more keys per
// chunk, fewer barriers per key).
const WORKGROUP_SIZES = [256, 128, 64];

/** The launch geometry of one kernel variant. */
export interface DecodeGqaConfig {
  /** Threads per workgroup. */
  wg: number;
  /** Threads per key slice (hd / 4): one 4-wide group of output dims each. */
  tps: number;
  /** Key slices per workgroup. */
  ks: number;
  /** Keys per chunk (ks * tps; threads at or past it only join the barriers). */
  chunk: number;
  /** Heads merged per pass of the final slice reduction. */
  headsPerPass: number;
  /** Bytes of workgroup memory. */
  sharedBytes: number;
}

function config(G: number, hd: number, wg: number): DecodeGqaConfig {
  const tps = hd / 4, ks = Math.floor(wg / tps), chunk = ks * tps;
  // the score buffer doubles as the slices' accumulators at the end: 4 floats per thread per merged head
  const scoreRows = Math.max(G, 4);
  const headsPerPass = Math.min(G, Math.floor(scoreRows / 4));
  const floats = G * hd + scoreRows * chunk + G * chunk + 2 * ks * G;
  return { wg, tps, ks, chunk, headsPerPass, sharedBytes: 4 * floats };
}

/**
 * The kernel geometry for G query heads per kv head and head dimension hd within `limitBytes` of workgroup
 * memory, or null when no workgroup size fits (or hd is not a multiple of 4 in 4..256, or G not in 1..16).
 */
export function decodeGqaConfig(
  G: number,
  hd: number,
  limitBytes = DECODE_GQA_DEFAULT_STORAGE,
): DecodeGqaConfig | null {
  if (
    !Number.isInteger(G) || G < 1 || G > DECODE_GQA_MAX_G || !Number.isInteger(hd) || hd < 4 ||
    hd > DECODE_GQA_MAX_HD || hd % 4
  ) {
    return null;
  }
  for (const wg of WORKGROUP_SIZES) {
    const c = config(G, hd, wg);
    if (c.ks >= 1 && c.sharedBytes <= limitBytes) return c;
  }
  return null;
}

/**
 * Whether {@linkcode attentionDecodeGqa} takes this geometry: f32 or f16 storage, hd a multiple of 4 in 4..256,
 * and G = H / Hkv query heads per kv head in 1..16 and few enough that a chunk's scores fit `limitBytes` of
 * workgroup memory (in the default 16 KiB: every G at hd <= 128, G <= 10 at hd 256).
 */
export function decodeGqaSupported(
  dtype: DType,
  G: number,
  hd: number,
  limitBytes = DECODE_GQA_DEFAULT_STORAGE,
): boolean {
  return (dtype === "f32" || dtype === "f16") && decodeGqaConfig(G, hd, limitBytes) !== null;
}

const NEG = "-1.0e30";

function decodeGqaSpec(dtype: DType, G: number, hd: number, c: DecodeGqaConfig, rope: boolean): KernelSpec {
  const f16 = dtype === "f16";
  return cachedSpec(`attn_decode_gqa_${dtype}_g${G}_hd${hd}_wg${c.wg}${rope ? "_rope" : ""}`, () => {
    const T = wgslType(dtype);
    // 4 values per item: a vec4 of f32, or four f16 packed in two words (works without vector f16 loads)
    const item = f16 ? "vec2<u32>" : "vec4<f32>";
    const ssLen = Math.max(G, 4) * c.chunk, psLen = G * c.chunk;
    const unpack = f16
      ? "let x = buf[i]; return vec4<f32>(unpack2x16float(x.x), unpack2x16float(x.y));"
      : "return buf[i];";
    const pack = f16 ? "vec2<u32>(pack2x16float(x.xy), pack2x16float(x.zw))" : "x";
    const cache = rope ? "read_write" : "read";
    const bindings = rope
      ? `@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> kn: array<${T}>;
@group(0) @binding(2) var<storage, read> vn: array<${T}>;
@group(0) @binding(3) var<storage, read> INV_FREQ: array<f32>;
@group(0) @binding(4) var<storage, ${cache}> k: array<${item}>;
@group(0) @binding(5) var<storage, ${cache}> v: array<${item}>;
@group(0) @binding(6) var<storage, read_write> o: array<${T}>;
@group(0) @binding(7) var<uniform> p: P;`
      : `@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, ${cache}> k: array<${item}>;
@group(0) @binding(2) var<storage, ${cache}> v: array<${item}>;
@group(0) @binding(3) var<storage, read_write> o: array<${T}>;
@group(0) @binding(4) var<uniform> p: P;`;
    // RoPE exactly as kernels/attention_decode.ts's ropeKvAppend computes it (position p.start, HF's scaling of
    // cos and sin), each rotated value rounded to T as that kernel stores it
    const ropeFns = !rope ? "" : `${WGSL_DECODE_ROTATION}
fn kstore(x: vec4<f32>) -> ${item} { return ${pack}; }`;
    // the new token's k (rotated) and v of this (sequence, kv head) go into the cache at position kv_len - 1,
    // written by this workgroup alone and read back by it after the storage barrier
    const ropePrologue = !rope ? "" : `
  {
    let half = HD / 2u;
    let src = (b * (p.H / G) + hk) * HD;
    let dst = row0 + (p.kv_len - 1u) * (p.kv_pstride / 4u);
    for (var j = lid; j < HD / 8u; j += WG) {
      var lo: vec4<f32>;
      var hi: vec4<f32>;
      for (var e = 0u; e < 4u; e++) {
        let d = 4u * j + e;
        let x1 = f32(kn[src + d]);
        let x2 = f32(kn[src + d + half]);
        let cs = rotation(d, 0u);
        lo[e] = x1 * cs.x - x2 * cs.y;
        hi[e] = x2 * cs.x + x1 * cs.y;
      }
      k[dst + j] = kstore(lo);
      k[dst + j + half / 4u] = kstore(hi);
    }
    for (var j = lid; j < HD / 4u; j += WG) {
      let a = src + 4u * j;
      v[dst + j] = kstore(vec4<f32>(f32(vn[a]), f32(vn[a + 1u]), f32(vn[a + 2u]), f32(vn[a + 3u])));
    }
  }
  storageBarrier();`;
    const qStage = rope
      ? `for (var i = lid; i < G * TPS; i += WG) {
    let g = i / TPS;
    var r: vec4<f32>;
    for (var e = 0u; e < 4u; e++) {
      let d = (i % TPS) * 4u + e;
      let upper = d >= HD / 2u;
      let dd = select(d, d - HD / 2u, upper);
      let x = f32(q[qbase + g * HD + d]);
      let y = f32(q[qbase + g * HD + select(d + HD / 2u, dd, upper)]);
      let cs = rotation(dd, 0u);
      r[e] = f32(${T}(select(x * cs.x - y * cs.y, x * cs.x + y * cs.y, upper)));
    }
    qs[i] = r * p.scale;
  }`
      : `for (var i = lid; i < G * TPS; i += WG) {
    let a = qbase + i * 4u;
    qs[i] = vec4<f32>(f32(q[a]), f32(q[a + 1u]), f32(q[a + 2u]), f32(q[a + 3u])) * p.scale;
  }`;
    return {
      bindings: rope ? ["read", "read", "read", "read", "rw", "rw", "rw"] : ["read", "read", "read", "rw"],
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
struct P { kv_len: u32, window: u32, scale: f32, H: u32, kv_bstride: u32, kv_pstride: u32, start: i32, scaling: f32 }
${bindings}
const G: u32 = ${G}u;
const HD: u32 = ${hd}u;
const TPS: u32 = ${c.tps}u;
const KS: u32 = ${c.ks}u;
const C: u32 = ${c.chunk}u;
const WG: u32 = ${c.wg}u;
const HP: u32 = ${c.headsPerPass}u;
const VB: u32 = ${Math.min(c.tps, 16)}u; // V rows a thread loads at once (16 registers of 4 values)
const NEG: f32 = ${NEG};
var<workgroup> qs: array<vec4<f32>, ${G * c.tps}>; // the group's query rows * scale, [G][TPS]
var<workgroup> ss: array<f32, ${ssLen}>; // scores [G][C]; at the end the slices' accumulators
var<workgroup> ps: array<f32, ${psLen}>; // probabilities [G][C], each against its slice's max
var<workgroup> ms: array<f32, ${c.ks * G}>; // final running max per (slice, head)
var<workgroup> ls: array<f32, ${c.ks * G}>; // final running sum per (slice, head)

fn kload(i: u32) -> vec4<f32> { ${unpack.replaceAll("buf", "k")} }
fn vload(i: u32) -> vec4<f32> { ${unpack.replaceAll("buf", "v")} }
${ropeFns}

@compute @workgroup_size(${c.wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let hk = wid.x;
  let b = wid.y;
  // the group's G query heads are consecutive rows of q (and of o)
  let qbase = (b * p.H + hk * G) * HD;
  ${qStage}
  // the query sits at position kv_len - 1 and sees keys j > kv_len - 1 - window: one contiguous range
  var k_begin = 0u;
  if (p.window > 0u && p.kv_len > p.window) { k_begin = p.kv_len - p.window; }
  let k_end = p.kv_len;
  let row0 = (b * p.kv_bstride + hk * HD) / 4u; // 4-value item of key 0, dim 0
  let pstride = p.kv_pstride / 4u;
  let s = lid / TPS;
  let d4 = lid % TPS;
  let in_chunk = lid < C; // threads past the chunk (when hd / 4 does not divide WG) only join the barriers

  var m: array<f32, ${G}>;
  var l: array<f32, ${G}>;
  var acc: array<vec4<f32>, ${G}>;
  for (var g = 0u; g < G; g++) {
    m[g] = NEG;
    l[g] = 0.0;
    acc[g] = vec4<f32>(0.0);
  }${ropePrologue}
  workgroupBarrier();

  for (var c0 = k_begin; c0 < k_end; c0 += C) {
    let j = c0 + lid;
    let live = in_chunk && j < k_end;
    // The slice's V rows (the first VB of them) are loaded before the scores, so their memory latency overlaps
    // the K loads' instead of following them (on the H200, in the stream, a layer's call went from about 31 to
    // 27 us at 130-145 keys). Rows past kv_len are never read (they may hold anything, NaN included): a missing
    // row reads the last key again and weighs 0.
    let j0 = c0 + s * TPS;
    let nk = select(0u, min(TPS, k_end - j0), j0 < k_end);
    var vr: array<vec4<f32>, VB>;
    if (in_chunk) {
      for (var i = 0u; i < VB; i++) { vr[i] = vload(row0 + min(j0 + i, k_end - 1u) * pstride + d4); }
    }
    var sc: array<f32, ${G}>;
    for (var g = 0u; g < G; g++) { sc[g] = NEG; }
    if (live) {
      for (var g = 0u; g < G; g++) { sc[g] = 0.0; }
      let row = row0 + j * pstride;
      for (var e = 0u; e < TPS; e++) {
        let kk = kload(row + e);
        for (var g = 0u; g < G; g++) { sc[g] += dot(qs[g * TPS + e], kk); }
      }
    }
    if (in_chunk) {
      for (var g = 0u; g < G; g++) { ss[g * C + lid] = sc[g]; }
    }
    workgroupBarrier();

    // every thread of a slice reads the slice's scores and reaches the same max; keys past the end score NEG
    var alpha: array<f32, ${G}>;
    if (in_chunk) {
      for (var g = 0u; g < G; g++) {
        var mx = NEG;
        for (var i = 0u; i < TPS; i++) { mx = max(mx, ss[g * C + s * TPS + i]); }
        let m_new = max(m[g], mx);
        alpha[g] = exp(m[g] - m_new);
        m[g] = m_new;
        ps[g * C + lid] = select(0.0, exp(sc[g] - m_new), live);
      }
    }
    workgroupBarrier();

    if (in_chunk) {
      for (var g = 0u; g < G; g++) {
        acc[g] *= alpha[g];
        l[g] *= alpha[g];
      }
      // blocks of VB rows, the first one loaded above; a weight of 0 adds exactly nothing
      for (var i0 = 0u; i0 < TPS; i0 += VB) {
        if (i0 > 0u) {
          for (var i = 0u; i < VB; i++) { vr[i] = vload(row0 + min(j0 + i0 + i, k_end - 1u) * pstride + d4); }
        }
        for (var i = 0u; i < VB; i++) {
          for (var g = 0u; g < G; g++) {
            let pr = select(0.0, ps[g * C + s * TPS + min(i0 + i, TPS - 1u)], i0 + i < nk);
            acc[g] = fma(vec4<f32>(pr), vr[i], acc[g]);
            l[g] += pr;
          }
        }
      }
    }
    // the next chunk's first writes (ss) follow this chunk's last reads of ss behind the barrier above, and its
    // writes of ps come after its own first barrier: no third barrier here
  }

  // merge the slices: o = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, with M the max over the slices
  if (in_chunk && d4 == 0u) {
    for (var g = 0u; g < G; g++) {
      ms[s * G + g] = m[g];
      ls[s * G + g] = l[g];
    }
  }
  workgroupBarrier();
  if (in_chunk) {
    for (var g = 0u; g < G; g++) {
      var mx = NEG;
      for (var t = 0u; t < KS; t++) { mx = max(mx, ms[t * G + g]); }
      var tot = 0.0;
      // a slice that saw no key has m = NEG and l = 0: weight 0
      for (var t = 0u; t < KS; t++) { tot += exp(ms[t * G + g] - mx) * ls[t * G + g]; }
      acc[g] *= exp(m[g] - mx) / tot;
    }
  }
  for (var h0 = 0u; h0 < G; h0 += HP) {
    if (in_chunk) {
      for (var hh = 0u; hh < HP; hh++) {
        if (h0 + hh < G) {
          let a = acc[h0 + hh];
          let at = (hh * C + lid) * 4u;
          ss[at] = a.x;
          ss[at + 1u] = a.y;
          ss[at + 2u] = a.z;
          ss[at + 3u] = a.w;
        }
      }
    }
    workgroupBarrier();
    for (var i = lid; i < HP * HD; i += WG) {
      let hh = i / HD;
      let d = i % HD;
      if (h0 + hh < G) {
        var sum = 0.0;
        for (var t = 0u; t < KS; t++) { sum += ss[(hh * C + t * TPS + d / 4u) * 4u + d % 4u]; }
        o[qbase + (h0 + hh) * HD + d] = ${T}(sum);
      }
    }
    workgroupBarrier();
  }
}
`,
    };
  });
}

/**
 * The RoPE and cache append the kernel can do first (decoding's `ropeKvAppend` for one token): q [B, 1, H, hd]
 * and the new k [B, 1, Hkv, hd] rotate by position `start`, and the rotated k and the new v land in the caches at
 * position `kvLen - 1`. Bindings then: q, k_new, v_new, inv_freq [hd / 2] (read), k cache, v cache, o (rw).
 */
export interface DecodeGqaRope {
  /** Position the new token rotates by. */
  start: number;
  /** HF's attention scaling of cos and sin (1 for the default and llama3 RoPE). */
  scaling?: number;
}

/**
 * Decode attention of one query token per sequence against a KV cache, one workgroup per (batch entry, kv
 * head). With `rope`, the kernel first rotates q and the new k and appends k and v to the cache
 * ({@linkcode DecodeGqaRope}), which saves a dispatch per layer and token. `s` must describe one query (`T = 1`) at the last cached position (`qoff = kvLen - 1`); `kvBatchStride`
 * is the cache's `maxT * Hkv * hd`. `limitBytes` is the device's workgroup memory (the largest workgroup that fits
 * is used). Bindings: q `[B, 1, H, hd]`, k cache, v cache `[B, maxT, Hkv, hd]` (read), o `[B, 1, H, hd]` (rw).
 * Throws for shapes {@linkcode decodeGqaSupported} rejects.
 */
export function attentionDecodeGqa(
  dtype: DType,
  s: AttentionShape,
  limitBytes = DECODE_GQA_DEFAULT_STORAGE,
  rope?: DecodeGqaRope,
): Launch {
  if (s.T !== 1 || s.qoff !== s.kvLen - 1) {
    throw new Error(
      `attentionDecodeGqa: expected one query (T = 1) at position kvLen - 1 = ${
        s.kvLen - 1
      }, got T = ${s.T}, ` +
        `qoff = ${s.qoff}`,
    );
  }
  if (s.B < 1 || s.kvLen < 1 || s.window < 0 || !Number.isInteger(s.window)) {
    throw new Error(
      `attentionDecodeGqa: expected B >= 1, kvLen >= 1 and an integer window >= 0, got B = ${s.B}, kvLen = ${s.kvLen}, window = ${s.window}`,
    );
  }
  if (s.Hkv < 1 || s.H % s.Hkv !== 0) {
    throw new Error(`attentionDecodeGqa: expected H a multiple of Hkv, got H = ${s.H}, Hkv = ${s.Hkv}`);
  }
  if (dtype !== "f32" && dtype !== "f16") {
    throw new Error(`attentionDecodeGqa: expected dtype f32 or f16, got ${dtype}`);
  }
  const G = s.H / s.Hkv;
  const c = decodeGqaConfig(G, s.hd, limitBytes);
  if (!c) {
    throw new Error(
      `attentionDecodeGqa: expected hd a multiple of 4 in 4..${DECODE_GQA_MAX_HD} and G = H / Hkv in ` +
        `1..${DECODE_GQA_MAX_G} fitting ${limitBytes} bytes of workgroup memory, got hd = ${s.hd}, G = ${G}`,
    );
  }
  if (s.kvBatchStride % 4 !== 0) {
    throw new Error(`attentionDecodeGqa: expected kvBatchStride a multiple of 4, got ${s.kvBatchStride}`);
  }
  if (rope && s.hd % 8 !== 0) {
    throw new Error(`attentionDecodeGqa: RoPE in the kernel expects hd a multiple of 8, got ${s.hd}`);
  }
  return {
    spec: decodeGqaSpec(dtype, G, s.hd, c, !!rope),
    uniforms: new Uniforms(32).u32(s.kvLen).u32(s.window).f32(s.scale).u32(s.H)
      .u32(s.kvBatchStride).u32(s.Hkv * s.hd).i32(rope?.start ?? 0).f32(rope?.scaling ?? 1).buffer,
    workgroups: [s.Hkv, s.B],
  };
}
