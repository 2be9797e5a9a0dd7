/**
 * Multiple-choice task files: HellaSwag-style JSONL `{ctx, endings[], label}` directly, or a small task YAML
 * in the shape of lm-evaluation-harness task configs.
 *
 * Accepted YAML keys (everything else is refused with its line, so typos do not pass silently):
 *
 * | key                                   | meaning                                                             |
 * | ------------------------------------- | ------------------------------------------------------------------- |
 * | `task`                                | task name (default: the file name)                                  |
 * | `dataset_path`                        | a local file/folder (relative to the YAML file), `hf://datasets/...`, |
 * |                                       | `org/name` (a Hub dataset), or `json`/`parquet`/`text` with         |
 * |                                       | `dataset_kwargs.data_files` (the lm-eval way to name local files)   |
 * | `dataset_name`                        | subset/config                                                       |
 * | `dataset_kwargs`                      | only `data_files` (a path, or `{split: path}`)                      |
 * | `test_split` / `validation_split` / `training_split` | splits; the evaluated split is test, else validation, else train |
 * | `fewshot_split`, `num_fewshot`        | where few-shot examples come from and how many (default 0)         |
 * | `output_type`                         | must be `multiple_choice`                                          |
 * | `doc_to_text` / `doc_to_choice` / `doc_to_target` | field names or safe templates (see template.ts)         |
 * | `target_delimiter` / `fewshot_delimiter` | default `" "` and `"\n\n"` as in lm-eval                         |
 * | `description`                         | literal text put before the (few-shot) context                      |
 * | `metric_list`, `metadata`, `tag`, `group`, `should_decontaminate`, `doc_to_decontamination_query` | accepted, unused |
 *
 * `include`, `process_docs`, `!function` tags and Jinja beyond the safe subset are refused: nothing in a task file
 * runs code.
 *
 * @module
 */
import { basename, dirname, isAbsolute, resolve } from "node:path";
import { isMap, isScalar, LineCounter, parseDocument, visit, type YAMLMap } from "yaml";
import { UserError } from "../util/errors.ts";
import type { HubDatasetResolver } from "./data_files.ts";
import {
  type ChoiceMapping,
  compileChoiceMapping,
  loadExamples,
  type MultipleChoiceExample,
} from "./formats.ts";
import type { ProblemReport } from "./problems.ts";
import { type DatasetSpec, iterateRecords, resolveDataset } from "./records.ts";

/** A multiple-choice task, ready to load. */
export interface MultipleChoiceTask {
  /** Task name (results are keyed by it). */
  name: string;
  /** The task file (YAML or JSONL) it came from. */
  file: string;
  /** The evaluated split's dataset. */
  dataset: DatasetSpec;
  /** Where few-shot examples come from (absent when `num_fewshot` is 0). */
  fewshotDataset?: DatasetSpec;
  /** How records become items; absent means `{ctx, endings, label}`. */
  mapping?: ChoiceMapping;
  /** Between context and continuation (lm-eval default " "). */
  targetDelimiter: string;
  /** Between few-shot examples (lm-eval default "\n\n"). */
  fewshotDelimiter: string;
  /** Number of few-shot examples. */
  numFewshot: number;
  /** Text placed before the context. */
  description: string;
  /** `metadata.version` from the YAML, for the results' `versions`; null when absent. */
  version: string | number | null;
}

const ALLOWED = new Set([
  "task",
  "dataset_path",
  "dataset_name",
  "dataset_kwargs",
  "test_split",
  "validation_split",
  "training_split",
  "fewshot_split",
  "num_fewshot",
  "output_type",
  "doc_to_text",
  "doc_to_choice",
  "doc_to_target",
  "target_delimiter",
  "fewshot_delimiter",
  "description",
  "metric_list",
  "metadata",
  "tag",
  "group",
  "should_decontaminate",
  "doc_to_decontamination_query",
]);
const CODE_KEYS: Record<string, string> = {
  include: "task inheritance (include) is not supported; write the task out in full",
  process_docs: "process_docs runs Python and is not supported; preprocess the data file instead",
  process_results: "process_results runs Python and is not supported",
  filter_list: "filter_list applies only to generation tasks",
};

/** Parses a task YAML's text; `file` names it in errors and anchors relative dataset paths. */
export function parseTaskYaml(text: string, file: string): MultipleChoiceTask {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const at = (
    offset: number | undefined,
  ) => (offset === undefined ? file : `${file}:${lc.linePos(offset).line}`);
  if (doc.errors.length) {
    const e = doc.errors[0];
    throw new UserError(`${at(e.pos[0])}: invalid YAML (${e.message.split("\n")[0]})`);
  }
  visit(doc, {
    Node(_, node) {
      const tag = (node as { tag?: string }).tag;
      if (tag && tag.startsWith("!") && !tag.startsWith("!!")) {
        throw new UserError(
          `${at(node.range?.[0])}: YAML tag ${tag} is not supported (task files never run code)`,
        );
      }
    },
  });
  if (!isMap(doc.contents)) throw new UserError(`${file}: expected a YAML mapping of task settings`);
  const map = doc.contents as YAMLMap;
  const line = new Map<string, string>();
  const raw: Record<string, unknown> = {};
  for (const pair of map.items) {
    const key = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
    const where = at((pair.key as { range?: [number] }).range?.[0]);
    if (CODE_KEYS[key]) throw new UserError(`${where}: ${key}: ${CODE_KEYS[key]}`);
    if (!ALLOWED.has(key)) {
      throw new UserError(`${where}: unknown task setting "${key}" (accepted: ${[...ALLOWED].join(", ")})`);
    }
    line.set(key, where);
    raw[key] = (pair.value as { toJSON?: () => unknown })?.toJSON?.() ??
      (isScalar(pair.value) ? pair.value.value : pair.value);
  }
  const where = (k: string) => line.get(k) ?? file;
  const str = (k: string, def?: string): string => {
    const v = raw[k];
    if (v === undefined || v === null) {
      if (def !== undefined) return def;
      throw new UserError(`${file}: missing task setting "${k}"`);
    }
    if (typeof v !== "string") {
      throw new UserError(`${where(k)}: ${k}: expected a string, found ${JSON.stringify(v)}`);
    }
    return v;
  };
  for (const k of ["dataset_path", "doc_to_text", "doc_to_choice", "doc_to_target"]) {
    if (raw[k] === undefined || raw[k] === null) throw new UserError(`${file}: missing task setting "${k}"`);
  }
  if (raw.output_type !== undefined && raw.output_type !== "multiple_choice") {
    throw new UserError(
      `${where("output_type")}: output_type: only multiple_choice tasks are supported, found ${
        JSON.stringify(raw.output_type)
      }`,
    );
  }
  const numFewshot = raw.num_fewshot ?? 0;
  if (typeof numFewshot !== "number" || !Number.isInteger(numFewshot) || numFewshot < 0) {
    throw new UserError(`${where("num_fewshot")}: num_fewshot: expected a non-negative integer`);
  }
  const docToChoice = raw.doc_to_choice;
  if (
    !(typeof docToChoice === "string" ||
      (Array.isArray(docToChoice) && docToChoice.every((c) => typeof c === "string")))
  ) {
    throw new UserError(
      `${where("doc_to_choice")}: doc_to_choice: expected a field name, a template or a list of strings`,
    );
  }
  const docToTarget = raw.doc_to_target;
  if (
    !(typeof docToTarget === "string" || (typeof docToTarget === "number" && Number.isInteger(docToTarget)))
  ) {
    throw new UserError(
      `${where("doc_to_target")}: doc_to_target: expected a field name, a template or an integer`,
    );
  }
  const mapping: ChoiceMapping = {
    doc_to_text: str("doc_to_text"),
    doc_to_choice: docToChoice as string | string[],
    doc_to_target: docToTarget as string | number,
  };
  // Compile now so template errors point at the task file.
  compileChoiceMapping(mapping, file);
  const description = str("description", "");
  if (description.includes("{{") || description.includes("{%")) {
    throw new UserError(`${where("description")}: description: templates are not supported here, only text`);
  }
  const baseDir = dirname(file);
  const dataPath = str("dataset_path");
  const splitOf = (k: string) => (raw[k] === undefined ? undefined : str(k));
  const evalSplit = splitOf("test_split") ?? splitOf("validation_split") ?? splitOf("training_split");
  const fewSplit = splitOf("fewshot_split") ?? splitOf("training_split") ?? splitOf("validation_split");
  const subset = raw.dataset_name === undefined || raw.dataset_name === null
    ? undefined
    : str("dataset_name");
  const spec = (split: string | undefined): DatasetSpec => {
    const kw = raw.dataset_kwargs;
    if (kw !== undefined) {
      const keys = kw && typeof kw === "object" ? Object.keys(kw) : [];
      if (!kw || typeof kw !== "object" || keys.some((k) => k !== "data_files")) {
        throw new UserError(`${where("dataset_kwargs")}: dataset_kwargs: only data_files is supported`);
      }
    }
    const dataFiles = (kw as { data_files?: unknown } | undefined)?.data_files;
    if (["json", "parquet", "text", "csv"].includes(dataPath)) {
      let p: unknown = dataFiles;
      if (p && typeof p === "object" && !Array.isArray(p)) {
        p = (p as Record<string, unknown>)[split ?? "train"];
      }
      if (typeof p !== "string") {
        throw new UserError(
          `${where("dataset_kwargs")}: dataset_path ${dataPath} needs dataset_kwargs.data_files with a path` +
            (split ? ` for split "${split}"` : ""),
        );
      }
      return { path: localOrHub(p, baseDir) };
    }
    if (dataFiles !== undefined) {
      throw new UserError(
        `${where("dataset_kwargs")}: data_files applies only with dataset_path json/parquet/text`,
      );
    }
    return { path: localOrHub(dataPath, baseDir), split, ...(subset ? { subset } : {}) };
  };
  const meta = raw.metadata as { version?: unknown } | undefined;
  const version = typeof meta?.version === "string" || typeof meta?.version === "number"
    ? meta.version
    : null;
  return {
    name: str("task", basename(file).replace(/\.ya?ml$/, "")),
    file,
    dataset: spec(evalSplit),
    ...(numFewshot > 0 ? { fewshotDataset: spec(fewSplit) } : {}),
    mapping,
    targetDelimiter: str("target_delimiter", " "),
    fewshotDelimiter: str("fewshot_delimiter", "\n\n"),
    numFewshot,
    description,
    version,
  };
}

/** A dataset path from a task file: `hf://` kept, `org/name` made an `hf://` address unless it exists locally. */
function localOrHub(p: string, baseDir: string): string {
  if (p.startsWith("hf://")) return p;
  const local = isAbsolute(p) ? p : resolve(baseDir, p);
  let exists = false;
  try {
    Deno.statSync(local);
    exists = true;
  } catch { /* not local */ }
  if (!exists && /^[\w.-]+\/[\w.-]+$/.test(p)) return `hf://datasets/${p}`;
  return local;
}

/**
 * Loads a task: a `.yaml`/`.yml` task file, or a JSON/JSONL/parquet file of `{ctx, endings, label}` items.
 *
 * @throws {UserError} for a missing or malformed task file.
 */
export async function loadTaskFile(path: string): Promise<MultipleChoiceTask> {
  if (/\.ya?ml$/i.test(path)) {
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (e) {
      throw new UserError(`task file ${path}: cannot read (${(e as Error).message})`, { cause: e });
    }
    return parseTaskYaml(text, path);
  }
  return {
    name: basename(path).replace(/\.(jsonl|ndjson|json|parquet)$/i, ""),
    file: path,
    dataset: { path },
    targetDelimiter: " ",
    fewshotDelimiter: "\n\n",
    numFewshot: 0,
    description: "",
    version: null,
  };
}

/** A task's items (and few-shot pool), all validated. */
export interface LoadedTask {
  /** The task. */
  task: MultipleChoiceTask;
  /** The evaluated items in file order. */
  items: MultipleChoiceExample[];
  /** Few-shot candidates (empty when `numFewshot` is 0). */
  fewshot: MultipleChoiceExample[];
  /** Counts for the evaluated split. */
  report: ProblemReport;
}

/**
 * Reads and validates a task's items. Malformed items (missing label, label out of range, empty endings, ...)
 * stop the load with a {@linkcode UserError} naming file, line and field, unless `onInvalid` is `skip`.
 */
export async function loadTaskItems(
  task: MultipleChoiceTask,
  opts: { hub?: HubDatasetResolver; onInvalid?: "error" | "skip"; limit?: number } = {},
): Promise<LoadedTask> {
  const read = async (spec: DatasetSpec, limit?: number) => {
    const ds = await resolveDataset(spec, { hub: opts.hub, baseDir: dirname(task.file) });
    return loadExamples(iterateRecords(ds, { ...spec, limit: limit ?? spec.limit }), {
      format: "multiple_choice",
      choiceMapping: task.mapping,
      choiceMappingWhere: task.file,
      onInvalid: opts.onInvalid ?? "error",
      what: `task ${task.name} (${task.file})`,
    });
  };
  const main = await read(task.dataset, opts.limit);
  const few = task.fewshotDataset ? await read(task.fewshotDataset) : null;
  return {
    task,
    items: main.examples as MultipleChoiceExample[],
    fewshot: (few?.examples ?? []) as MultipleChoiceExample[],
    report: main.report,
  };
}
