/**
 * Differentiable causal grouped-query attention (HF Llama/Mistral semantics) and KV-cache decoding.
 *
 * Layouts: q and the output `[B, T, H, hd]` (or `[T, H, hd]` for one sequence), k and v `[B, T, Hkv, hd]`, the
 * saved log-sum-exp `[B, T, H]` f32. A {@linkcode KvCache} holds `[B, maxT, Hkv, hd]` per layer (position-major:
 * its first `length` positions are a plain k/v tensor). Query head h uses kv head `floor(h / (H / Hkv))`;
 * softmax scale defaults to `1 / sqrt(hd)`; `window` W > 0 is Mistral's sliding window: query position i attends
 * keys j with `i - W < j <= i` (transformers' `sliding_window_overlay`), i.e. W keys including itself.
 *
 * @module
 */
import {
  attentionBackwardDelta,
  attentionBackwardDkv,
  attentionBackwardDq,
  attentionForward,
  type AttentionShape,
  chooseDecodeTiles,
  chooseDkvTiles,
  chooseDqTiles,
  chooseForwardTiles,
  type KeyTiles,
  type RowTiles,
} from "../../kernels/attention.ts";
import {
  attentionBackwardDkvV2,
  attentionBackwardDqV2,
  attentionForwardV2,
  type BackwardTiles,
  chooseBackwardTiles,
  chooseForwardTilesV2,
  type ForwardTilesV2,
} from "../../kernels/attention_v2.ts";
import { kvCacheAppend, planDecodeAttention, ropeKvAppend } from "../../kernels/attention_decode.ts";
import { attentionDecodeGqa, decodeGqaSupported } from "../../kernels/attention_decode_gqa.ts";
import {
  attentionBackwardDkvSgm,
  attentionBackwardDqSgm,
  attentionForwardSgm,
  chooseSgmAttentionBackwardTiles,
  chooseSgmAttentionKeyTile,
  sgmAttentionApplies,
} from "../../kernels/attention_sgm.ts";
import type { Launch } from "../../kernels/fill.ts";
import { useSubgroupMatrices } from "./matmul.ts";
import type { Runtime } from "../runtime.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import type { DType } from "../../kernels/kernel.ts";

/** Options of {@linkcode attention}. */
export interface AttentionOptions {
  /** Softmax scale; default `1 / sqrt(hd)`. */
  scale?: number;
  /** Sliding window (keys j with `i - window < j <= i`); 0 or absent for full causal attention. */
  window?: number;
  /**
   * Tile overrides (tests exercise several; default: the fastest that fits the device). `forward`, `dq`, `dkv`
   * apply to the v1 kernels, `forwardV2` and `backward` to the v2 kernels.
   */
  tiles?: {
    forward?: RowTiles;
    dq?: RowTiles;
    dkv?: KeyTiles;
    forwardV2?: ForwardTilesV2;
    backward?: BackwardTiles;
  };
  /**
   * Forward kernel: "sgm" (`kernels/attention_sgm.ts`, f16 on the matrix units: the default where the device
   * and the geometry allow it), "v1" (the default otherwise; `kernels/attention.ts`, also used by decoding for its
   * key-split partials) or "v2" (`kernels/attention_v2.ts`). v1 stays the portable default because it is the one
   * measured on the H200 (7.7 ms at B=1, T=2048, H=32/8, hd=64); the only H200 run with v2 as the default showed
   * a slower hybrid prefill (379 ms against 221 ms), see BENCHMARKS.md.
   */
  forwardKernels?: AttentionBackwardKernels | "sgm";
  /**
   * Backward kernels: "sgm" (`kernels/attention_sgm.ts`, f16 on the matrix units: the default where the device
   * and the geometry allow it), "v2" (the default otherwise; `kernels/attention_v2.ts`, register-resident
   * micro-tiles) or "v1" (`kernels/attention.ts`, kept so benchmarks can compare them in one run).
   */
  backwardKernels?: AttentionBackwardKernels | "sgm";
}

/**
 * Which generation of the attention kernels runs (see {@linkcode AttentionOptions.forwardKernels} and
 * {@linkcode AttentionOptions.backwardKernels}).
 */
export type AttentionBackwardKernels = "v1" | "v2";

/** Output and saved log-sum-exp of {@linkcode attentionWithLse}. */
export interface AttentionResult {
  /** Attention output, q's shape. */
  out: Tensor;
  /** Log-sum-exp of the scaled scores per query row, `[B, T, H]` f32 (natural log). */
  lse: Tensor;
}

function dims(q: Tensor, k: Tensor, v: Tensor): { B: number; T: number; H: number; Hkv: number; hd: number } {
  const batched = q.shape.length === 4;
  if (!batched && q.shape.length !== 3) {
    throw new Error(`attention: q must be [B, T, H, hd] or [T, H, hd], got ${shapeStr(q.shape)}`);
  }
  if (k.shape.length !== q.shape.length || v.shape.length !== q.shape.length) {
    throw new Error(
      `attention: q ${shapeStr(q.shape)}, k ${shapeStr(k.shape)}, v ${shapeStr(v.shape)} ranks differ`,
    );
  }
  const [B, T, H, hd] = batched ? q.shape : [1, ...q.shape];
  const [Bk, Tk, Hkv, hdk] = batched ? k.shape : [1, ...k.shape];
  if (Bk !== B || Tk !== T || hdk !== hd || H % Hkv !== 0 || v.shape.join() !== k.shape.join()) {
    throw new Error(
      `attention: expected k, v [${batched ? "B, " : ""}T, Hkv, hd] with H % Hkv == 0 matching q ${
        shapeStr(q.shape)
      }; got k ${shapeStr(k.shape)}, v ${shapeStr(v.shape)}`,
    );
  }
  if (q.dtype !== k.dtype || q.dtype !== v.dtype || (q.dtype !== "f32" && q.dtype !== "f16")) {
    throw new Error(
      `attention: q, k, v must share dtype f32 or f16 (got ${q.dtype}, ${k.dtype}, ${v.dtype})`,
    );
  }
  return { B, T, H, Hkv, hd };
}

function storageLimit(rt: Runtime): number {
  return rt.dev.limits.maxComputeWorkgroupStorageSize;
}

/**
 * Causal GQA attention with its log-sum-exp (saved for the backward). Differentiable in q, k and v.
 */
export function attentionWithLse(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions = {},
): AttentionResult {
  const rt = q.rt;
  const { B, T, H, Hkv, hd } = dims(q, k, v);
  const shape: AttentionShape = {
    B,
    T,
    H,
    Hkv,
    hd,
    qoff: 0,
    kvLen: T,
    kvBatchStride: T * Hkv * hd,
    window: opts.window ?? 0,
    scale: opts.scale ?? 1 / Math.sqrt(hd),
  };
  const out = rt.empty(q.shape, q.dtype);
  const lse = rt.empty([B, T, H], "f32");
  const f = forwardLaunch(rt, q.dtype, shape, opts);
  rt.dev.dispatch(
    f.spec,
    [q.binding, k.binding, v.binding, out.binding, lse.binding],
    f.workgroups,
    f.uniforms,
  );
  rt.record("attention", [q, k, v], [out, lse], ([gOut]) => {
    if (!gOut) return [null, null, null];
    // frozen inputs skip their kernel (dK and dV come from one kernel, so they go together)
    const need = { dq: q.requiresGrad, dkv: k.requiresGrad || v.requiresGrad };
    const g = attentionBackwardRaw(rt, q.dtype, shape, q, k, v, out, lse, gOut, opts, need);
    return [g.dq, g.dk, g.dv];
  });
  return { out, lse };
}

/** Whether attention of this dtype and geometry runs on the device's matrix units by default. */
function onMatrixUnits(rt: Runtime, dtype: DType, shape: AttentionShape): boolean {
  return dtype === "f16" && useSubgroupMatrices(rt.dev) && sgmAttentionApplies(shape, storageLimit(rt));
}

/**
 * The forward kernel for a call: the one `opts.forwardKernels` names, else the matrix-unit kernel for f16 where
 * the device has it and the geometry fits ({@linkcode sgmAttentionApplies}), else v1.
 */
function forwardLaunch(rt: Runtime, dtype: DType, shape: AttentionShape, opts: AttentionOptions): Launch {
  const limit = storageLimit(rt);
  const which = opts.forwardKernels ?? (onMatrixUnits(rt, dtype, shape) ? "sgm" : "v1");
  if (which === "sgm") return attentionForwardSgm(shape, chooseSgmAttentionKeyTile(shape.hd, limit));
  if (which === "v2") {
    return attentionForwardV2(dtype, shape, opts.tiles?.forwardV2 ?? chooseForwardTilesV2(shape.hd, limit));
  }
  return attentionForward(dtype, shape, opts.tiles?.forward ?? chooseForwardTiles(shape.hd, limit));
}

/** Causal GQA attention: `softmax(q k^T * scale + causal/window mask) v` per head. Differentiable. */
export function attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions = {}): Tensor {
  return attentionWithLse(q, k, v, opts).out;
}

/**
 * The input gradients of attention from O, LSE and dO (FlashAttention-2 backward): delta = rowsum(dO * O), then
 * dQ (one workgroup per row block) and dK/dV (one per key block, looping over every query head of its group).
 * `need` skips dQ or dK/dV (returned as null); `opts.backwardKernels` picks the kernel generation.
 */
export function attentionBackwardRaw(
  rt: Runtime,
  dtype: DType,
  shape: AttentionShape,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  gOut: Tensor,
  opts: AttentionOptions = {},
  need: { dq: boolean; dkv: boolean } = { dq: true, dkv: true },
): { dq: Tensor | null; dk: Tensor | null; dv: Tensor | null } {
  const { B, T, H, hd } = shape;
  const delta = rt.empty([B, T, H], "f32");
  const dl = attentionBackwardDelta(dtype, B * T * H, hd);
  rt.dev.dispatch(dl.spec, [out.binding, gOut.binding, delta.binding], dl.workgroups, dl.uniforms);
  const limit = storageLimit(rt);
  const sgmTiles = onMatrixUnits(rt, dtype, shape) ? chooseSgmAttentionBackwardTiles(hd, limit) : null;
  const which = opts.backwardKernels ?? (sgmTiles ? "sgm" : "v2");
  if (which === "sgm" && !sgmTiles) {
    throw new Error("attention: the sgm backward needs f16, subgroup matrices and causal self-attention");
  }
  const v2 = which === "v2";
  const v2Tiles = opts.tiles?.backward ?? chooseBackwardTiles(hd, limit);
  let dq: Tensor | null = null, dk: Tensor | null = null, dv: Tensor | null = null;
  if (need.dq) {
    dq = rt.empty(q.shape, dtype);
    const a = which === "sgm"
      ? attentionBackwardDqSgm(shape, sgmTiles!.bc)
      : v2
      ? attentionBackwardDqV2(dtype, shape, v2Tiles)
      : attentionBackwardDq(dtype, shape, opts.tiles?.dq ?? chooseDqTiles(hd, limit));
    rt.dev.dispatch(
      a.spec,
      [q.binding, k.binding, v.binding, gOut.binding, lse.binding, delta.binding, dq.binding],
      a.workgroups,
      a.uniforms,
    );
  }
  if (need.dkv) {
    dk = rt.empty(k.shape, dtype);
    dv = rt.empty(v.shape, dtype);
    const c = which === "sgm"
      ? attentionBackwardDkvSgm(shape, sgmTiles!.br)
      : v2
      ? attentionBackwardDkvV2(dtype, shape, v2Tiles)
      : attentionBackwardDkv(dtype, shape, opts.tiles?.dkv ?? chooseDkvTiles(hd, limit));
    rt.dev.dispatch(
      c.spec,
      [q.binding, k.binding, v.binding, gOut.binding, lse.binding, delta.binding, dk.binding, dv.binding],
      c.workgroups,
      c.uniforms,
    );
  }
  delta.dispose();
  return { dq, dk, dv };
}

// ---- decoding -------------------------------------------------------------------------------------------

/**
 * A per-layer KV cache: `k`, `v` of shape `[B, maxT, Hkv, hd]`, of which the first `length` positions are valid.
 * Kept outside scopes; call {@linkcode KvCache.dispose} when done. Rolling back a rejected speculative draft is
 * `cache.length = acceptedLength` (entries past the length are overwritten by the next append).
 */
export class KvCache {
  /** Keys `[B, maxT, Hkv, hd]`. */
  readonly k: Tensor;
  /** Values `[B, maxT, Hkv, hd]`. */
  readonly v: Tensor;
  /** Valid positions. */
  length = 0;

  /** Allocates an empty cache (contents undefined until appended). */
  constructor(rt: Runtime, B: number, maxT: number, Hkv: number, hd: number, dtype: DType = "f32") {
    this.k = rt.empty([B, maxT, Hkv, hd], dtype).keep();
    this.v = rt.empty([B, maxT, Hkv, hd], dtype).keep();
  }

  /** Batch size. */
  get B(): number {
    return this.k.shape[0];
  }
  /** Capacity in positions. */
  get maxT(): number {
    return this.k.shape[1];
  }
  /** Key/value heads. */
  get Hkv(): number {
    return this.k.shape[2];
  }
  /** Head dimension. */
  get hd(): number {
    return this.k.shape[3];
  }

  /** Sets the valid length (truncation after a rejected draft); cannot grow past what was appended. */
  truncate(length: number): void {
    if (length < 0 || length > this.length) {
      throw new Error(`KvCache.truncate: length ${length} outside 0..${this.length}`);
    }
    this.length = length;
  }

  /** Releases the cache's buffers. */
  dispose(): void {
    this.k.dispose();
    this.v.dispose();
  }
}

/** Appends `k`, `v` `[B, n, Hkv, hd]` (or `[n, Hkv, hd]` when B = 1) at the cache's length; length += n. */
export function appendKv(cache: KvCache, k: Tensor, v: Tensor): void {
  const rt = k.rt;
  const shape = k.shape.length === 3 ? [1, ...k.shape] : k.shape;
  const [B, n, Hkv, hd] = shape;
  if (
    shape.length !== 4 || B !== cache.B || Hkv !== cache.Hkv || hd !== cache.hd ||
    v.shape.join() !== k.shape.join() ||
    k.dtype !== cache.k.dtype || v.dtype !== cache.k.dtype
  ) {
    throw new Error(
      `appendKv: k ${shapeStr(k.shape)} ${k.dtype}, v ${shapeStr(v.shape)} do not fit cache ${
        shapeStr(cache.k.shape)
      } ${cache.k.dtype}`,
    );
  }
  if (cache.length + n > cache.maxT) {
    throw new Error(`appendKv: ${cache.length} + ${n} positions exceed the cache capacity ${cache.maxT}`);
  }
  const a = kvCacheAppend(k.dtype, B, n, Hkv * hd, cache.maxT, cache.length);
  rt.dev.dispatch(a.spec, [k.binding, v.binding, cache.k.binding, cache.v.binding], a.workgroups, a.uniforms);
  cache.length += n;
}

/**
 * Checks the operands of a RoPE + cache append (q [B, n, H, hd] or [n, H, hd], k and v [B, n, Hkv, hd] fitting the
 * cache, inv_freq [hd / 2], room for n more positions) and returns [B, n, H, hd]; errors name `op`.
 */
function checkRopeAppend(
  op: string,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  invFreq: Tensor,
  cache: KvCache,
): readonly number[] {
  const qs = q.shape.length === 3 ? [1, ...q.shape] : q.shape;
  const ks = k.shape.length === 3 ? [1, ...k.shape] : k.shape;
  const [B, n, , hd] = qs;
  if (
    qs.length !== 4 || ks.length !== 4 || ks[0] !== B || ks[1] !== n || ks[2] !== cache.Hkv || ks[3] !== hd ||
    hd !== cache.hd || B !== cache.B || v.shape.join() !== k.shape.join() ||
    [q, k, v].some((t) => t.dtype !== cache.k.dtype) || invFreq.size !== hd / 2
  ) {
    throw new Error(
      `${op}: q ${shapeStr(q.shape)}, k ${shapeStr(k.shape)}, v ${shapeStr(v.shape)} ${q.dtype} do not fit ` +
        `cache ${shapeStr(cache.k.shape)} ${cache.k.dtype}`,
    );
  }
  if (cache.length + n > cache.maxT) {
    throw new Error(`${op}: ${cache.length} + ${n} positions exceed the cache capacity ${cache.maxT}`);
  }
  return qs;
}

/**
 * Whether one decode step's attention takes the single-dispatch kernel by default: one query token per
 * sequence, a shape the kernel supports, and at most {@linkcode DECODE_GQA_MAX_KEYS} visible keys.
 */
function gqaByDefault(
  rt: Runtime,
  q: Tensor,
  n: number,
  H: number,
  Hkv: number,
  hd: number,
  kvLen: number,
  window: number,
): boolean {
  const span = window > 0 ? Math.min(kvLen, window) : kvLen;
  return n === 1 && span <= DECODE_GQA_MAX_KEYS && decodeGqaSupported(q.dtype, H / Hkv, hd, storageLimit(rt));
}

/** The attention shape of n new queries per sequence against the first `kvLen` positions of a cache. */
function decodeShape(
  B: number,
  n: number,
  H: number,
  hd: number,
  cache: KvCache,
  kvLen: number,
  opts: DecodeOptions,
): AttentionShape {
  return {
    B,
    T: n,
    H,
    Hkv: cache.Hkv,
    hd,
    qoff: kvLen - n,
    kvLen,
    kvBatchStride: cache.maxT * cache.Hkv * hd,
    window: opts.window ?? 0,
    scale: opts.scale ?? 1 / Math.sqrt(hd),
  };
}

/**
 * Decoding's RoPE and cache append in one dispatch: rotates q [B, n, H, hd] and k [B, n, Hkv, hd] by positions
 * `start + t` (as the `rope` op with `start`), appends the rotated k and v to the cache, and returns the
 * rotated q. The same result as `rope` on q and k followed by {@linkcode appendKv}. Inference only.
 */
export function ropeAppendKv(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  invFreq: Tensor,
  cache: KvCache,
  start: number,
): Tensor {
  const rt = q.rt;
  const [B, n, H, hd] = checkRopeAppend("ropeAppendKv", q, k, v, invFreq, cache);
  const out = rt.empty(q.shape, q.dtype);
  const l = ropeKvAppend(q.dtype, {
    B,
    n,
    H,
    Hkv: cache.Hkv,
    hd,
    maxT: cache.maxT,
    pos: cache.length,
    start,
  });
  rt.dev.dispatch(
    l.spec,
    [q.binding, k.binding, v.binding, invFreq.binding, out.binding, cache.k.binding, cache.v.binding],
    l.workgroups,
    l.uniforms,
  );
  cache.length += n;
  return out;
}

/** Options of {@linkcode decodeAttention}. */
export interface DecodeOptions {
  /** Softmax scale; default `1 / sqrt(hd)`. */
  scale?: number;
  /** Sliding window, as in {@linkcode AttentionOptions}. */
  window?: number;
  /** Workgroups to aim for when splitting the keys (default 264, two per H200 SM; "split" kernel only). */
  targetWorkgroups?: number;
  /** Tile override (tests; "split" kernel only). */
  tiles?: RowTiles;
  /**
   * Which kernel runs (tests and benchmarks force one): "gqa", the single-dispatch kernel for one query token
   * per sequence (`kernels/attention_decode_gqa.ts`; throws where it does not apply: n > 1 or an unsupported
   * shape), or "split", the training forward kernel split over the keys plus a combine dispatch
   * (`kernels/attention_decode.ts`). Default: "gqa" where it applies and at most
   * {@linkcode DECODE_GQA_MAX_KEYS} keys are visible, else "split".
   */
  kernel?: DecodeKernel;
}

/** The decode attention kernels {@linkcode DecodeOptions.kernel} chooses between. */
export type DecodeKernel = "gqa" | "split";

/**
 * Most visible keys (the cache length, or the sliding window when smaller) for which {@linkcode decodeAttention}
 * picks the single-dispatch kernel by default. The kernel runs one workgroup per (sequence, kv head), so with
 * long contexts its few workgroups stream all keys while the split path spreads them over the GPU; 2048 is a
 * starting point, to be tuned by benchmark against the split path (bench/attention.ts).
 */
export const DECODE_GQA_MAX_KEYS = 2048;

/**
 * Attention of the last `n` cached positions' queries `q` `[B, n, H, hd]` (or `[n, H, hd]`) against the cache:
 * query i sits at position `cache.length - n + i` and attends every cached key up to itself (causal among the n
 * new tokens). Append the new k/v with {@linkcode appendKv} first. Not differentiable (inference only).
 * One new token per sequence against up to {@linkcode DECODE_GQA_MAX_KEYS} visible keys takes a single dispatch
 * (`kernels/attention_decode_gqa.ts`); otherwise long caches are split over workgroups (flash-decoding) and
 * merged with a combine kernel. {@linkcode DecodeOptions.kernel} forces either.
 */
export function decodeAttention(q: Tensor, cache: KvCache, opts: DecodeOptions = {}): Tensor {
  const rt = q.rt;
  const shape4 = q.shape.length === 3 ? [1, ...q.shape] : q.shape;
  const [B, n, H, hd] = shape4;
  if (
    shape4.length !== 4 || B !== cache.B || hd !== cache.hd || H % cache.Hkv !== 0 ||
    q.dtype !== cache.k.dtype
  ) {
    throw new Error(
      `decodeAttention: q ${shapeStr(q.shape)} ${q.dtype} does not fit cache ${shapeStr(cache.k.shape)}`,
    );
  }
  if (n > cache.length) {
    throw new Error(`decodeAttention: ${n} queries but only ${cache.length} cached positions`);
  }
  const s = decodeShape(B, n, H, hd, cache, cache.length, opts);
  const kernel = opts.kernel ??
    (gqaByDefault(rt, q, n, H, cache.Hkv, hd, cache.length, s.window) ? "gqa" : "split");
  if (kernel === "gqa") {
    if (n !== 1) {
      throw new Error(`decodeAttention: kernel "gqa" expects n = 1 query token per sequence, got n = ${n}`);
    }
    // the launch builder names any other shape it does not take (head dim, group size)
    const l = attentionDecodeGqa(q.dtype, s, storageLimit(rt));
    const out = rt.empty(q.shape, q.dtype);
    rt.dev.dispatch(
      l.spec,
      [q.binding, cache.k.binding, cache.v.binding, out.binding],
      l.workgroups,
      l.uniforms,
    );
    return out;
  }
  const tiles = opts.tiles ?? chooseDecodeTiles(hd, n * (H / cache.Hkv), storageLimit(rt));
  const plan = planDecodeAttention(q.dtype, s, tiles, opts.targetWorkgroups);
  const out = rt.empty(q.shape, q.dtype);
  if (!plan.combine) {
    const lse = rt.empty([B, n, H], "f32");
    const f = plan.forward;
    rt.dev.dispatch(
      f.spec,
      [q.binding, cache.k.binding, cache.v.binding, out.binding, lse.binding],
      f.workgroups,
      f.uniforms,
    );
    lse.dispose();
    return out;
  }
  const oPart = rt.empty([plan.nSplits, B * n * H * hd], "f32");
  const lPart = rt.empty([plan.nSplits, B * n * H], "f32");
  const lse = rt.empty([B, n, H], "f32");
  const f = plan.forward;
  rt.dev.dispatch(
    f.spec,
    [q.binding, cache.k.binding, cache.v.binding, oPart.binding, lPart.binding],
    f.workgroups,
    f.uniforms,
  );
  const c = plan.combine;
  rt.dev.dispatch(c.spec, [oPart.binding, lPart.binding, out.binding, lse.binding], c.workgroups, c.uniforms);
  oPart.dispose();
  lPart.dispose();
  lse.dispose();
  return out;
}

/**
 * A decoding step's attention from the raw projections: RoPE on q and k at position `start`, the append of k and
 * v to the cache, and the attention of the new queries against it (the same result as {@linkcode ropeAppendKv}
 * followed by {@linkcode decodeAttention}). One new token per sequence on the single-dispatch kernel does all of
 * it in that kernel (`kernels/attention_decode_gqa.ts` with `rope`): one dispatch per layer and token instead of
 * two. Inference only.
 */
export function ropeAppendDecodeAttention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  invFreq: Tensor,
  cache: KvCache,
  start: number,
  opts: DecodeOptions = {},
): Tensor {
  const rt = q.rt;
  const [B, n, H, hd] = checkRopeAppend("ropeAppendDecodeAttention", q, k, v, invFreq, cache);
  const kvLen = cache.length + n;
  const fused = opts.kernel !== "split" && hd % 8 === 0 &&
    gqaByDefault(rt, q, n, H, cache.Hkv, hd, kvLen, opts.window ?? 0) &&
    rt.dev.limits.maxStorageBuffersPerShaderStage >= 7;
  if (!fused) return decodeAttention(ropeAppendKv(q, k, v, invFreq, cache, start), cache, opts);
  const s = decodeShape(B, n, H, hd, cache, kvLen, opts);
  const l = attentionDecodeGqa(q.dtype, s, storageLimit(rt), { start });
  const out = rt.empty(q.shape, q.dtype);
  rt.dev.dispatch(
    l.spec,
    [q.binding, k.binding, v.binding, invFreq.binding, cache.k.binding, cache.v.binding, out.binding],
    l.workgroups,
    l.uniforms,
  );
  cache.length = kvLen;
  return out;
}
