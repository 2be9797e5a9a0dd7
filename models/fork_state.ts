/**
 * Forking a decoding state: a new {@linkcode DecodeState} whose rows are copies of rows of another one, so a
 * prefix computed once (a multiple-choice context) can continue in several directions (its choices) without
 * being recomputed. Every per-row buffer is copied with GPU buffer copies (no kernel): the KV caches of the
 * attention layers up to the consumed length, and the Mamba layers' SSM and conv states.
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import type { Tensor } from "../runtime/tensor.ts";

function bytesPerElement(t: Tensor): number {
  return t.dtype === "f16" ? 2 : 4;
}

function copyChecked(lm: CausalLM, src: Tensor, srcOff: number, dst: Tensor, dstOff: number, size: number) {
  // WebGPU buffer copies move whole 4-byte words
  if (srcOff % 4 || dstOff % 4 || size % 4) {
    throw new Error(`forkDecodeState: unaligned row copy (${srcOff}, ${dstOff}, ${size} bytes)`);
  }
  lm.rt.dev.copyBuffer(src.buffer, srcOff, dst.buffer, dstOff, size);
}

/**
 * A new decoding state of `rows.length` sequences where row r continues source row `rows[r]` (rows may repeat).
 * Its capacity is `maxLength` (default the source's), which must hold what the source consumed. The source is
 * left untouched; dispose both with `lm.disposeState`.
 */
export function forkDecodeState(
  lm: CausalLM,
  src: DecodeState,
  rows: readonly number[],
  maxLength: number = src.maxLength,
): DecodeState {
  if (rows.length === 0) throw new Error("forkDecodeState: no rows");
  for (const r of rows) {
    if (!Number.isInteger(r) || r < 0 || r >= src.batch) {
      throw new Error(`forkDecodeState: row ${r} outside the source's ${src.batch} rows`);
    }
  }
  if (maxLength < src.length) {
    throw new Error(`forkDecodeState: capacity ${maxLength} < the ${src.length} tokens already consumed`);
  }
  const dst = lm.newDecodeState(rows.length, maxLength);
  try {
    dst.length = src.length;
    for (const [layer, kv] of src.kv) {
      const out = dst.kv.get(layer)!;
      for (const [s, d] of [[kv.k, out.k], [kv.v, out.v]]) {
        // [B, maxT, Hkv, hd]: a row's valid positions are one contiguous block
        const posBytes = kv.Hkv * kv.hd * bytesPerElement(s);
        rows.forEach((r, i) => {
          copyChecked(lm, s, r * kv.maxT * posBytes, d, i * out.maxT * posBytes, kv.length * posBytes);
        });
      }
      out.length = kv.length;
    }
    for (const [layer, st] of src.ssm) {
      const out = dst.ssm.get(layer)!;
      // the per-row tensors; the caches built from the weights (heads, convTaps) are not per row, and the fork
      // builds its own at its first one-token step
      for (const [s, d] of [[st.state, out.state], [st.conv, out.conv]]) {
        // every state tensor is [B, ...]: a row is one contiguous block
        const rowBytes = s.byteLength / src.batch;
        rows.forEach((r, i) => copyChecked(lm, s, r * rowBytes, d, i * rowBytes, rowBytes));
      }
    }
  } catch (e) {
    lm.disposeState(dst);
    throw e;
  }
  return dst;
}
