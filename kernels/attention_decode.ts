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
import { ceilDiv, type DType, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import { attentionCombineSplits, attentionForward, type AttentionShape, type RowTiles } from "./attention.ts";

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
