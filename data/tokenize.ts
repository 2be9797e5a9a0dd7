/**
 * Turning examples into token sequences with a loss mask.
 *
 * Conventions (every consumer relies on them):
 * - `mask[t] = 1` means token `t` is a training target: the loss includes the prediction of `ids[t]` from the
 *   logits at position `t - 1`. `mask[0]` is always 0 (nothing predicts the first token).
 * - Plain text: `[BOS] + encode(text) + [EOS]` (BOS/EOS when the tokenizer has them and the options keep them);
 *   every token but BOS is a target.
 * - Chat and prompt/completion through the chat template: the template renders the whole conversation; with
 *   `completionOnly` (default) only assistant turns are targets, including what the template emits right
 *   after an answer (e.g. `</s>` or `<|im_end|>`), so the model learns to stop. BOS is prepended when the
 *   tokenizer has one and the rendering does not already start with it (`ensureBos`), as
 *   `apply_chat_template(tokenize=True)` plus a BOS-less template would otherwise lose it.
 * - Prompt/completion without the template (`template: "none"`): `[BOS] + encode(prompt + completion) + [EOS]`,
 *   targets from the completion on (TRL's non-conversational prompt-completion).
 *
 * Where the prompt ends (completion-only masking). The template is rendered for every prefix of the
 * conversation that ends before an assistant turn (with the generation prompt) and after it; those renderings
 * must be prefixes of the full rendering (checked; a template that is not prefix-stable, e.g. one that
 * rewrites earlier turns, is reported). The full text is tokenised once; for each character boundary `b` the
 * prefix `text[0:b]` is tokenised too, and the boundary's token index is the length of the common prefix of the
 * two id lists. When the prefix's ids are a prefix of the full ids the boundary is exact. Otherwise a token
 * straddles the boundary (e.g. SentencePiece merges a trailing space with the next word, `" " + "Tom"` ->
 * `"▁Tom"`); that token contains completion characters and is made a target (at both span ends), and the case
 * is counted in {@linkcode TokenizeStats.boundaryMerges}. Tokenising whole prefixes (not the pieces
 * separately) keeps the ids exactly those of the full text, so what the model trains on is what it would see
 * at inference; tokenising pieces separately would add spurious "▁" prefixes with SentencePiece tokenizers.
 *
 * Preference pairs follow the DPO trainer of TRL as the paper's code used it (TRL 0.8 with alignment-handbook,
 * max_length 1024, max_prompt_length 512, truncation_mode keep_end):
 * - prompt ids = the common id prefix of the rendered prompt, prompt+chosen and prompt+rejected (so prompt +
 *   chosen is exactly the tokenisation of the full chosen text); chosen/rejected = the rest, with EOS appended
 *   when they contain none (TRL always appends one, which doubles it after templates that end turns with EOS);
 * - if `len(prompt) + max(len(chosen), len(rejected)) > max_length`, the prompt is cut to `max_prompt_length`
 *   (`keep_end`: its last tokens, i.e. truncated from the left; `keep_start`: its first), and if still too long
 *   both completions are cut to `max_length - max_prompt_length` from the right.
 * - One deliberate difference: TRL 0.8 drops the prompt's BOS when it truncates from the left; here BOS is kept
 *   (the prompt keeps BOS + its last `max_prompt_length - 1` tokens), since a Llama-family model never sees a
 *   sequence without it. (TRL >= 0.12 instead tokenises prompt and completion separately and truncates the
 *   concatenation; TRL 1.x dropped max_prompt_length and defaults to keep_start.)
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import type {
  ChatExample,
  Example,
  PreferenceExample,
  PromptCompletionExample,
  TextExample,
} from "./formats.ts";
import { formatSource, type RecordSource } from "./problems.ts";
import type { ChatMessage, TextTokenizer } from "./tokenizer.ts";

/** A token sequence with its loss mask. */
export interface TokenizedSequence {
  /** Token ids. */
  ids: number[];
  /** 1 where the token is a training target (see the module doc), else 0; same length as `ids`. */
  mask: number[];
  /** Where the example came from. */
  source: RecordSource;
}

/** A tokenised preference pair. */
export interface TokenizedPair {
  /** Shared prompt ids (starts with BOS when the tokenizer has one). */
  prompt: number[];
  /** Preferred completion ids (ends with EOS when the tokenizer has one). */
  chosen: number[];
  /** Dispreferred completion ids. */
  rejected: number[];
  /** Whether truncation removed anything. */
  truncated: boolean;
  /** Where the pair came from. */
  source: RecordSource;
}

/** How prompt/completion examples are rendered. */
export type PromptTemplateMode = "chat" | "none";

/** Options for tokenising examples. */
export interface TokenizeOptions {
  /** Only assistant/completion tokens are targets (default true; TRL's completion_only_loss/assistant_only_loss). */
  completionOnly?: boolean;
  /** Prompt/completion and preference with string fields: render through the chat template (default) or not. */
  template?: PromptTemplateMode;
  /** Text (and untemplated prompt/completion): prepend BOS (default true). */
  addBos?: boolean;
  /** Text (and untemplated prompt/completion, and preference completions): append EOS (default true). */
  addEos?: boolean;
  /** Templated text: prepend BOS when the rendering does not start with it (default true). */
  ensureBos?: boolean;
}

/** Options for {@linkcode tokenizePreference} (TRL DPO names in camelCase). */
export interface PreferenceOptions extends Pick<TokenizeOptions, "template" | "addEos" | "ensureBos"> {
  /** Maximum prompt + completion length (paper: 1024); undefined = no limit. */
  maxLength?: number;
  /** Maximum prompt length when truncating (paper: 512); required with maxLength. */
  maxPromptLength?: number;
  /** `keep_end` (default, truncate the prompt from the left) or `keep_start`. */
  truncationMode?: "keep_end" | "keep_start";
}

/** Counters a tokenize pass reports (e.g. in the tokenize stage's metrics). */
export interface TokenizeStats {
  /** Examples tokenised. */
  examples: number;
  /** Tokens produced. */
  tokens: number;
  /** Tokens with mask 1. */
  targetTokens: number;
  /** Prompt/completion boundaries that fell inside a token (see the module doc). */
  boundaryMerges: number;
  /** Sequences or pairs shortened by truncation. */
  truncated: number;
}

/** A fresh zeroed {@linkcode TokenizeStats}. */
export function newTokenizeStats(): TokenizeStats {
  return { examples: 0, tokens: 0, targetTokens: 0, boundaryMerges: 0, truncated: 0 };
}

function commonPrefix(a: readonly number[], b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

function encodePlain(tok: TextTokenizer, text: string): number[] {
  return text.length === 0 ? [] : tok.encode(text, { addSpecialTokens: false });
}

/** Tokenises rendered text and prepends BOS if asked and missing. */
function encodeRendered(tok: TextTokenizer, text: string, ensureBos: boolean): number[] {
  const ids = encodePlain(tok, text);
  if (ensureBos && tok.bosId !== null && ids[0] !== tok.bosId) ids.unshift(tok.bosId);
  return ids;
}

/**
 * Token indices of character boundaries of `text` (whose full ids are `full`), by tokenising prefixes.
 * `side` says which way a straddling token goes: "start" boundaries return the straddling token's index (it
 * becomes the first target), "end" boundaries return the index after it (it stays a target).
 */
function boundaryIndex(
  text: string,
  full: number[],
  b: number,
  side: "start" | "end",
  encode: (t: string) => number[],
  stats: TokenizeStats | undefined,
): number {
  if (b >= text.length) return full.length;
  const pre = encode(text.slice(0, b));
  const l = commonPrefix(pre, full);
  if (l === pre.length) return l;
  if (stats) stats.boundaryMerges++;
  return side === "start" ? l : Math.min(l + 1, full.length);
}

/** Renders the chat template; a template failure (e.g. Jinja's raise_exception) names the record. */
function render(
  tok: TextTokenizer,
  messages: ChatMessage[],
  addGenerationPrompt: boolean,
  source: RecordSource,
): string {
  try {
    return tok.applyChatTemplate(messages, { addGenerationPrompt });
  } catch (e) {
    if (e instanceof UserError) throw e;
    throw new UserError(`${formatSource(source)}: the chat template failed: ${(e as Error).message ?? e}`, {
      cause: e,
    });
  }
}

function templateError(source: RecordSource, what: string): UserError {
  return new UserError(
    `${
      formatSource(source)
    }: the chat template is not prefix-stable: ${what}. Completion-only masking needs ` +
      `the rendering of the first turns to be a prefix of the rendering of the whole conversation; set ` +
      `completion_only: false or use a template without this behaviour`,
  );
}

/**
 * Tokenises a conversation with the chat template; targets are the assistant turns at index >= `firstTarget`
 * (or every token after BOS when `completionOnly` is false).
 */
export function tokenizeConversation(
  tok: TextTokenizer,
  messages: ChatMessage[],
  source: RecordSource,
  opts: TokenizeOptions & { firstTarget?: number } = {},
  stats?: TokenizeStats,
): TokenizedSequence {
  const ensureBos = opts.ensureBos ?? true;
  const text = render(tok, messages, false, source);
  const encode = (t: string) => encodeRendered(tok, t, ensureBos);
  const ids = encode(text);
  const mask = new Array<number>(ids.length).fill(0);
  if (opts.completionOnly === false) {
    for (let i = 1; i < ids.length; i++) mask[i] = 1;
  } else {
    const first = opts.firstTarget ?? 0;
    let spans = 0;
    for (let k = first; k < messages.length; k++) {
      if (messages[k].role !== "assistant") continue;
      const before = render(tok, messages.slice(0, k), true, source);
      const upto = render(tok, messages.slice(0, k + 1), false, source);
      if (!text.startsWith(before)) {
        throw templateError(
          source,
          `turns 0..${k - 1} with the generation prompt are not a prefix of the whole`,
        );
      }
      if (!text.startsWith(upto) || upto.length < before.length) {
        throw templateError(source, `turns 0..${k} are not a prefix of the whole`);
      }
      const s = boundaryIndex(text, ids, before.length, "start", encode, stats);
      const e = boundaryIndex(text, ids, upto.length, "end", encode, stats);
      for (let i = Math.max(s, 1); i < e; i++) mask[i] = 1;
      spans++;
    }
    if (spans === 0) {
      throw new UserError(`${formatSource(source)}: no assistant turn to train on (completion-only masking)`);
    }
  }
  return count({ ids, mask, source }, stats);
}

function count(seq: TokenizedSequence, stats?: TokenizeStats): TokenizedSequence {
  if (stats) {
    stats.examples++;
    stats.tokens += seq.ids.length;
    for (const m of seq.mask) stats.targetTokens += m;
  }
  return seq;
}

/** Tokenises plain text: `[BOS] + text + [EOS]`, every token after BOS a target. */
export function tokenizeText(
  tok: TextTokenizer,
  ex: TextExample,
  opts: TokenizeOptions = {},
  stats?: TokenizeStats,
): TokenizedSequence {
  const ids = encodePlain(tok, ex.text);
  if ((opts.addBos ?? true) && tok.bosId !== null) ids.unshift(tok.bosId);
  if ((opts.addEos ?? true) && tok.eosId !== null) ids.push(tok.eosId);
  const mask = ids.map((_, i) => (i === 0 ? 0 : 1));
  return count({ ids, mask, source: ex.source }, stats);
}

/** Tokenises a prompt/completion example (through the chat template unless `template: "none"`). */
export function tokenizePromptCompletion(
  tok: TextTokenizer,
  ex: PromptCompletionExample,
  opts: TokenizeOptions = {},
  stats?: TokenizeStats,
): TokenizedSequence {
  const mode = opts.template ?? "chat";
  if (mode === "chat" || typeof ex.prompt !== "string" || typeof ex.completion !== "string") {
    const prompt = typeof ex.prompt === "string" ? [{ role: "user", content: ex.prompt }] : ex.prompt;
    const completion = typeof ex.completion === "string"
      ? [{ role: "assistant", content: ex.completion }]
      : ex.completion;
    return tokenizeConversation(tok, [...prompt, ...completion], ex.source, {
      ...opts,
      firstTarget: prompt.length,
    }, stats);
  }
  const text = ex.prompt + ex.completion;
  const bos = (opts.addBos ?? true) && tok.bosId !== null ? [tok.bosId] : [];
  const encode = (t: string) => [...bos, ...encodePlain(tok, t)];
  const ids = encode(text);
  const start = opts.completionOnly === false
    ? 1
    : boundaryIndex(text, ids, ex.prompt.length, "start", encode, stats);
  if ((opts.addEos ?? true) && tok.eosId !== null) ids.push(tok.eosId);
  const mask = ids.map((_, i) => (i >= Math.max(start, 1) ? 1 : 0));
  return count({ ids, mask, source: ex.source }, stats);
}

/** Tokenises a chat example; targets are the assistant turns (or everything with `completionOnly: false`). */
export function tokenizeChat(
  tok: TextTokenizer,
  ex: ChatExample,
  opts: TokenizeOptions = {},
  stats?: TokenizeStats,
): TokenizedSequence {
  return tokenizeConversation(tok, ex.messages, ex.source, opts, stats);
}

/** Tokenises any sequence-shaped example (text, prompt/completion, chat). */
export function tokenizeExample(
  tok: TextTokenizer,
  ex: Example,
  opts: TokenizeOptions = {},
  stats?: TokenizeStats,
): TokenizedSequence {
  switch (ex.kind) {
    case "text":
      return tokenizeText(tok, ex, opts, stats);
    case "prompt_completion":
      return tokenizePromptCompletion(tok, ex, opts, stats);
    case "chat":
      return tokenizeChat(tok, ex, opts, stats);
    default:
      throw new Error(`tokenizeExample: ${ex.kind} examples are not single sequences`);
  }
}

/**
 * Tokenises a preference pair (see the module doc for the prompt boundary and TRL's truncation rule).
 *
 * @throws {UserError} for a template that is not prefix-stable, or maxLength without a valid maxPromptLength.
 */
export function tokenizePreference(
  tok: TextTokenizer,
  ex: PreferenceExample,
  opts: PreferenceOptions = {},
  stats?: TokenizeStats,
): TokenizedPair {
  const ensureBos = opts.ensureBos ?? true;
  const useTemplate = (opts.template ?? "chat") === "chat" || typeof ex.prompt !== "string";
  let pText: string, cText: string, rText: string;
  if (useTemplate) {
    const asMsgs = (
      v: string | ChatMessage[],
      role: string,
    ) => (typeof v === "string" ? [{ role, content: v }] : v);
    const p = asMsgs(ex.prompt, "user");
    pText = render(tok, p, true, ex.source);
    cText = render(tok, [...p, ...asMsgs(ex.chosen, "assistant")], false, ex.source);
    rText = render(tok, [...p, ...asMsgs(ex.rejected, "assistant")], false, ex.source);
    for (const [name, t] of [["chosen", cText], ["rejected", rText]]) {
      if (!t.startsWith(pText)) {
        throw templateError(
          ex.source,
          `the prompt with the generation prompt is not a prefix of prompt + ${name}`,
        );
      }
    }
  } else {
    pText = ex.prompt as string;
    cText = pText + (ex.chosen as string);
    rText = pText + (ex.rejected as string);
  }
  const encode = (t: string) => encodeRendered(tok, t, ensureBos);
  const p = encode(pText), c = encode(cText), r = encode(rText);
  const l = Math.min(commonPrefix(p, c), commonPrefix(p, r), p.length);
  if (l < p.length && stats) stats.boundaryMerges++;
  let prompt = p.slice(0, l), chosen = c.slice(l), rejected = r.slice(l);
  if ((opts.addEos ?? true) && tok.eosId !== null) {
    // Templates that close a turn with EOS already put it in; others (and plain text) get one, so the model
    // learns to stop either way without a doubled EOS.
    if (!chosen.includes(tok.eosId)) chosen.push(tok.eosId);
    if (!rejected.includes(tok.eosId)) rejected.push(tok.eosId);
  }
  let truncated = false;
  const maxLen = opts.maxLength;
  if (maxLen !== undefined) {
    const maxPrompt = opts.maxPromptLength;
    if (maxPrompt === undefined || !(maxPrompt > 0 && maxPrompt < maxLen)) {
      throw new UserError(
        `max_prompt_length: expected an integer between 1 and max_length - 1 (${
          maxLen - 1
        }), found ${maxPrompt}`,
      );
    }
    const longer = () => Math.max(chosen.length, rejected.length);
    if (prompt.length + longer() > maxLen && prompt.length > maxPrompt) {
      truncated = true;
      if ((opts.truncationMode ?? "keep_end") === "keep_start") prompt = prompt.slice(0, maxPrompt);
      else {
        const keepBos = tok.bosId !== null && prompt[0] === tok.bosId;
        prompt = keepBos
          ? [prompt[0], ...prompt.slice(prompt.length - (maxPrompt - 1))]
          : prompt.slice(-maxPrompt);
      }
    }
    if (prompt.length + longer() > maxLen) {
      truncated = true;
      chosen = chosen.slice(0, maxLen - maxPrompt);
      rejected = rejected.slice(0, maxLen - maxPrompt);
    }
  }
  if (stats) {
    stats.examples++;
    stats.tokens += 2 * prompt.length + chosen.length + rejected.length;
    stats.targetTokens += chosen.length + rejected.length;
    if (truncated) stats.truncated++;
  }
  return { prompt, chosen, rejected, truncated, source: ex.source };
}

/**
 * Cuts a sequence to `maxLength` tokens keeping its start (TRL SFT's default truncation); returns it unchanged
 * when it fits.
 */
export function truncateSequence(
  seq: TokenizedSequence,
  maxLength: number,
  stats?: TokenizeStats,
): TokenizedSequence {
  if (seq.ids.length <= maxLength) return seq;
  if (stats) stats.truncated++;
  return { ids: seq.ids.slice(0, maxLength), mask: seq.mask.slice(0, maxLength), source: seq.source };
}

/**
 * A preference pair as two sequences for a token file: `prompt + chosen` and `prompt + rejected`, with mask 1 on
 * the completion tokens (the DPO log-probabilities are sums over masked tokens).
 */
export function pairToSequences(pair: TokenizedPair): [TokenizedSequence, TokenizedSequence] {
  const seq = (completion: number[]): TokenizedSequence => ({
    ids: [...pair.prompt, ...completion],
    mask: [...pair.prompt.map(() => 0), ...completion.map(() => 1)],
    source: pair.source,
  });
  const [c, r] = [seq(pair.chosen), seq(pair.rejected)];
  if (pair.prompt.length === 0) c.mask[0] = r.mask[0] = 0;
  return [c, r];
}
