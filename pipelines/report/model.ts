/**
 * The run report's data model: everything the HTML page, `results.json` and `summary.md` show, gathered from a run
 * directory by `buildRunReportData` (build.ts). Plain JSON-compatible objects, so `results.json` is this
 * model minus the training curves and the per-run paths.
 *
 * @module
 */
import type { EvalGeneration, EvalResults, SpecBenchResults } from "./results.ts";

/**
 * What happened to a stage in this run:
 * - `ran`: computed in this run (possibly resumed from a checkpoint);
 * - `cached`: its outputs came from the cache, nothing computed;
 * - `failed`: it raised an error;
 * - `interrupted`: the run was stopped (Ctrl-C, kill) while it was running;
 * - `skipped`: not run because an upstream stage failed, or excluded by `--only` / `--from`;
 * - `pending`: planned, but the run ended before reaching it (or the log stops early).
 */
export type StageStatus = "ran" | "cached" | "failed" | "interrupted" | "skipped" | "pending";

/** A final metric value as stages record it (non-finite numbers are null). */
export type MetricValue = number | string | boolean | null;

/** One stage of the recipe, as this run saw it. */
export interface ReportStage {
  /** Stage name in the recipe. */
  name: string;
  /** Stage kind (`distill`, `evaluate`...), or null when the log does not say. */
  kind: string | null;
  /** Names of the stages whose outputs this one consumes (the DAG's edges); empty for sources. */
  deps: string[];
  /** Outcome in this run. */
  status: StageStatus;
  /** Seconds spent computing in this run (null when it did not run or the log has no time). */
  wall_s: number | null;
  /** For a cached stage: seconds the run that computed it spent on it, when that run's log is still on disk. */
  cached_wall_s: number | null;
  /** The step a resumed stage restarted from (null when it started from scratch). */
  resumed_from_step: number | null;
  /** ISO time the stage started (or was found cached). */
  started: string | null;
  /** The stage's cache key, when the log gives it. */
  key: string | null;
  /** The stage's final metrics (`stage_finish.metrics`). */
  metrics: Record<string, MetricValue>;
  /** Output paths by port (absolute, or relative to the run directory). */
  outputs: Record<string, string>;
  /** Why the runner decided to run it (from the plan), or why it was skipped. */
  reasons: string[];
  /** The error message of a failed stage. */
  error: string | null;
  /** True when the failure was a problem with the user's input (a `UserError`), not a bug. */
  user_error: boolean;
  /** Latest checkpoint kept after a failure: the next run resumes from it. */
  checkpoint_step: number | null;
}

/** One metric of a training stage against the step: parallel arrays, in increasing step order. */
export interface MetricSeries {
  /** Steps (x). */
  steps: number[];
  /** Values (y); null where the stage logged a non-finite value. */
  values: (number | null)[];
}

/** The curves of one training stage (a stage that logged `metric` events). */
export interface TrainingCurves {
  /** Stage name. */
  stage: string;
  /** Stage kind, if known. */
  kind: string | null;
  /** Metric name (`loss`, `ce`, `kl`, `lr`, `grad_norm`, `rewards/accuracies`...) -> series. */
  series: Record<string, MetricSeries>;
  /** Run ids whose logs contributed points (a resumed or cached stage's curve comes from earlier runs too). */
  from_runs: string[];
}

/** One task's scores for one model, with lm-eval's `,none` suffixes removed. */
export interface EvalScores {
  /** Accuracy (multiple choice). */
  acc?: number | null;
  /** Standard error of `acc`. */
  acc_stderr?: number | null;
  /** Length-normalised accuracy (multiple choice). */
  acc_norm?: number | null;
  /** Standard error of `acc_norm`. */
  acc_norm_stderr?: number | null;
  /** Token-level perplexity (also filled from lm-eval's plain `perplexity`). */
  token_perplexity?: number | null;
  /** Word-level perplexity. */
  word_perplexity?: number | null;
  /** Byte-level perplexity. */
  byte_perplexity?: number | null;
  /** Bits per byte. */
  bits_per_byte?: number | null;
  /** Items scored. */
  n?: number | null;
  /** Any other numeric metric of the task. */
  [metric: string]: number | null | undefined;
}

/** One evaluated model: a row of the evaluation table. */
export interface EvalRow {
  /** The evaluate stage that produced it. */
  stage: string;
  /** Display name (`config.model_name`). */
  model_name: string;
  /** Path or Hub id of the model (`config.model`). */
  model: string;
  /** Teacher or student. */
  role: "teacher" | "student";
  /** Fraction of layers that keep attention (1 for the teacher). */
  attention_fraction: number;
  /** Scores by task. */
  tasks: Record<string, EvalScores>;
  /** Perplexity window (`config.max_length`), if stated. */
  max_length: number | null;
  /** The results file it was read from. */
  file: string;
  /** Generated samples saved with the results. */
  generations: EvalGeneration[];
  /** The full file, for `results.json`. */
  raw: EvalResults;
}

/** One speculative-decoding benchmark (one spec_bench stage, one results file). */
export interface SpecReport {
  /** The spec_bench stage that produced it. */
  stage: string;
  /** The results file it was read from. */
  file: string;
  /** The file's content. */
  results: SpecBenchResults;
}

/** A message from the log worth showing: warnings and errors of stages and of the runner. */
export interface ReportLogEntry {
  /** ISO time (may be empty when the log has none). */
  time: string;
  /** The stage it came from, or null for the runner. */
  stage: string | null;
  /** Severity. */
  level: "info" | "warn" | "error";
  /** The message. */
  message: string;
}

/** Everything the report shows about one run. */
export interface RunReportData {
  /** Format version of this model (and of `results.json`). */
  format: 1;
  /** Run id (the run directory's name). */
  run_id: string;
  /** The run directory. */
  run_dir: string;
  /** Recipe name (`name:` in the YAML). */
  recipe: string;
  /** Recipe file, when the log gives it. */
  recipe_path: string | null;
  /** Recipe description, when the log gives it. */
  description: string | null;
  /** Outcome: `incomplete` when the log has no `run_finish` (still running, or killed). */
  status: "ok" | "failed" | "interrupted" | "incomplete";
  /** ISO start time. */
  started: string | null;
  /** ISO end time. */
  finished: string | null;
  /** Total seconds (from `run_finish`, else from the first and last event times). */
  wall_s: number | null;
  /** Devices the stages ran on (distinct), e.g. `builtin: llvmpipe (LLVM 15.0.7, 256 bits)`. */
  devices: string[];
  /** Recipe settings as logged (cache dir, seed, dtype...). */
  settings: Record<string, unknown>;
  /** True when the log gives the stages' dependencies (else the DAG is drawn without edges). */
  has_deps: boolean;
  /** Every stage of the recipe, in run order. */
  stages: ReportStage[];
  /** Curves of each training stage, in run order. */
  training: TrainingCurves[];
  /** Evaluation rows: the teacher first, then students by decreasing attention fraction. */
  evaluation: EvalRow[];
  /** Every task that appears in `evaluation`, in first-seen order. */
  eval_tasks: string[];
  /** Speculative-decoding benchmarks, in run order. */
  speculative: SpecReport[];
  /** Warnings and errors logged during the run. */
  logs: ReportLogEntry[];
  /** Problems met while reading the run (an unreadable result file, malformed lines): shown in the report. */
  problems: string[];
}
