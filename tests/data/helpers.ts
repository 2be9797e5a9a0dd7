/**
 * Shared helpers for the data-layer tests: fixture paths, temporary directories, and a {@linkcode TextTokenizer}
 * built from the fixture teacher's tokenizer.json with `@huggingface/tokenizers` and a trivial chat template.
 *
 * @module
 */
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import type { ChatMessage, ChatTemplateOptions, TextTokenizer } from "../../data/tokenizer.ts";

/** Absolute path of a file under the repository's fixtures/ folder. */
export function fixture(rel: string): string {
  return new URL(`../../fixtures/${rel}`, import.meta.url).pathname;
}

/** Absolute path of a file under tests/data/fixtures/. */
export function localFixture(rel: string): string {
  return new URL(`./fixtures/${rel}`, import.meta.url).pathname;
}

/** Runs `fn` with a fresh temporary directory that is removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "distillery-data-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes files given as `{relativePath: contents}` under `dir`, creating folders. */
export async function writeTree(dir: string, files: Record<string, string | Uint8Array>): Promise<void> {
  for (const [rel, data] of Object.entries(files)) {
    const path = `${dir}/${rel}`;
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    if (typeof data === "string") await Deno.writeTextFile(path, data);
    else await Deno.writeFile(path, data);
  }
}

/** A small chat template: `<s>` once, a `### Role:` header line per turn, `</s>` after each assistant answer. */
function trivialTemplate(messages: ChatMessage[], opts: ChatTemplateOptions): string {
  let out = "<s>";
  for (const m of messages) {
    if (m.role === "assistant") out += `### Assistant:\n${m.content}</s>\n`;
    else out += `### ${m.role === "system" ? "System" : "User"}:\n${m.content}\n`;
  }
  if (opts.addGenerationPrompt) out += "### Assistant:\n";
  return out;
}

/** The stories260K tokenizer behind the data layer's {@linkcode TextTokenizer} interface. */
export class FixtureTokenizer implements TextTokenizer {
  readonly #tok: Tokenizer;
  /** BOS id (1 for stories260K). */
  readonly bosId: number | null;
  /** EOS id (2 for stories260K). */
  readonly eosId: number | null;
  /** The template used by {@linkcode FixtureTokenizer.applyChatTemplate}. */
  template: (messages: ChatMessage[], opts: ChatTemplateOptions) => string = trivialTemplate;

  /** Loads fixtures/models/stories260K-hf/tokenizer.json and tokenizer_config.json. */
  constructor() {
    const dir = "models/stories260K-hf";
    const json = JSON.parse(Deno.readTextFileSync(fixture(`${dir}/tokenizer.json`)));
    const config = JSON.parse(Deno.readTextFileSync(fixture(`${dir}/tokenizer_config.json`)));
    this.#tok = new Tokenizer(json, config);
    this.bosId = this.#tok.token_to_id(config.bos_token) ?? null;
    this.eosId = this.#tok.token_to_id(config.eos_token) ?? null;
  }

  /** Token ids; `addSpecialTokens` (default true) adds BOS through the post-processor. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[] {
    return this.#tok.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids;
  }

  /** Text of ids. */
  decode(ids: number[]): string {
    return this.#tok.decode(ids);
  }

  /** Renders the chat template. */
  applyChatTemplate(messages: ChatMessage[], opts: ChatTemplateOptions): string {
    return this.template(messages, opts);
  }
}

/**
 * Zephyr's chat template (HuggingFaceH4/zephyr-7b-beta, the paper's teacher family), rendered with
 * `@huggingface/jinja` as the models layer will: a real Jinja template, for prefix-stability tests.
 */
export const ZEPHYR_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n" +
  "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n" +
  "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n" +
  "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n" +
  "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/** A template function rendering `source` with `@huggingface/jinja` (bos `<s>`, eos `</s>`). */
export function jinjaTemplate(
  source: string,
): (messages: ChatMessage[], opts: ChatTemplateOptions) => string {
  const t = new Template(source);
  return (messages, opts) =>
    t.render({
      messages,
      add_generation_prompt: opts.addGenerationPrompt,
      bos_token: "<s>",
      eos_token: "</s>",
    });
}

let shared: FixtureTokenizer | null = null;

/** One shared fixture tokenizer per test process (loading it takes a few milliseconds). */
export function fixtureTokenizer(): FixtureTokenizer {
  shared ??= new FixtureTokenizer();
  return shared;
}

/** Asserts that `fn` rejects with a UserError whose message contains every string of `parts`. */
export async function assertUserError(fn: () => unknown, ...parts: (string | RegExp)[]): Promise<string> {
  try {
    await fn();
  } catch (e) {
    if (!(e instanceof Error) || e.name !== "UserError") throw e;
    for (const p of parts) {
      const ok = typeof p === "string" ? e.message.includes(p) : p.test(e.message);
      if (!ok) throw new Error(`UserError message lacks ${p}:\n${e.message}`);
    }
    return e.message;
  }
  throw new Error(`expected a UserError containing ${parts.join(" | ")}, but nothing was thrown`);
}
