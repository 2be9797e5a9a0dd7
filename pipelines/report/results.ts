/**
 * The result files that the `evaluate` and `spec_bench` stages write, and that the run report reads.
 *
 * Both are plain JSON objects. The report recognises them by shape (not by file name), in the outputs that a
 * stage's `stage_finish` / `stage_cached` event lists: an output that is a file is read directly; an output that is
 * a directory is searched for `*.json` files at its top level.
 *
 * - {@linkcode EvalResults}: one model evaluated on one or more tasks, keyed like EleutherAI's
 *   lm-evaluation-harness (`results[task]["acc,none"]`), so numbers compare with published tables.
 * - {@linkcode SpecBenchResults}: one target model with one draft, benchmarked for several draft lengths K.
 *
 * {@linkcode parseEvalResults} and {@linkcode parseSpecBenchResults} check a parsed file and say exactly which field
 * is wrong; stage authors can call them in their tests to pin the format they write.
 *
 * @module
 */
import { UserError } from "../../util/errors.ts";

/**
 * Scores of one model on one task, keyed like lm-evaluation-harness: `"<metric>,<filter>"` with the filter `none`.
 * A task reports the metrics that apply to it: perplexity tasks the perplexities and bits per byte, multiple-choice
 * tasks `acc` / `acc_norm` with their standard errors. Any other key is kept and shown as is.
 */
export interface EvalTaskScores {
  /** Display name of the task (lm-eval writes it; defaults to the task key). */
  alias?: string;
  /** Multiple choice: fraction of items whose highest summed continuation log-likelihood is the label. */
  "acc,none"?: number;
  /** Standard error of `acc`: sample standard deviation / sqrt(n). */
  "acc_stderr,none"?: number;
  /** Multiple choice: as `acc`, with each choice's log-likelihood divided by its length in characters. */
  "acc_norm,none"?: number;
  /** Standard error of `acc_norm`. */
  "acc_norm_stderr,none"?: number;
  /** Perplexity per token of the model's own tokenizer: exp(-sum ll / tokens). */
  "token_perplexity,none"?: number;
  /** Perplexity per whitespace-separated word: exp(-sum ll / words); comparable across tokenizers. */
  "word_perplexity,none"?: number;
  /** Perplexity per UTF-8 byte: exp(-sum ll / bytes). */
  "byte_perplexity,none"?: number;
  /** Bits per UTF-8 byte: -sum ll / (bytes * ln 2). */
  "bits_per_byte,none"?: number;
  /** Any further metric (`"perplexity,none"`, `"f1,none"`, ...): numbers or null (not computed / not finite). */
  [metric: string]: number | string | null | undefined;
}

/** How a model was evaluated: lm-eval's `config`, plus what the report needs to place the model. */
export interface EvalConfig {
  /** Where the model came from: a local path or a Hub id (`HuggingFaceH4/zephyr-7b-beta`). */
  model: string;
  /** Short display name used in tables and charts (`teacher`, `hybrid-50`, `hybrid-25-dpo`). */
  model_name: string;
  /**
   * Fraction of decoder layers that keep attention: 1 for the Transformer teacher, 0.5 for a 50% hybrid, 0 for a
   * pure Mamba model. The perplexity-vs-attention chart places the model by it.
   */
  attention_fraction: number;
  /** `teacher` or `student`; when absent the model with `attention_fraction` 1 is taken as the teacher. */
  role?: "teacher" | "student";
  /** Perplexity window in tokens (non-overlapping windows, the first conditioned on BOS). */
  max_length?: number;
  /** Window stride in tokens (equal to `max_length` for non-overlapping windows). */
  stride?: number;
  /** Few-shot examples per multiple-choice item. */
  num_fewshot?: number;
  /** Batch size used for scoring. */
  batch_size?: number;
  /** Compute dtype (`f32`, `f16`). */
  dtype?: string;
  /** The device the evaluation ran on (adapter description). */
  device?: string;
  /** Any other setting worth recording. */
  [key: string]: unknown;
}

/** One generated sample, saved with the evaluation results. */
export interface EvalGeneration {
  /** The prompt (before the chat template). */
  prompt: string;
  /** The model's continuation, decoded. */
  completion: string;
  /** Sampling settings and anything else worth keeping (temperature, top_p, tokens...). */
  [key: string]: unknown;
}

/**
 * An evaluation results file: one model on one or more tasks, in lm-evaluation-harness layout.
 *
 * @example
 * ```json
 * {
 *   "results": {
 *     "tinystories": { "alias": "tinystories", "token_perplexity,none": 4.71, "word_perplexity,none": 7.9,
 *                      "byte_perplexity,none": 1.42, "bits_per_byte,none": 0.506 },
 *     "tinystories_cloze": { "acc,none": 0.61, "acc_stderr,none": 0.049, "acc_norm,none": 0.66,
 *                            "acc_norm_stderr,none": 0.048 }
 *   },
 *   "config": { "model": "/cache/objects/ab/cd...", "model_name": "hybrid-50", "attention_fraction": 0.5,
 *               "max_length": 256, "stride": 256 },
 *   "versions": { "tinystories": 1, "tinystories_cloze": 1 },
 *   "n-samples": { "tinystories": { "original": 64, "effective": 64 },
 *                  "tinystories_cloze": { "original": 100, "effective": 100 } },
 *   "date": 1732822800.5
 * }
 * ```
 */
export interface EvalResults {
  /** Scores by task name. */
  results: Record<string, EvalTaskScores>;
  /** How the model was evaluated. */
  config: EvalConfig;
  /** Version of each task's definition (a changed task changes its version). */
  versions: Record<string, number | string>;
  /** Items per task: `original` in the task, `effective` actually scored (after a limit). */
  "n-samples": Record<string, { original: number; effective: number }>;
  /** When the evaluation finished: Unix time in seconds (as lm-eval writes) or an ISO-8601 string. */
  date: number | string;
  /** Generated samples for the recipe's prompts, if the stage was asked for them. */
  generations?: EvalGeneration[];
}

/** One draft length K of a speculative-decoding benchmark. */
export interface SpecBenchEntry {
  /** Draft length: tokens the draft proposes per target pass. */
  k: number;
  /**
   * Length K. Entry i (0-based) is the fraction of target passes in which the draft token at position i+1 was
   * accepted, i.e. in which at least i+1 draft tokens were accepted; so it never increases with i, and
   * `acceptance_rate_per_position[i] = sum(acceptance_histogram[i+1..K]) / sum(acceptance_histogram)`.
   */
  acceptance_rate_per_position: number[];
  /**
   * Mean number of draft tokens accepted per target pass (0..K). Each pass also emits one token of the target's own
   * (the correction or the bonus token), so tokens per pass = this + 1 except at the end of a sequence.
   */
  mean_accepted_per_pass: number;
  /** Generated tokens per second with speculative decoding (prefill excluded, batch 1). */
  tokens_per_s: number;
  /** Generated tokens per second of plain decoding of the same target, measured in the same run. */
  baseline_tokens_per_s: number;
  /** `tokens_per_s / baseline_tokens_per_s`. */
  speedup: number;
  /** Length K+1. Entry j counts the target passes that accepted exactly j draft tokens. */
  acceptance_histogram: number[];
}

/**
 * A speculative-decoding benchmark results file: one target with one draft, for each K in a list.
 *
 * @example
 * ```json
 * {
 *   "model": "hybrid-50", "draft": "draft-2l",
 *   "temperature": 0, "prompts": 16, "max_new_tokens": 128, "device": "llvmpipe",
 *   "results": [
 *     { "k": 2, "acceptance_rate_per_position": [0.8, 0.62], "mean_accepted_per_pass": 1.42,
 *       "tokens_per_s": 51.0, "baseline_tokens_per_s": 35.2, "speedup": 1.45, "acceptance_histogram": [40, 36, 124] }
 *   ]
 * }
 * ```
 */
export interface SpecBenchResults {
  /** The target (verifier) model: display name, path or Hub id. */
  model: string;
  /** The draft model: display name, path or Hub id. */
  draft: string;
  /** Sampling temperature (0: greedy). */
  temperature?: number;
  /** Number of prompts decoded. */
  prompts?: number;
  /** Tokens generated per prompt. */
  max_new_tokens?: number;
  /** The device the benchmark ran on. */
  device?: string;
  /** One entry per K, in increasing K. */
  results: SpecBenchEntry[];
  /** Any other setting worth recording. */
  [key: string]: unknown;
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") {
    return `the string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + "..." : v)}`;
  }
  if (typeof v === "number") return `the number ${v}`;
  return `${typeof v === "object" ? "an object" : typeof v}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Collects every problem of a file, so the author sees them all at once. */
class Problems {
  readonly list: string[] = [];
  constructor(readonly source: string) {}
  add(field: string, expected: string, found: unknown): void {
    this.list.push(`field ${field}: expected ${expected}, found ${typeName(found)}`);
  }
  throwIfAny(what: string): void {
    if (this.list.length === 0) return;
    throw new UserError(
      `${this.source}: not a valid ${what} file:\n${this.list.map((p) => `  - ${p}`).join("\n")}`,
    );
  }
}

function fieldPath(base: string, key: string): string {
  return /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? `${base}.${key}` : `${base}[${JSON.stringify(key)}]`;
}

/**
 * Checks that `value` (a parsed JSON file) is an {@linkcode EvalResults}; `source` names the file in messages.
 * Throws a {@linkcode UserError} listing every wrong field (path, what was expected, what was found).
 */
export function parseEvalResults(value: unknown, source: string): EvalResults {
  const p = new Problems(source);
  if (!isObject(value)) {
    p.add("(top level)", "an object", value);
    p.throwIfAny("evaluation results");
  }
  const v = value as Record<string, unknown>;
  if (!isObject(v.results)) p.add("results", "an object of task -> scores", v.results);
  else {
    if (Object.keys(v.results).length === 0) p.add("results", "at least one task", v.results);
    for (const [task, scores] of Object.entries(v.results)) {
      const f = fieldPath("results", task);
      if (!isObject(scores)) {
        p.add(f, "an object of metric -> number", scores);
        continue;
      }
      for (const [metric, x] of Object.entries(scores)) {
        if (metric === "alias") {
          if (typeof x !== "string") p.add(fieldPath(f, metric), "a string", x);
        } else if (metric.includes(",") && x !== null && typeof x !== "number" && x !== "N/A") {
          p.add(fieldPath(f, metric), "a number or null", x);
        }
      }
    }
  }
  if (!isObject(v.config)) p.add("config", "an object", v.config);
  else {
    const c = v.config;
    if (typeof c.model !== "string") p.add("config.model", "a string (path or Hub id)", c.model);
    if (typeof c.model_name !== "string" || c.model_name === "") {
      p.add("config.model_name", "a non-empty string", c.model_name);
    }
    const a = c.attention_fraction;
    if (typeof a !== "number" || !(a >= 0 && a <= 1)) {
      p.add("config.attention_fraction", "a number from 0 to 1", a);
    }
    if (c.role !== undefined && c.role !== "teacher" && c.role !== "student") {
      p.add("config.role", `"teacher" or "student"`, c.role);
    }
  }
  if (!isObject(v.versions)) p.add("versions", "an object of task -> version", v.versions);
  if (!isObject(v["n-samples"])) {
    p.add(`["n-samples"]`, "an object of task -> {original, effective}", v["n-samples"]);
  } else {
    for (const [task, n] of Object.entries(v["n-samples"])) {
      if (!isObject(n) || typeof n.original !== "number" || typeof n.effective !== "number") {
        p.add(fieldPath(`["n-samples"]`, task), "{original: number, effective: number}", n);
      }
    }
  }
  if (typeof v.date !== "number" && typeof v.date !== "string") {
    p.add("date", "a Unix time or ISO string", v.date);
  }
  if (v.generations !== undefined) {
    if (!Array.isArray(v.generations)) p.add("generations", "an array", v.generations);
    else {
      v.generations.forEach((g, i) => {
        if (!isObject(g) || typeof g.prompt !== "string" || typeof g.completion !== "string") {
          p.add(`generations[${i}]`, "{prompt: string, completion: string}", g);
        }
      });
    }
  }
  p.throwIfAny("evaluation results");
  return v as unknown as EvalResults;
}

function isFiniteNumber(x: unknown): x is number {
  return typeof x === "number" && Number.isFinite(x);
}

/**
 * Checks that `value` (a parsed JSON file) is a {@linkcode SpecBenchResults}, including the consistency of each
 * entry (array lengths K and K+1, rates in [0, 1]); `source` names the file in messages. Throws a
 * {@linkcode UserError} listing every wrong field.
 */
export function parseSpecBenchResults(value: unknown, source: string): SpecBenchResults {
  const p = new Problems(source);
  if (!isObject(value)) {
    p.add("(top level)", "an object", value);
    p.throwIfAny("speculative-decoding results");
  }
  const v = value as Record<string, unknown>;
  if (typeof v.model !== "string") p.add("model", "a string", v.model);
  if (typeof v.draft !== "string") p.add("draft", "a string", v.draft);
  if (!Array.isArray(v.results) || v.results.length === 0) {
    p.add("results", "a non-empty array of per-K entries", v.results);
  } else {
    v.results.forEach((e, i) => {
      const f = `results[${i}]`;
      if (!isObject(e)) return p.add(f, "an object", e);
      const k = e.k;
      if (!Number.isInteger(k) || (k as number) < 1) p.add(`${f}.k`, "an integer >= 1", k);
      for (const name of ["mean_accepted_per_pass", "tokens_per_s", "baseline_tokens_per_s", "speedup"]) {
        if (!isFiniteNumber(e[name]) || (e[name] as number) < 0) {
          p.add(`${f}.${name}`, "a finite number >= 0", e[name]);
        }
      }
      const rates = e.acceptance_rate_per_position;
      if (!Array.isArray(rates) || rates.some((r) => !isFiniteNumber(r) || r < 0 || r > 1)) {
        p.add(`${f}.acceptance_rate_per_position`, "an array of rates in [0, 1]", rates);
      } else if (Number.isInteger(k) && rates.length !== k) {
        p.add(`${f}.acceptance_rate_per_position`, `K = ${k} entries`, rates);
      }
      const hist = e.acceptance_histogram;
      if (!Array.isArray(hist) || hist.some((c) => !Number.isInteger(c) || c < 0)) {
        p.add(`${f}.acceptance_histogram`, "an array of counts", hist);
      } else if (Number.isInteger(k) && hist.length !== (k as number) + 1) {
        p.add(
          `${f}.acceptance_histogram`,
          `K + 1 = ${(k as number) + 1} entries (passes accepting 0..K)`,
          hist,
        );
      }
    });
  }
  p.throwIfAny("speculative-decoding results");
  return v as unknown as SpecBenchResults;
}

/** What a JSON value looks like to the report: an evaluation result, a spec-bench result, or neither. */
export type ResultKind = "eval" | "spec_bench" | null;

/**
 * Recognises a result file by its shape: `results` an object and `config` present -> evaluation;
 * `results` an array of entries with `k` -> speculative decoding; anything else -> null.
 */
export function detectResultKind(value: unknown): ResultKind {
  if (!isObject(value)) return null;
  if (isObject(value.results) && isObject(value.config)) return "eval";
  if (
    Array.isArray(value.results) && value.results.length > 0 &&
    value.results.every((e) => isObject(e) && "k" in e && "acceptance_rate_per_position" in e)
  ) return "spec_bench";
  return null;
}
