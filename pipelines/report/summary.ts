/**
 * `results.json`: the run's machine-readable summary - the stage table, each stage's final metrics, a summary of
 * each training curve, the evaluation table (teacher vs students) and the speculative-decoding results.
 *
 * @module
 */
import type { EvalScores, MetricValue, RunReportData, StageStatus } from "./model.ts";
import type { EvalConfig, SpecBenchResults } from "./results.ts";

/** One row of the stage table in `results.json`. */
export interface SummaryStage {
  /** Stage name. */
  name: string;
  /** Stage kind. */
  kind: string | null;
  /** Upstream stages. */
  deps: string[];
  /** Outcome in this run. */
  status: StageStatus;
  /** True when the outputs came from the cache. */
  cached: boolean;
  /** Seconds computing in this run. */
  wall_s: number | null;
  /** Seconds the computing run spent, for a cached stage (when known). */
  cached_wall_s: number | null;
  /** Step a resumed stage restarted from. */
  resumed_from_step: number | null;
  /** Cache key. */
  key: string | null;
  /** Final metrics. */
  metrics: Record<string, MetricValue>;
  /** Error message of a failed stage. */
  error: string | null;
}

/** The end of a training curve. */
export interface SummaryCurve {
  /** Stage name. */
  stage: string;
  /** Last step logged. */
  last_step: number;
  /** Points logged (all metrics together). */
  points: number;
  /** Last finite value of each metric. */
  final: Record<string, number>;
  /** Smallest value of each metric whose name ends in `loss` (or is `ce` / `kl`). */
  min: Record<string, number>;
}

/** One row of the evaluation table in `results.json`. */
export interface SummaryEvalRow {
  /** Evaluate stage. */
  stage: string;
  /** Display name. */
  model_name: string;
  /** Path or Hub id. */
  model: string;
  /** Teacher or student. */
  role: "teacher" | "student";
  /** Attention fraction. */
  attention_fraction: number;
  /** Scores by task (lm-eval's `,none` suffix removed). */
  tasks: Record<string, EvalScores>;
  /** Per perplexity task: this model's token perplexity divided by the teacher's (1 for the teacher). */
  perplexity_ratio: Record<string, number>;
  /** The evaluation config from the results file. */
  config: EvalConfig;
}

/** The content of `results.json`. */
export interface RunSummary {
  /** Format version. */
  format: 1;
  /** Run id. */
  run_id: string;
  /** Recipe name. */
  recipe: string;
  /** Recipe file. */
  recipe_path: string | null;
  /** Run outcome. */
  status: RunReportData["status"];
  /** ISO start time. */
  started: string | null;
  /** ISO end time. */
  finished: string | null;
  /** Total seconds. */
  wall_s: number | null;
  /** Devices used. */
  devices: string[];
  /** Count of stages per status. */
  counts: Record<StageStatus, number>;
  /** The stage table. */
  stages: SummaryStage[];
  /** Ends of the training curves. */
  training: SummaryCurve[];
  /** The evaluation table: tasks, and one row per model (teacher first). */
  evaluation: { tasks: string[]; rows: SummaryEvalRow[] };
  /** Speculative-decoding results, one per spec_bench stage. */
  speculative: ({ stage: string } & SpecBenchResults)[];
  /** Warnings and errors logged during the run. */
  logs: RunReportData["logs"];
  /** Problems met while reading the run. */
  problems: string[];
}

const isLossName = (n: string) => /(^|[_/])(loss|ce|kl|nll)$/.test(n) || n.endsWith("loss");

/** Which perplexity an evaluation row is compared by: token perplexity, else word, else byte perplexity. */
export function mainPerplexity(s: EvalScores | undefined): number | null {
  if (!s) return null;
  for (const k of ["token_perplexity", "word_perplexity", "byte_perplexity"]) {
    const v = s[k];
    if (typeof v === "number" && Number.isFinite(v)) return v;
  }
  return null;
}

/** Each row's perplexity divided by the teacher's, per task (empty when there is no teacher row). */
export function perplexityRatios(data: RunReportData): Map<string, Record<string, number>> {
  const teacher = data.evaluation.find((r) => r.role === "teacher");
  const out = new Map<string, Record<string, number>>();
  for (const r of data.evaluation) {
    const ratios: Record<string, number> = {};
    for (const t of data.eval_tasks) {
      const mine = mainPerplexity(r.tasks[t]), base = mainPerplexity(teacher?.tasks[t]);
      if (mine !== null && base !== null && base > 0) ratios[t] = mine / base;
    }
    out.set(r.stage + "\u0000" + r.file, ratios);
  }
  return out;
}

const METRIC_COLUMNS: { key: string; label: string; stderr?: string }[] = [
  { key: "token_perplexity", label: "ppl" },
  { key: "word_perplexity", label: "word ppl" },
  { key: "byte_perplexity", label: "byte ppl" },
  { key: "bits_per_byte", label: "bits/byte" },
  { key: "acc", label: "acc", stderr: "acc_stderr" },
  { key: "acc_norm", label: "acc_norm", stderr: "acc_norm_stderr" },
];

/** The columns of a task: the known metrics any model has, then any other metric. */
export function taskColumns(
  rows: RunReportData["evaluation"],
  task: string,
): { key: string; label: string; stderr?: string }[] {
  const present = new Set<string>();
  for (const r of rows) {
    for (const [k, v] of Object.entries(r.tasks[task] ?? {})) if (v !== undefined) present.add(k);
  }
  const cols = METRIC_COLUMNS.filter((c) => present.has(c.key));
  const used = new Set(cols.flatMap((c) => [c.key, c.stderr ?? ""]).concat(["n", "perplexity"]));
  for (const k of present) {
    if (!used.has(k) && !k.endsWith("_stderr") && !k.includes("_stderr,")) cols.push({ key: k, label: k });
  }
  return cols;
}

/** Builds the content of `results.json` from the report data. */
export function buildRunSummary(data: RunReportData): RunSummary {
  const counts = { ran: 0, cached: 0, failed: 0, interrupted: 0, skipped: 0, pending: 0 };
  for (const s of data.stages) counts[s.status]++;
  const ratios = perplexityRatios(data);
  return {
    format: 1,
    run_id: data.run_id,
    recipe: data.recipe,
    recipe_path: data.recipe_path,
    status: data.status,
    started: data.started,
    finished: data.finished,
    wall_s: data.wall_s,
    devices: data.devices,
    counts,
    stages: data.stages.map((s) => ({
      name: s.name,
      kind: s.kind,
      deps: s.deps,
      status: s.status,
      cached: s.status === "cached",
      wall_s: s.wall_s,
      cached_wall_s: s.cached_wall_s,
      resumed_from_step: s.resumed_from_step,
      key: s.key,
      metrics: s.metrics,
      error: s.error,
    })),
    training: data.training.map((c) => {
      const final: Record<string, number> = {}, min: Record<string, number> = {};
      let last = -Infinity, points = 0;
      for (const [name, s] of Object.entries(c.series)) {
        points = Math.max(points, s.steps.length);
        last = Math.max(last, s.steps[s.steps.length - 1] ?? -Infinity);
        const finite = s.values.filter((v): v is number => v !== null);
        if (finite.length) final[name] = finite[finite.length - 1];
        if (finite.length && isLossName(name)) min[name] = Math.min(...finite);
      }
      return { stage: c.stage, last_step: Number.isFinite(last) ? last : 0, points, final, min };
    }),
    evaluation: {
      tasks: data.eval_tasks,
      rows: data.evaluation.map((r) => ({
        stage: r.stage,
        model_name: r.model_name,
        model: r.model,
        role: r.role,
        attention_fraction: r.attention_fraction,
        tasks: r.tasks,
        perplexity_ratio: ratios.get(r.stage + "\u0000" + r.file) ?? {},
        config: r.raw.config,
      })),
    },
    speculative: data.speculative.map((s) => ({ stage: s.stage, ...s.results })),
    logs: data.logs,
    problems: data.problems,
  };
}
