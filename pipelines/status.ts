/**
 * `distillery status`: what the last run did - from its `run.json`, or reconstructed from `events.jsonl` when the
 * run was killed before it could write one.
 *
 * @module
 */
import { formatDuration, formatValue, table } from "./format.ts";
import { displayPath } from "./paths.ts";
import { listRuns, runEvents, type RunInfo } from "./runs.ts";

/** A run's summary as data. */
export interface RunStatus {
  /** Run id. */
  run_id: string;
  /** Recipe name. */
  recipe: string;
  /** `ok`, `failed`, `interrupted`, or `unfinished` (no run.json: still running or killed). */
  status: string;
  /** ISO start time, if known. */
  started: string | null;
  /** Seconds, if finished. */
  wall_s: number | null;
  /** Run directory. */
  run_dir: string;
  /** Per stage: result, seconds, final metrics, error, last step seen. */
  stages: {
    stage: string;
    kind: string;
    result: string;
    wall_s: number | null;
    metrics: Record<string, unknown>;
    error?: string;
    last_step?: number;
  }[];
}

/** Summarises a run directory. */
export function summariseRun(run: RunInfo): RunStatus {
  if (run.record) {
    const r = run.record;
    return {
      run_id: r.run_id,
      recipe: r.recipe,
      status: r.status,
      started: r.started,
      wall_s: r.wall_s,
      run_dir: r.run_dir,
      stages: r.stages.map((s) => ({
        stage: s.stage,
        kind: s.kind,
        result: s.action,
        wall_s: s.action === "ran" || s.action === "failed" ? s.wall_s : null,
        metrics: s.metrics,
        error: s.error,
      })),
    };
  }
  // No run.json: rebuild what we can from the event log.
  const events = runEvents(run.dir);
  const start = events.find((e) => e.type === "run_start");
  const stages = new Map<string, RunStatus["stages"][number]>();
  for (const e of events) {
    if (e.type === "run_start") {
      for (const p of e.plan) {
        stages.set(p.stage, {
          stage: p.stage,
          kind: p.kind,
          result: p.action === "skip" ? "skipped" : "pending",
          wall_s: null,
          metrics: {},
        });
      }
    } else if (e.type === "stage_start") {
      const s = stages.get(e.stage);
      if (s) s.result = "started, did not finish";
    } else if (e.type === "stage_cached") {
      const s = stages.get(e.stage);
      if (s) s.result = "cached";
    } else if (e.type === "stage_finish") {
      const s = stages.get(e.stage);
      if (s) Object.assign(s, { result: "ran", wall_s: e.wall_s, metrics: e.metrics });
    } else if (e.type === "stage_failed") {
      const s = stages.get(e.stage);
      if (s) {
        Object.assign(s, {
          result: e.interrupted ? "interrupted" : "failed",
          wall_s: e.wall_s,
          error: e.error,
        });
      }
    } else if (e.type === "metric" || e.type === "checkpoint") {
      const s = stages.get(e.stage);
      if (s) s.last_step = e.step;
    }
  }
  return {
    run_id: run.runId,
    recipe: run.recipe,
    status: "unfinished",
    started: start?.t ?? null,
    wall_s: null,
    run_dir: run.dir,
    stages: [...stages.values()],
  };
}

/** Renders a run summary for the terminal. */
export function formatRunStatus(s: RunStatus): string {
  const when = s.started ? ` started ${s.started.slice(0, 19).replace("T", " ")}` : "";
  const how = s.status === "unfinished"
    ? "did not finish (still running, or the process was killed; run the same command again to resume)"
    : `${s.status === "ok" ? "finished" : s.status} in ${formatDuration(s.wall_s ?? 0)}`;
  const rows = s.stages.map((st) => [
    st.stage,
    st.kind,
    st.result + (st.last_step !== undefined && st.result !== "ran" ? ` (last step ${st.last_step})` : ""),
    st.wall_s !== null ? formatDuration(st.wall_s) : "-",
    st.error
      ? `error: ${st.error.split("\n")[0]}`
      : Object.entries(st.metrics).slice(0, 4).map(([k, v]) => `${k}=${formatValue(v)}`).join(" "),
  ]);
  return `run ${s.run_id} (recipe ${s.recipe})${when}: ${how}\n` +
    table(["stage", "kind", "result", "time", "metrics"], rows) + "\n" +
    `run directory: ${displayPath(s.run_dir)}\n`;
}

/** The newest run in `runsDir` (optionally of one recipe), summarised; null when there is none. */
export function lastRunStatus(runsDir: string, recipe?: string): RunStatus | null {
  const runs = listRuns(runsDir, recipe);
  return runs.length > 0 ? summariseRun(runs[0]) : null;
}
