/**
 * Tokenization and chat formatting of a model directory: `tokenizer.json` through `@huggingface/tokenizers`
 * and chat templates through `@huggingface/jinja`, with transformers' conventions.
 *
 * - `encode(text)` adds what the tokenizer's post-processor adds (for Llama-2 style tokenizers such as the
 *   fixture's, BOS = 1 in front); `encode(text, { addSpecialTokens: false })` adds nothing.
 * - Chat templates are looked up as transformers does: `chat_template.jinja`, then `chat_template.json`, then
 *   `tokenizer_config.json`'s `chat_template` (a string, or a list whose "default" entry is used). The rendered
 *   text already holds any BOS the template writes, so {@linkcode Tokenizer.encodeChat} encodes it without
 *   special tokens, as `apply_chat_template(tokenize=True)` does.
 * - A tokenizer without a chat template (base models such as the fixture's) gets {@linkcode FALLBACK_CHAT_TEMPLATE}:
 *   BOS, then each turn as plain text — a system message on its own, `User: ...`, `Assistant: ...` followed by
 *   EOS so a fine-tuned model learns to stop — each turn followed by a blank line, and `Assistant:` as the
 *   generation prompt. Plain words rather than markers like `<|user|>` keep it cheap for small vocabularies.
 *
 * @module
 */
import { join } from "node:path";
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
import { UserError } from "../util/errors.ts";

/** One chat turn. */
export interface ChatMessage {
  /** "system", "user" or "assistant" (templates may accept others). */
  role: string;
  /** The turn's text. */
  content: string;
}

/** The chat template used when a tokenizer has none; see the module documentation. */
export const FALLBACK_CHAT_TEMPLATE: string = "{{ bos_token }}" +
  "{% for message in messages %}" +
  "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}" +
  "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}" +
  "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}" +
  "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}" +
  "{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/** Options of {@linkcode Tokenizer.applyChatTemplate}. */
export interface ChatTemplateOptions {
  /** Append the prompt that starts the assistant's reply (default false). */
  addGenerationPrompt?: boolean;
  /** Extra variables for the template (e.g. `tools`, `date_string`). */
  extra?: Record<string, unknown>;
}

type Json = Record<string, unknown>;

/** A special-token entry of tokenizer_config.json: a string or an AddedToken object with `content`. */
function tokenContent(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (typeof v === "object" && v !== null && typeof (v as Json).content === "string") {
    return (v as Json).content as string;
  }
  return null;
}

async function readText(path: string): Promise<string | null> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

function parseJson(text: string, path: string): Json {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new UserError(`${path}: expected a JSON object`);
  }
  return v as Json;
}

/** A model's tokenizer with its special tokens and chat template. */
export class Tokenizer {
  #tok: HfTokenizer;
  #template: Template;
  #specials: Record<string, string | null>;
  #specialIds: Set<number>;
  /** Where the tokenizer came from (for messages). */
  readonly source: string;
  /** The chat template text in use (the tokenizer's own, or {@linkcode FALLBACK_CHAT_TEMPLATE}). */
  readonly chatTemplate: string;
  /** True when the template is the tokenizer's own, false when it is the fallback. */
  readonly hasOwnChatTemplate: boolean;
  /** BOS id, or null when the tokenizer has none. */
  readonly bosTokenId: number | null;
  /** EOS id, or null. */
  readonly eosTokenId: number | null;
  /** Padding id, or null (many causal LMs have none). */
  readonly padTokenId: number | null;
  /** Unknown-token id, or null. */
  readonly unkTokenId: number | null;
  /** Number of ids, added tokens included (may be less than the model's vocab_size, never more). */
  readonly vocabSize: number;

  /** Alias of {@linkcode Tokenizer.bosTokenId}: the data layer's `TextTokenizer` interface. */
  get bosId(): number | null {
    return this.bosTokenId;
  }
  /** Alias of {@linkcode Tokenizer.eosTokenId}: the data layer's `TextTokenizer` interface. */
  get eosId(): number | null {
    return this.eosTokenId;
  }

  /**
   * Builds a tokenizer from parsed `tokenizer.json` and `tokenizer_config.json` objects; `chatTemplate`
   * overrides the config's template; `source` names the origin in messages.
   */
  constructor(
    tokenizerJson: Json,
    tokenizerConfig: Json = {},
    chatTemplate?: string | null,
    source = "tokenizer",
  ) {
    this.source = source;
    try {
      this.#tok = new HfTokenizer(tokenizerJson, tokenizerConfig);
    } catch (e) {
      throw new UserError(`${source}: tokenizer.json could not be loaded (${(e as Error).message})`, {
        cause: e,
      });
    }
    let template = chatTemplate ?? null;
    if (template === null) {
      const t = tokenizerConfig.chat_template;
      if (typeof t === "string") template = t;
      else if (Array.isArray(t)) {
        const def = t.find((x) => (x as Json)?.name === "default") as Json | undefined;
        if (def && typeof def.template === "string") template = def.template;
      }
    }
    this.hasOwnChatTemplate = template !== null;
    this.chatTemplate = template ?? FALLBACK_CHAT_TEMPLATE;
    try {
      this.#template = new Template(this.chatTemplate);
    } catch (e) {
      throw new UserError(`${source}: the chat template does not parse (${(e as Error).message})`, {
        cause: e,
      });
    }
    this.#specials = {};
    for (const k of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      this.#specials[k] = tokenContent(tokenizerConfig[k]);
    }
    const id = (k: string) => {
      const s = this.#specials[k];
      return s === null ? null : this.#tok.token_to_id(s) ?? null;
    };
    this.bosTokenId = id("bos_token");
    this.eosTokenId = id("eos_token");
    this.padTokenId = id("pad_token");
    this.unkTokenId = id("unk_token");
    this.#specialIds = new Set(
      [...this.#tok.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([i]) => i),
    );
    this.vocabSize = this.#tok.get_vocab(true).size;
  }

  /**
   * Loads `tokenizer.json`, `tokenizer_config.json` and any chat template file from a model directory.
   * A directory with only a SentencePiece `tokenizer.model` is refused with the conversion command.
   */
  static async fromDir(dir: string): Promise<Tokenizer> {
    const tjPath = join(dir, "tokenizer.json");
    const tj = await readText(tjPath);
    if (tj === null) {
      const hasSp = (await readText(join(dir, "tokenizer.model"))) !== null;
      throw new UserError(
        `${dir}: no tokenizer.json` +
          (hasSp
            ? ` (only a SentencePiece tokenizer.model; convert it with \`python -c "from transformers import ` +
              `AutoTokenizer as T; T.from_pretrained('${dir}').save_pretrained('${dir}')"\`)`
            : ""),
      );
    }
    const cfgPath = join(dir, "tokenizer_config.json");
    const cfgText = await readText(cfgPath);
    const cfg = cfgText === null ? {} : parseJson(cfgText, cfgPath);
    let template = await readText(join(dir, "chat_template.jinja"));
    if (template === null) {
      const ctPath = join(dir, "chat_template.json");
      const ct = await readText(ctPath);
      if (ct !== null) {
        const t = parseJson(ct, ctPath).chat_template;
        if (typeof t !== "string") throw new UserError(`${ctPath}: field "chat_template" must be a string`);
        template = t;
      }
    }
    return new Tokenizer(parseJson(tj, tjPath), cfg, template, dir);
  }

  /** Token ids of `text`; special tokens per the post-processor unless `addSpecialTokens` is false. */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    return this.#tok.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /** Text of `ids`; special tokens are kept unless `skipSpecialTokens`. */
  decode(ids: readonly number[] | Int32Array, options: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return "";
    return this.#tok.decode(Array.from(ids), { skip_special_tokens: options.skipSpecialTokens ?? false });
  }

  /** The vocabulary string of each id (e.g. "▁Once"); "" for ids outside the vocabulary. */
  tokens(ids: readonly number[] | Int32Array): string[] {
    return Array.from(ids, (i) => this.#tok.id_to_token(i) ?? "");
  }

  /** The vocabulary string of one id, or undefined. */
  idToToken(id: number): string | undefined {
    return this.#tok.id_to_token(id);
  }

  /** The id of a vocabulary string, or undefined. */
  tokenToId(token: string): number | undefined {
    return this.#tok.token_to_id(token);
  }

  /** True for ids of special added tokens (BOS, EOS, ...). */
  isSpecial(id: number): boolean {
    return this.#specialIds.has(id);
  }

  /** The special token strings (bos_token, eos_token, unk_token, pad_token; null when unset). */
  get specialTokens(): Readonly<Record<string, string | null>> {
    return this.#specials;
  }

  /** Renders a conversation with the chat template (transformers' `apply_chat_template(tokenize=False)`). */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    for (const [i, m] of messages.entries()) {
      if (typeof m?.role !== "string" || typeof m?.content !== "string") {
        throw new UserError(
          `chat message ${i}: expected {role: string, content: string}, found ${JSON.stringify(m)}`,
        );
      }
    }
    try {
      return this.#template.render({
        ...options.extra,
        messages: messages.map((m) => ({ ...m })),
        add_generation_prompt: options.addGenerationPrompt ?? false,
        bos_token: this.#specials.bos_token ?? "",
        eos_token: this.#specials.eos_token ?? "",
        unk_token: this.#specials.unk_token ?? "",
        pad_token: this.#specials.pad_token ?? "",
      });
    } catch (e) {
      throw new UserError(`${this.source}: chat template failed: ${(e as Error).message}`, { cause: e });
    }
  }

  /** Token ids of a rendered conversation (no special tokens added beyond what the template writes). */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  /** A {@linkcode StreamDecoder} over this tokenizer, for printing generated text as it comes. */
  streamDecoder(options: { skipSpecialTokens?: boolean } = {}): StreamDecoder {
    return new StreamDecoder(this, options.skipSpecialTokens ?? true);
  }
}

/**
 * Turns a growing list of generated ids into text pieces whose concatenation equals decoding all ids at once.
 * Decoding token by token breaks on SentencePiece's leading-space handling and on byte-fallback tokens that
 * split a UTF-8 character; so each step decodes a short window that keeps the previous token as context and
 * holds text back while it ends in an incomplete character (U+FFFD), as text-generation-inference does.
 */
export class StreamDecoder {
  #tok: Tokenizer;
  #skip: boolean;
  #ids: number[] = [];
  #prefix = 0;
  #read = 0;

  /** A decoder over `tokenizer`; special tokens are dropped when `skipSpecialTokens`. */
  constructor(tokenizer: Tokenizer, skipSpecialTokens = true) {
    this.#tok = tokenizer;
    this.#skip = skipSpecialTokens;
  }

  #decode(ids: number[]): string {
    return this.#tok.decode(ids, { skipSpecialTokens: this.#skip });
  }

  /** Adds one id; returns the text it completes (possibly ""). */
  push(id: number): string {
    this.#ids.push(id);
    const prefixText = this.#decode(this.#ids.slice(this.#prefix, this.#read));
    const newText = this.#decode(this.#ids.slice(this.#prefix));
    if (newText.length > prefixText.length && !newText.endsWith("\uFFFD")) {
      this.#prefix = this.#read;
      this.#read = this.#ids.length;
      return newText.slice(prefixText.length);
    }
    return "";
  }

  /** Text still held back (an incomplete character at the end of generation is emitted as is). */
  flush(): string {
    const prefixText = this.#decode(this.#ids.slice(this.#prefix, this.#read));
    const newText = this.#decode(this.#ids.slice(this.#prefix));
    this.#prefix = this.#read = this.#ids.length;
    return newText.slice(prefixText.length);
  }
}
