/**
 * Rotary position embedding as a differentiable op (HF `rotate_half` convention; precision notes in
 * `kernels/rope.ts`). The inverse frequencies come from the model (including llama3 `rope_scaling`), computed on
 * the CPU; {@linkcode ropeInverseFrequencies} gives the plain (unscaled) ones.
 *
 * @module
 */
import { ropeKernel } from "../../kernels/rope.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Where the positions of {@linkcode rope} come from. */
export interface RopeOptions {
  /**
   * i32 positions, one per token of x ([B*T] or [B, T]), or one per sequence step ([T], shared by every
   * sequence of the batch).
   */
  positions?: Tensor;
  /** Without `positions`: token t of each sequence is at `start + t` (decode: the cache length). Default 0. */
  start?: number;
  /** HF's `attention_scaling`, multiplying cos and sin (1, the default, for default and llama3 rope types). */
  attentionScaling?: number;
}

/**
 * HF's default inverse frequencies: `1 / theta^(2i / head_dim)` for i < head_dim / 2, computed in float64 and
 * rounded to f32 (HF computes them in f32 via `torch.arange(..).float() / dim`, whose rounding differs from this
 * in the last bit at most).
 */
export function ropeInverseFrequencies(headDim: number, theta: number): Float32Array {
  const out = new Float32Array(headDim / 2);
  for (let i = 0; i < out.length; i++) out[i] = 1 / theta ** ((2 * i) / headDim);
  return out;
}

/**
 * Rotates q or k, laid out [T, heads, head_dim] or [B, T, heads, head_dim], by `position * invFreq[i]` on the
 * pairs (i, i + head_dim/2). `invFreq`: f32 [head_dim / 2] (a tensor, or CPU values uploaded for this call).
 * Differentiable in x (the backward rotates by the negative angle).
 */
export function rope(x: Tensor, invFreq: Tensor | Float32Array, opts: RopeOptions = {}): Tensor {
  const rt = x.rt;
  if (x.shape.length !== 3 && x.shape.length !== 4) {
    throw new Error(
      `rope: expected x [T, heads, head_dim] or [B, T, heads, head_dim], got ${shapeStr(x.shape)}`,
    );
  }
  const [seqLen, heads, hd] = x.shape.slice(-3);
  const tokens = x.size / (heads * hd);
  const freq = invFreq instanceof Float32Array ? rt.tensor(invFreq, [invFreq.length], "f32") : invFreq;
  if (freq.size !== hd / 2 || freq.dtype !== "f32") {
    throw new Error(`rope: inv_freq must be f32 [${hd / 2}] for head_dim ${hd}, got ${freq}`);
  }
  const pos = opts.positions;
  if (pos && (pos.dtype !== "i32" || (pos.size !== tokens && pos.size !== seqLen))) {
    throw new Error(`rope: positions must be i32 with ${tokens} or ${seqLen} entries, got ${pos}`);
  }
  // the map is x -> s R x, so its transpose (the backward) is g -> s R^T g: the same scale, negative angle
  const scaling = opts.attentionScaling ?? 1;
  const run = (src: Tensor, dst: Tensor, sign: 1 | -1) => {
    const k = pos
      ? ropeKernel(x.dtype, "tensor", tokens, heads, hd, { sign, posLen: pos.size, scaling })
      : ropeKernel(x.dtype, "offset", tokens, heads, hd, { sign, start: opts.start ?? 0, seqLen, scaling });
    const bindings = pos
      ? [src.binding, pos.binding, freq.binding, dst.binding]
      : [src.binding, freq.binding, dst.binding];
    rt.dev.dispatch(k.spec, bindings, k.workgroups, k.uniforms);
  };
  const y = rt.empty(x.shape, x.dtype);
  run(x, y, 1);
  rt.record("rope", [x], [y], ([g]) => {
    const gx = rt.empty(x.shape, x.dtype);
    run(g!, gx, -1);
    return [gx];
  });
  return y;
}
