/**
 * The one place that knows how the runner names things in `events.jsonl`.
 *
 * {@linkcode adaptEvent} turns one parsed log line into a {@linkcode ReportEvent}, the report's own normalised
 * event. It accepts both the field names of the runner (`t`, `metric.values`, `outputs: {port: {path}}`, `plan`)
 * and the flatter names of the report's brief (`time`, metrics as top-level numbers, `outputs: {port: path}`,
 * `stages: [{name, kind, deps}]`). If the runner renames a field, adjust this file only.
 *
 * @module
 */
import type { MetricValue } from "./model.ts";

/** A stage as `run_start` announces it. */
export interface PlannedStage {
  /** Stage name. */
  name: string;
  /** Stage kind, if given. */
  kind: string | null;
  /** Upstream stage names; null when the log does not give them. */
  deps: string[] | null;
  /** Why it will run, or why it is cached or skipped. */
  reasons: string[];
}

/** The report's normalised event; `time` is an ISO string, or "" when the line had none. */
export type ReportEvent =
  | {
    type: "run_start";
    time: string;
    run_id: string | null;
    recipe: string | null;
    recipe_path: string | null;
    description: string | null;
    settings: Record<string, unknown>;
    device: string | null;
    stages: PlannedStage[];
  }
  | {
    type: "stage_start";
    time: string;
    stage: string;
    kind: string | null;
    key: string | null;
    resume_step: number | null;
    device: string | null;
  }
  | {
    type: "stage_cached";
    time: string;
    stage: string;
    kind: string | null;
    key: string | null;
    outputs: Record<string, string>;
  }
  | {
    type: "stage_finish";
    time: string;
    stage: string;
    kind: string | null;
    key: string | null;
    wall_s: number | null;
    metrics: Record<string, MetricValue>;
    outputs: Record<string, string>;
    device: string | null;
  }
  | {
    type: "stage_failed";
    time: string;
    stage: string;
    kind: string | null;
    wall_s: number | null;
    error: string;
    user_error: boolean;
    interrupted: boolean;
    checkpoint_step: number | null;
  }
  | { type: "stage_skipped"; time: string; stage: string; reason: string | null }
  | { type: "metric"; time: string; stage: string; step: number; values: Record<string, number | null> }
  | { type: "log"; time: string; stage: string | null; level: "info" | "warn" | "error"; message: string }
  | { type: "run_finish"; time: string; status: "ok" | "failed" | "interrupted"; wall_s: number | null };

type Raw = Record<string, unknown>;

const str = (v: unknown): string | null => (typeof v === "string" && v !== "" ? v : null);
const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
const obj = (v: unknown): Raw => (typeof v === "object" && v !== null && !Array.isArray(v) ? v as Raw : {});
const strings = (v: unknown): string[] =>
  Array.isArray(v) ? v.filter((x): x is string => typeof x === "string") : typeof v === "string" ? [v] : [];

/** Keys of a `metric` event that are not metric values when metrics are flattened into the event. */
const METRIC_ENVELOPE = new Set([
  "type",
  "t",
  "time",
  "timestamp",
  "stage",
  "step",
  "kind",
  "run_id",
  "epoch_time",
]);

/** `outputs` as `{port: path}`; accepts `{port: "path"}` and `{port: {path, digest, ...}}`. */
function outputPaths(v: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [port, o] of Object.entries(obj(v))) {
    const path = typeof o === "string" ? o : str(obj(o).path);
    if (path) out[port] = path;
  }
  return out;
}

/** Upstream names from `deps` / `depends_on` / `needs` / `upstream`; `inputs` references like `${a.model}` too. */
function depsOf(s: Raw): string[] | null {
  for (const k of ["deps", "depends_on", "needs", "upstream"]) {
    if (Array.isArray(s[k])) return strings(s[k]);
  }
  if (s.inputs !== undefined) {
    const names = new Set<string>();
    const visit = (x: unknown) => {
      if (typeof x === "string") { for (const m of x.matchAll(/\$\{([^.}]+)[.}]/g)) names.add(m[1]); }
      else if (Array.isArray(x)) x.forEach(visit);
      else if (typeof x === "object" && x !== null) Object.values(x).forEach(visit);
    };
    visit(s.inputs);
    return [...names];
  }
  return null;
}

/**
 * Stages of `run_start`: from `stages` (names, or objects with `name`/`stage`, `kind`, `deps`) merged with `plan`
 * entries (`{stage, kind, action, reasons, deps?}`), in the order first given.
 */
function plannedStages(e: Raw): PlannedStage[] {
  const byName = new Map<string, PlannedStage>();
  const add = (x: unknown) => {
    const s = typeof x === "string" ? { name: x } : obj(x);
    const name = str(s.name) ?? str(s.stage);
    if (!name) return;
    const prev = byName.get(name);
    const deps = depsOf(s);
    byName.set(name, {
      name,
      kind: str(s.kind) ?? prev?.kind ?? null,
      deps: deps ?? prev?.deps ?? null,
      reasons: strings(s.reasons).length ? strings(s.reasons) : prev?.reasons ?? [],
    });
  };
  if (Array.isArray(e.stages)) e.stages.forEach(add);
  else for (const [name, s] of Object.entries(obj(e.stages))) add({ name, ...obj(s) });
  if (Array.isArray(e.plan)) e.plan.forEach(add);
  return [...byName.values()];
}

/**
 * Normalises one parsed line of `events.jsonl`. Returns null for event types the report does not use (`progress`,
 * `checkpoint`, anything new) and for lines that lack what their type needs (a stage event without a stage).
 */
export function adaptEvent(raw: unknown): ReportEvent | null {
  const e = obj(raw);
  const type = str(e.type) ?? str(e.event);
  const time = str(e.t) ?? str(e.time) ?? str(e.timestamp) ?? "";
  const stage = str(e.stage);
  const kind = str(e.kind);
  const key = str(e.key);
  const device = str(e.device);
  switch (type) {
    case "run_start": {
      const settings = obj(e.settings);
      return {
        type,
        time,
        run_id: str(e.run_id),
        recipe: str(e.recipe_name) ?? str(obj(e.recipe).name) ?? str(e.recipe) ?? str(e.name),
        recipe_path: str(e.recipe_path) ?? (str(e.recipe_name) ? str(e.recipe) : null),
        description: str(e.description) ?? str(obj(e.recipe).description),
        settings,
        device: device ?? str(settings.device),
        stages: plannedStages(e),
      };
    }
    case "stage_start":
      if (!stage) return null;
      return { type, time, stage, kind, key, resume_step: num(e.resume_step), device };
    case "stage_cached":
    case "stage_cache_hit":
      if (!stage) return null;
      return { type: "stage_cached", time, stage, kind, key, outputs: outputPaths(e.outputs) };
    case "stage_finish":
    case "stage_done":
    case "stage_end": {
      if (!stage) return null;
      const metrics: Record<string, MetricValue> = {};
      for (const [k, v] of Object.entries(obj(e.metrics))) {
        if (v === null || ["number", "string", "boolean"].includes(typeof v)) metrics[k] = v as MetricValue;
      }
      return {
        type: "stage_finish",
        time,
        stage,
        kind,
        key,
        wall_s: num(e.wall_s) ?? num(e.seconds),
        metrics,
        outputs: outputPaths(e.outputs),
        device,
      };
    }
    case "stage_failed":
    case "stage_error":
      if (!stage) return null;
      return {
        type: "stage_failed",
        time,
        stage,
        kind,
        wall_s: num(e.wall_s),
        error: str(e.error) ?? str(e.message) ?? "failed (no message in the log)",
        user_error: e.user_error === true,
        interrupted: e.interrupted === true,
        checkpoint_step: num(e.checkpoint_step),
      };
    case "stage_skipped":
      if (!stage) return null;
      return { type, time, stage, reason: str(e.reason) };
    case "metric":
    case "metrics": {
      const step = num(e.step);
      if (!stage || step === null) return null;
      const source = e.values !== undefined ? obj(e.values) : e.metrics !== undefined ? obj(e.metrics) : e;
      const values: Record<string, number | null> = {};
      for (const [k, v] of Object.entries(source)) {
        if (source === e && METRIC_ENVELOPE.has(k)) continue;
        if (typeof v === "number") values[k] = Number.isFinite(v) ? v : null;
        else if (v === null) values[k] = null;
      }
      return { type: "metric", time, stage, step, values };
    }
    case "log": {
      const level = e.level === "warn" || e.level === "warning"
        ? "warn"
        : e.level === "error"
        ? "error"
        : "info";
      return { type, time, stage, level, message: str(e.message) ?? str(e.msg) ?? "" };
    }
    case "run_finish":
    case "run_end": {
      const s = e.status;
      const status = s === "ok" || s === "success" ? "ok" : s === "interrupted" ? "interrupted" : "failed";
      return { type: "run_finish", time, status, wall_s: num(e.wall_s) };
    }
    default:
      return null;
  }
}
