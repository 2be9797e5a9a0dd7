/**
 * Text generation with a {@linkcode CausalLM}: prompts are grouped by length and decoded in lockstep batches
 * (one KV/SSM state per batch), sampling on the CPU from the logits read after each step, so a batch of B
 * sequences costs one GPU->CPU read per generated position. Greedy decoding (temperature 0) keeps the loop on
 * the GPU instead and reads the batch's ids once per 32 positions.
 *
 * Each sequence draws from its own {@linkcode Rng} stream (seeded from the run seed and the prompt's index), so a
 * prompt's completion does not depend on which other prompts share its batch.
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { greedyArgmax } from "../runtime/ops/loss.ts";
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
  if (opts.sampling.temperature <= 0) return await greedyGroup(lm, prompts, len, opts);
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

/** Greedy decoding steps recorded per submit by {@linkcode generate}'s batched GPU loop. */
const GREEDY_CHUNK = 32;

/**
 * Greedy lockstep decoding of a batch with the loop on the GPU: each step's argmax ids [B] feed the next step's
 * embedding, and `chunk` steps are recorded per submit and read back together (B ids per step instead of
 * B x V logits). Rows that ended keep decoding until the whole batch has ended; their extra tokens are dropped,
 * and rows do not interact, so the completions equal the CPU path's (both take the lowest index of a tie).
 */
async function greedyGroup(
  lm: CausalLM,
  prompts: readonly (readonly number[])[],
  len: number,
  opts: Pick<GenerateOptions, "maxNewTokens" | "eosIds" | "dropEos" | "signal">,
  chunk = GREEDY_CHUNK,
): Promise<number[][]> {
  const rt = lm.rt;
  const B = prompts.length;
  const eos = new Set(opts.eosIds ?? []);
  const done = new Array(B).fill(false);
  const completions: number[][] = prompts.map(() => []);
  const state: DecodeState = lm.newDecodeState(B, len + opts.maxNewTokens);
  let prev: Tensor | null = null;
  try {
    if (opts.maxNewTokens <= 0) return completions;
    prev = rt.noGrad(() =>
      greedyArgmax(lm.step(state, Int32Array.from(prompts.flat()), len, { lastOnly: true })).ids
    ).keep();
    let unread = 1, produced = 0;
    while (true) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      const steps = Math.min(chunk, opts.maxNewTokens - produced - unread);
      const last: Tensor = prev;
      const { next, finished } = await rt.scope(async () => {
        const chain: Tensor[] = unread ? [last] : [];
        let cur = last;
        for (let j = 0; j < steps; j++) {
          cur = greedyArgmax(lm.step(state, cur, 1)).ids;
          chain.push(cur);
        }
        const reads = await rt.dev.readMany(chain.map((t) => ({ buffer: t.buffer, offset: 0, size: 4 * B })));
        let finished = false;
        for (const bytes of reads) {
          const ids = new Int32Array(bytes);
          for (let b = 0; b < B; b++) {
            if (done[b]) continue;
            if (eos.has(ids[b])) {
              done[b] = true;
              if (!opts.dropEos) completions[b].push(ids[b]);
            } else {
              completions[b].push(ids[b]);
            }
          }
          produced++;
          if (done.every(Boolean) || produced >= opts.maxNewTokens) {
            finished = true;
            break;
          }
        }
        return { next: cur === last ? null : cur.keep(), finished };
      });
      unread = 0;
      if (next) {
        prev.dispose();
        prev = next;
      }
      if (finished) break;
    }
  } finally {
    prev?.dispose();
    lm.disposeState(state);
  }
  return completions;
}

/** Options of {@linkcode greedyResident}. */
export interface ResidentOptions {
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** Decode steps recorded per submit; their ids are read back together (default 32). */
  chunk?: number;
  /** Ids that end the sequence (the output stops there, EOS included). */
  eosIds?: readonly number[];
}

/**
 * Greedy decoding of one prompt with the loop on the GPU: each step's argmax is written to a GPU buffer that the
 * next step's embedding reads, so `chunk` tokens are recorded into one submit and read back together. This
 * removes the per-token GPU->CPU round trip (about 12 ms on Deno's built-in WebGPU); an end-of-sequence token is
 * noticed up to `chunk - 1` steps late and the surplus is trimmed.
 */
export async function greedyResident(
  lm: CausalLM,
  prompt: Int32Array,
  opts: ResidentOptions,
): Promise<number[]> {
  const [tokens] = await greedyGroup(lm, [[...prompt]], prompt.length, opts, Math.max(1, opts.chunk ?? 32));
  return tokens;
}
