/**
 * Run directories: `.distillery/runs/<run id>/` holds `events.jsonl` (written as the run goes) and `run.json`
 * (the {@linkcode RunRecord}, written when it ends). Run ids sort by start time:
 * `20250101-120000-123-<recipe>-<random>` (date, time, milliseconds).
 *
 * @module
 */
import { join } from "node:path";
import { writeFileAtomic } from "../util/atomic.ts";
import { EventLog, readEvents } from "./events.ts";
import type { EventOutput } from "./events.ts";
import type { MetricValue } from "./stage.ts";

/** One stage's outcome in a run. */
export interface StageResult {
  /** Stage name. */
  stage: string;
  /** Stage kind. */
  kind: string;
  /** What happened. */
  action: "ran" | "cached" | "failed" | "interrupted" | "skipped";
  /** Stage key (null when skipped). */
  key: string | null;
  /** Seconds spent computing (0 when cached or skipped). */
  wall_s: number;
  /** Outputs by port (empty unless ran or cached). */
  outputs: Record<string, EventOutput>;
  /** Final metrics. */
  metrics: Record<string, MetricValue>;
  /** Why it ran or was skipped. */
  reasons: string[];
  /** Error message when failed. */
  error?: string;
}

/** What a run did: `run.json`, and the argument of the `onRunFinished` hook. */
export interface RunRecord {
  /** Format version. */
  format: 1;
  /** Run id (also the directory name). */
  run_id: string;
  /** Recipe name. */
  recipe: string;
  /** Absolute recipe path. */
  recipe_path: string;
  /** Outcome. */
  status: "ok" | "failed" | "interrupted";
  /** ISO start time. */
  started: string;
  /** ISO end time. */
  finished: string;
  /** Duration, seconds. */
  wall_s: number;
  /** Absolute path of the run directory. */
  run_dir: string;
  /** Absolute path of the cache. */
  cache_dir: string;
  /** Absolute path of the recipe's `distillery.lock`. */
  lock_file: string;
  /** Every stage of the recipe, in run order. */
  stages: StageResult[];
}

function timestamp(d: Date): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${
    p(d.getSeconds())
  }-${String(d.getMilliseconds()).padStart(3, "0")}`;
}

/** Creates a new run directory with an open event log. */
export function createRunDir(
  runsDir: string,
  recipeName: string,
): { runId: string; runDir: string; events: EventLog } {
  Deno.mkdirSync(runsDir, { recursive: true });
  const rand = crypto.getRandomValues(new Uint16Array(1))[0].toString(16).padStart(4, "0");
  const runId = `${timestamp(new Date())}-${recipeName}-${rand}`;
  const runDir = join(runsDir, runId);
  Deno.mkdirSync(runDir);
  return { runId, runDir, events: new EventLog(join(runDir, "events.jsonl")) };
}

/** Writes `run.json`. */
export function writeRunRecord(runDir: string, record: RunRecord): void {
  // Synchronous so that it is on disk before the hook (and the process) goes on.
  const tmp = join(runDir, ".run.json.tmp");
  Deno.writeTextFileSync(tmp, JSON.stringify(record, null, 2) + "\n");
  Deno.renameSync(tmp, join(runDir, "run.json"));
}

/** Writes `run.json` asynchronously (atomic). */
export async function writeRunRecordAsync(runDir: string, record: RunRecord): Promise<void> {
  await writeFileAtomic(join(runDir, "run.json"), JSON.stringify(record, null, 2) + "\n");
}

/** A run directory found on disk. */
export interface RunInfo {
  /** Run id. */
  runId: string;
  /** Absolute path. */
  dir: string;
  /** Recipe name, from the id or the first event. */
  recipe: string;
  /** `run.json`, if the run finished (a killed run has none). */
  record: RunRecord | null;
}

/** Lists run directories, newest first; `recipe` filters by recipe name. */
export function listRuns(runsDir: string, recipe?: string): RunInfo[] {
  const out: RunInfo[] = [];
  let names: string[];
  try {
    names = [...Deno.readDirSync(runsDir)].filter((d) => d.isDirectory).map((d) => d.name);
  } catch {
    return [];
  }
  for (const name of names.sort().reverse()) {
    const m = /^\d{8}-\d{6}-\d{3}-(.+)-[0-9a-f]{4}$/.exec(name);
    if (!m) continue;
    if (recipe !== undefined && m[1] !== recipe) continue;
    const dir = join(runsDir, name);
    let record: RunRecord | null = null;
    try {
      record = JSON.parse(Deno.readTextFileSync(join(dir, "run.json")));
    } catch {
      // unfinished or killed run
    }
    out.push({ runId: name, dir, recipe: m[1], record });
  }
  return out;
}

/** Reads a run's events (empty if it has no event log). */
export function runEvents(dir: string): ReturnType<typeof readEvents> {
  try {
    return readEvents(join(dir, "events.jsonl"));
  } catch {
    return [];
  }
}
