/**
 * The acceptance rule of speculative decoding (Leviathan et al. 2023; method.md section 3), independent of how
 * the draft and target models compute their distributions.
 *
 * The draft proposed tokens d_1..d_K from distributions q_1..q_K; the target scored the same prefix and gives
 * p_1..p_{K+1} (p_{K+1} follows the last draft token). Token d_i is accepted with probability
 * min(1, p_i(d_i) / q_i(d_i)); at the first rejection a replacement is drawn from norm(max(0, p_i - q_i)); when all
 * K are accepted a bonus token is drawn from p_{K+1}. The emitted sequence is then distributed exactly as if the
 * target had sampled alone. With greedy decoding (one-hot p and q) this reduces to "accept while the draft token
 * is the target's argmax, then emit the target's argmax", which reproduces plain greedy decoding token for token.
 *
 * @module
 */
import type { Rng } from "../util/rng.ts";
import { sampleFrom } from "./sampling.ts";

/** What one verification step emits. */
export interface VerifyResult {
  /** How many draft tokens were accepted (0..K). */
  accepted: number;
  /** Tokens to append: the accepted draft tokens, then one replacement or bonus token (unless EOS came first). */
  tokens: number[];
  /** True when an emitted token is the end-of-sequence token (tokens end there). */
  finished: boolean;
}

/**
 * Applies the acceptance rule. `draftProbs[i]` is q_{i+1} (length K), `targetProbs[i]` is p_{i+1} (length K+1).
 * For greedy decoding pass one-hot distributions (or use {@linkcode verifyGreedy}). `eosId`, when given, ends the
 * emitted tokens at the first end-of-sequence token.
 */
export function verifySampled(
  draftTokens: readonly number[],
  draftProbs: readonly ArrayLike<number>[],
  targetProbs: readonly ArrayLike<number>[],
  rng: Rng,
  eosId: number | null = null,
): VerifyResult {
  const K = draftTokens.length;
  if (draftProbs.length !== K || targetProbs.length !== K + 1) {
    throw new Error(`verifySampled: ${K} draft tokens need ${K} draft and ${K + 1} target distributions`);
  }
  const tokens: number[] = [];
  for (let i = 0; i < K; i++) {
    const d = draftTokens[i];
    const p = targetProbs[i][d], q = draftProbs[i][d];
    // q > 0 always holds for a token the draft sampled; guard anyway so a zero never divides
    const accept = q <= 0 ? p > 0 : rng.uniform() < Math.min(1, p / q);
    if (accept) {
      tokens.push(d);
      if (d === eosId) return { accepted: i + 1, tokens, finished: true };
      continue;
    }
    const residual = residualDistribution(targetProbs[i], draftProbs[i]);
    const t = sampleFrom(residual, rng);
    tokens.push(t);
    return { accepted: i, tokens, finished: t === eosId };
  }
  const bonus = sampleFrom(targetProbs[K], rng);
  tokens.push(bonus);
  return { accepted: K, tokens, finished: bonus === eosId };
}

/** norm(max(0, p - q)); falls back to p when p <= q everywhere (possible only through rounding). */
export function residualDistribution(p: ArrayLike<number>, q: ArrayLike<number>): Float64Array {
  const r = new Float64Array(p.length);
  let z = 0;
  for (let i = 0; i < p.length; i++) {
    r[i] = Math.max(0, p[i] - q[i]);
    z += r[i];
  }
  if (z <= 0) return Float64Array.from(p);
  for (let i = 0; i < r.length; i++) r[i] /= z;
  return r;
}

/**
 * Greedy verification: `targetArgmax[i]` is the target's most likely token after the prefix and the first i
 * draft tokens (length K+1).
 */
export function verifyGreedy(
  draftTokens: readonly number[],
  targetArgmax: readonly number[],
  eosId: number | null = null,
): VerifyResult {
  const K = draftTokens.length;
  if (targetArgmax.length !== K + 1) throw new Error(`verifyGreedy: need ${K + 1} target tokens`);
  const tokens: number[] = [];
  for (let i = 0; i < K; i++) {
    if (draftTokens[i] !== targetArgmax[i]) {
      tokens.push(targetArgmax[i]);
      return { accepted: i, tokens, finished: targetArgmax[i] === eosId };
    }
    tokens.push(draftTokens[i]);
    if (draftTokens[i] === eosId) return { accepted: i + 1, tokens, finished: true };
  }
  tokens.push(targetArgmax[K]);
  return { accepted: K, tokens, finished: targetArgmax[K] === eosId };
}
