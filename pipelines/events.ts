/**
 * The run's event log: `.distillery/runs/<run id>/events.jsonl`, one JSON object per line, appended as things
 * happen (a line is written with a single `write` call, so a killed run leaves a readable log up to its last
 * event).
 *
 * Schema (version 1). Every event has:
 * - `t`: ISO-8601 time the event was written
 * - `type`: one of the types below
 *
 * | type           | fields                                                                                     |
 * | -------------- | ------------------------------------------------------------------------------------------ |
 * | `run_start`    | `schema` (1), `run_id`, `recipe` (name), `recipe_path`, `argv`, `cache_dir`, `stages` (names in run order), `plan`: `[{stage, kind, action: "run" \| "cached" \| "skip", reasons: string[]}]` |
 * | `stage_start`  | `stage`, `kind`, `key`, `index` (1-based), `total`, `resume_step` (number or null)          |
 * | `stage_cached` | `stage`, `kind`, `key`, `outputs` (see below)                                              |
 * | `stage_finish` | `stage`, `kind`, `key`, `wall_s`, `outputs`, `metrics` (the stage's final metrics)         |
 * | `stage_failed` | `stage`, `kind`, `key`, `wall_s`, `error` (message), `user_error` (bool), `interrupted` (bool), `checkpoint_step` (latest kept checkpoint or null) |
 * | `stage_skipped`| `stage`, `reason` (e.g. an upstream stage failed)                                          |
 * | `metric`       | `stage`, `step`, `values` (name -> number, string, boolean or null; non-finite numbers are null) |
 * | `progress`     | `stage`, `done`, `total`, `unit`, `rate` (units/s), `tokens_per_s` (or null), `eta_s` (or null); at most every 10 s |
 * | `checkpoint`   | `stage`, `step`                                                                            |
 * | `log`          | `stage` (or null), `level` (`info` \| `warn` \| `error`), `message`                         |
 * | `run_finish`   | `status` (`ok` \| `failed` \| `interrupted`), `wall_s`, `ran`, `cached`, `failed`, `skipped` |
 *
 * `outputs` maps port -> `{digest, type, size, path}` (`path` is absolute, inside the cache).
 *
 * Loss curves: the `metric` events of a stage, in order, give `values.loss` (etc.) against `step`. A resumed
 * stage logs again from its checkpoint's step in a later run's log.
 *
 * @module
 */
import type { MetricValue } from "./stage.ts";

/** Output description inside events. */
export interface EventOutput {
  /** Content digest. */
  digest: string;
  /** `file` or `dir`. */
  type: string;
  /** Bytes. */
  size: number;
  /** Absolute path in the cache. */
  path: string;
}

/** A planned stage inside `run_start`. */
export interface PlannedStageEvent {
  /** Stage name. */
  stage: string;
  /** Stage kind. */
  kind: string;
  /** What the run intends to do with it. */
  action: "run" | "cached" | "skip";
  /** Why. */
  reasons: string[];
}

/** Every event type, discriminated by `type`. */
export type RunEvent =
  | {
    type: "run_start";
    schema: 1;
    run_id: string;
    recipe: string;
    recipe_path: string;
    argv: string[];
    cache_dir: string;
    stages: string[];
    plan: PlannedStageEvent[];
  }
  | {
    type: "stage_start";
    stage: string;
    kind: string;
    key: string;
    index: number;
    total: number;
    resume_step: number | null;
  }
  | { type: "stage_cached"; stage: string; kind: string; key: string; outputs: Record<string, EventOutput> }
  | {
    type: "stage_finish";
    stage: string;
    kind: string;
    key: string;
    wall_s: number;
    outputs: Record<string, EventOutput>;
    metrics: Record<string, MetricValue>;
  }
  | {
    type: "stage_failed";
    stage: string;
    kind: string;
    key: string;
    wall_s: number;
    error: string;
    user_error: boolean;
    interrupted: boolean;
    checkpoint_step: number | null;
  }
  | { type: "stage_skipped"; stage: string; reason: string }
  | { type: "metric"; stage: string; step: number; values: Record<string, MetricValue> }
  | {
    type: "progress";
    stage: string;
    done: number;
    total: number;
    unit: string;
    rate: number | null;
    tokens_per_s: number | null;
    eta_s: number | null;
  }
  | { type: "checkpoint"; stage: string; step: number }
  | { type: "log"; stage: string | null; level: "info" | "warn" | "error"; message: string }
  | {
    type: "run_finish";
    status: "ok" | "failed" | "interrupted";
    wall_s: number;
    ran: number;
    cached: number;
    failed: number;
    skipped: number;
  };

/** An event as stored: the event plus its time. */
export type StoredEvent = RunEvent & { t: string };

/** Appends events to a JSONL file. */
export class EventLog {
  /** Path of the log. */
  readonly path: string;
  #file: Deno.FsFile | null;
  #enc = new TextEncoder();

  /** Opens (creating) the log at `path` for appending. */
  constructor(path: string) {
    this.path = path;
    this.#file = Deno.openSync(path, { append: true, create: true });
  }

  /** Appends one event (synchronously: the line is on disk before the caller continues). */
  write(event: RunEvent): void {
    if (!this.#file) return;
    const line = JSON.stringify({ t: new Date().toISOString(), ...event }) + "\n";
    const bytes = this.#enc.encode(line);
    let off = 0;
    while (off < bytes.length) off += this.#file.writeSync(bytes.subarray(off));
  }

  /** Closes the file. */
  close(): void {
    this.#file?.close();
    this.#file = null;
  }
}

/** Reads an events file; a truncated last line (from a killed writer) is ignored. */
export function readEvents(path: string): StoredEvent[] {
  const text = Deno.readTextFileSync(path);
  const out: StoredEvent[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try {
      out.push(JSON.parse(line));
    } catch {
      // partial line written by a process that was killed mid-write
    }
  }
  return out;
}

/** Replaces non-finite numbers by null (JSON cannot hold them) in a flat metric record. */
export function cleanMetrics(record: Record<string, MetricValue>): Record<string, MetricValue> {
  const out: Record<string, MetricValue> = {};
  for (const [k, v] of Object.entries(record)) {
    out[k] = typeof v === "number" && !Number.isFinite(v) ? null : v;
  }
  return out;
}
