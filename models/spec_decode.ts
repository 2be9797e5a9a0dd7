/**
 * Speculative decoding with a draft model and a target model (method.md section 3), batch 1, and the plain
 * decoding it is measured against.
 *
 * One pass: the draft proposes K tokens autoregressively; the target scores the last committed token and the K
 * drafts in one {@linkcode CausalLM.verifyStep} (K+1 positions); the acceptance rule of `speculative.ts` keeps a
 * prefix of the drafts and emits one more token of the target's own (the correction or the bonus token); both
 * models then drop what was rejected: the target through its verification state (KV truncation, conv ring index,
 * Mamba snapshot replay: no recomputation), the draft by truncating its KV caches (a Transformer draft) or by
 * restoring a state snapshot and re-running the kept tokens (a draft with Mamba layers).
 *
 * Both models have consumed every committed token except the last one, `x0`, which opens the next pass: the
 * target verifies [x0, d_1..d_K], whose K+1 logits rows are the distributions for d_1..d_K and the bonus token.
 *
 * GPU->CPU traffic per pass:
 * - greedy: none while drafting (each draft argmax stays on the GPU and feeds the next draft step), then ONE read
 *   of the K draft tokens and the target's K+1 argmaxes;
 * - sampled: the same, ONE read per pass: each draft token is drawn on the GPU and feeds the next draft step; the
 *   distributions q_1..q_K it was drawn from and the target's p_1..p_{K+1} (same kernel, so the same
 *   temperature / top-k / top-p) are read with the drafts, and the acceptance test runs on the CPU.
 *
 * Random numbers of a sampled run: the draft tokens come from the GPU's counter-based generator
 * (`runtime/ops/sampling.ts`), whose seed {@linkcode speculativeSeed} draws from the caller's `rng` once, before
 * anything else; draft token i (from 0) of pass n (from 0) is the draw at stream {@linkcode DRAFT_STREAM}, step
 * `n * K + i`, so no two draft tokens of a run share a draw. The acceptance uniforms and the residual or bonus
 * token then draw from `rng` in the order of `verifySampled`. A run is therefore reproducible from the rng's
 * state (and K), and different rng states give unrelated draft draws.
 *
 * With temperature 0 the output is plain greedy decoding of the target, token for token (the verification pass
 * computes the same logits up to rounding: different kernels sum in a different order, so only exact ties within
 * float rounding could differ). With sampling, the output is distributed as the target's own sampling
 * distribution (temperature, top-k and top-p applied to both models' logits by the GPU sampler, which follows
 * {@linkcode samplingDistribution}).
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import type { VerifyMode } from "./verify_state.ts";
import { sampleFrom, samplingDistribution, type SamplingOptions } from "./sampling.ts";
import { verifyGreedy, type VerifyResult, verifySampled } from "./speculative.ts";
import { greedyArgmax } from "../runtime/ops/loss.ts";
import { samplingProbs } from "../runtime/ops/sampling.ts";
import type { Tensor } from "../runtime/tensor.ts";
import type { Rng } from "../util/rng.ts";

/** Options shared by {@linkcode speculativeGenerate} and {@linkcode plainGenerate}. */
export interface DecodeOptions {
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** Sampling (temperature 0 = greedy; then `rng` is not used). */
  sampling: SamplingOptions;
  /** Random stream for sampling (required unless greedy). */
  rng?: Rng;
  /** Token ids that end the sequence (the end token is included in the output). */
  eosIds?: readonly number[];
  /** Stops between passes when aborted. */
  signal?: AbortSignal;
}

/** Options of {@linkcode speculativeGenerate}. */
export interface SpeculativeOptions extends DecodeOptions {
  /** Draft tokens per target pass (K >= 1). */
  k: number;
  /** Verification of the target's Mamba2 layers: the fused kernel (default) or one kernel per step. */
  mode?: VerifyMode;
}

/** What a decode produced and how long it took. */
export interface DecodeResult {
  /** Generated tokens (the end-of-sequence token included when one ended the sequence). */
  tokens: number[];
  /** True when an end-of-sequence token ended the sequence. */
  finished: boolean;
  /** Milliseconds of the prompt prefill (up to the GPU finishing it). */
  prefillMs: number;
  /** Milliseconds from the end of the prefill to the last token on the CPU. */
  decodeMs: number;
}

/** Result of {@linkcode speculativeGenerate}: the tokens and the acceptance statistics. */
export interface SpeculativeResult extends DecodeResult {
  /** Target verification passes. */
  passes: number;
  /** Length K+1: entry j counts passes that accepted exactly j draft tokens. */
  histogram: number[];
}

/** Result of {@linkcode plainGenerate}. */
export interface PlainResult extends DecodeResult {
  /** Greedy only: the target's top-1 minus top-2 logit margin at each generated token (ties show as 0). */
  margins?: number[];
}

function isGreedy(s: SamplingOptions): boolean {
  return s.temperature <= 0;
}

function checkPrompt(prompt: readonly number[], vocab: number, who: string): void {
  if (prompt.length === 0) throw new Error(`${who}: the prompt is empty (give at least a BOS token)`);
  for (const t of prompt) {
    if (!(Number.isInteger(t) && t >= 0 && t < vocab)) {
      throw new Error(`${who}: prompt token ${t} is outside the vocabulary [0, ${vocab})`);
    }
  }
}

/** Index of the first end-of-sequence token in `tokens`, or -1. */
function firstEos(tokens: readonly number[], eos: ReadonlySet<number>): number {
  for (let i = 0; i < tokens.length; i++) if (eos.has(tokens[i])) return i;
  return -1;
}

/** Options of {@linkcode plainGenerate}. */
export interface PlainOptions extends DecodeOptions {
  /**
   * Greedy only: decode steps recorded per GPU->CPU read (default 32). Each step's argmax stays on the GPU and
   * feeds the next step, so only every `greedyChunk`-th token waits for the GPU; an end-of-sequence token is then
   * noticed up to `greedyChunk - 1` steps late (the surplus is dropped). 1 reads every token.
   */
  greedyChunk?: number;
}

/**
 * Plain (non-speculative) decoding of `lm`, batch 1, one token per step: the baseline of the benchmark and the
 * reference of the greedy-exactness tests. The prompt minus its last token is prefilled (not timed); the last
 * prompt token opens the first timed step, as in {@linkcode speculativeGenerate}, so both time the same work per
 * generated token. Greedy decoding keeps the loop on the GPU (see {@linkcode PlainOptions.greedyChunk}), the
 * strongest non-speculative baseline; sampled steps read the logits row and sample on the CPU.
 */
export async function plainGenerate(
  lm: CausalLM,
  prompt: readonly number[],
  opts: PlainOptions,
): Promise<PlainResult> {
  const rt = lm.rt;
  const V = lm.config.vocabSize;
  checkPrompt(prompt, V, "plainGenerate");
  const greedy = isGreedy(opts.sampling);
  if (!greedy && !opts.rng) throw new Error("plainGenerate: sampling needs an rng");
  const chunk = Math.max(1, Math.floor(opts.greedyChunk ?? 32));
  const eos = new Set(opts.eosIds ?? []);
  const state = lm.newDecodeState(1, prompt.length + opts.maxNewTokens);
  const tokens: number[] = [];
  const margins: number[] = [];
  let finished = false;
  // the newest token on the GPU (greedy): the next step's input
  let prev: Tensor | null = null;
  try {
    const t0 = performance.now();
    if (prompt.length > 1) {
      rt.scope(() => {
        lm.step(state, Int32Array.from(prompt.slice(0, -1)), prompt.length - 1, { lastOnly: true });
      });
    }
    prev = rt.tensor([prompt[prompt.length - 1]], [1], "i32").keep();
    await rt.dev.sync();
    const t1 = performance.now();
    let next = prompt[prompt.length - 1];
    while (tokens.length < opts.maxNewTokens && !finished) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      if (greedy) {
        const steps = Math.min(chunk, opts.maxNewTokens - tokens.length);
        const last: Tensor = await rt.scope(async () => {
          let cur = prev!;
          const ranges: { buffer: GPUBuffer; offset: number; size: number }[] = [];
          const marginRanges: typeof ranges = [];
          for (let j = 0; j < steps; j++) {
            const am = greedyArgmax(lm.step(state, cur, 1));
            cur = am.ids;
            ranges.push({ buffer: am.ids.buffer, offset: 0, size: 4 });
            marginRanges.push({ buffer: am.margin.buffer, offset: 0, size: 4 });
          }
          const reads = await rt.dev.readMany([...ranges, ...marginRanges]);
          for (let j = 0; j < steps && !finished; j++) {
            const id = new Int32Array(reads[j])[0];
            tokens.push(id);
            margins.push(new Float32Array(reads[steps + j])[0]);
            if (eos.has(id)) finished = true;
          }
          return cur.keep();
        });
        prev.dispose();
        prev = last;
        continue;
      }
      next = await rt.scope(async () => {
        const row = (await lm.step(state, Int32Array.of(next), 1).read()) as Float32Array;
        return sampleFrom(samplingDistribution(row, opts.sampling), opts.rng!);
      });
      tokens.push(next);
      if (eos.has(next)) finished = true;
    }
    const t2 = performance.now();
    return {
      tokens,
      finished,
      prefillMs: t1 - t0,
      decodeMs: t2 - t1,
      ...(greedy ? { margins } : {}),
    };
  } finally {
    prev?.dispose();
    lm.disposeState(state);
  }
}

/** The GPU generator's stream for the draft tokens of a sampled speculative run (batch 1: one stream). */
export const DRAFT_STREAM = 0;

/**
 * The seed of the GPU generator that draws a sampled speculative run's draft tokens: a uniform 53-bit integer
 * from `rng` (one `rng.uniform()`). {@linkcode speculativeGenerate} calls it once, before any other use of the
 * rng, so a caller (or a test's reference implementation) with the same rng state gets the same seed.
 */
export function speculativeSeed(rng: Rng): number {
  // uniform() is k / 2^53 for an integer k, so this is exact
  return rng.uniform() * 2 ** 53;
}

/** The GPU random streams of a sampled run (kept for the whole run). */
interface GpuDraws {
  seed: number;
  /** `[DRAFT_STREAM]`, u32. */
  draft: Tensor;
  /** K+1 streams for the target's rows, u32: their draws are unused but the sampler needs one per row. */
  target: Tensor;
}

/**
 * The draft side of speculative decoding: a decode state that has consumed every committed token except those
 * in `pending`, and the rollback after each verification.
 */
class Drafter {
  readonly lm: CausalLM;
  readonly state: DecodeState;
  /** Committed tokens the draft has not consumed yet (they open the next draft step). */
  pending: number[] = [];
  /** Draft length at the start of the current pass. */
  #passStart = 0;
  /** SSM and conv states at the start of the pass (drafts with Mamba layers only). */
  #snapshot: Map<number, { state: Tensor; conv: Tensor }> | null = null;

  constructor(lm: CausalLM, maxLength: number) {
    this.lm = lm;
    this.state = lm.newDecodeState(1, maxLength);
  }

  get hasMamba(): boolean {
    return this.state.ssm.size > 0;
  }

  prefill(tokens: readonly number[]): void {
    if (tokens.length === 0) return;
    this.lm.rt.scope(() => {
      this.lm.step(this.state, Int32Array.from(tokens), tokens.length, { lastOnly: true });
    });
  }

  /** Marks the start of a pass (snapshots Mamba states so the pass can be undone). */
  beginPass(): void {
    this.#passStart = this.state.length;
    if (!this.hasMamba) return;
    const rt = this.lm.rt;
    this.#snapshot ??= new Map(
      [...this.state.ssm].map(([l, m]) => [l, {
        state: rt.empty(m.state.shape, m.state.dtype).keep(),
        conv: rt.empty(m.conv.shape, m.conv.dtype).keep(),
      }]),
    );
    for (const [l, m] of this.state.ssm) {
      const snap = this.#snapshot.get(l)!;
      rt.copyInto(snap.state, m.state);
      rt.copyInto(snap.conv, m.conv);
    }
  }

  /**
   * After a pass that consumed `pending` (opening the pass) and d_1..d_{K-1}: keeps the opening tokens and the
   * `accepted` drafts, and sets the tokens the next pass opens with.
   */
  endPass(opened: readonly number[], drafts: readonly number[], accepted: number, emitted: number): void {
    const K = drafts.length;
    if (accepted === K) {
      // everything consumed is kept; d_K was never fed to the draft
      this.pending = [drafts[K - 1], emitted];
      return;
    }
    const keepLen = this.#passStart + opened.length + accepted;
    this.pending = [emitted];
    if (!this.hasMamba) {
      for (const kv of this.state.kv.values()) kv.truncate(keepLen);
      this.state.length = keepLen;
      return;
    }
    // Mamba layers cannot rewind: restore the pass's starting state and re-run the kept tokens.
    const rt = this.lm.rt;
    for (const [l, m] of this.state.ssm) {
      const snap = this.#snapshot!.get(l)!;
      rt.copyInto(m.state, snap.state);
      rt.copyInto(m.conv, snap.conv);
    }
    for (const kv of this.state.kv.values()) kv.truncate(this.#passStart);
    this.state.length = this.#passStart;
    const redo = [...opened, ...drafts.slice(0, accepted)];
    rt.scope(() => {
      this.lm.step(this.state, Int32Array.from(redo), redo.length, { lastOnly: true });
    });
  }

  dispose(): void {
    this.lm.disposeState(this.state);
    if (this.#snapshot) {
      for (const s of this.#snapshot.values()) {
        s.state.dispose();
        s.conv.dispose();
      }
    }
  }
}

/**
 * Speculative decoding of `target` with `draft` (same tokenizer), batch 1. Greedy output equals
 * {@linkcode plainGenerate}'s for the target; sampled output follows the target's sampling distribution.
 */
export async function speculativeGenerate(
  target: CausalLM,
  draft: CausalLM,
  prompt: readonly number[],
  opts: SpeculativeOptions,
): Promise<SpeculativeResult> {
  const rt = target.rt;
  const K = opts.k;
  const V = target.config.vocabSize;
  if (!(Number.isInteger(K) && K >= 1)) {
    throw new Error(`speculativeGenerate: k must be an integer >= 1, got ${K}`);
  }
  if (draft.rt !== rt) throw new Error("speculativeGenerate: the draft and the target must share a runtime");
  if (draft.config.vocabSize !== V) {
    throw new Error(
      `speculativeGenerate: the draft's vocabulary (${draft.config.vocabSize}) differs from the target's (${V})`,
    );
  }
  checkPrompt(prompt, V, "speculativeGenerate");
  const greedy = isGreedy(opts.sampling);
  if (!greedy && !opts.rng) throw new Error("speculativeGenerate: sampling needs an rng");
  const eos = new Set(opts.eosIds ?? []);
  const capacity = prompt.length + opts.maxNewTokens + K + 1;
  const tv = target.newVerifyState(capacity, K, { mode: opts.mode ?? "fused" });
  const drafter = new Drafter(draft, capacity + 1);
  const histogram = new Array(K + 1).fill(0);
  const tokens: number[] = [];
  let finished = false, passes = 0;
  let gpu: GpuDraws | null = null;
  try {
    if (!greedy) {
      gpu = {
        seed: speculativeSeed(opts.rng!),
        draft: rt.tensor(Uint32Array.of(DRAFT_STREAM), [1], "u32").keep(),
        target: rt.tensor(Uint32Array.from({ length: K + 1 }, (_, j) => DRAFT_STREAM + 1 + j), [K + 1], "u32")
          .keep(),
      };
    }
    const t0 = performance.now();
    const head = prompt.slice(0, -1);
    if (head.length > 0) {
      rt.scope(() => {
        target.verifyPrefill(tv, Int32Array.from(head), head.length, { lastOnly: true });
      });
    }
    drafter.prefill(head);
    drafter.pending = [prompt[prompt.length - 1]];
    await rt.dev.sync();
    const t1 = performance.now();
    while (tokens.length < opts.maxNewTokens && !finished) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      const opened = drafter.pending;
      drafter.beginPass();
      const { drafts, result } = greedy
        ? await greedyPass(target, tv, drafter, K)
        : await sampledPass(target, tv, drafter, K, opts.sampling, opts.rng!, gpu!, passes);
      passes++;
      histogram[result.accepted]++;
      target.verifyAccept(tv, result.accepted + 1);
      let emitted = result.tokens;
      const cut = firstEos(emitted, eos);
      if (cut >= 0) {
        emitted = emitted.slice(0, cut + 1);
        finished = true;
      }
      const room = opts.maxNewTokens - tokens.length;
      if (emitted.length > room) {
        emitted = emitted.slice(0, room);
        finished = false;
      }
      tokens.push(...emitted);
      if (finished || tokens.length >= opts.maxNewTokens) break;
      drafter.endPass(opened, drafts, result.accepted, result.tokens[result.tokens.length - 1]);
    }
    const t2 = performance.now();
    return { tokens, finished, prefillMs: t1 - t0, decodeMs: t2 - t1, passes, histogram };
  } finally {
    gpu?.draft.dispose();
    gpu?.target.dispose();
    target.disposeVerifyState(tv);
    drafter.dispose();
  }
}

/**
 * The draft's K steps on the GPU, inside the caller's scope: the pending tokens open the draft, and each step's
 * token, chosen from its last-position logits by `next` (step i from 0), feeds the next step and lands in the
 * target's verification input [x0, d_1..d_K], which is returned.
 */
function draftChain(drafter: Drafter, K: number, next: (logits: Tensor, i: number) => Tensor): Tensor {
  const rt = drafter.lm.rt;
  const opened = drafter.pending;
  const feed = rt.tensor(opened, [opened.length], "i32");
  const verifyIds = rt.empty([K + 1], "i32");
  rt.dev.copyBuffer(feed.buffer, 4 * (opened.length - 1), verifyIds.buffer, 0, 4);
  let ids: Tensor = feed, n = opened.length;
  for (let i = 0; i < K; i++) {
    ids = next(drafter.lm.step(drafter.state, ids, n, { lastOnly: true }), i);
    n = 1;
    rt.dev.copyBuffer(ids.buffer, 0, verifyIds.buffer, 4 * (i + 1), 4);
  }
  return verifyIds;
}

/**
 * A greedy pass kept on the GPU until one read: the pending tokens open the draft, each draft argmax feeds the
 * next draft step and lands in the target's input [x0, d_1..d_K]; then the target's argmaxes and the drafts are
 * read together.
 */
async function greedyPass(
  target: CausalLM,
  tv: ReturnType<CausalLM["newVerifyState"]>,
  drafter: Drafter,
  K: number,
): Promise<{ drafts: number[]; result: VerifyResult }> {
  const rt = target.rt;
  return await rt.scope(async () => {
    const verifyIds = draftChain(drafter, K, (logits) => greedyArgmax(logits).ids);
    const am = greedyArgmax(target.verifyStep(tv, verifyIds, K + 1));
    const [d, t] = await rt.dev.readMany([
      { buffer: verifyIds.buffer, offset: 4, size: 4 * K },
      { buffer: am.ids.buffer, offset: 0, size: 4 * (K + 1) },
    ]);
    const drafts = [...new Int32Array(d)];
    return { drafts, result: verifyGreedy(drafts, [...new Int32Array(t)]) };
  });
}

/**
 * A sampled pass kept on the GPU until one read, like {@linkcode greedyPass}: each draft token is drawn on the GPU
 * (Philox counter `(seed, DRAFT_STREAM, pass * K + i)`) and feeds the next draft step and the target's input
 * [x0, d_1..d_K]; the distributions q_1..q_K it was drawn from and the target's p_1..p_{K+1} come from the same
 * kernel, so temperature, top-k and top-p are applied identically to both models. One read brings back the
 * drafts, q and p; the acceptance test, the residual and the bonus token then draw from the CPU `rng`.
 */
async function sampledPass(
  target: CausalLM,
  tv: ReturnType<CausalLM["newVerifyState"]>,
  drafter: Drafter,
  K: number,
  sampling: SamplingOptions,
  rng: Rng,
  gpu: GpuDraws,
  pass: number,
): Promise<{ drafts: number[]; result: VerifyResult }> {
  const rt = target.rt;
  const V = target.config.vocabSize;
  return await rt.scope(async () => {
    const q: Tensor[] = [];
    const verifyIds = draftChain(drafter, K, (logits, i) => {
      const s = samplingProbs(logits, sampling, { seed: gpu.seed, streams: gpu.draft, step: pass * K + i });
      q.push(s.probs);
      return s.ids;
    });
    // the target's own draws are discarded: only its distributions enter the acceptance test
    const p = samplingProbs(target.verifyStep(tv, verifyIds, K + 1), sampling, {
      seed: gpu.seed,
      streams: gpu.target,
      step: pass,
    }).probs;
    const reads = await rt.dev.readMany([
      { buffer: verifyIds.buffer, offset: 4, size: 4 * K },
      ...q.map((t) => ({ buffer: t.buffer, offset: 0, size: 4 * V })),
      { buffer: p.buffer, offset: 0, size: 4 * (K + 1) * V },
    ]);
    const drafts = [...new Int32Array(reads[0])];
    const qRows = reads.slice(1, K + 1).map((b) => new Float32Array(b));
    const pAll = new Float32Array(reads[K + 1]);
    const pRows = Array.from({ length: K + 1 }, (_, j) => pAll.subarray(j * V, (j + 1) * V));
    return { drafts, result: verifySampled(drafts, qRows, pRows, rng, null) };
  });
}
