/**
 * Evaluation windows for perplexity over long token streams, and the word/byte counts for word perplexity and
 * bits per byte (method.md section 4).
 *
 * Every window says what to feed the model and what to score: the logits at position `scoreFrom + j` of
 * `input` are scored against `targets[j]`. Two conventions:
 *
 * - `rolling` (lm-evaluation-harness `loglikelihood_rolling`, context_len 1): every token of the document is a
 *   target exactly once. The first window is `[prefix] + ids[0 : L-1]` and scores `ids[0 : L]` (so the first
 *   token is predicted from BOS). Each later window scores the next up-to-L tokens, and its input is the L
 *   tokens that precede each target (`ids[end-L-1 : end-1]`): for a full window that is the previous window's
 *   last target followed by L-1 new tokens; the last, partial window keeps a full L tokens of input but scores
 *   only its new tokens (lm-eval's make_disjoint_window). Nothing is dropped. lm-eval uses the model's
 *   max_length (2048 by default for HF models) as L and BOS (else EOS) as the prefix.
 * - `bos_each` (the reference fixture's procedure, fixtures/reference/README.md "Cross-entropy fixture"):
 *   windows `[BOS] + ids[(L-1)w : (L-1)(w+1)]` of L tokens, each an independent sequence, scoring its L-1
 *   text tokens (BOS is never a target). A trailing part shorter than L-1 tokens is dropped (or, with
 *   `keepTrailing`, scored as one shorter window). For the fixture: 31,401 ids, L = 256, 123 windows of 255
 *   targets, 36 trailing tokens dropped.
 *
 * Reports should state the mode, L (window) and stride (L for rolling, L-1 tokens of text per window for
 * bos_each).
 *
 * @module
 */

/** One window: model input and the targets it scores. */
export interface EvalWindow {
  /** Model input ids (length <= L). */
  input: number[];
  /** Targets; `targets[j]` is scored with the logits at `input` position `scoreFrom + j`. */
  targets: number[];
  /** First scored position in `input`. */
  scoreFrom: number;
}

/** The window conventions. */
export type WindowMode = "rolling" | "bos_each";

/** All window modes, for schema checks. */
export const WINDOW_MODES: readonly WindowMode[] = ["rolling", "bos_each"];

/** Options for {@linkcode evalWindows}. */
export interface WindowOptions {
  /** `rolling` (lm-eval, default) or `bos_each` (the reference fixture). */
  mode?: WindowMode;
  /** Window length L in tokens (model input length). */
  maxLength: number;
  /** The id that starts the first window (BOS, or EOS for models without BOS). */
  prefixId: number;
  /** bos_each only: score a trailing part shorter than L-1 tokens as a shorter window instead of dropping it. */
  keepTrailing?: boolean;
}

function checkLength(maxLength: number): void {
  if (!Number.isInteger(maxLength) || maxLength < 2) {
    throw new RangeError(`window length must be an integer >= 2, got ${maxLength}`);
  }
}

/** lm-eval's loglikelihood_rolling windows (context_len 1) over one document's ids (no BOS in `ids`). */
export function rollingWindows(ids: readonly number[], maxLength: number, prefixId: number): EvalWindow[] {
  checkLength(maxLength);
  const n = ids.length, L = maxLength;
  if (n === 0) return [];
  const out: EvalWindow[] = [];
  const first = Math.min(L, n);
  out.push({ input: [prefixId, ...ids.slice(0, first - 1)], targets: ids.slice(0, first), scoreFrom: 0 });
  let predicted = first;
  while (predicted < n) {
    const k = Math.min(n - predicted, L);
    const end = predicted + k;
    out.push({
      input: ids.slice(end - L - 1, end - 1),
      targets: ids.slice(predicted, end),
      scoreFrom: L - k,
    });
    predicted = end;
  }
  return out;
}

/** The reference fixture's windows: `[BOS] + ids[(L-1)w : (L-1)(w+1)]`, trailing part dropped by default. */
export function bosEachWindows(
  ids: readonly number[],
  maxLength: number,
  bosId: number,
  opts: { keepTrailing?: boolean } = {},
): EvalWindow[] {
  checkLength(maxLength);
  const step = maxLength - 1;
  const out: EvalWindow[] = [];
  for (let start = 0; start < ids.length; start += step) {
    const chunk = ids.slice(start, start + step);
    if (chunk.length < step && !opts.keepTrailing) break;
    out.push({ input: [bosId, ...chunk], targets: chunk, scoreFrom: 0 });
  }
  return out;
}

/** Windows in the given mode (see the module doc). */
export function evalWindows(ids: readonly number[], opts: WindowOptions): EvalWindow[] {
  const mode = opts.mode ?? "rolling";
  if (mode === "rolling") return rollingWindows(ids, opts.maxLength, opts.prefixId);
  if (mode === "bos_each") return bosEachWindows(ids, opts.maxLength, opts.prefixId, opts);
  throw new RangeError(`unknown window mode ${mode}`);
}

/** Tokens of `ids` that no window scores (only `bos_each` without `keepTrailing` drops any). */
export function droppedTokens(ids: readonly number[], windows: readonly EvalWindow[]): number {
  return ids.length - windows.reduce((a, w) => a + w.targets.length, 0);
}

// Python's str.isspace() set, which `re.split(r"\s+", ...)` uses on str: JS \s minus U+FEFF, plus U+001C-U+001F
// and U+0085. Matching it keeps word counts (and so word perplexity) identical to lm-eval's.
// deno-lint-ignore no-control-regex -- U+001C..U+001F are whitespace to Python, on purpose.
const PY_WHITESPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

/** Words as lm-eval counts them: `len(re.split(r"\s+", text))` (leading/trailing whitespace adds a piece). */
export function countWords(text: string): number {
  return text.split(PY_WHITESPACE).length;
}

/** UTF-8 bytes of `text` (lm-eval's `len(text.encode("utf-8"))`). */
export function countBytes(text: string): number {
  return new TextEncoder().encode(text).length;
}

/** Sums over a perplexity evaluation. */
export interface PerplexityTotals {
  /** Sum of negative log-likelihoods of all scored tokens, in nats. */
  nll: number;
  /** Scored tokens. */
  tokens: number;
  /** Words of the evaluated text(s) ({@linkcode countWords}). */
  words: number;
  /** UTF-8 bytes of the evaluated text(s). */
  bytes: number;
}

/** Perplexity metrics with lm-eval's names and formulas. */
export interface PerplexityMetrics {
  /** Mean NLL per token (nats). */
  mean_nll: number;
  /** exp(mean NLL per token). */
  token_perplexity: number;
  /** exp(NLL / words). */
  word_perplexity: number;
  /** exp(NLL / bytes). */
  byte_perplexity: number;
  /** NLL / bytes / ln 2. */
  bits_per_byte: number;
}

/**
 * Token, word and byte perplexities and bits per byte from summed NLL. Word and byte figures are only
 * comparable across tokenizers when every token of the text was scored (mode `rolling`, or nothing dropped).
 */
export function perplexityMetrics(t: PerplexityTotals): PerplexityMetrics {
  return {
    mean_nll: t.nll / t.tokens,
    token_perplexity: Math.exp(t.nll / t.tokens),
    word_perplexity: Math.exp(t.nll / t.words),
    byte_perplexity: Math.exp(t.nll / t.bytes),
    bits_per_byte: t.nll / t.bytes / Math.LN2,
  };
}
