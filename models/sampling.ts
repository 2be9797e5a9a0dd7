/**
 * Next-token sampling from logits on the CPU: greedy, temperature, top-k and top-p (nucleus), with a seeded
 * {@linkcode Rng} so generations are reproducible. The filters are applied in Hugging Face `generate`'s order
 * (temperature, then top-k, then top-p), and top-p keeps the smallest set of most likely tokens whose probability
 * reaches `topP`, always at least one token.
 *
 * @module
 */
import type { Rng } from "../util/rng.ts";

/** Sampling settings. `temperature` 0 means greedy. */
export interface SamplingOptions {
  /** Softmax temperature; 0 selects the most likely token (greedy). */
  temperature: number;
  /** Keep only the k most likely tokens (0 or undefined: no limit). */
  topK?: number;
  /** Keep the smallest set of tokens whose cumulative probability reaches topP (1 or undefined: no limit). */
  topP?: number;
}

/** Greedy decoding. */
export const GREEDY: SamplingOptions = { temperature: 0 };

/** Index of the largest value (the first one on ties, like torch.argmax). */
export function argmax(logits: ArrayLike<number>, offset = 0, length = logits.length - offset): number {
  let best = 0, bestV = -Infinity;
  for (let i = 0; i < length; i++) {
    const v = logits[offset + i];
    if (v > bestV) {
      bestV = v;
      best = i;
    }
  }
  return best;
}

/**
 * The sampling distribution after temperature, top-k and top-p, as probabilities over the vocabulary (zeros for
 * filtered tokens). Speculative decoding needs these exact distributions for its acceptance test.
 */
export function samplingDistribution(
  logits: ArrayLike<number>,
  opts: SamplingOptions,
  offset = 0,
  length = logits.length - offset,
): Float64Array {
  const p = new Float64Array(length);
  if (opts.temperature <= 0) {
    p[argmax(logits, offset, length)] = 1;
    return p;
  }
  let m = -Infinity;
  for (let i = 0; i < length; i++) m = Math.max(m, logits[offset + i]);
  let z = 0;
  for (let i = 0; i < length; i++) {
    p[i] = Math.exp((logits[offset + i] - m) / opts.temperature);
    z += p[i];
  }
  for (let i = 0; i < length; i++) p[i] /= z;
  const topK = opts.topK && opts.topK > 0 ? Math.min(opts.topK, length) : length;
  const topP = opts.topP !== undefined && opts.topP < 1 ? opts.topP : 1;
  if (topK === length && topP >= 1) return p;
  // indices by descending probability; ties keep the lower index first
  const order = Array.from({ length }, (_, i) => i).sort((a, b) => p[b] - p[a] || a - b);
  let keep = topK;
  if (topP < 1) {
    let cum = 0, zk = 0;
    for (let r = 0; r < topK; r++) zk += p[order[r]];
    for (let r = 0; r < topK; r++) {
      cum += p[order[r]] / zk;
      if (cum >= topP) {
        keep = r + 1;
        break;
      }
    }
  }
  let zKeep = 0;
  for (let r = 0; r < keep; r++) zKeep += p[order[r]];
  const out = new Float64Array(length);
  for (let r = 0; r < keep; r++) out[order[r]] = p[order[r]] / zKeep;
  return out;
}

/** Draws an index from a probability vector (inverse CDF with one uniform draw). */
export function sampleFrom(probs: ArrayLike<number>, rng: Rng): number {
  const u = rng.uniform();
  let cum = 0, last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] <= 0) continue;
    cum += probs[i];
    last = i;
    if (u < cum) return i;
  }
  return last; // rounding left u above the total: the last token with mass
}

/** Samples the next token from one row of logits. Greedy when `opts.temperature` is 0 (the rng is not used). */
export function sampleToken(
  logits: ArrayLike<number>,
  opts: SamplingOptions,
  rng: Rng,
  offset = 0,
  length = logits.length - offset,
): number {
  if (opts.temperature <= 0) return argmax(logits, offset, length);
  return sampleFrom(samplingDistribution(logits, opts, offset, length), rng);
}
