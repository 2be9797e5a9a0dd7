/**
 * What the data layer needs from a tokenizer, and nothing more.
 *
 * The models layer owns the real tokenizer (tokenizer.json through `@huggingface/tokenizers`, chat templates
 * through `@huggingface/jinja`); the data layer depends only on this interface so that it can be built and
 * tested on its own, and so that any tokenizer with these few methods works.
 *
 * @module
 */

/** One chat turn. `role` is usually `system`, `user` or `assistant` (templates may accept others, e.g. `tool`). */
export interface ChatMessage {
  /** Who speaks: `system`, `user`, `assistant`, ... */
  role: string;
  /** The text of the turn. */
  content: string;
}

/** Options for {@linkcode TextTokenizer.applyChatTemplate}. */
export interface ChatTemplateOptions {
  /** Append the header that opens an assistant turn (the template's `add_generation_prompt`). */
  addGenerationPrompt: boolean;
}

/**
 * A text tokenizer as the data layer uses it.
 *
 * Contract (the data layer relies on each point):
 * - `encode(text, { addSpecialTokens: false })` returns the ids of `text` alone, without BOS/EOS; special-token
 *   strings that occur in `text` (e.g. `<s>` or `<|im_end|>`, emitted by chat templates) map to their ids.
 * - `encode(text)` (special tokens on) adds what the tokenizer's post-processor adds (Llama: BOS).
 * - `applyChatTemplate` renders the template to a string, exactly as `tokenizer.apply_chat_template(...,
 *   tokenize=False)` does in transformers; the rendering must be deterministic, and rendering a prefix of a
 *   conversation must give a prefix of the full rendering (true of ordinary templates; the data layer checks
 *   it and reports the template otherwise).
 * - `bosId` / `eosId` are the ids of the tokenizer's BOS and EOS tokens, or null when it has none.
 */
export interface TextTokenizer {
  /** Token ids of `text`; `addSpecialTokens` (default true) lets the post-processor add BOS etc. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  /** Text of `ids`. */
  decode(ids: number[]): string;
  /** BOS id, or null when the tokenizer has no BOS token. */
  readonly bosId: number | null;
  /** EOS id, or null when the tokenizer has no EOS token. */
  readonly eosId: number | null;
  /** Renders `messages` with the tokenizer's chat template (no tokenisation). */
  applyChatTemplate(messages: ChatMessage[], opts: ChatTemplateOptions): string;
}
