/**
 * `pseudo_label`: the teacher writes completions for prompts (sequence-level knowledge distillation, method.md
 * section 2, step 1), batched, resumable part-way, as a JSONL dataset the tokenize stage reads.
 *
 * Prompts come from a dataset: chat conversations (the turns before the first assistant reply, rendered with
 * the chat template and its generation prompt), prompt/completion records (the prompt), or plain text (the
 * whole text, or with `prompt_tokens` its first N tokens, which gives prompts of equal length that batch
 * without waste).
 *
 * Decoding is `models/generate.ts`'s GPU-resident loop (tokens sampled on the GPU, ids read once per chunk of
 * steps). Determinism: completion j (prompt i's k-th of n is j = i * n + k) draws from random stream j of the
 * seed, so it does not depend on the other prompts or on the batching. Prompts are processed in chunks of
 * `save_every` (at least `batch_size`) in index order (grouped by length into batches inside a chunk), and a
 * checkpoint after each chunk holds every completion so far; a resumed run redoes only the chunks after it
 * and writes the same bytes as an uninterrupted one. A checkpoint stores its completions as one part file per
 * chunk and hard-links the previous checkpoint's parts, so a save writes only the new chunk (rewriting
 * everything each time was O(chunks^2) bytes: terabytes at paper scale).
 *
 * @module
 */
import { join } from "node:path";
import { type Artifact, type Checkpoint, defineStage, type StageLog } from "../pipelines/stage.ts";
import { type Example, normalizeRecords } from "../data/formats.ts";
import { formatProblem } from "../data/problems.ts";
import { iterateRecords, resolveDataset, TEXT_MODES, type TextMode } from "../data/records.ts";
import type { ChatMessage } from "../data/tokenizer.ts";
import { generate } from "../models/generate.ts";
import type { SamplingOptions } from "../models/sampling.ts";
import type { Tokenizer } from "../models/tokenizer.ts";
import { UserError } from "../util/errors.ts";
import { loadModelInput, loadTokenizerInput, modelDir, stageRuntime, toGpu } from "./shared/models.ts";
import { datasetSpecOf } from "./shared/datasets.ts";
import { hubDatasetResolver } from "./shared/hub_datasets.ts";

/** One prompt to complete. */
interface Prompt {
  /** Token ids fed to the model (with BOS or the template's prefix). */
  ids: number[];
  /** What the output record's `prompt` holds: text, or the conversation so far. */
  prompt: string | ChatMessage[];
  /** The prompt as text (for the `text` field). */
  text: string;
}

/** One output record. */
export interface Labelled {
  prompt: string | ChatMessage[];
  completion: string | ChatMessage[];
  text: string;
  completion_tokens: number;
  finished: boolean;
}

/** Ids that end a generation: the tokenizer's EOS and generation_config.json's eos_token_id(s). */
async function stopIds(dir: string, tok: Tokenizer): Promise<number[]> {
  const ids = new Set<number>();
  if (tok.eosId !== null) ids.add(tok.eosId);
  try {
    const g = JSON.parse(await Deno.readTextFile(join(dir, "generation_config.json")));
    for (const x of [g.eos_token_id].flat()) if (Number.isInteger(x)) ids.add(x);
  } catch {
    // no generation config: the tokenizer's EOS only
  }
  return [...ids];
}

/** The pseudo_label stage kind. */
export const pseudoLabelStage = defineStage({
  kind: "pseudo_label",
  version: 2, // 2: sampling on the GPU (Philox streams): samples differ from version 1's
  doc: "The teacher generates a completion for every prompt of a dataset (temperature / top-p / top-k " +
    "sampling, seeded per prompt), in batches, resumable part-way. Writes train.jsonl with prompt, " +
    "completion and text (= prompt + completion, for plain-text training) per record.",
  usesDevice: true,
  usesSeed: true,
  params: {
    format: {
      type: "string",
      enum: ["text", "prompt_completion", "chat"],
      default: "chat",
      doc: "Prompt records: chat (turns before the first assistant reply), prompt_completion (the prompt " +
        "field) or text (a plain-text prefix).",
    },
    prompt_tokens: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "text only: use the first N tokens of each record as the prompt (records with fewer are skipped " +
        "and reported); null: the whole text.",
    },
    template: {
      type: "string",
      enum: ["chat", "none"],
      default: "chat",
      doc:
        "prompt_completion string prompts: render through the chat template (with the generation prompt) " +
        "or use as plain text.",
    },
    fields: {
      type: "object",
      fields: {
        text: { type: "string", nullable: true, doc: "Field holding the text." },
        prompt: { type: "string", nullable: true, doc: "Field holding the prompt." },
        messages: { type: "string", nullable: true, doc: "Field holding the conversation." },
      },
      nullable: true,
      doc: "Renames canonical fields to the dataset's names.",
    },
    on_invalid: {
      type: "string",
      enum: ["error", "skip"],
      default: "error",
      doc: "A record that does not fit the format: stop, or skip it (counted and warned).",
    },
    temperature: {
      type: "number",
      min: 0,
      default: 0.7,
      doc: "Sampling temperature (paper: 0.7; 0: greedy).",
    },
    top_p: {
      type: "number",
      exclusiveMin: 0,
      max: 1,
      default: 0.95,
      doc: "Nucleus sampling mass (paper: 0.95).",
    },
    top_k: { type: "number", integer: true, min: 0, default: 10, doc: "Top-k sampling (paper: 10; 0: off)." },
    max_new_tokens: {
      type: "number",
      integer: true,
      min: 1,
      default: 2048,
      doc: "Longest completion in tokens (paper: up to 2048).",
    },
    num_return_sequences: {
      type: "number",
      integer: true,
      min: 1,
      default: 1,
      doc: "Completions per prompt (each its own sampling stream), as in transformers' generate.",
    },
    batch_size: {
      type: "number",
      integer: true,
      min: 1,
      default: 16,
      doc: "Prompts of equal length decoded together.",
    },
    seed: {
      type: "number",
      integer: true,
      min: 0,
      nullable: true,
      doc: "Seed of the per-prompt sampling streams; null: the recipe's settings.seed.",
    },
    save_every: {
      type: "number",
      integer: true,
      min: 1,
      default: 256,
      inKey: false,
      doc: "Checkpoint the completions every N prompts (at least every batch_size prompts).",
    },
    split: { type: "string", default: "train", doc: "Split of a directory or Hub dataset." },
    subset: { type: "string", nullable: true, doc: "Subset (config) of a Hub dataset." },
    text_mode: {
      type: "string",
      enum: TEXT_MODES,
      default: "paragraphs",
      doc: "Plain .txt files: one record per paragraph, per line, or per file.",
    },
    offset: { type: "number", integer: true, min: 0, default: 0, doc: "Records to skip at the start." },
    limit: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Read at most this many records (the prompts are these, minus any skipped).",
    },
  },
  inputs: {
    teacher: { doc: "The model that writes the completions (and whose tokenizer encodes the prompts)." },
    prompts: { doc: "Prompt dataset: a local file/folder, stage output or hf://datasets reference." },
  },
  outputs: {
    data: {
      type: "dir",
      doc:
        "train.jsonl ({prompt, completion, text, completion_tokens, finished} per prompt, in prompt order) " +
        "and dataset_info.json (counts and sampling settings).",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    const seed = p.seed ?? ctx.settings.seed;
    if (p.prompt_tokens !== null && p.format !== "text") {
      throw new UserError("pseudo_label: prompt_tokens applies to format text only");
    }
    const tok = await loadTokenizerInput(ctx.inputs.teacher, "teacher");
    const read = await readPrompts(ctx.inputs.prompts, p, ctx.log, tok);
    // num_return_sequences: completion k of prompt i is item i * n + k, with its own stream
    const prompts = read.flatMap((q) => Array.from({ length: p.num_return_sequences }, () => q));
    if (prompts.length === 0) {
      throw new UserError(`pseudo_label: no usable prompt in ${ctx.inputs.prompts.ref}`);
    }
    const { model: cpu } = await loadModelInput(ctx.inputs.teacher, "teacher");
    const stops = await stopIds(await modelDir(ctx.inputs.teacher, "teacher"), tok);
    const sampling: SamplingOptions = { temperature: p.temperature, topK: p.top_k, topP: p.top_p };
    const latest = ctx.checkpoints.latest();
    const out: Labelled[] = latest ? await readCompletions(latest) : [];
    if (latest) {
      ctx.log.info(`resuming after ${out.length} of ${prompts.length} prompts`);
    }
    const rt = await stageRuntime(ctx.settings);
    const lm = toGpu(rt, cpu, ctx.settings);
    ctx.progress.start(prompts.length, "prompt", "pseudo_label");
    let tokens = 0;
    try {
      // a chunk is decoded in batches of batch_size, so a chunk smaller than a batch would cap the batch (a
      // 256-prompt chunk ran batch_size 1024 at a quarter of its width)
      const every = Math.max(p.save_every, p.batch_size);
      ctx.log.info(
        `${prompts.length - out.length} completions to write, in batches of up to ${p.batch_size}, ` +
          `a checkpoint every ${every}`,
      );
      for (let c0 = out.length; c0 < prompts.length; c0 += every) {
        const chunk = prompts.slice(c0, c0 + every);
        // generate batches equal lengths; stream c0 + j keeps a completion independent of the chunking
        let finishedInChunk = 0;
        const completions = await generate(lm, chunk.map((q) => q.ids), {
          maxNewTokens: p.max_new_tokens,
          sampling,
          seed,
          streams: chunk.map((_, j) => c0 + j),
          eosIds: stops,
          batchSize: p.batch_size,
          signal: ctx.signal,
          onCompletion: (_, ids) => {
            tokens += endAtStop(ids, stops).ids.length;
            ctx.progress.update(out.length + ++finishedInChunk, { tokens });
          },
        });
        chunk.forEach((q, j) => out.push(labelled(tok, q, endAtStop(completions[j], stops))));
        if (out.length < prompts.length) {
          // latest() inside the callback is still the previous checkpoint: the new one is renamed into place
          // only after the callback resolves
          await ctx.checkpoints.save(
            out.length,
            (dir) => writeCompletions(dir, out, ctx.checkpoints.latest()),
          );
        }
      }
    } finally {
      lm.dispose();
    }
    await Deno.writeTextFile(
      join(ctx.outputs.data, "train.jsonl"),
      out.map((r) => JSON.stringify(r)).join("\n") + "\n",
    );
    const finished = out.filter((r) => r.finished).length;
    const totalTokens = out.reduce((a, r) => a + r.completion_tokens, 0);
    await Deno.writeTextFile(
      join(ctx.outputs.data, "dataset_info.json"),
      JSON.stringify(
        {
          records: out.length,
          finished,
          completion_tokens: totalTokens,
          sampling: {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            max_new_tokens: p.max_new_tokens,
          },
          seed,
        },
        null,
        2,
      ) + "\n",
    );
    if (finished < out.length) {
      ctx.log.info(
        `${out.length - finished} completions reached max_new_tokens ${p.max_new_tokens} without EOS`,
      );
    }
    ctx.setMetrics({
      prompts: out.length,
      completion_tokens: totalTokens,
      mean_completion_tokens: totalTokens / out.length,
      finished_fraction: finished / out.length,
    });
  },
});

/** Folder of a checkpoint holding its completions, one JSONL part file per chunk. */
const PARTS_DIR = "parts";
/** A part file's name: the index of its first completion, zero-padded so names sort in index order. */
const PART_FILE = /^(\d{12})\.jsonl$/;
/** Completions of a checkpoint written before part files (all of them in one file). */
const LEGACY_FILE = "completions.jsonl";

/** The name of the part file whose first completion has index `start`. */
export function partFileName(start: number): string {
  return `${String(start).padStart(12, "0")}.jsonl`;
}

/** The part files of a checkpoint directory in index order (empty for a legacy or empty checkpoint). */
async function partFiles(dir: string): Promise<{ name: string; start: number }[]> {
  const parts: { name: string; start: number }[] = [];
  try {
    for await (const e of Deno.readDir(join(dir, PARTS_DIR))) {
      const m = PART_FILE.exec(e.name);
      if (m && e.isFile) parts.push({ name: e.name, start: Number(m[1]) });
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return parts.sort((a, b) => a.start - b.start);
}

/**
 * The completions a checkpoint holds, in index order: its part files, or the single `completions.jsonl` of a
 * checkpoint written before part files. Throws when they are not exactly the `step` completions the
 * checkpoint was saved at (a part missing or out of place would otherwise shift every later completion onto
 * the wrong prompt).
 */
export async function readCompletions(cp: Checkpoint): Promise<Labelled[]> {
  const out: Labelled[] = [];
  const parse = (text: string) => {
    for (const line of text.split("\n")) if (line) out.push(JSON.parse(line));
  };
  const parts = await partFiles(cp.dir);
  if (parts.length === 0) parse(await Deno.readTextFile(join(cp.dir, LEGACY_FILE)));
  for (const part of parts) {
    if (part.start !== out.length) {
      throw new Error(
        `pseudo_label: checkpoint ${cp.dir}: part ${part.name} starts at completion ${part.start}, ` +
          `expected ${out.length}`,
      );
    }
    parse(await Deno.readTextFile(join(cp.dir, PARTS_DIR, part.name)));
  }
  if (out.length !== cp.step) {
    throw new Error(`pseudo_label: checkpoint ${cp.dir} holds ${out.length} completions, not ${cp.step}`);
  }
  return out;
}

/**
 * Fills a new checkpoint directory with the completions `out`: the part files of `prev` (the previous
 * checkpoint, which holds `out`'s first `prev.step`) hard-linked, copied where linking fails, and the rest as
 * one new part. A save so writes only the completions since `prev`, yet every checkpoint stands alone
 * (pruning `prev` leaves the linked files in place). A legacy `prev` (one `completions.jsonl`) is not linked:
 * its completions go into the new part, once.
 */
export async function writeCompletions(
  dir: string,
  out: readonly Labelled[],
  prev: Checkpoint | null,
): Promise<void> {
  await Deno.mkdir(join(dir, PARTS_DIR));
  let from = 0;
  if (prev && prev.step <= out.length) {
    const parts = await partFiles(prev.dir);
    for (const part of parts) {
      await linkOrCopy(join(prev.dir, PARTS_DIR, part.name), join(dir, PARTS_DIR, part.name));
    }
    if (parts.length > 0) from = prev.step;
  }
  if (from < out.length) {
    const lines = out.slice(from).map((r) => JSON.stringify(r)).join("\n") + "\n";
    // createNew: a name clash with a linked part must fail, not write through the link into older checkpoints
    await Deno.writeTextFile(join(dir, PARTS_DIR, partFileName(from)), lines, { createNew: true });
  }
}

/** Hard-links `from` to `to`, or copies it where a link is not possible. */
async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await Deno.link(from, to);
  } catch {
    // another filesystem, or links not permitted: a copy costs the bytes but keeps the checkpoint whole
    await Deno.copyFile(from, to);
  }
}

/** The output record of a prompt and its generated ids. */
function labelled(tok: Tokenizer, q: Prompt, g: { ids: number[]; finished: boolean }): Labelled {
  const completionText = tok.decode(g.ids, { skipSpecialTokens: true });
  if (typeof q.prompt !== "string") {
    return {
      prompt: q.prompt,
      completion: [{ role: "assistant", content: completionText }],
      text: q.text + completionText,
      completion_tokens: g.ids.length,
      finished: g.finished,
    };
  }
  // Decode prompt and completion together so the boundary keeps its spacing (SentencePiece drops a leading
  // space when a piece is decoded alone).
  const promptIds = q.ids.filter((id) => !tok.isSpecial(id));
  const joined = tok.decode([...promptIds, ...g.ids], { skipSpecialTokens: true });
  const completion = joined.startsWith(q.text) ? joined.slice(q.text.length) : completionText;
  return {
    prompt: q.text,
    completion,
    text: q.text + completion,
    completion_tokens: g.ids.length,
    finished: g.finished,
  };
}

/** The parameters that say which prompts to read and how. */
interface PromptParams {
  format: "text" | "prompt_completion" | "chat";
  prompt_tokens: number | null;
  template: "chat" | "none";
  fields: { text: string | null; prompt: string | null; messages: string | null } | null;
  on_invalid: "error" | "skip";
  split: string;
  subset: string | null;
  text_mode: TextMode;
  offset: number;
  limit: number | null;
}

/** Reads and encodes the prompts of the `prompts` input. */
async function readPrompts(
  input: Artifact,
  p: PromptParams,
  log: StageLog,
  tok: Tokenizer,
): Promise<Prompt[]> {
  const spec = datasetSpecOf(input, {
    split: p.split,
    subset: p.subset,
    textMode: p.text_mode,
    offset: p.offset,
    limit: p.limit,
  }, "prompts");
  const ds = await resolveDataset(spec, { hub: hubDatasetResolver() });
  const fields: Record<string, string> = {};
  for (const [k, v] of Object.entries(p.fields ?? {})) if (v) fields[k] = v;
  const { examples, report } = normalizeRecords(iterateRecords(ds, spec), {
    format: p.format,
    fields,
    onInvalid: p.on_invalid,
    what: `prompts ${input.ref} (format ${p.format})`,
  });
  const out: Prompt[] = [];
  let short = 0;
  for await (const ex of examples) {
    const q = promptOf(ex as Example, tok, p.template, p.prompt_tokens);
    if (q === null) short++;
    else out.push(q);
  }
  const rep = report();
  if (rep.skipped > 0) {
    const shown = rep.problems.slice(0, 3).map((x) => `\n  ${formatProblem(x)}`).join("");
    log.warn(`prompts: skipped ${rep.skipped} of ${rep.seen} records (on_invalid: skip):${shown}`);
  }
  if (short > 0) {
    log.warn(
      `prompts: skipped ${short} text records shorter than prompt_tokens ${p.prompt_tokens} tokens`,
    );
  }
  return out;
}

/** The prompt of one example, or null when a text is shorter than `promptTokens`. */
function promptOf(ex: Example, tok: Tokenizer, template: string, promptTokens: number | null): Prompt | null {
  const bos = tok.bosId !== null ? [tok.bosId] : [];
  const chat = (messages: ChatMessage[]): Prompt => {
    const text = tok.applyChatTemplate(messages, { addGenerationPrompt: true });
    const ids = tok.encode(text, { addSpecialTokens: false });
    if (tok.bosId !== null && ids[0] !== tok.bosId) ids.unshift(tok.bosId);
    return { ids, prompt: messages, text };
  };
  const plain = (text: string): Prompt => ({
    ids: [...bos, ...tok.encode(text, { addSpecialTokens: false })],
    prompt: text,
    text,
  });
  switch (ex.kind) {
    case "text": {
      if (promptTokens === null) return plain(ex.text);
      const ids = tok.encode(ex.text, { addSpecialTokens: false });
      if (ids.length < promptTokens) return null;
      const head = ids.slice(0, promptTokens);
      const text = tok.decode(head, { skipSpecialTokens: true });
      return { ids: [...bos, ...head], prompt: text, text };
    }
    case "prompt_completion":
      if (typeof ex.prompt !== "string") return chat(ex.prompt);
      return template === "chat" ? chat([{ role: "user", content: ex.prompt }]) : plain(ex.prompt);
    case "chat": {
      const first = ex.messages.findIndex((m) => m.role === "assistant");
      const turns = first < 0 ? ex.messages : ex.messages.slice(0, first);
      if (turns.length === 0) {
        throw new UserError(`${ex.source.file}: a conversation starts with an assistant turn`);
      }
      return chat(turns);
    }
    default:
      throw new Error(`pseudo_label: unexpected ${ex.kind} example`);
  }
}

/** A completion with its stop token (if it reached one) taken off, and whether it did. */
function endAtStop(ids: number[], stops: readonly number[]): { ids: number[]; finished: boolean } {
  const finished = ids.length > 0 && stops.includes(ids[ids.length - 1]);
  return { ids: finished ? ids.slice(0, -1) : ids, finished };
}
