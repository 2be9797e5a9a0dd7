/**
 * Text generation with a {@linkcode CausalLM}: prompts are grouped by length and decoded in lockstep batches
 * (one KV/SSM state per batch), sampling on the CPU from the logits read after each step, so a batch of B
 * sequences costs one GPU->CPU read per generated position.
 *
 * Each sequence draws from its own {@linkcode Rng} stream (seeded from the run seed and the prompt's index), so a
 * prompt's completion does not depend on which other prompts share its batch.
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import { sampleToken, type SamplingOptions } from "./sampling.ts";
import { Rng } from "../util/rng.ts";

/** Options of {@linkcode generate}. */
export interface GenerateOptions {
  /** Tokens to generate per prompt at most. */
  maxNewTokens: number;
  /** Sampling (temperature 0 = greedy). */
  sampling: SamplingOptions;
  /** Seed of the per-prompt random streams. */
  seed: number;
  /** Token ids that end a sequence (included in the output unless `dropEos`). */
  eosIds?: readonly number[];
  /** Leave the end-of-sequence token out of the completion. */
  dropEos?: boolean;
  /** Sequences decoded together at most (default 16). */
  batchSize?: number;
  /** Called after each finished prompt with its index and completion (progress, streaming to disk). */
  onCompletion?: (index: number, completion: number[]) => void | Promise<void>;
  /** Stops between steps when aborted. */
  signal?: AbortSignal;
}

/** Generates a completion for every prompt. Results are in prompt order. */
export async function generate(
  lm: CausalLM,
  prompts: readonly (readonly number[])[],
  opts: GenerateOptions,
): Promise<number[][]> {
  const out: number[][] = new Array(prompts.length);
  const byLength = new Map<number, number[]>();
  prompts.forEach((p, i) => {
    if (p.length === 0) throw new Error(`generate: prompt ${i} is empty (give at least a BOS token)`);
    const list = byLength.get(p.length) ?? [];
    list.push(i);
    byLength.set(p.length, list);
  });
  const B = opts.batchSize ?? 16;
  for (const [len, indices] of [...byLength].sort((a, b) => a[0] - b[0])) {
    for (let s = 0; s < indices.length; s += B) {
      const group = indices.slice(s, s + B);
      const completions = await generateGroup(lm, group.map((i) => prompts[i]), len, group, opts);
      for (let j = 0; j < group.length; j++) {
        out[group[j]] = completions[j];
        await opts.onCompletion?.(group[j], completions[j]);
      }
    }
  }
  return out;
}

async function generateGroup(
  lm: CausalLM,
  prompts: readonly (readonly number[])[],
  len: number,
  indices: number[],
  opts: GenerateOptions,
): Promise<number[][]> {
  const rt = lm.rt;
  const B = prompts.length;
  const V = lm.config.vocabSize;
  const eos = new Set(opts.eosIds ?? []);
  const rngs = indices.map((i) => new Rng(`${opts.seed}/prompt/${i}`));
  const done = new Array(B).fill(false);
  const completions: number[][] = prompts.map(() => []);
  const state: DecodeState = lm.newDecodeState(B, len + opts.maxNewTokens);
  try {
    let ids = Int32Array.from(prompts.flat());
    let n = len;
    for (let step = 0; step < opts.maxNewTokens; step++) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      const logits = await rt.scope(async () => await lm.step(state, ids, n, { lastOnly: true }).read());
      const next = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        if (done[b]) continue;
        const tok = sampleToken(logits, opts.sampling, rngs[b], b * V, V);
        next[b] = tok;
        if (eos.has(tok)) {
          done[b] = true;
          if (!opts.dropEos) completions[b].push(tok);
        } else {
          completions[b].push(tok);
        }
      }
      if (done.every(Boolean)) break;
      ids = next;
      n = 1;
    }
  } finally {
    lm.disposeState(state);
  }
  return completions;
}
