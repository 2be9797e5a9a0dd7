/**
 * The run report: what a run did, as a self-contained HTML page (`report.html`), a machine-readable summary
 * (`results.json`) and a Markdown summary for CI job summaries (`summary.md`), all written into the run directory.
 *
 * Wiring it to the runner takes one call in the run-finished hook:
 *
 * ```ts
 * import { writeRunReport } from "./pipelines/report/mod.ts";
 * const { html } = await writeRunReport(runDir);
 * console.log(`report: ${html}`);
 * ```
 *
 * What the report reads is described in build.ts (the run directory), adapter.ts (the events it uses) and
 * results.ts (the result files of the evaluate and spec_bench stages).
 *
 * @module
 */
import { join } from "node:path";
import { writeFileAtomic } from "../../util/atomic.ts";
import { UserError } from "../../util/errors.ts";
import { type BuildOptions, buildRunReportData } from "./build.ts";
import { renderReportHtml } from "./html.ts";
import { renderSummaryMarkdown } from "./markdown.ts";
import type { RunReportData } from "./model.ts";
import { buildRunSummary } from "./summary.ts";

export { adaptEvent, type PlannedStage, type ReportEvent } from "./adapter.ts";
export { type BuildOptions, buildRunReportData, readRunEvents } from "./build.ts";
export { renderReportHtml } from "./html.ts";
export { renderSummaryMarkdown } from "./markdown.ts";
export type {
  EvalRow,
  EvalScores,
  MetricSeries,
  MetricValue,
  ReportLogEntry,
  ReportStage,
  RunReportData,
  SpecReport,
  StageStatus,
  TrainingCurves,
} from "./model.ts";
export {
  detectResultKind,
  type EvalConfig,
  type EvalGeneration,
  type EvalResults,
  type EvalTaskScores,
  parseEvalResults,
  parseSpecBenchResults,
  type ResultKind,
  type SpecBenchEntry,
  type SpecBenchResults,
} from "./results.ts";
export {
  buildRunSummary,
  mainPerplexity,
  perplexityRatios,
  type RunSummary,
  type SummaryCurve,
  type SummaryEvalRow,
  type SummaryStage,
  taskColumns,
} from "./summary.ts";

/** Options of {@linkcode writeRunReport}. */
export interface WriteReportOptions extends BuildOptions {
  /** Directory to write the three files into (default: the run directory). */
  outDir?: string;
  /** Time printed in the report's footer (ISO; default now). */
  generatedAt?: string;
}

/** Paths of the files {@linkcode writeRunReport} wrote. */
export interface WrittenReport {
  /** `report.html`. */
  html: string;
  /** `results.json`. */
  json: string;
  /** `summary.md`. */
  markdown: string;
  /** The data they were rendered from. */
  data: RunReportData;
}

/**
 * Builds the report of the run in `runDir` and writes `report.html`, `results.json` and `summary.md` atomically
 * (each appears complete or not at all). Throws a {@linkcode UserError} when `runDir` is not a run directory.
 */
export async function writeRunReport(
  runDir: string,
  options: WriteReportOptions = {},
): Promise<WrittenReport> {
  const data = await buildRunReportData(runDir, options);
  const outDir = options.outDir ?? data.run_dir;
  await Deno.mkdir(outDir, { recursive: true });
  const html = join(outDir, "report.html"),
    json = join(outDir, "results.json"),
    markdown = join(outDir, "summary.md");
  await writeFileAtomic(json, JSON.stringify(buildRunSummary(data), null, 2) + "\n");
  await writeFileAtomic(markdown, renderSummaryMarkdown(data));
  await writeFileAtomic(html, renderReportHtml(data, options.generatedAt));
  return { html, json, markdown, data };
}

/**
 * The newest run directory under `runsDir` (run ids sort by start time), for `distillery report` without an
 * argument. Throws a {@linkcode UserError} when there is none.
 */
export async function latestRunDir(runsDir: string): Promise<string> {
  const names: string[] = [];
  try {
    for await (const d of Deno.readDir(runsDir)) if (d.isDirectory) names.push(d.name);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  for (const name of names.sort().reverse()) {
    try {
      await Deno.stat(join(runsDir, name, "events.jsonl"));
      return join(runsDir, name);
    } catch {
      // not a run directory (or one being created): look further back
    }
  }
  throw new UserError(`${runsDir}: no runs yet (no directory with an events.jsonl); run a recipe first`);
}
