/**
 * `evaluate`: one model on perplexity datasets, multiple-choice tasks and generation prompts, written as an
 * lm-evaluation-harness style results file (pipelines/report/results.ts `EvalResults`) that the run report turns
 * into the teacher-vs-students table. One model per stage, so each model of a recipe (teacher, 50%, 25%, ...) is
 * a separately cached stage and a new student only evaluates itself.
 *
 * - Perplexity (method.md section 4): each record of a `text` input is a document, tokenised without special
 *   tokens and cut into windows of `max_length` (data/text_windows.ts): `rolling` is lm-eval's
 *   `loglikelihood_rolling` (the first window conditioned on BOS, every token scored once); `bos_each` is the
 *   reference fixture's procedure (independent BOS-prefixed windows). Reported: token, word and byte perplexity
 *   and bits per byte, from the summed negative log-likelihood over all documents (lm-eval's weighted
 *   perplexity); the window and stride are in `config`.
 * - Multiple choice (stages/shared/multiple_choice.ts): request (context, delimiter + choice) per choice,
 *   summed continuation log-likelihood, `acc`, `acc_norm` and their standard errors. Each context is computed
 *   once and shared by its choices (models/loglikelihood.ts).
 * - Generation: completions of the `prompts` input with the chat template and sampling settings, kept in the
 *   results file and in `generations.jsonl`.
 *
 * A task YAML's local data files must lie inside the input that names the YAML (a directory holding both), so
 * they are part of the stage's cache key; a YAML given alone may only read Hub datasets. Finished tasks are
 * checkpointed, so an interrupted evaluation resumes with the next task.
 *
 * @module
 */
import { basename, dirname, join, relative, resolve } from "node:path";
import { defineStage, type StageContext } from "../pipelines/stage.ts";
import type { EvalGeneration, EvalResults, EvalTaskScores } from "../pipelines/report/results.ts";
import { UserError } from "../util/errors.ts";
import { writeFileAtomic } from "../util/atomic.ts";
import type { Artifact } from "../pipelines/stage.ts";
import type { HubDatasetResolver } from "../data/data_files.ts";
import { type DatasetSpec, iterateRecords, resolveDataset, type TextMode } from "../data/records.ts";
import { formatSource } from "../data/problems.ts";
import { readTextDocuments, type TextDocument } from "../data/documents.ts";
import { type LoadedTask, loadTaskFile, loadTaskItems, type MultipleChoiceTask } from "../data/task_file.ts";
import {
  countBytes,
  countWords,
  type EvalWindow,
  evalWindows,
  perplexityMetrics,
  type WindowMode,
} from "../data/text_windows.ts";
import type { Model } from "../models/weights.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import { type ChatMessage, Tokenizer } from "../models/tokenizer.ts";
import { scoreContinuations, scoreWindows } from "../models/loglikelihood.ts";
import { generate } from "../models/generate.ts";
import { loadTokenizerInput, modelDir, stageRuntime, toGpu } from "./shared/models.ts";
import { loadModel } from "../models/checkpoint.ts";
import { loadTransformerConfig } from "../models/config.ts";
import type { MultipleChoiceExample } from "../data/formats.ts";
import { hubDatasetResolver } from "./shared/hub_datasets.ts";
import {
  buildContext,
  choiceMetrics,
  type EncodedRequest,
  encodeRequest,
  scoreItem,
  selectFewshot,
} from "./shared/multiple_choice.ts";

const params = {
  model_name: {
    type: "string",
    nullable: true,
    doc: "Display name in the results and the report table (default: the stage's name).",
  },
  role: {
    type: "string",
    enum: ["teacher", "student"],
    nullable: true,
    doc: "Role in the report table (default: student for a hybrid, teacher for a Transformer).",
  },
  attention_fraction: {
    type: "number",
    min: 0,
    max: 1,
    nullable: true,
    doc: "Fraction of decoder layers with attention, for the report (default from the model: 1 for a " +
      "Transformer, len(attn_layers) / n_layers for a hybrid).",
  },
  max_length: {
    type: "number",
    integer: true,
    min: 2,
    nullable: true,
    doc: "Perplexity window and longest multiple-choice input, in tokens (default: the model's " +
      "max_position_embeddings, at most 2048).",
  },
  window_mode: {
    type: "string",
    enum: ["rolling", "bos_each"],
    default: "rolling",
    doc: "Perplexity windows: rolling = lm-eval loglikelihood_rolling (every token scored once, the first " +
      "window after BOS); bos_each = independent [BOS] + max_length-1 token windows, the tail dropped.",
  },
  text_mode: {
    type: "string",
    enum: ["paragraphs", "lines", "file"],
    default: "paragraphs",
    doc:
      "How .txt perplexity inputs become documents: blank-line separated paragraphs, lines, or the whole file.",
  },
  text_field: {
    type: "string",
    default: "text",
    doc: "Field holding the document text in JSON/JSONL/parquet perplexity inputs.",
  },
  limit: {
    type: "number",
    integer: true,
    min: 1,
    nullable: true,
    doc: "Evaluate only the first N items of each task and documents of each text input (all when null).",
  },
  num_fewshot: {
    type: "number",
    integer: true,
    min: 0,
    nullable: true,
    doc: "Few-shot examples per multiple-choice item (default: each task file's num_fewshot, else 0).",
  },
  fewshot_seed: {
    type: "number",
    integer: true,
    min: 0,
    default: 1234,
    doc: "Seed of the few-shot example selection (per item, independent of other items).",
  },
  add_bos_token: {
    type: "boolean",
    default: false,
    doc: "Prepend BOS to multiple-choice contexts (lm-eval's add_bos_token; off by default as in lm-eval).",
  },
  batch_size: {
    type: "number",
    integer: true,
    min: 1,
    default: 8,
    doc: "Sequences per forward: perplexity windows, multiple-choice continuations, generation prompts.",
  },
  generation: {
    type: "object",
    default: {
      max_new_tokens: 128,
      temperature: 0,
      top_k: 0,
      top_p: 1,
      chat_template: true,
      seed: 1234,
    },
    doc: "Settings for the prompts input.",
    fields: {
      max_new_tokens: {
        type: "number",
        integer: true,
        min: 1,
        default: 128,
        doc: "Tokens generated per prompt at most (generation stops earlier at EOS).",
      },
      temperature: { type: "number", min: 0, default: 0, doc: "Sampling temperature; 0 is greedy." },
      top_k: {
        type: "number",
        integer: true,
        min: 0,
        default: 0,
        doc: "Keep the k most likely tokens (0: all).",
      },
      top_p: { type: "number", exclusiveMin: 0, max: 1, default: 1, doc: "Nucleus sampling mass (1: off)." },
      chat_template: {
        type: "boolean",
        default: true,
        doc:
          "Wrap each prompt in the tokenizer's chat template (with the generation prompt); off: BOS + text.",
      },
      seed: { type: "number", integer: true, min: 0, default: 1234, doc: "Seed of the per-prompt streams." },
    },
  },
} as const;

const inputs = {
  model: {
    doc: "The model to evaluate: a model directory (stage output, local path) or hf://org/name.",
    type: "dir",
  },
  tokenizer: {
    doc:
      "A model directory whose tokenizer to use, when the model directory has none (default: the model's).",
    optional: true,
    type: "dir",
  },
  text: {
    doc: "Perplexity datasets: .txt, .jsonl, .json, .parquet files or folders, or hf://datasets/org/name.",
    list: true,
    optional: true,
  },
  tasks: {
    doc: "Multiple-choice tasks: JSONL {ctx, endings, label} files, lm-eval style task YAMLs, or folders " +
      "whose top-level *.yaml files are tasks (with the data files they read).",
    list: true,
    optional: true,
  },
  prompts: {
    doc: "Generation prompts: .txt (one per line) or JSONL/JSON records with `prompt` (or `messages`).",
    optional: true,
  },
} as const;

const outputs = {
  results: {
    type: "dir",
    doc: "results.json (lm-eval layout, see pipelines/report/results.ts), samples_<task>.jsonl per task " +
      "(per-item log-likelihoods and predictions, per-document NLL), generations.jsonl.",
  },
} as const;

type Ctx = StageContext<typeof params, typeof inputs, typeof outputs>;
type Params = Ctx["params"];

/** What a finished task leaves: its scores, per-item samples, counts and version. */
interface TaskOutcome {
  name: string;
  kind: "perplexity" | "multiple_choice";
  scores: EvalTaskScores;
  samples: Record<string, unknown>[];
  nSamples: { original: number; effective: number };
  version: number | string;
  config: Record<string, unknown>;
}

interface TextTask {
  name: string;
  input: Artifact;
  spec: DatasetSpec;
}

interface ChoiceTask {
  name: string;
  input: Artifact;
  task: MultipleChoiceTask;
}

interface Prompt {
  prompt: string;
  messages: ChatMessage[] | null;
}

/** The evaluate stage kind. */
export const evaluateStage = defineStage({
  kind: "evaluate",
  version: 2, // 2: generations sample on the GPU (Philox streams): sampled text differs from version 1's
  doc: "Evaluates one model: perplexity (token, word, byte, bits per byte) over text datasets, accuracy on " +
    "multiple-choice tasks (lm-eval conventions: acc, acc_norm, stderr) and sample generations, written as an " +
    "lm-evaluation-harness style results.json for the run report.",
  usesDevice: true,
  // results.json carries the evaluation date (lm-eval layout): the bytes differ between runs, the scores do not
  deterministic: false,
  params,
  inputs,
  outputs,
  async run(ctx) {
    const p = ctx.params;
    const hub = hubDatasetResolver();
    // Read and validate every input before loading the model, so bad data fails fast.
    const textTasks = ctx.inputs.text.map((a) => textTaskOf(a, p));
    const choiceTasks = (await Promise.all(ctx.inputs.tasks.map((a) => choiceTasksOf(a, ctx)))).flat();
    const names = new Map<string, string>();
    for (const t of [...textTasks, ...choiceTasks]) {
      const prev = names.get(t.name);
      if (prev) {
        throw new UserError(
          `two tasks are named "${t.name}" (${prev} and ${t.input.ref}): results are keyed by task name, rename one`,
        );
      }
      names.set(t.name, t.input.ref);
    }
    const prompts = ctx.inputs.prompts ? await readPrompts(ctx.inputs.prompts, hub) : [];
    if (textTasks.length + choiceTasks.length + prompts.length === 0) {
      throw new UserError("evaluate: nothing to evaluate: give text, tasks or prompts inputs");
    }
    const dir = await modelDir(ctx.inputs.model);
    const config = await loadTransformerConfig(dir);
    const tok = ctx.inputs.tokenizer
      ? await loadTokenizerInput(ctx.inputs.tokenizer, "tokenizer")
      : await Tokenizer.fromDir(dir);
    const maxLength = p.max_length ?? Math.min(config.maxPositionEmbeddings, 2048);
    // Read, tokenise and check all the data before loading the weights, so bad data fails at once.
    const preparedText = new Map<string, PreparedText>();
    for (const t of textTasks) preparedText.set(t.name, await prepareText(p, tok, t, maxLength, hub));
    const preparedChoice = new Map<string, PreparedChoice>();
    for (const t of choiceTasks) {
      const loaded = await loadTaskItems(t.task, { hub });
      preparedChoice.set(t.name, prepareChoice(p, tok, t, loaded, maxLength));
    }

    const model = await loadModel(dir);
    const attentionFraction = p.attention_fraction ?? attentionFractionOf(model);
    const role = p.role ?? (model.kind === "hybrid" ? "student" : "teacher");

    // Finished tasks from an interrupted attempt.
    const done = new Map<string, TaskOutcome>();
    const latest = ctx.checkpoints.latest();
    if (latest) {
      for await (const e of Deno.readDir(latest.dir)) {
        const o = JSON.parse(await Deno.readTextFile(join(latest.dir, e.name))) as TaskOutcome;
        done.set(o.name, o);
      }
      ctx.log.info(`resuming: ${done.size} task(s) already evaluated`);
    }
    const finish = async (o: TaskOutcome) => {
      done.set(o.name, o);
      const all = [...done.values()];
      await ctx.checkpoints.save(all.length, async (d) => {
        for (const [i, t] of all.entries()) await Deno.writeTextFile(join(d, `${i}.json`), JSON.stringify(t));
      });
      ctx.log.info(`${o.name}: ${summary(o.scores)}`);
    };

    const rt = await stageRuntime(ctx.settings);
    const lm = toGpu(rt, model, ctx.settings);
    let generations: EvalGeneration[] = [];
    try {
      for (const t of textTasks) {
        if (!done.has(t.name)) {
          await finish(await runPerplexity(ctx, lm, preparedText.get(t.name)!, maxLength));
        }
      }
      for (const t of choiceTasks) {
        if (!done.has(t.name)) await finish(await runMultipleChoice(ctx, lm, preparedChoice.get(t.name)!));
      }
      if (prompts.length) generations = await runGeneration(ctx, lm, tok, prompts);
    } finally {
      lm.dispose();
    }

    const order = [...textTasks, ...choiceTasks].map((t) => done.get(t.name)!);
    const results: EvalResults = {
      results: Object.fromEntries(order.map((o) => [o.name, { alias: o.name, ...o.scores }])),
      config: {
        model: modelLabel(ctx.inputs.model),
        model_name: p.model_name ?? ctx.stage,
        attention_fraction: attentionFraction,
        role,
        max_length: maxLength,
        stride: p.window_mode === "rolling" ? maxLength : maxLength - 1,
        window_mode: p.window_mode,
        ...(p.num_fewshot !== null ? { num_fewshot: p.num_fewshot } : {}),
        batch_size: p.batch_size,
        add_bos_token: p.add_bos_token,
        limit: p.limit,
        dtype: ctx.settings.dtype,
        device: String(ctx.runtimeFacts?.adapter ?? ""),
        model_digest: ctx.inputs.model.digest,
        tasks: Object.fromEntries(order.map((o) => [o.name, o.config])),
        ...(prompts.length ? { generation: p.generation } : {}),
      },
      versions: Object.fromEntries(order.map((o) => [o.name, o.version])),
      "n-samples": Object.fromEntries(order.map((o) => [o.name, o.nSamples])),
      date: Date.now() / 1000,
      ...(generations.length ? { generations } : {}),
    };
    if (order.length === 0) {
      // generation only: the results file still needs a task entry to be a valid results file
      results.results.generation = { alias: "generation" };
      results.versions.generation = 1;
      results["n-samples"].generation = { original: prompts.length, effective: prompts.length };
    }
    const out = ctx.outputs.results;
    for (const o of order) {
      await writeFileAtomic(
        join(out, `samples_${fileSafe(o.name)}.jsonl`),
        o.samples.map((s) => JSON.stringify(s)).join("\n") + "\n",
      );
    }
    if (generations.length) {
      await writeFileAtomic(
        join(out, "generations.jsonl"),
        generations.map((g) => JSON.stringify(g)).join("\n") + "\n",
      );
    }
    await writeFileAtomic(join(out, "results.json"), JSON.stringify(results, null, 2) + "\n");
    const metrics: Record<string, number | null> = {};
    for (const o of order) {
      for (const [k, v] of Object.entries(o.scores)) {
        if (typeof v === "number" && !k.includes("stderr")) metrics[`${o.name}/${k.split(",")[0]}`] = v;
      }
    }
    ctx.setMetrics(metrics);
  },
});

/** Fraction of decoder layers that keep attention. */
export function attentionFractionOf(model: Model): number {
  if (model.kind !== "hybrid") return 1;
  return model.mamba.attnLayers.length / model.config.numLayers;
}

function modelLabel(a: Artifact): string {
  if (a.kind === "hub" && a.hub) return a.hub.revision ? `${a.hub.repo}@${a.hub.revision}` : a.hub.repo;
  if (a.kind === "file") return a.path ?? a.ref;
  return a.ref;
}

function fileSafe(name: string): string {
  return name.replace(/[^A-Za-z0-9._-]/g, "_");
}

function summary(scores: EvalTaskScores): string {
  return Object.entries(scores)
    .filter(([k, v]) => typeof v === "number" && !k.includes("stderr"))
    .map(([k, v]) => `${k.split(",")[0]} ${(v as number).toPrecision(5)}`)
    .join(", ");
}

// ---- inputs ----------------------------------------------------------------------------------------------

function stem(path: string): string {
  return basename(path).replace(/\.(txt|jsonl|ndjson|json|parquet|ya?ml)$/i, "");
}

function textTaskOf(a: Artifact, p: Params): TextTask {
  if (a.kind === "hub") {
    if (!a.hub || a.hub.repoType !== "dataset") {
      throw new UserError(`input text: ${a.ref} is not a dataset (use hf://datasets/org/name)`);
    }
    const path = `hf://datasets/${a.hub.repo}${a.hub.revision ? `@${a.hub.revision}` : ""}`;
    return {
      name: a.hub.repo.split("/").pop()!,
      input: a,
      spec: { path, textMode: p.text_mode as TextMode },
    };
  }
  return {
    name: stem(a.path!),
    input: a,
    spec: { path: a.path!, textMode: p.text_mode as TextMode },
  };
}

/** Task files of one `tasks` input: the file itself, or every top-level YAML of a folder. */
async function choiceTasksOf(a: Artifact, ctx: Ctx): Promise<ChoiceTask[]> {
  if (a.kind === "hub" || !a.path) {
    throw new UserError(
      `input tasks: ${a.ref}: give a task file or a folder of task YAMLs (a YAML can read Hub datasets)`,
    );
  }
  const root = resolve(a.path);
  const st = await Deno.stat(root);
  let files: string[];
  if (st.isDirectory) {
    files = [];
    for await (const e of Deno.readDir(root)) {
      if ((e.isFile || e.isSymlink) && /\.ya?ml$/i.test(e.name)) files.push(join(root, e.name));
    }
    files.sort();
    if (files.length === 0) throw new UserError(`input tasks: ${a.ref}: the folder has no *.yaml task files`);
  } else files = [root];
  const out: ChoiceTask[] = [];
  for (const f of files) {
    const task = await loadTaskFile(f);
    for (const spec of [task.dataset, task.fewshotDataset]) {
      if (!spec) continue;
      if (spec.path.startsWith("hf://")) {
        if (!/@[^/]+/.test(spec.path.slice("hf://datasets/".length))) {
          ctx.log.warn(
            `task ${task.name}: ${spec.path} is not pinned to a revision: a new upload changes the scores ` +
              "without changing the cache key (add @<commit sha>)",
          );
        }
        continue;
      }
      const rel = relative(st.isDirectory ? root : dirname(root), resolve(spec.path));
      const inside = st.isDirectory ? !rel.startsWith("..") : resolve(spec.path) === root;
      if (!inside) {
        throw new UserError(
          `task file ${f} reads ${spec.path}, which is not part of the input ${a.ref} (so not in the stage's ` +
            `cache key): give the folder that holds both the task YAML and its data as the input`,
        );
      }
    }
    out.push({ name: task.name, input: a, task });
  }
  return out;
}

async function readPrompts(a: Artifact, hub: HubDatasetResolver): Promise<Prompt[]> {
  const path = a.kind === "hub" && a.hub
    ? `hf://datasets/${a.hub.repo}${a.hub.revision ? `@${a.hub.revision}` : ""}`
    : a.path!;
  const ds = await resolveDataset({ path, textMode: "lines" }, { hub });
  const out: Prompt[] = [];
  for await (const rec of iterateRecords(ds, { textMode: "lines" })) {
    const where = formatSource(rec.source);
    if (rec.error) throw new UserError(`${where}: ${rec.error}`);
    const v = rec.value;
    if (typeof v === "string") {
      out.push({ prompt: v, messages: null });
      continue;
    }
    const r = (typeof v === "object" && v !== null ? v : {}) as Record<string, unknown>;
    if (Array.isArray(r.messages)) {
      const msgs = r.messages as ChatMessage[];
      if (!msgs.every((m) => typeof m?.role === "string" && typeof m?.content === "string")) {
        throw new UserError(`${where}: field "messages": expected a list of {role, content} strings`);
      }
      const lastUser = [...msgs].reverse().find((m) => m.role === "user");
      out.push({ prompt: lastUser?.content ?? "", messages: msgs });
    } else if (typeof (r.prompt ?? r.text) === "string") {
      out.push({ prompt: (r.prompt ?? r.text) as string, messages: null });
    } else {
      throw new UserError(`${where}: expected a string field "prompt" (or "text"), or a "messages" list`);
    }
  }
  if (out.length === 0) throw new UserError(`input prompts: ${a.ref} holds no prompts`);
  return out;
}

// ---- perplexity ------------------------------------------------------------------------------------------

/** A text input read, tokenised and cut into windows (before the model is loaded). */
interface PreparedText {
  task: TextTask;
  docs: TextDocument[];
  original: number;
  windows: EvalWindow[][];
}

async function prepareText(
  p: Params,
  tok: Tokenizer,
  t: TextTask,
  maxLength: number,
  hub: HubDatasetResolver,
): Promise<PreparedText> {
  const prefixId = tok.bosTokenId ?? tok.eosTokenId;
  if (prefixId === null) throw new UserError("perplexity: the tokenizer has neither a BOS nor an EOS token");
  const mode = p.window_mode as WindowMode;
  const ds = await resolveDataset(t.spec, { hub });
  const { docs, original } = await readTextDocuments(ds, t.spec, tok, {
    textField: p.text_field,
    limit: p.limit,
  });
  const windows = docs.map((d) => evalWindows(d.ids, { mode, maxLength, prefixId }));
  if (windows.every((w) => w.length === 0)) {
    throw new UserError(
      `text ${t.input.ref}: no window to score (${docs.length} document(s); bos_each needs ${
        maxLength - 1
      } tokens)`,
    );
  }
  return { task: t, docs, original, windows };
}

async function runPerplexity(
  ctx: Ctx,
  lm: CausalLM,
  prep: PreparedText,
  maxLength: number,
): Promise<TaskOutcome> {
  const p = ctx.params;
  const mode = p.window_mode as WindowMode;
  const { task: t, docs, original, windows } = prep;
  const flat = windows.flat();
  ctx.progress.start(flat.length, "window", t.name);
  const sums = await scoreWindows(lm, flat, {
    batchSize: p.batch_size,
    signal: ctx.signal,
    onProgress: (n) => ctx.progress.update(n),
  });
  let k = 0, nll = 0, tokens = 0, words = 0, bytes = 0, dropped = 0;
  const samples = docs.map((d, i) => {
    let docLl = 0, docTokens = 0;
    for (const w of windows[i]) {
      docLl += sums[k++];
      docTokens += w.targets.length;
    }
    const docWords = countWords(d.text), docBytes = countBytes(d.text);
    nll -= docLl;
    tokens += docTokens;
    words += docWords;
    bytes += docBytes;
    dropped += d.ids.length - docTokens;
    return {
      doc_id: i,
      source: d.source,
      loglikelihood: docLl,
      tokens: docTokens,
      dropped_tokens: d.ids.length - docTokens,
      words: docWords,
      bytes: docBytes,
      windows: windows[i].length,
    };
  });
  if (dropped > 0) {
    ctx.log.warn(
      `${t.name}: ${dropped} trailing token(s) not scored (window_mode bos_each): word and byte perplexity ` +
        "count the whole text, so compare them only between models with the same tokenizer",
    );
  }
  const m = perplexityMetrics({ nll, tokens, words, bytes });
  return {
    name: t.name,
    kind: "perplexity",
    scores: {
      "token_perplexity,none": m.token_perplexity,
      "word_perplexity,none": m.word_perplexity,
      "byte_perplexity,none": m.byte_perplexity,
      "bits_per_byte,none": m.bits_per_byte,
      "mean_nll,none": m.mean_nll,
    },
    samples,
    nSamples: { original, effective: docs.length },
    version: 1,
    config: {
      type: "perplexity",
      source: t.input.ref,
      window_mode: mode,
      max_length: maxLength,
      stride: mode === "rolling" ? maxLength : maxLength - 1,
      text_mode: p.text_mode,
      scored_tokens: tokens,
      dropped_tokens: dropped,
      windows: flat.length,
    },
  };
}

// ---- multiple choice -------------------------------------------------------------------------------------

/** A task's items turned into token requests (before the model is loaded). */
interface PreparedChoice {
  task: ChoiceTask;
  all: MultipleChoiceExample[];
  items: MultipleChoiceExample[];
  k: number;
  contexts: string[];
  requests: EncodedRequest[];
}

function prepareChoice(
  p: Params,
  tok: Tokenizer,
  t: ChoiceTask,
  loaded: LoadedTask,
  maxLength: number,
): PreparedChoice {
  const task = t.task;
  const k = p.num_fewshot ?? task.numFewshot;
  const all = loaded.items;
  const items = p.limit !== null ? all.slice(0, p.limit) : all;
  // few-shot pool: the task's few-shot split, else the evaluated items themselves (never the item itself)
  const poolIsEval = loaded.fewshot.length === 0;
  const pool = poolIsEval ? all : loaded.fewshot;
  const fmt = {
    description: task.description,
    targetDelimiter: task.targetDelimiter,
    fewshotDelimiter: task.fewshotDelimiter,
  };
  const seed = `${p.fewshot_seed}/${task.name}`;
  const contexts = items.map((item, i) =>
    buildContext(item, selectFewshot(pool, k, seed, i, poolIsEval), fmt)
  );
  const requests = items.map((item, i) =>
    encodeRequest(tok, contexts[i], item.choices.map((c) => task.targetDelimiter + c), {
      addBos: p.add_bos_token,
      maxLength,
      where: `task ${task.name}, ${formatSource(item.source)}`,
    })
  );
  return { task: t, all, items, k, contexts, requests };
}

async function runMultipleChoice(ctx: Ctx, lm: CausalLM, prep: PreparedChoice): Promise<TaskOutcome> {
  const p = ctx.params;
  const t = prep.task;
  const task = t.task;
  const { all, items, k, contexts, requests } = prep;
  ctx.progress.start(items.length, "item", task.name);
  const lls = await scoreContinuations(lm, requests, {
    batchSize: p.batch_size,
    signal: ctx.signal,
    onProgress: (n) => ctx.progress.update(n),
  });
  const outcomes = items.map((item, i) => scoreItem(item, lls[i]));
  const samples = items.map((item, i) => ({
    doc_id: i,
    ...(item.id !== undefined ? { id: item.id } : {}),
    source: formatSource(item.source),
    context: contexts[i],
    choices: item.choices,
    label: item.label,
    loglikelihoods: lls[i],
    pred: outcomes[i].pred,
    pred_norm: outcomes[i].predNorm,
    acc: outcomes[i].acc,
    acc_norm: outcomes[i].accNorm,
    context_tokens: requests[i].context.length,
    continuation_tokens: requests[i].continuations.map((c) => c.length),
  }));
  return {
    name: task.name,
    kind: "multiple_choice",
    scores: choiceMetrics(outcomes),
    samples,
    nSamples: { original: all.length, effective: items.length },
    version: task.version ?? 1,
    config: {
      type: "multiple_choice",
      source: t.input.ref,
      file: basename(task.file),
      num_fewshot: k,
      target_delimiter: task.targetDelimiter,
      fewshot_delimiter: task.fewshotDelimiter,
      add_bos_token: p.add_bos_token,
    },
  };
}

// ---- generation ------------------------------------------------------------------------------------------

async function runGeneration(
  ctx: Ctx,
  lm: CausalLM,
  tok: Tokenizer,
  prompts: Prompt[],
): Promise<EvalGeneration[]> {
  const g = ctx.params.generation;
  const ids = prompts.map((pr, i) => {
    let out: number[];
    if (g.chat_template) {
      const messages = pr.messages ?? [{ role: "user", content: pr.prompt }];
      out = tok.encodeChat(messages, { addGenerationPrompt: true });
    } else {
      if (pr.messages) {
        throw new UserError(`prompt ${i}: a messages list needs generation.chat_template: true`);
      }
      out = tok.encode(pr.prompt);
    }
    if (out.length === 0) {
      throw new UserError(`prompt ${i}: encodes to no tokens (and the tokenizer adds no BOS)`);
    }
    return out;
  });
  const sampling = { temperature: g.temperature, topK: g.top_k, topP: g.top_p };
  const eos = [...new Set([...lm.config.eosTokenIds, ...(tok.eosTokenId !== null ? [tok.eosTokenId] : [])])];
  ctx.progress.start(prompts.length, "prompt", "generation");
  let finished = 0;
  const completions = await generate(lm, ids, {
    maxNewTokens: g.max_new_tokens,
    sampling,
    seed: g.seed,
    eosIds: eos,
    dropEos: true,
    batchSize: ctx.params.batch_size,
    signal: ctx.signal,
    onCompletion: () => ctx.progress.update(++finished),
  });
  return prompts.map((pr, i) => ({
    prompt: pr.prompt,
    ...(pr.messages ? { messages: pr.messages } : {}),
    completion: tok.decode(completions[i], { skipSpecialTokens: true }),
    prompt_tokens: ids[i].length,
    completion_tokens: completions[i].length,
    finish_reason: completions[i].length < g.max_new_tokens ? "eos" : "length",
    temperature: g.temperature,
    top_k: g.top_k,
    top_p: g.top_p,
    seed: g.seed,
    chat_template: g.chat_template,
  }));
}
