/**
 * Normalising raw records into typed examples for the format a recipe declares.
 *
 * | format              | accepted record shapes                                                                 |
 * | ------------------- | -------------------------------------------------------------------------------------- |
 * | `text`              | `{text}` (the field name is configurable; text files give `{text}`)                     |
 * | `prompt_completion` | `{prompt, completion}` as strings or message lists (TRL); alpaca `{instruction, input?, |
 * |                     | output, system?, history?}` (prompt = instruction + "\n" + input, as LLaMA-Factory)     |
 * | `chat`              | `{messages: [{role, content}]}`; ShareGPT `{conversations: [{from, value}], system?}`   |
 * |                     | with from human/user -> user, gpt/assistant -> assistant, system -> system              |
 * | `preference`        | `{prompt, chosen, rejected}` (strings or message lists); `{chosen, rejected}` message   |
 * |                     | lists with the shared leading turns as implicit prompt (TRL); ShareGPT                  |
 * |                     | `{conversations, chosen: {from, value}, rejected: {from, value}}`                       |
 * | `multiple_choice`   | `{ctx, endings[], label}` (HellaSwag-style JSONL), or any record through a task's       |
 * |                     | `doc_to_text` / `doc_to_choice` / `doc_to_target` (see task_file.ts and template.ts)    |
 *
 * `fields` renames the canonical field names (`text`, `prompt`, `completion`, `messages`, `chosen`, `rejected`,
 * `ctx`, `endings`, `label`, `id`) to the names a dataset uses. A record that does not fit yields precise
 * {@linkcode RecordProblem}s (file, index/line, field path, expected, found); the {@linkcode ProblemCollector}
 * applies the `on_invalid` policy.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import {
  describeValue,
  type InvalidPolicy,
  ProblemCollector,
  type ProblemReport,
  type RecordProblem,
  type RecordSource,
} from "./problems.ts";
import type { DatasetRecord } from "./records.ts";
import {
  compileTemplate,
  formatPath,
  isBareFieldName,
  isSinglePlaceholder,
  lookupPath,
  type PathStep,
  renderTemplate,
  type Template,
} from "./template.ts";
import type { ChatMessage } from "./tokenizer.ts";

/** The formats a dataset can be declared as. */
export type DataFormat = "text" | "prompt_completion" | "chat" | "preference" | "multiple_choice";

/** All formats, for schema checks. */
export const DATA_FORMATS: readonly DataFormat[] = [
  "text",
  "prompt_completion",
  "chat",
  "preference",
  "multiple_choice",
];

/** Plain text for language modelling. */
export interface TextExample {
  /** Discriminator. */
  kind: "text";
  /** The document. */
  text: string;
  /** Where it came from. */
  source: RecordSource;
}

/** A prompt and its completion (strings, or message lists for the chat template). */
export interface PromptCompletionExample {
  /** Discriminator. */
  kind: "prompt_completion";
  /** The prompt text, or the conversation so far (ends with a user turn). */
  prompt: string | ChatMessage[];
  /** The completion text, or the assistant turn(s). */
  completion: string | ChatMessage[];
  /** Where it came from. */
  source: RecordSource;
}

/** A conversation; training targets are the assistant turns. */
export interface ChatExample {
  /** Discriminator. */
  kind: "chat";
  /** The turns in order (an optional system turn first). */
  messages: ChatMessage[];
  /** Where it came from. */
  source: RecordSource;
}

/** A preference pair: one prompt, a preferred and a dispreferred completion. */
export interface PreferenceExample {
  /** Discriminator. */
  kind: "preference";
  /** Prompt text, or the conversation up to the answer. Message lists and strings are never mixed. */
  prompt: string | ChatMessage[];
  /** Preferred completion (text, or assistant turn(s)). */
  chosen: string | ChatMessage[];
  /** Dispreferred completion. */
  rejected: string | ChatMessage[];
  /** Where it came from. */
  source: RecordSource;
}

/** A multiple-choice item, scored as continuations of `context`. */
export interface MultipleChoiceExample {
  /** Discriminator. */
  kind: "multiple_choice";
  /** The context (without the target delimiter). */
  context: string;
  /** The candidate continuations (without the target delimiter). */
  choices: string[];
  /** Index of the correct choice. */
  label: number;
  /** The record's id, when it has one. */
  id?: string;
  /** Where it came from. */
  source: RecordSource;
}

/** Any normalised example. */
export type Example =
  | TextExample
  | PromptCompletionExample
  | ChatExample
  | PreferenceExample
  | MultipleChoiceExample;

/** The task-file fields that map a record to a multiple-choice item (lm-eval names). */
export interface ChoiceMapping {
  /** Field name or template giving the context. */
  doc_to_text: string;
  /** Field name or template giving the list of choices, or a fixed list. */
  doc_to_choice: string | string[];
  /** Field name or template giving the label (index, or the correct choice's text), or a fixed index. */
  doc_to_target: string | number;
}

/** How to normalise records. */
export interface FormatOptions {
  /** The declared format. */
  format: DataFormat;
  /** Canonical field name -> the dataset's field name. */
  fields?: Partial<Record<string, string>>;
  /** Multiple choice only: map records through lm-eval style templates instead of `{ctx, endings, label}`. */
  choiceMapping?: ChoiceMapping;
  /** Where the choice mapping came from, for messages (e.g. the task file). */
  choiceMappingWhere?: string;
}

/** The outcome of normalising one record. */
export interface NormalizeResult {
  /** The example, when the record fits. */
  example?: Example;
  /** What is wrong (empty when it fits). */
  problems: RecordProblem[];
}

const FIELD_NAMES = [
  "text",
  "prompt",
  "completion",
  "messages",
  "chosen",
  "rejected",
  "ctx",
  "endings",
  "label",
  "id",
];

const SHAREGPT_ROLES: Record<string, string> = {
  human: "user",
  user: "user",
  gpt: "assistant",
  assistant: "assistant",
  system: "system",
};
const MESSAGE_ROLES = new Set(["system", "user", "assistant", "tool"]);

type Issue = Omit<RecordProblem, "source">;
type WithoutSource<T> = T extends unknown ? Omit<T, "source"> : never;
/** An example before its source is attached. */
type Draft = WithoutSource<Example>;

class Problems {
  list: Issue[] = [];
  add(field: string, expected: string, found: unknown, raw = false): void {
    this.list.push({ field, expected, found: raw ? String(found) : describeValue(found) });
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return !!v && typeof v === "object" && !Array.isArray(v);
}

/** Text of an OpenAI-style content value: a string, or a list of `{type: "text", text}` parts. */
function contentText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (Array.isArray(v) && v.every((p) => isObject(p) && p.type === "text" && typeof p.text === "string")) {
    return v.map((p) => (p as { text: string }).text).join("");
  }
  return null;
}

/** Reads `[{role, content}]` (or ShareGPT `[{from, value}]` when `sharegpt`). */
function readMessages(v: unknown, field: string, sharegpt: boolean, probs: Problems): ChatMessage[] | null {
  if (!Array.isArray(v) || v.length === 0) {
    probs.add(
      field,
      sharegpt ? "a non-empty list of {from, value}" : "a non-empty list of {role, content}",
      v,
    );
    return null;
  }
  const out: ChatMessage[] = [];
  const before = probs.list.length;
  v.forEach((m, i) => {
    const at = `${field}[${i}]`;
    if (!isObject(m)) return probs.add(at, sharegpt ? "{from, value}" : "{role, content}", m);
    if (sharegpt) {
      const role = typeof m.from === "string" ? SHAREGPT_ROLES[m.from] : undefined;
      if (!role) probs.add(`${at}.from`, `one of ${Object.keys(SHAREGPT_ROLES).join(", ")}`, m.from);
      if (typeof m.value !== "string") probs.add(`${at}.value`, "a string", m.value);
      if (role && typeof m.value === "string") out.push({ role, content: m.value });
    } else {
      const okRole = typeof m.role === "string" && MESSAGE_ROLES.has(m.role);
      if (!okRole) probs.add(`${at}.role`, `one of ${[...MESSAGE_ROLES].join(", ")}`, m.role);
      const text = contentText(m.content);
      if (text === null) probs.add(`${at}.content`, "a string (or a list of {type: text, text})", m.content);
      if (okRole && text !== null) out.push({ role: m.role as string, content: text });
    }
  });
  if (probs.list.length > before) return null;
  for (let i = 1; i < out.length; i++) {
    if (out[i].role === "system") {
      probs.add(
        `${field}[${i}].${sharegpt ? "from" : "role"}`,
        "a system turn only at the start",
        "system",
        false,
      );
      return null;
    }
  }
  return out;
}

/** Picks `messages` or ShareGPT `conversations` (or the renamed field). */
function readConversation(
  rec: Record<string, unknown>,
  fields: FormatOptions["fields"],
  probs: Problems,
): ChatMessage[] | null {
  const named = fields?.messages;
  let key: string;
  if (named) key = named;
  else if ("messages" in rec) key = "messages";
  else if ("conversations" in rec) key = "conversations";
  else {
    probs.add(
      "messages",
      "a list of {role, content} (or ShareGPT conversations: [{from, value}])",
      undefined,
    );
    return null;
  }
  const v = rec[key];
  const sharegpt = Array.isArray(v) && v.length > 0 && isObject(v[0]) && "from" in v[0] && !("role" in v[0]);
  const msgs = readMessages(v, key, sharegpt, probs);
  if (!msgs) return null;
  if (sharegpt && typeof rec.system === "string" && rec.system.length > 0 && msgs[0]?.role !== "system") {
    msgs.unshift({ role: "system", content: rec.system });
  }
  return msgs;
}

function normalizeText(
  rec: Record<string, unknown>,
  f: FormatOptions["fields"],
  probs: Problems,
): Draft | null {
  const key = f?.text ?? "text";
  const v = rec[key];
  if (typeof v !== "string" || v.length === 0) {
    probs.add(key, "a non-empty string", v);
    return null;
  }
  return { kind: "text", text: v };
}

function normalizePromptCompletion(
  rec: Record<string, unknown>,
  f: FormatOptions["fields"],
  probs: Problems,
): Draft | null {
  const pk = f?.prompt ?? "prompt", ck = f?.completion ?? "completion";
  if (pk in rec || ck in rec || f?.prompt) {
    const p = rec[pk], c = rec[ck];
    if (typeof p === "string" && typeof c === "string") {
      return { kind: "prompt_completion", prompt: p, completion: c };
    }
    if (Array.isArray(p) || Array.isArray(c)) {
      const pm = readMessages(p, pk, false, probs);
      const cm = readMessages(c, ck, false, probs);
      if (!pm || !cm) return null;
      if (pm[pm.length - 1].role === "assistant") {
        probs.add(
          `${pk}[${pm.length - 1}].role`,
          "the prompt to end with a non-assistant turn",
          "assistant",
          true,
        );
      }
      cm.forEach((m, i) => {
        if (m.role !== "assistant") probs.add(`${ck}[${i}].role`, "assistant", m.role, true);
      });
      return probs.list.length ? null : { kind: "prompt_completion", prompt: pm, completion: cm };
    }
    if (typeof p !== "string") probs.add(pk, "a string or a list of messages", p);
    if (typeof c !== "string") probs.add(ck, "a string or a list of messages", c);
    return null;
  }
  if ("instruction" in rec || "output" in rec) {
    const ins = rec.instruction, inp = rec.input ?? "", out = rec.output;
    if (typeof ins !== "string" || ins.length === 0) probs.add("instruction", "a non-empty string", ins);
    if (typeof inp !== "string") probs.add("input", "a string (or absent)", inp);
    if (typeof out !== "string") probs.add("output", "a string", out);
    const sys = rec.system ?? "";
    if (typeof sys !== "string") probs.add("system", "a string (or absent)", sys);
    const hist = rec.history ?? [];
    const histOk = Array.isArray(hist) &&
      hist.every((h) => Array.isArray(h) && h.length === 2 && h.every((x) => typeof x === "string"));
    if (!histOk) probs.add("history", "a list of [query, response] string pairs (or absent)", hist);
    if (probs.list.length) return null;
    const query = (inp as string).length > 0 ? `${ins}\n${inp}` : ins as string;
    if ((sys as string).length === 0 && (hist as unknown[]).length === 0) {
      return { kind: "prompt_completion", prompt: query, completion: out as string };
    }
    const prompt: ChatMessage[] = [];
    if ((sys as string).length > 0) prompt.push({ role: "system", content: sys as string });
    for (const [q, a] of hist as [string, string][]) {
      prompt.push({ role: "user", content: q }, { role: "assistant", content: a });
    }
    prompt.push({ role: "user", content: query });
    return {
      kind: "prompt_completion",
      prompt,
      completion: [{ role: "assistant", content: out as string }],
    };
  }
  probs.add(pk, "prompt and completion, or alpaca instruction/input/output", undefined);
  return null;
}

function normalizeChat(
  rec: Record<string, unknown>,
  f: FormatOptions["fields"],
  probs: Problems,
): Draft | null {
  const msgs = readConversation(rec, f, probs);
  if (!msgs) return null;
  if (!msgs.some((m) => m.role === "assistant")) {
    probs.add(
      f?.messages ?? ("messages" in rec ? "messages" : "conversations"),
      "at least one assistant turn",
      "none",
      true,
    );
    return null;
  }
  return { kind: "chat", messages: msgs };
}

/** A completion given as one ShareGPT/OpenAI message object, a message list, or a string. */
function readCompletion(v: unknown, field: string, probs: Problems): string | ChatMessage[] | null {
  if (typeof v === "string") return v;
  if (isObject(v)) {
    const sharegpt = "from" in v && !("role" in v);
    const msgs = readMessages([v], field, sharegpt, probs);
    if (!msgs) {
      // readMessages reports "field[0].x"; for a single object the index is noise.
      for (const p of probs.list) p.field = p.field.replace(`${field}[0]`, field);
      return null;
    }
    if (msgs[0].role !== "assistant") {
      probs.add(
        `${field}.${sharegpt ? "from" : "role"}`,
        "an assistant turn (gpt/assistant)",
        msgs[0].role,
        true,
      );
      return null;
    }
    return msgs;
  }
  if (Array.isArray(v)) return readMessages(v, field, false, probs);
  probs.add(field, "a string, a message, or a list of messages", v);
  return null;
}

function sameMessage(a: ChatMessage, b: ChatMessage): boolean {
  return a.role === b.role && a.content === b.content;
}

function normalizePreference(
  rec: Record<string, unknown>,
  f: FormatOptions["fields"],
  probs: Problems,
): Draft | null {
  const pk = f?.prompt ?? "prompt", chk = f?.chosen ?? "chosen", rk = f?.rejected ?? "rejected";
  let prompt: string | ChatMessage[] | null = null;
  if (pk in rec) {
    const p = rec[pk];
    if (typeof p === "string") prompt = p;
    else prompt = readMessages(p, pk, false, probs);
  } else if ("conversations" in rec || (f?.messages && f.messages in rec)) {
    prompt = readConversation(rec, f, probs);
  }
  const chosen = readCompletion(rec[chk], chk, probs);
  const rejected = readCompletion(rec[rk], rk, probs);
  if (probs.list.length || chosen === null || rejected === null) return null;
  if (prompt === null) {
    // TRL's implicit prompt: the leading turns that chosen and rejected share.
    if (!Array.isArray(chosen) || !Array.isArray(rejected)) {
      probs.add(
        pk,
        "a prompt (string or messages), or chosen/rejected conversations sharing their prompt",
        undefined,
      );
      return null;
    }
    let n = 0;
    while (n < chosen.length && n < rejected.length && sameMessage(chosen[n], rejected[n])) n++;
    while (n > 0 && chosen[n - 1].role === "assistant") n--;
    if (n === 0) {
      probs.add(
        pk,
        "a prompt, or chosen/rejected conversations that start with the same user turn(s)",
        undefined,
      );
      return null;
    }
    return {
      kind: "preference",
      prompt: chosen.slice(0, n),
      chosen: chosen.slice(n),
      rejected: rejected.slice(n),
    };
  }
  const anyList = Array.isArray(prompt) || Array.isArray(chosen) || Array.isArray(rejected);
  if (!anyList) return { kind: "preference", prompt, chosen, rejected };
  const asList = (v: string | ChatMessage[], role: string) =>
    typeof v === "string" ? [{ role, content: v }] : v;
  const pm = asList(prompt, "user"), cm = asList(chosen, "assistant"), rm = asList(rejected, "assistant");
  if (pm.length === 0 || pm[pm.length - 1].role === "assistant") {
    probs.add(
      pk,
      "a prompt that ends with a user turn",
      pm.length ? "an assistant turn last" : "no turns",
      true,
    );
    return null;
  }
  return { kind: "preference", prompt: pm, chosen: cm, rejected: rm };
}

/** A {@linkcode ChoiceMapping} with its templates compiled: each part reads a field, renders, or is fixed. */
export interface CompiledMapping {
  /** How the context is obtained. */
  text: { field: string } | { template: Template };
  /** How the choices are obtained. */
  choice: { field: string } | { template: Template } | { fixed: string[] };
  /** How the label is obtained. */
  target: { field: string } | { template: Template } | { fixed: number };
}

function compileSpec(v: string, where: string): { field: string } | { template: Template } {
  return isBareFieldName(v) ? { field: v } : { template: compileTemplate(v, where) };
}

/**
 * Compiles a {@linkcode ChoiceMapping} once (template syntax errors surface here, naming `where`).
 *
 * @throws {UserError} for unsupported template constructs or malformed values.
 */
export function compileChoiceMapping(m: ChoiceMapping, where: string): CompiledMapping {
  if (typeof m.doc_to_text !== "string") throw new UserError(`${where} doc_to_text: expected a string`);
  const choice = Array.isArray(m.doc_to_choice)
    ? (m.doc_to_choice.every((c) => typeof c === "string") && m.doc_to_choice.length > 0
      ? { fixed: m.doc_to_choice }
      : (() => {
        throw new UserError(`${where} doc_to_choice: expected a non-empty list of strings`);
      })())
    : compileSpec(m.doc_to_choice, `${where} doc_to_choice`);
  const target = typeof m.doc_to_target === "number"
    ? { fixed: m.doc_to_target }
    : compileSpec(m.doc_to_target, `${where} doc_to_target`);
  return { text: compileSpec(m.doc_to_text, `${where} doc_to_text`), choice, target };
}

function evalSpec(
  spec: { field: string } | { template: Template },
  rec: unknown,
  probs: Problems,
  name: string,
): { ok: true; value: unknown } | { ok: false } {
  const r = "field" in spec ? lookupPath(rec, [spec.field]) : renderTemplate(spec.template, rec);
  if (!r.ok) {
    probs.list.push({ field: r.field, expected: `${r.expected} (for ${name})`, found: r.found });
    return { ok: false };
  }
  return r;
}

/** The record field a mapping reads (for messages), or the mapping's name when it is a template with text. */
function specField(
  spec: { field: string } | { template: Template } | { fixed: unknown },
  name: string,
): string {
  if ("field" in spec) return spec.field;
  if ("template" in spec && isSinglePlaceholder(spec.template)) {
    return formatPath((spec.template.parts[0] as { path: PathStep[] }).path);
  }
  return name;
}

function toLabel(v: unknown): number | null {
  if (typeof v === "number" && Number.isInteger(v)) return v;
  if (typeof v === "string" && /^\s*\d+\s*$/.test(v)) return Number(v);
  return null;
}

function normalizeMultipleChoice(
  rec: Record<string, unknown>,
  opts: FormatOptions,
  compiled: CompiledMapping | null,
  probs: Problems,
): Draft | null {
  const f = opts.fields;
  let context: unknown, choices: unknown, labelRaw: unknown;
  let ctxField: string, choiceField: string, labelField: string;
  if (compiled) {
    ctxField = specField(compiled.text, "doc_to_text");
    choiceField = specField(compiled.choice, "doc_to_choice");
    labelField = specField(compiled.target, "doc_to_target");
    const t = evalSpec(compiled.text, rec, probs, "doc_to_text");
    context = t.ok ? t.value : undefined;
    if ("fixed" in compiled.choice) choices = compiled.choice.fixed;
    else {
      const c = evalSpec(compiled.choice, rec, probs, "doc_to_choice");
      choices = c.ok ? c.value : undefined;
    }
    if ("fixed" in compiled.target) labelRaw = compiled.target.fixed;
    else {
      const l = evalSpec(compiled.target, rec, probs, "doc_to_target");
      labelRaw = l.ok ? l.value : undefined;
    }
    if (probs.list.length) return null;
  } else {
    ctxField = f?.ctx ?? "ctx";
    choiceField = f?.endings ?? "endings";
    labelField = f?.label ?? "label";
    context = rec[ctxField];
    choices = rec[choiceField];
    labelRaw = rec[labelField];
  }
  if (typeof context !== "string") probs.add(ctxField, "a string", context);
  let choiceList: string[] | null = null;
  if (!Array.isArray(choices) || choices.length === 0) {
    probs.add(choiceField, "a non-empty list of strings", choices);
  } else {
    const bad = choices.findIndex((c) => typeof c !== "string" || c.length === 0);
    if (bad >= 0) probs.add(`${choiceField}[${bad}]`, "a non-empty string", choices[bad]);
    else choiceList = choices as string[];
  }
  let label = toLabel(labelRaw);
  if (label === null && typeof labelRaw === "string" && choiceList) {
    // lm-eval: a target that is the text of a choice selects that choice.
    const i = choiceList.indexOf(labelRaw);
    if (i >= 0) label = i;
  }
  if (labelRaw === undefined) probs.add(labelField, "an integer index into the choices", undefined);
  else if (label === null) {
    probs.add(labelField, "an integer index into the choices (or a choice's text)", labelRaw);
  } else if (choiceList && (label < 0 || label >= choiceList.length)) {
    probs.add(
      labelField,
      `an index from 0 to ${choiceList.length - 1}`,
      `${label} (${choiceList.length} choices)`,
      true,
    );
  }
  if (probs.list.length) return null;
  const idKey = f?.id ?? "id";
  const id = rec[idKey];
  return {
    kind: "multiple_choice",
    context: context as string,
    choices: choiceList!,
    label: label!,
    ...(typeof id === "string" || typeof id === "number" ? { id: String(id) } : {}),
  };
}

/** A reusable normaliser for one format (compiles task templates once). */
export class RecordNormalizer {
  readonly #opts: FormatOptions;
  readonly #compiled: CompiledMapping | null;

  /**
   * Creates a normaliser.
   *
   * @throws {UserError} for an unknown format, an unknown `fields` key, or a bad choice mapping.
   */
  constructor(opts: FormatOptions) {
    if (!DATA_FORMATS.includes(opts.format)) {
      throw new UserError(`format: expected one of ${DATA_FORMATS.join(", ")}, found "${opts.format}"`);
    }
    for (const [k, v] of Object.entries(opts.fields ?? {})) {
      if (!FIELD_NAMES.includes(k)) {
        throw new UserError(`fields: unknown key "${k}"; expected some of ${FIELD_NAMES.join(", ")}`);
      }
      if (typeof v !== "string" || v.length === 0) throw new UserError(`fields.${k}: expected a field name`);
    }
    if (opts.choiceMapping && opts.format !== "multiple_choice") {
      throw new UserError(`doc_to_text/doc_to_choice/doc_to_target apply only to format multiple_choice`);
    }
    this.#opts = opts;
    this.#compiled = opts.choiceMapping
      ? compileChoiceMapping(opts.choiceMapping, opts.choiceMappingWhere ?? "task")
      : null;
  }

  /** Normalises one record. */
  normalize(rec: DatasetRecord): NormalizeResult {
    const withSource = (issues: Issue[]) => issues.map((p) => ({ source: rec.source, ...p }));
    if (rec.error !== undefined) {
      return {
        problems: withSource([{ field: "(record)", expected: "a valid JSON value", found: rec.error }]),
      };
    }
    if (!isObject(rec.value)) {
      return {
        problems: withSource([{ field: "(record)", expected: "an object", found: describeValue(rec.value) }]),
      };
    }
    const probs = new Problems();
    const v = rec.value, f = this.#opts.fields;
    let ex: Draft | null;
    switch (this.#opts.format) {
      case "text":
        ex = normalizeText(v, f, probs);
        break;
      case "prompt_completion":
        ex = normalizePromptCompletion(v, f, probs);
        break;
      case "chat":
        ex = normalizeChat(v, f, probs);
        break;
      case "preference":
        ex = normalizePreference(v, f, probs);
        break;
      case "multiple_choice":
        ex = normalizeMultipleChoice(v, this.#opts, this.#compiled, probs);
        break;
    }
    if (!ex || probs.list.length) return { problems: withSource(probs.list) };
    return { example: { ...ex, source: rec.source } as Example, problems: [] };
  }
}

/** Options for {@linkcode normalizeRecords} and {@linkcode loadExamples}. */
export interface NormalizeOptions extends FormatOptions {
  /** `error` (default) or `skip`. */
  onInvalid?: InvalidPolicy;
  /** How many problems to list in errors and reports (default 10). */
  maxListed?: number;
  /** Names the dataset in messages. */
  what?: string;
}

/**
 * Normalises a stream of records, applying `on_invalid`. Under `error` it throws a {@linkcode UserError} listing
 * the first problems (possibly before the stream ends); under `skip` the returned `report()` counts what was
 * dropped. Call `report()` after the iteration has finished.
 */
export function normalizeRecords(
  records: AsyncIterable<DatasetRecord> | Iterable<DatasetRecord>,
  opts: NormalizeOptions,
): { examples: AsyncGenerator<Example>; report: () => ProblemReport } {
  const normalizer = new RecordNormalizer(opts);
  const collector = new ProblemCollector({
    policy: opts.onInvalid,
    maxListed: opts.maxListed,
    what: opts.what ?? `dataset (format ${opts.format})`,
  });
  let finished: ProblemReport | null = null;
  async function* run(): AsyncGenerator<Example> {
    for await (const rec of records) {
      const r = normalizer.normalize(rec);
      if (collector.record(r.problems)) yield r.example!;
    }
    finished = collector.finish();
  }
  return {
    examples: run(),
    report: () => {
      if (!finished) throw new Error("normalizeRecords: report() called before the examples were consumed");
      return finished;
    },
  };
}

/** Normalises records into an array (small datasets, tests). */
export async function loadExamples(
  records: AsyncIterable<DatasetRecord> | Iterable<DatasetRecord>,
  opts: NormalizeOptions,
): Promise<{ examples: Example[]; report: ProblemReport }> {
  const { examples, report } = normalizeRecords(records, opts);
  const out: Example[] = [];
  for await (const e of examples) out.push(e);
  return { examples: out, report: report() };
}
