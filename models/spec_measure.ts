/**
 * Measuring speculative decoding against plain decoding of the same target in one run (the `spec_bench` stage and
 * `bench/spec.ts`): per K, the acceptance rate per draft position, mean accepted drafts per target pass, the
 * acceptance histogram, tokens/s, and the speedup over the baseline measured first, on the same prompts, seeds
 * and device.
 *
 * Timing: each decode's prefill is excluded (see {@linkcode plainGenerate}); tokens/s is the total of generated
 * tokens over the total decode time of all prompts. Warm-up decodes (untimed) compile every kernel first.
 *
 * With greedy decoding every speculative output is also compared with the baseline's tokens (they must be
 * equal); a difference is reported with the baseline's top-1/top-2 logit margin where it occurred, so a genuine
 * bug (large margin) can be told from a float tie (margin within rounding).
 *
 * @module
 */
import type { CausalLM } from "./causal_lm.ts";
import { plainGenerate, speculativeGenerate } from "./spec_decode.ts";
import type { SamplingOptions } from "./sampling.ts";
import type { VerifyMode } from "./verify_state.ts";
import { Rng } from "../util/rng.ts";

/** Options of {@linkcode measureSpeculative}. */
export interface MeasureOptions {
  /** Draft lengths to measure, e.g. [1, 2, 4, 8]. */
  ks: readonly number[];
  /** Tokens generated per prompt at most. */
  maxNewTokens: number;
  /** Sampling (temperature 0: greedy). */
  sampling: SamplingOptions;
  /** Seed of the per-prompt random streams (the same stream for the baseline and every K). */
  seed: number | string;
  /** Untimed decodes of the first prompt before measuring (baseline and each K). Default 1. */
  warmup?: number;
  /** End-of-sequence ids. */
  eosIds?: readonly number[];
  /** Mamba verification mode (default fused). */
  mode?: VerifyMode;
  /** Aborts between decodes. */
  signal?: AbortSignal;
  /** Progress: decodes done of the total, and what is being measured. */
  onProgress?: (done: number, total: number, phase: string, tokens: number) => void;
}

/** A greedy output that differs from the baseline's. */
export interface GreedyMismatch {
  /** Prompt index. */
  prompt: number;
  /** Draft length. */
  k: number;
  /** First differing position. */
  position: number;
  /** The baseline's top-1 minus top-2 logit margin at that position. */
  baselineMargin: number;
}

/** Measurements of one K. */
export interface KMeasurement {
  /** Draft length. */
  k: number;
  /** Entry i: fraction of passes that accepted at least i+1 drafts. */
  acceptance_rate_per_position: number[];
  /** Mean accepted drafts per target pass. */
  mean_accepted_per_pass: number;
  /** Entry j: passes that accepted exactly j drafts (length K+1). */
  acceptance_histogram: number[];
  /** Generated tokens per second (decode time, all prompts). */
  tokens_per_s: number;
  /** The baseline's tokens per second. */
  baseline_tokens_per_s: number;
  /** tokens_per_s / baseline_tokens_per_s. */
  speedup: number;
  /** Target passes in total. */
  passes: number;
  /** Tokens generated in total. */
  tokens: number;
  /** Decode milliseconds in total. */
  decode_ms: number;
}

/** Result of {@linkcode measureSpeculative}. */
export interface Measurement {
  /** Plain decoding of the target. */
  baseline: { tokens: number; decode_ms: number; tokens_per_s: number };
  /** One entry per K, in the order given. */
  results: KMeasurement[];
  /** Greedy only: outputs that differ from the baseline (empty when exact). */
  greedyMismatches: GreedyMismatch[];
}

/** Acceptance rate per position from a histogram of accepted counts (length K+1). */
export function acceptanceRates(histogram: readonly number[]): number[] {
  const K = histogram.length - 1;
  const passes = histogram.reduce((a, b) => a + b, 0);
  const rates: number[] = [];
  let atLeast = passes;
  for (let i = 0; i < K; i++) {
    atLeast -= histogram[i];
    rates.push(passes > 0 ? atLeast / passes : 0);
  }
  return rates;
}

/** Measures the baseline, then speculative decoding for each K, on every prompt. */
export async function measureSpeculative(
  target: CausalLM,
  draft: CausalLM,
  prompts: readonly (readonly number[])[],
  opts: MeasureOptions,
): Promise<Measurement> {
  if (prompts.length === 0) throw new Error("measureSpeculative: no prompts");
  const rngFor = (i: number) => new Rng(`${opts.seed}/prompt/${i}`);
  const base = { maxNewTokens: opts.maxNewTokens, sampling: opts.sampling, eosIds: opts.eosIds };
  const warm = opts.warmup ?? 1;
  const total = (warm + prompts.length) * (1 + opts.ks.length);
  let done = 0;
  const tick = (phase: string, tokens: number) => opts.onProgress?.(++done, total, phase, tokens);
  const abort = () => {
    if (opts.signal?.aborted) throw opts.signal.reason;
  };

  const reference: number[][] = [];
  const margins: number[][] = [];
  let baseTokens = 0, baseMs = 0;
  for (let w = 0; w < warm; w++) {
    abort();
    await plainGenerate(target, prompts[0], { ...base, rng: rngFor(0) });
    tick("warm-up baseline", 0);
  }
  for (let i = 0; i < prompts.length; i++) {
    abort();
    const r = await plainGenerate(target, prompts[i], { ...base, rng: rngFor(i), signal: opts.signal });
    reference.push(r.tokens);
    margins.push(r.margins ?? []);
    baseTokens += r.tokens.length;
    baseMs += r.decodeMs;
    tick("baseline", r.tokens.length);
  }
  const baseline = { tokens: baseTokens, decode_ms: baseMs, tokens_per_s: rate(baseTokens, baseMs) };

  const greedy = opts.sampling.temperature <= 0;
  const results: KMeasurement[] = [];
  const greedyMismatches: GreedyMismatch[] = [];
  for (const k of opts.ks) {
    const spec = { ...base, k, mode: opts.mode, signal: opts.signal };
    for (let w = 0; w < warm; w++) {
      abort();
      await speculativeGenerate(target, draft, prompts[0], { ...spec, rng: rngFor(0) });
      tick(`warm-up K=${k}`, 0);
    }
    const histogram = new Array(k + 1).fill(0);
    let tokens = 0, ms = 0, passes = 0;
    for (let i = 0; i < prompts.length; i++) {
      abort();
      const r = await speculativeGenerate(target, draft, prompts[i], { ...spec, rng: rngFor(i) });
      r.histogram.forEach((c, j) => (histogram[j] += c));
      tokens += r.tokens.length;
      ms += r.decodeMs;
      passes += r.passes;
      if (greedy) {
        const ref = reference[i];
        const n = Math.max(ref.length, r.tokens.length);
        for (let t = 0; t < n; t++) {
          if (ref[t] !== r.tokens[t]) {
            greedyMismatches.push({ prompt: i, k, position: t, baselineMargin: margins[i][t] ?? NaN });
            break;
          }
        }
      }
      tick(`K=${k}`, r.tokens.length);
    }
    const tps = rate(tokens, ms);
    results.push({
      k,
      acceptance_rate_per_position: acceptanceRates(histogram),
      mean_accepted_per_pass: passes > 0 ? histogram.reduce((a, c, j) => a + c * j, 0) / passes : 0,
      acceptance_histogram: histogram,
      tokens_per_s: tps,
      baseline_tokens_per_s: baseline.tokens_per_s,
      speedup: baseline.tokens_per_s > 0 ? tps / baseline.tokens_per_s : 0,
      passes,
      tokens,
      decode_ms: ms,
    });
  }
  return { baseline, results, greedyMismatches };
}

function rate(tokens: number, ms: number): number {
  return ms > 0 ? (tokens * 1000) / ms : 0;
}
