/**
 * Text generation with a {@linkcode CausalLM}: prompts are grouped by length and decoded in lockstep batches
 * (one KV/SSM state per batch) with the loop on the GPU. Each step's next tokens are chosen on the GPU
 * (`runtime/ops/sampling.ts`: argmax when greedy, else temperature / top-k / top-p with a counter-based
 * generator) into an id buffer that the next step's embedding reads, so {@linkcode DECODE_CHUNK} steps are
 * recorded per submit and the batch's ids are read back together: B ids per step instead of B x V logits, and
 * no GPU->CPU round trip per token. A row that ends (EOS) is noticed at the next read and its surplus tokens
 * dropped.
 *
 * Determinism: the draw of prompt i at completion position t depends only on (seed, stream of i, t), the
 * stream being i's index (or `streams[i]`), so a prompt's completion does not depend on which other prompts
 * share its batch, on the batch size or on the chunk size.
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { sampleTokens } from "../runtime/ops/sampling.ts";
import { GREEDY, type SamplingOptions } from "./sampling.ts";

/** Options of {@linkcode generate}. */
export interface GenerateOptions {
  /** Tokens to generate per prompt at most. */
  maxNewTokens: number;
  /** Sampling (temperature 0 = greedy). */
  sampling: SamplingOptions;
  /** Seed of the per-prompt random streams (an integer, |seed| < 2^53). */
  seed: number;
  /**
   * Random stream of each prompt (u32; default: the prompt's index). A caller that generates a long list in
   * parts passes each prompt's index in the whole list, so its sample does not depend on the partition.
   */
  streams?: readonly number[];
  /** Token ids that end a sequence (included in the output unless `dropEos`). */
  eosIds?: readonly number[];
  /** Leave the end-of-sequence token out of the completion. */
  dropEos?: boolean;
  /** Sequences decoded together at most (default 16). */
  batchSize?: number;
  /** Decode steps recorded per submit, their ids read back together (default {@linkcode DECODE_CHUNK}). */
  chunk?: number;
  /**
   * Called after every read of a chunk of steps with a prompt's index and the tokens its completion gained in
   * that chunk (EOS included unless `dropEos`), for streaming output as it is decoded.
   */
  onTokens?: (index: number, tokens: readonly number[]) => void | Promise<void>;
  /** Called after each finished prompt with its index and completion (progress, streaming to disk). */
  onCompletion?: (index: number, completion: number[]) => void | Promise<void>;
  /** Stops between chunks when aborted. */
  signal?: AbortSignal;
}

/** Decode steps recorded per submit by {@linkcode generate}'s GPU loop unless told otherwise. */
export const DECODE_CHUNK = 32;

/** Generates a completion for every prompt. Results are in prompt order. */
export async function generate(
  lm: CausalLM,
  prompts: readonly (readonly number[])[],
  opts: GenerateOptions,
): Promise<number[][]> {
  if (opts.streams && opts.streams.length !== prompts.length) {
    throw new Error(`generate: ${opts.streams.length} streams for ${prompts.length} prompts`);
  }
  const badStream = opts.streams?.find((s) => !Number.isInteger(s) || s < 0 || s >= 2 ** 32);
  if (badStream !== undefined) {
    throw new Error(`generate: stream ${badStream} is not an integer in [0, 2^32)`);
  }
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
      const streams = group.map((i) => opts.streams?.[i] ?? i);
      const onTokens = opts.onTokens;
      const completions = await decodeGroup(
        lm,
        group.map((i) => prompts[i]),
        len,
        streams,
        opts,
        onTokens && ((row, tokens) => onTokens(group[row], tokens)),
      );
      for (let j = 0; j < group.length; j++) {
        out[group[j]] = completions[j];
        await opts.onCompletion?.(group[j], completions[j]);
      }
    }
  }
  return out;
}

/**
 * Lockstep decoding of a batch of equal-length prompts with the loop on the GPU: each step's ids [B] (sampled
 * on the GPU, row b from stream `streams[b]` at its completion position) feed the next step's embedding, and
 * `chunk` steps are recorded per submit and read back together, one chunk ahead of the reads. Rows that ended
 * keep decoding until the whole batch has ended; their extra tokens are dropped, and rows do not interact, so
 * every row's completion is the one it would have alone.
 */
async function decodeGroup(
  lm: CausalLM,
  prompts: readonly (readonly number[])[],
  len: number,
  streams: readonly number[],
  opts: Pick<
    GenerateOptions,
    "maxNewTokens" | "sampling" | "seed" | "eosIds" | "dropEos" | "chunk" | "signal"
  >,
  onRowTokens?: (row: number, tokens: readonly number[]) => void | Promise<void>,
): Promise<number[][]> {
  const rt = lm.rt;
  const B = prompts.length;
  const chunk = Math.max(1, opts.chunk ?? DECODE_CHUNK);
  const eos = new Set(opts.eosIds ?? []);
  const done = new Array(B).fill(false);
  const completions: number[][] = prompts.map(() => []);
  if (opts.maxNewTokens <= 0) return completions;
  const state: DecodeState = lm.newDecodeState(B, len + opts.maxNewTokens);
  const streamIds = rt.tensor(Uint32Array.from(streams), [B], "u32").keep();
  // The token ids of a chunk are copied here and read back at once. Each step runs in its own scope and only
  // its token survives it (until the next step has read it): the steps then see the same free buffers and bind
  // the same ones, so their bind groups come from the cache. Keeping a chunk's tokens and intermediates alive
  // instead shifted the pool's hand-out order every step, and up to 40% of a decode step's dispatches
  // created a bind group (tens of microseconds each on Dawn).
  const ring = rt.empty([chunk + 1, B], "i32").keep();
  // completion position t of every row is drawn at step t of its stream
  const next = (logits: Tensor, step: number): Tensor =>
    sampleTokens(logits, opts.sampling, { seed: opts.seed, streams: streamIds, step });
  let cur: Tensor | null = null; // the newest sampled ids, which the next step embeds
  let issued = 0, recorded = 1; // ids queued for reading; sampling steps recorded
  // Records up to `chunk` steps after `cur` and queues the read of their ids. The read's copy out of the ring is
  // recorded before the call returns, so the next chunk may overwrite the ring at once.
  const issueChunk = (): { ids: Promise<ArrayBuffer>; filled: number } => {
    const first = issued === 0; // the prompt's sampled ids are read with the first chunk
    const steps = Math.min(chunk, opts.maxNewTokens - issued - (first ? 1 : 0));
    let filled = 0;
    const record = (t: Tensor) => rt.dev.copyBuffer(t.buffer, 0, ring.buffer, 4 * B * filled++, 4 * B);
    if (first) record(cur!);
    for (let j = 0; j < steps; j++) {
      const token = rt.scope(() => next(lm.step(state, cur!, 1), recorded++)).keep();
      record(token);
      cur!.dispose();
      cur = token;
    }
    issued += filled;
    return { ids: rt.dev.read(ring.buffer, 0, 4 * B * filled), filled };
  };
  const inFlight: { ids: Promise<ArrayBuffer>; filled: number }[] = [];
  try {
    cur = rt.scope(() =>
      rt.noGrad(() => next(lm.step(state, Int32Array.from(prompts.flat()), len, { lastOnly: true }), 0))
    ).keep();
    inFlight.push(issueChunk());
    let produced = 0;
    while (inFlight.length > 0) {
      // One chunk ahead: the GPU runs the next chunk while this one's ids come back and are handled, so it does
      // not sit idle at chunk boundaries. A batch that ends (EOS) wastes at most that chunk.
      if (issued < opts.maxNewTokens && !opts.signal?.aborted) inFlight.push(issueChunk());
      const { ids, filled } = inFlight.shift()!;
      const all = new Int32Array(await ids);
      if (opts.signal?.aborted) throw opts.signal.reason;
      const had = completions.map((c) => c.length);
      let finished = false;
      for (let i = 0; i < filled; i++) {
        const row = all.subarray(B * i, B * (i + 1));
        for (let b = 0; b < B; b++) {
          if (done[b]) continue;
          if (eos.has(row[b])) {
            done[b] = true;
            if (!opts.dropEos) completions[b].push(row[b]);
          } else {
            completions[b].push(row[b]);
          }
        }
        produced++;
        if (done.every(Boolean) || produced >= opts.maxNewTokens) {
          finished = true;
          break;
        }
      }
      if (onRowTokens) {
        for (let b = 0; b < B; b++) {
          if (completions[b].length > had[b]) await onRowTokens(b, completions[b].slice(had[b]));
        }
      }
      if (finished) break;
    }
  } finally {
    // a chunk recorded past the end still holds a staging buffer until its read completes
    await Promise.allSettled(inFlight.map((c) => c.ids));
    cur?.dispose();
    ring.dispose();
    streamIds.dispose();
    lm.disposeState(state);
  }
  return completions;
}

/** Options of {@linkcode greedyResident}. */
export interface ResidentOptions {
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** Decode steps recorded per submit; their ids are read back together (default {@linkcode DECODE_CHUNK}). */
  chunk?: number;
  /** Ids that end the sequence (the output stops there, EOS included). */
  eosIds?: readonly number[];
}

/**
 * Greedy decoding of one prompt with the loop on the GPU ({@linkcode generate}'s loop for a batch of one): each
 * step's argmax is written to a GPU buffer that the next step's embedding reads, so `chunk` tokens are recorded
 * into one submit and read back together. This removes the per-token GPU->CPU round trip (about 12 ms on Deno's
 * built-in WebGPU); an end-of-sequence token is noticed up to `chunk - 1` steps late and the surplus is trimmed.
 */
export async function greedyResident(
  lm: CausalLM,
  prompt: Int32Array,
  opts: ResidentOptions,
): Promise<number[]> {
  const [tokens] = await decodeGroup(lm, [[...prompt]], prompt.length, [0], {
    ...opts,
    sampling: GREEDY,
    seed: 0,
  });
  return tokens;
}
