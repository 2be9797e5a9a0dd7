/**
 * Multiple-choice evaluation as lm-evaluation-harness does it (method.md section 4): building each item's
 * context (description, few-shot examples, the item's text), turning (context, target delimiter + choice) into
 * token requests, and the accuracy metrics.
 *
 * Tokenisation follows lm-eval's `_encode_pair`: trailing whitespace of the context moves to the front of the
 * continuation; then the context and the whole string `context + continuation` are encoded separately and the
 * continuation's tokens are the whole encoding's tail after the context's length. Encoding the pieces separately
 * instead would split words differently at the boundary (SentencePiece's "▁" prefix, BPE merges across the
 * space), which changes the scores. As in lm-eval for Hugging Face causal models, no special tokens are added
 * (`add_bos_token` false) unless asked; an empty context is replaced by the BOS token (else EOS). A request
 * longer than `max_length + 1` tokens has its context cut from the left.
 *
 * Metrics: `acc` picks the choice with the highest summed log-likelihood, `acc_norm` the highest
 * log-likelihood divided by the choice's length in characters (Unicode code points, as Python's `len`), ties
 * going to the first; standard errors are the sample standard deviation over items divided by sqrt(n).
 *
 * @module
 */
import type { MultipleChoiceExample } from "../../data/formats.ts";
import type { TextTokenizer } from "../../data/tokenizer.ts";
import { UserError } from "../../util/errors.ts";
import { Rng } from "../../util/rng.ts";

/** How a task's items are turned into text (the task file's settings). */
export interface ContextFormat {
  /** Literal text before everything else. */
  description: string;
  /** Between context and choice (lm-eval default " "). */
  targetDelimiter: string;
  /** Between few-shot examples (lm-eval default "\n\n"). */
  fewshotDelimiter: string;
}

/**
 * Picks `k` few-shot examples for item `index` from `pool`, reproducibly from `seed` (the same item always gets
 * the same examples, whatever else is evaluated). When the pool is the evaluated split itself
 * (`poolIsEvalSplit`), the item is never its own example.
 */
export function selectFewshot(
  pool: readonly MultipleChoiceExample[],
  k: number,
  seed: string,
  index: number,
  poolIsEvalSplit: boolean,
): MultipleChoiceExample[] {
  if (k === 0) return [];
  const candidates = pool.map((_, i) => i).filter((i) => !(poolIsEvalSplit && i === index));
  if (candidates.length < k) {
    throw new UserError(`${k} few-shot examples asked for, but the few-shot pool has ${candidates.length}`);
  }
  const rng = new Rng(`${seed}/${index}`);
  // partial Fisher-Yates: the first k of a seeded shuffle
  for (let i = 0; i < k; i++) {
    const j = i + rng.int(candidates.length - i);
    [candidates[i], candidates[j]] = [candidates[j], candidates[i]];
  }
  return candidates.slice(0, k).map((i) => pool[i]);
}

/**
 * The text before the target delimiter: description, then each few-shot example as `context + delimiter +
 * correct choice` followed by the few-shot delimiter, then the item's context.
 */
export function buildContext(
  item: MultipleChoiceExample,
  fewshot: readonly MultipleChoiceExample[],
  fmt: ContextFormat,
): string {
  const shots = fewshot.map((e) =>
    e.context + fmt.targetDelimiter + e.choices[e.label] + fmt.fewshotDelimiter
  );
  return fmt.description + shots.join("") + item.context;
}

/** Token ids of one item: its context and one continuation per choice. */
export interface EncodedRequest {
  /** Context ids (never empty), shared by every choice. */
  context: number[];
  /** Continuation ids per choice (never empty). */
  continuations: number[][];
}

/** Options of {@linkcode encodeRequest}. */
export interface EncodeRequestOptions {
  /** Prepend BOS to the context (lm-eval's `add_bos_token`, default false). */
  addBos?: boolean;
  /** Longest model input (`max_length`); see {@linkcode encodeRequest} for truncation. */
  maxLength: number;
  /** Names the item in errors. */
  where: string;
}

/**
 * Encodes an item's requests `(context, continuation)` the lm-eval way (see the module documentation). The
 * continuations are the choices with the target delimiter in front. When the longest request exceeds
 * `maxLength + 1` tokens the shared context is cut from the left to fit it, so every choice keeps the same
 * context (lm-eval cuts each request on its own; the two agree whenever nothing is cut).
 */
export function encodeRequest(
  tok: TextTokenizer,
  context: string,
  continuations: readonly string[],
  opts: EncodeRequestOptions,
): EncodedRequest {
  const prefixId = tok.bosId ?? tok.eosId;
  const noPrefix = () =>
    new UserError(`${opts.where}: empty context and the tokenizer has no BOS or EOS token to stand for it`);
  const trimmed = context.replace(/\s+$/u, "");
  const moved = context.slice(trimmed.length);
  let ctxIds: number[];
  let contIds: number[][];
  if (context === "") {
    if (prefixId === null) throw noPrefix();
    ctxIds = [prefixId];
    contIds = continuations.map((c) => tok.encode(c, { addSpecialTokens: false }));
  } else {
    ctxIds = tok.encode(trimmed, { addSpecialTokens: false });
    contIds = continuations.map((c) =>
      tok.encode(trimmed + moved + c, { addSpecialTokens: false }).slice(ctxIds.length)
    );
    if (opts.addBos) {
      if (tok.bosId === null) {
        throw new UserError(`${opts.where}: add_bos_token is set but the tokenizer has no BOS`);
      }
      ctxIds = [tok.bosId, ...ctxIds];
    }
    if (ctxIds.length === 0) {
      // the context was only whitespace: lm-eval's empty-context case
      if (prefixId === null) throw noPrefix();
      ctxIds = [prefixId];
    }
  }
  contIds.forEach((c, i) => {
    if (c.length === 0) {
      throw new UserError(
        `${opts.where}: choice ${i} (${JSON.stringify(continuations[i])}) encodes to no tokens`,
      );
    }
  });
  const longest = Math.max(...contIds.map((c) => c.length));
  const keep = opts.maxLength + 1 - longest;
  if (keep < 1) {
    throw new UserError(
      `${opts.where}: a choice of ${longest} tokens does not fit max_length ${opts.maxLength}`,
    );
  }
  if (ctxIds.length > keep) ctxIds = ctxIds.slice(ctxIds.length - keep);
  return { context: ctxIds, continuations: contIds };
}

/** Index of the largest value, the first on ties (numpy's argmax). */
export function argmaxFirst(xs: readonly number[]): number {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i;
  return best;
}

/** Sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`); null for fewer than two values. */
export function meanStderr(xs: readonly number[]): number | null {
  const n = xs.length;
  if (n < 2) return null;
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  const v = xs.reduce((a, x) => a + (x - mean) * (x - mean), 0) / (n - 1);
  return Math.sqrt(v) / Math.sqrt(n);
}

/** One scored item. */
export interface ChoiceOutcome {
  /** argmax of the log-likelihoods. */
  pred: number;
  /** argmax of the log-likelihoods divided by the choices' lengths in characters. */
  predNorm: number;
  /** pred == label (1 or 0). */
  acc: number;
  /** predNorm == label (1 or 0). */
  accNorm: number;
}

/** Scores one item from its choices' summed log-likelihoods. */
export function scoreItem(item: MultipleChoiceExample, lls: readonly number[]): ChoiceOutcome {
  const pred = argmaxFirst(lls);
  const predNorm = argmaxFirst(lls.map((ll, i) => ll / [...item.choices[i]].length));
  return { pred, predNorm, acc: pred === item.label ? 1 : 0, accNorm: predNorm === item.label ? 1 : 0 };
}

/** Task-level metrics keyed like lm-eval (`acc,none`, ...). */
export function choiceMetrics(outcomes: readonly ChoiceOutcome[]): Record<string, number | null> {
  const acc = outcomes.map((o) => o.acc);
  const accNorm = outcomes.map((o) => o.accNorm);
  const mean = (xs: number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
  return {
    "acc,none": mean(acc),
    "acc_stderr,none": meanStderr(acc),
    "acc_norm,none": mean(accNorm),
    "acc_norm_stderr,none": meanStderr(accNorm),
  };
}
