/**
 * Decoding with a KV cache: appending new keys/values to a preallocated cache and planning the split-K
 * (flash-decoding) forward so that a handful of query rows still spreads over the whole GPU.
 *
 * Cache layout per layer: `[B, maxT, Hkv, hd]` (position-major, like the k/v activations), so the first `len`
 * positions of a cache are exactly a `[B, len, Hkv, hd]` k tensor with batch stride `maxT * Hkv * hd`: the
 * training forward kernel reads a cache unchanged, appending one sequence's new tokens is one contiguous copy,
 * and truncating after a rejected speculative draft only lowers `len`.
 *
 * @module
 */
import { ceilDiv, type DType, grid2d, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { attentionCombineSplits, attentionForward, type AttentionShape, type RowTiles } from "./attention.ts";
import { WGSL_SINCOS } from "./rope.ts";

const appendSpecs = new Map<DType, KernelSpec>();

/**
 * Copies new k and v `[B, n, Hkv, hd]` into caches `[B, maxT, Hkv, hd]` at positions `pos..pos+n-1`.
 * Bindings: k_new, v_new (read), k_cache, v_cache (rw).
 */
export function kvCacheAppend(
  dtype: DType,
  B: number,
  n: number,
  rowElems: number,
  maxT: number,
  pos: number,
): Launch {
  let spec = appendSpecs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key: `kv_append_${dtype}`,
      bindings: ["read", "read", "rw", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { per_batch: u32, total: u32, cache_bstride: u32, offset: u32 }
@group(0) @binding(0) var<storage, read> kn: array<${T}>;
@group(0) @binding(1) var<storage, read> vn: array<${T}>;
@group(0) @binding(2) var<storage, read_write> kc: array<${T}>;
@group(0) @binding(3) var<storage, read_write> vc: array<${T}>;
@group(0) @binding(4) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid;
  if (i >= p.total) { return; }
  // new tokens of one batch entry are contiguous, and so is their destination
  let dst = (i / p.per_batch) * p.cache_bstride + p.offset + i % p.per_batch;
  kc[dst] = kn[i];
  vc[dst] = vn[i];
}
`,
    };
    appendSpecs.set(dtype, spec);
  }
  const perBatch = n * rowElems;
  const total = B * perBatch;
  const wg = ceilDiv(total, 256);
  const y = ceilDiv(wg, 65535);
  return {
    spec,
    uniforms: new Uniforms(16).u32(perBatch).u32(total).u32(maxT * rowElems).u32(pos * rowElems).buffer,
    workgroups: [ceilDiv(wg, y), y],
  };
}

/**
 * `rotation(i, t)`: cos and sin of RoPE pair i at token t of the new tokens, as the rope kernel forms them (position
 * `p.start + t`, one f32 rounding of the angle, HF's `p.scaling` of both). Needs `INV_FREQ` and uniforms `p` with
 * `start: i32` and `scaling: f32`; shared by every decode kernel that rotates.
 */
export const WGSL_DECODE_ROTATION = `${WGSL_SINCOS}
fn rotation(i: u32, t: u32) -> vec2<f32> {
  let angle = f32(p.start + i32(t)) * INV_FREQ[i];
  let sc = sincos_accurate(angle);
  return vec2<f32>(p.scaling * sc.y, p.scaling * sc.x);
}
`;

const ropeAppendSpecs = new Map<DType, KernelSpec>();

/**
 * Decoding's RoPE and cache append in one dispatch: q and k [B, n, heads, hd] rotate exactly as
 * the rope kernel (kernels/rope.ts) does (offset positions `start + t`), the rotated q goes to `q_out`, and the rotated k
 * and v land in the caches [B, maxT, Hkv, hd] at positions `pos..pos+n-1`. Replaces three dispatches per
 * attention layer and token (rope q, rope k, append). Bindings: q, k, v, invFreq (read), q_out, k_cache,
 * v_cache (rw).
 */
export function ropeKvAppend(
  dtype: DType,
  s: { B: number; n: number; H: number; Hkv: number; hd: number; maxT: number; pos: number; start: number },
  scaling = 1,
): Launch {
  if (s.hd % 2 !== 0) throw new Error(`ropeKvAppend: head_dim must be even, got ${s.hd}`);
  let spec = ropeAppendSpecs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key: `rope_kv_append_${dtype}`,
      bindings: ["read", "read", "read", "read", "rw", "rw", "rw"],
      uniformBytes: 48,
      code: `${wgslHeader(dtype)}
struct P {
  q_pairs: u32, k_pairs: u32, v_elems: u32, H: u32,
  Hkv: u32, half: u32, n: u32, start: i32,
  scaling: f32, cache_bstride: u32, offset: u32, _a: u32,
}
@group(0) @binding(0) var<storage, read> Q: array<${T}>;
@group(0) @binding(1) var<storage, read> K: array<${T}>;
@group(0) @binding(2) var<storage, read> V: array<${T}>;
@group(0) @binding(3) var<storage, read> INV_FREQ: array<f32>;
@group(0) @binding(4) var<storage, read_write> QO: array<${T}>;
@group(0) @binding(5) var<storage, read_write> KC: array<${T}>;
@group(0) @binding(6) var<storage, read_write> VC: array<${T}>;
@group(0) @binding(7) var<uniform> p: P;
${WGSL_DECODE_ROTATION}@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let g = (wid.y * nwg.x + wid.x) * 256u + lid;
  let row = p.Hkv * 2u * p.half;             // elements of one token's k (or v)
  if (g < p.q_pairs) {
    let i = g % p.half;
    let th = g / p.half;                      // token * H + head
    let cs = rotation(i, (th / p.H) % p.n);
    let base = th * 2u * p.half;
    let x1 = f32(Q[base + i]);
    let x2 = f32(Q[base + i + p.half]);
    QO[base + i] = ${T}(x1 * cs.x - x2 * cs.y);
    QO[base + i + p.half] = ${T}(x2 * cs.x + x1 * cs.y);
  } else if (g < p.q_pairs + p.k_pairs) {
    let j = g - p.q_pairs;
    let i = j % p.half;
    let th = j / p.half;                      // token * Hkv + head
    let tok = th / p.Hkv;                     // b * n + t
    let cs = rotation(i, tok % p.n);
    let base = th * 2u * p.half;
    let dst = (tok / p.n) * p.cache_bstride + p.offset + (tok % p.n) * row + (th % p.Hkv) * 2u * p.half;
    let x1 = f32(K[base + i]);
    let x2 = f32(K[base + i + p.half]);
    KC[dst + i] = ${T}(x1 * cs.x - x2 * cs.y);
    KC[dst + i + p.half] = ${T}(x2 * cs.x + x1 * cs.y);
  } else if (g < p.q_pairs + p.k_pairs + p.v_elems) {
    let j = g - p.q_pairs - p.k_pairs;
    let tok = j / row;
    VC[(tok / p.n) * p.cache_bstride + p.offset + (tok % p.n) * row + j % row] = V[j];
  }
}
`,
    };
    ropeAppendSpecs.set(dtype, spec);
  }
  const half = s.hd / 2, tokens = s.B * s.n;
  const qPairs = tokens * s.H * half, kPairs = tokens * s.Hkv * half, vElems = tokens * s.Hkv * s.hd;
  const rowElems = s.Hkv * s.hd;
  return {
    spec,
    uniforms: new Uniforms(48).u32(qPairs).u32(kPairs).u32(vElems).u32(s.H)
      .u32(s.Hkv).u32(half).u32(s.n).i32(s.start)
      .f32(scaling).u32(s.maxT * rowElems).u32(s.pos * rowElems).u32(0).buffer,
    workgroups: grid2d(ceilDiv(qPairs + kPairs + vElems, 256)),
  };
}

/** How a decode forward is split over the keys. */
export interface DecodePlan {
  /** Number of key splits (1: no combine step). */
  nSplits: number;
  /** Keys per split (a multiple of the tile's bc). */
  splitLen: number;
  /** The forward launch. */
  forward: Launch;
  /** The combine launch (absent when nSplits is 1). */
  combine?: Launch;
}

/**
 * Plans decode attention: split the keys so that about `targetWorkgroups` workgroups run (flash-decoding), never
 * smaller than one tile per split. Returns the forward launch (writing f32 partials when split) and the combine.
 */
export function planDecodeAttention(
  dtype: DType,
  s: AttentionShape,
  tiles: RowTiles,
  targetWorkgroups = 264,
): DecodePlan {
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), tiles.br);
  const base = rowBlocks * s.B * s.Hkv;
  // every row block sees at most kvLen - window-start keys; split that range
  const span = s.window > 0 ? Math.min(s.kvLen, s.window + s.T) : s.kvLen;
  const maxSplits = ceilDiv(span, tiles.bc);
  let nSplits = Math.max(1, Math.min(maxSplits, Math.floor(targetWorkgroups / base)));
  const splitLen = ceilDiv(ceilDiv(span, nSplits), tiles.bc) * tiles.bc;
  nSplits = ceilDiv(span, splitLen);
  if (nSplits <= 1) return { nSplits: 1, splitLen: 0, forward: attentionForward(dtype, s, tiles) };
  return {
    nSplits,
    splitLen,
    forward: attentionForward(dtype, s, tiles, { nSplits, splitLen }),
    combine: attentionCombineSplits(dtype, s.B * s.T * s.H, s.hd, nSplits),
  };
}
