/**
 * Next-token sampling as a tensor op: {@linkcode sampleTokens} draws one token id per row of logits on the GPU
 * (greedy, or temperature / top-k / top-p with a counter-based generator; see `kernels/sample_token.ts`), and
 * {@linkcode samplingProbs} also returns the distribution each token was drawn from. Neither records a gradient.
 *
 * Row b's draw depends only on the seed, its stream id `streams[b]` and the step, so a sequence samples the
 * same tokens whatever other sequences share its batch, and a decode loop can record many steps without
 * reading anything back.
 *
 * @module
 */
import { samplesGreedily, sampleTokensKernel } from "../../kernels/sample_token.ts";
import {
  ARGMAX_MAX_SLICES,
  argmaxMerge,
  argmaxSliceCount,
  argmaxSlices,
} from "../../kernels/argmax_split.ts";
import { rowBlocks } from "./loss.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** What to sample from (structurally the same as `models/sampling.ts` `SamplingOptions`). */
export interface TokenSampling {
  /** Softmax temperature; 0 selects the most likely token (lowest index on ties). */
  temperature: number;
  /** Keep only the k most likely tokens (0 or undefined: no limit). */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches topP (1 or undefined: no limit). */
  topP?: number;
}

/** Where the random numbers of a draw come from. */
export interface TokenDraw {
  /** Seed of the generator: an integer, |seed| < 2^53. */
  seed: number;
  /** Random stream of each row: u32 (or i32), one entry per row of logits. */
  streams: Tensor;
  /** Position of this draw in each stream (the decode step, from 0). */
  step: number;
}

/**
 * Vocabularies from which greedy sampling (without the distribution) takes the split argmax
 * (`kernels/argmax_split.ts`, two dispatches over many workgroups) instead of the sampler's one workgroup per row.
 */
export const ARGMAX_SPLIT_MIN_VOCAB = 8192;

/** Options of {@linkcode sampleTokens}. */
export interface SampleTokensOptions {
  /** Largest logits slice bound at once (default: the device's storage binding limit); tests lower it. */
  maxBindingBytes?: number;
}

/** The generator key of a seed: its low and high 32-bit words (two's complement for negative seeds). */
export function seedKey(seed: number): [number, number] {
  if (!Number.isSafeInteger(seed)) {
    throw new Error(`sampling: seed must be an integer below 2^53, got ${seed}`);
  }
  return [seed >>> 0, Math.floor(seed / 2 ** 32) >>> 0];
}

function check(logits: Tensor, sampling: TokenSampling, draw: TokenDraw): { N: number; V: number } {
  if (logits.shape.length < 2 || (logits.dtype !== "f32" && logits.dtype !== "f16")) {
    throw new Error(`sampleTokens: logits must be f32 or f16 [N, V] or [B, T, V], got ${logits}`);
  }
  const V = logits.shape[logits.shape.length - 1];
  const N = logits.size / V;
  const s = draw.streams;
  if (s.size !== N || (s.dtype !== "u32" && s.dtype !== "i32")) {
    throw new Error(
      `sampleTokens: streams must be ${N} u32 values (one per row), got ${shapeStr(s.shape)} ${s.dtype}`,
    );
  }
  if (!Number.isInteger(draw.step) || draw.step < 0 || draw.step >= 2 ** 32) {
    throw new Error(`sampleTokens: step must be an integer in [0, 2^32), got ${draw.step}`);
  }
  if (!(sampling.temperature >= 0) || !((sampling.topK ?? 0) >= 0) || !((sampling.topP ?? 1) >= 0)) {
    throw new Error(`sampleTokens: invalid sampling settings ${JSON.stringify(sampling)}`);
  }
  return { N, V };
}

function dispatchSample(
  logits: Tensor,
  sampling: TokenSampling,
  draw: TokenDraw,
  ids: Tensor,
  probs: Tensor | null,
  opts: SampleTokensOptions,
): void {
  const rt = logits.rt;
  const { N, V } = check(logits, sampling, draw);
  const params = {
    temperature: sampling.temperature,
    topK: sampling.topK ?? 0,
    topP: sampling.topP ?? 1,
    key: seedKey(draw.seed),
    step: draw.step,
  };
  const tensors = probs ? [logits, probs] : [logits];
  const split = !probs && samplesGreedily(sampling.temperature) && V >= ARGMAX_SPLIT_MIN_VOCAB &&
    argmaxSliceCount(V) <= ARGMAX_MAX_SLICES;
  for (const blk of rowBlocks(rt, tensors, N, V, opts.maxBindingBytes)) {
    if (split) {
      // a long row's argmax over many workgroups (kernels/argmax_split.ts), not one workgroup per row
      const slices = argmaxSlices(logits.dtype, blk.rows, V);
      const part = rt.empty([blk.rows * argmaxSliceCount(V) * 2], "u32");
      rt.dev.dispatch(slices.spec, [blk.slices[0], part.binding], slices.workgroups, slices.uniforms);
      const merge = argmaxMerge(blk.rows, V, blk.row0);
      rt.dev.dispatch(merge.spec, [part.binding, ids.binding], merge.workgroups, merge.uniforms);
      part.dispose();
      continue;
    }
    const k = sampleTokensKernel(logits.dtype, blk.rows, blk.row0, V, params, probs !== null);
    const buffers = [blk.slices[0], draw.streams.binding, ids.binding, ...(probs ? [blk.slices[1]] : [])];
    rt.dev.dispatch(k.spec, buffers, k.workgroups, k.uniforms);
  }
}

/**
 * One sampled token id per row of `logits` (`[N, V]` or `[B, T, V]`, f32 or f16): i32, shape without the
 * vocabulary dimension. Temperature 0 is argmax. Not differentiable.
 */
export function sampleTokens(
  logits: Tensor,
  sampling: TokenSampling,
  draw: TokenDraw,
  opts: SampleTokensOptions = {},
): Tensor {
  const ids = logits.rt.empty(logits.shape.slice(0, -1), "i32");
  dispatchSample(logits, sampling, draw, ids, null, opts);
  return ids;
}

/**
 * {@linkcode sampleTokens} together with the distribution each token was drawn from: `probs` f32, the shape of
 * `logits`, zero outside the kept set, summing to 1 per row (one-hot when greedy). For checking the sampler and
 * for algorithms that need the distribution itself (speculative decoding's acceptance test).
 */
export function samplingProbs(
  logits: Tensor,
  sampling: TokenSampling,
  draw: TokenDraw,
  opts: SampleTokensOptions = {},
): { ids: Tensor; probs: Tensor } {
  const rt = logits.rt;
  const ids = rt.empty(logits.shape.slice(0, -1), "i32");
  const probs = rt.empty(logits.shape, "f32");
  dispatchSample(logits, sampling, draw, ids, probs, opts);
  return { ids, probs };
}
