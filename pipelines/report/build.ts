/**
 * Builds a {@linkcode RunReportData} from what a run leaves on disk: `<runDir>/events.jsonl` and the result files
 * its stages list as outputs. Curves of stages that were cached or resumed in this run are completed from the
 * logs of earlier runs in the same runs directory (matched by stage key), so a fully cached re-run still shows
 * every loss curve.
 *
 * @module
 */
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { UserError } from "../../util/errors.ts";
import { adaptEvent, type ReportEvent } from "./adapter.ts";
import type {
  EvalRow,
  EvalScores,
  ReportLogEntry,
  ReportStage,
  RunReportData,
  SpecReport,
  TrainingCurves,
} from "./model.ts";
import { detectResultKind, parseEvalResults, parseSpecBenchResults } from "./results.ts";

/** Options of {@linkcode buildRunReportData}. */
export interface BuildOptions {
  /** Stage dependencies, when the log does not record them (stage -> upstream stage names). */
  deps?: Record<string, string[]>;
  /** Device description to show when the log does not name one. */
  device?: string;
  /** How many earlier runs to search for the curves of cached or resumed stages (default 200; 0 turns it off). */
  historyRuns?: number;
}

/** Result files larger than this are not opened (they are not results, and reading them would be slow). */
const MAX_RESULT_FILE_BYTES = 16 << 20;

/** Reads and normalises a run's `events.jsonl`; malformed lines are counted in `problems`. */
export async function readRunEvents(
  runDir: string,
  problems: string[] = [],
): Promise<ReportEvent[]> {
  const path = join(runDir, "events.jsonl");
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new UserError(`${runDir}: not a run directory (no events.jsonl in it)`);
    }
    throw e;
  }
  const lines = text.split("\n");
  const events: ReportEvent[] = [];
  let bad = 0;
  lines.forEach((line, i) => {
    if (!line.trim()) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      // A killed writer can leave a partial last line; anything else is worth a note.
      if (i < lines.length - 1 || line.trim().startsWith("{") === false) bad++;
      return;
    }
    const ev = adaptEvent(parsed);
    if (ev) events.push(ev);
  });
  if (bad > 0) problems.push(`${path}: ${bad} line(s) are not JSON and were ignored`);
  return events;
}

function secondsBetween(a: string, b: string): number | null {
  const ta = Date.parse(a), tb = Date.parse(b);
  return Number.isFinite(ta) && Number.isFinite(tb) ? Math.max(0, (tb - ta) / 1000) : null;
}

function newStage(name: string): ReportStage {
  return {
    name,
    kind: null,
    deps: [],
    status: "pending",
    wall_s: null,
    cached_wall_s: null,
    resumed_from_step: null,
    started: null,
    key: null,
    metrics: {},
    outputs: {},
    reasons: [],
    error: null,
    user_error: false,
    checkpoint_step: null,
  };
}

/** Step -> values of one stage, merged across runs. */
type Points = Map<number, Record<string, number | null>>;

/**
 * Adds the `metric` events of `stage` to `points`. Steps already present are kept (a later run's values win over
 * an earlier run's); steps above `upTo` are left out (an earlier run's steps after the checkpoint a later run
 * resumed from were recomputed). Returns whether any point was added.
 */
function addPoints(points: Points, events: ReportEvent[], stage: string, upTo = Infinity): boolean {
  const mine: Points = new Map();
  for (const e of events) {
    if (e.type !== "metric" || e.stage !== stage || e.step > upTo) continue;
    mine.set(e.step, { ...mine.get(e.step), ...e.values });
  }
  let any = false;
  for (const [step, values] of mine) {
    if (points.has(step)) continue;
    points.set(step, values);
    any = true;
  }
  return any;
}

function curvesOf(stage: string, kind: string | null, points: Points, runs: string[]): TrainingCurves {
  const steps = [...points.keys()].sort((a, b) => a - b);
  const names: string[] = [];
  for (const s of steps) for (const k of Object.keys(points.get(s)!)) if (!names.includes(k)) names.push(k);
  const series: TrainingCurves["series"] = {};
  for (const name of names) {
    const xs: number[] = [], ys: (number | null)[] = [];
    for (const s of steps) {
      const v = points.get(s)![name];
      if (v === undefined) continue;
      xs.push(s);
      ys.push(v);
    }
    if (ys.some((v) => v !== null)) series[name] = { steps: xs, values: ys };
  }
  return { stage, kind, series, from_runs: runs };
}

/** Lazily reads the logs of the other runs in the same runs directory, newest first. */
class RunHistory {
  #runs: { id: string; events: Promise<ReportEvent[]> }[] | null = null;
  constructor(private readonly runDir: string, private readonly limit: number) {}

  async *older(): AsyncGenerator<{ id: string; events: ReportEvent[] }> {
    if (this.#runs === null) {
      const self = basename(this.runDir);
      const names: string[] = [];
      try {
        for await (const d of Deno.readDir(dirname(this.runDir))) {
          if (d.isDirectory && d.name !== self && d.name < self) names.push(d.name);
        }
      } catch {
        // no runs directory around this run (a copied run directory): no history
      }
      names.sort().reverse();
      this.#runs = names.slice(0, this.limit).map((id) => ({
        id,
        events: readRunEvents(join(dirname(this.runDir), id)).catch(() => []),
      }));
    }
    for (const r of this.#runs) yield { id: r.id, events: await r.events };
  }
}

/**
 * Completes a stage's points from earlier runs: the run that computed a cached stage, and the runs whose
 * checkpoints a resumed stage continued from (steps up to its `resume_step` come from the earlier run).
 */
async function fillFromHistory(
  st: ReportStage,
  points: Points,
  runs: string[],
  history: RunHistory,
): Promise<void> {
  if (!st.key) return;
  let upTo = st.status === "cached" ? Infinity : st.resumed_from_step ?? 0;
  let needFinish = st.status === "cached";
  if (!needFinish && !(upTo > 0)) return;
  for await (const run of history.older()) {
    let start: Extract<ReportEvent, { type: "stage_start" }> | undefined;
    let finish: Extract<ReportEvent, { type: "stage_finish" }> | undefined;
    for (const e of run.events) {
      if (e.type === "stage_start" && e.key === st.key) start = e;
      if (e.type === "stage_finish" && e.key === st.key) finish ??= e;
    }
    if (needFinish) {
      if (!finish) continue;
      st.cached_wall_s = finish.wall_s;
      st.kind ??= finish.kind;
      needFinish = false;
    } else if (!start) continue;
    // The stage may have had another name in that run's recipe: its metric events carry that name.
    const name = start?.stage ?? finish!.stage;
    if (addPoints(points, run.events, name, upTo)) runs.unshift(run.id);
    upTo = start?.resume_step ?? 0;
    if (!(upTo > 0)) return;
  }
}

/** Output files (and top-level JSON files of output directories) that may be result files. */
async function candidateFiles(path: string): Promise<string[]> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch {
    return [];
  }
  if (info.isFile) return info.size <= MAX_RESULT_FILE_BYTES ? [path] : [];
  if (!info.isDirectory) return [];
  const files: string[] = [];
  for await (const d of Deno.readDir(path)) {
    if (d.isFile && d.name.endsWith(".json")) files.push(join(path, d.name));
  }
  files.sort();
  const out: string[] = [];
  for (const f of files) if ((await Deno.stat(f)).size <= MAX_RESULT_FILE_BYTES) out.push(f);
  return out;
}

async function readJsonObject(path: string): Promise<unknown> {
  const bytes = await Deno.readFile(path);
  let i = 0;
  while (
    i < bytes.length && (bytes[i] === 0x20 || bytes[i] === 0x0a || bytes[i] === 0x0d || bytes[i] === 0x09)
  ) i++;
  if (bytes[i] !== 0x7b) return undefined; // not a JSON object: not a result file
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return undefined;
  }
}

function scoresOf(raw: Record<string, unknown>, n: number | null): EvalScores {
  const s: EvalScores = {};
  for (const [key, v] of Object.entries(raw)) {
    const [metric, filter] = key.split(",", 2);
    if (filter === undefined) continue; // alias and other non-metric fields
    const name = filter === "none" ? metric : key;
    if (typeof v === "number") s[name] = Number.isFinite(v) ? v : null;
    else if (v === null || v === "N/A") s[name] = null;
  }
  if (s.token_perplexity === undefined && s.perplexity !== undefined) s.token_perplexity = s.perplexity;
  if (n !== null) s.n = n;
  return s;
}

function evalRow(stage: string, file: string, value: unknown): EvalRow {
  const r = parseEvalResults(value, file);
  const c = r.config;
  const tasks: Record<string, EvalScores> = {};
  for (const [task, scores] of Object.entries(r.results)) {
    const n = r["n-samples"][task]?.effective ?? null;
    tasks[task] = scoresOf(scores as Record<string, unknown>, n);
  }
  return {
    stage,
    model_name: c.model_name,
    model: c.model,
    role: c.role ?? (c.attention_fraction === 1 ? "teacher" : "student"),
    attention_fraction: c.attention_fraction,
    tasks,
    max_length: typeof c.max_length === "number" ? c.max_length : null,
    file,
    generations: r.generations ?? [],
    raw: r,
  };
}

/**
 * Reads a run directory into a {@linkcode RunReportData}. Throws a {@linkcode UserError} when `runDir` has no
 * `events.jsonl`; anything else that cannot be read (a malformed result file, a bad log line) is listed in
 * `problems` and the rest of the report is still built.
 */
export async function buildRunReportData(runDir: string, options: BuildOptions = {}): Promise<RunReportData> {
  runDir = resolve(runDir);
  const problems: string[] = [];
  const events = await readRunEvents(runDir, problems);
  const stages = new Map<string, ReportStage>();
  const stage = (name: string) => {
    let s = stages.get(name);
    if (!s) stages.set(name, s = newStage(name));
    return s;
  };
  const starts = new Map<string, string>();
  const points = new Map<string, Points>();
  const logs: ReportLogEntry[] = [];
  const devices = new Set<string>();
  let runStart: Extract<ReportEvent, { type: "run_start" }> | null = null;
  let runFinish: Extract<ReportEvent, { type: "run_finish" }> | null = null;
  let hasDeps = false;

  for (const e of events) {
    if ("device" in e && e.device) devices.add(e.device);
    switch (e.type) {
      case "run_start":
        runStart = e;
        for (const p of e.stages) {
          const s = stage(p.name);
          s.kind = p.kind ?? s.kind;
          if (p.deps) {
            s.deps = p.deps;
            hasDeps = true;
          }
          s.reasons = p.reasons;
        }
        break;
      case "stage_start": {
        const s = stage(e.stage);
        s.kind = e.kind ?? s.kind;
        s.key = e.key ?? s.key;
        s.status = "interrupted"; // until the log says how it ended
        s.started = e.time || null;
        s.resumed_from_step = e.resume_step !== null && e.resume_step > 0 ? e.resume_step : null;
        starts.set(e.stage, e.time);
        break;
      }
      case "stage_cached": {
        const s = stage(e.stage);
        Object.assign(s, {
          status: "cached",
          kind: e.kind ?? s.kind,
          key: e.key ?? s.key,
          outputs: e.outputs,
        });
        s.started = e.time || null;
        break;
      }
      case "stage_finish": {
        const s = stage(e.stage);
        s.status = "ran";
        s.kind = e.kind ?? s.kind;
        s.key = e.key ?? s.key;
        s.wall_s = e.wall_s ?? secondsBetween(starts.get(e.stage) ?? "", e.time);
        s.metrics = e.metrics;
        s.outputs = e.outputs;
        break;
      }
      case "stage_failed": {
        const s = stage(e.stage);
        s.status = e.interrupted ? "interrupted" : "failed";
        s.kind = e.kind ?? s.kind;
        s.wall_s = e.wall_s ?? secondsBetween(starts.get(e.stage) ?? "", e.time);
        s.error = e.error;
        s.user_error = e.user_error;
        s.checkpoint_step = e.checkpoint_step;
        break;
      }
      case "stage_skipped": {
        const s = stage(e.stage);
        s.status = "skipped";
        if (e.reason) s.reasons = [e.reason];
        break;
      }
      case "metric": {
        stage(e.stage);
        let p = points.get(e.stage);
        if (!p) points.set(e.stage, p = new Map());
        p.set(e.step, { ...p.get(e.step), ...e.values });
        break;
      }
      case "log":
        if (e.level !== "info") {
          logs.push({ time: e.time, stage: e.stage, level: e.level, message: e.message });
        }
        break;
      case "run_finish":
        runFinish = e;
        break;
    }
  }
  if (options.deps) {
    for (const [name, deps] of Object.entries(options.deps)) {
      if (stages.has(name)) {
        stage(name).deps = deps;
        hasDeps = true;
      }
    }
  }
  for (const s of stages.values()) s.deps = s.deps.filter((d) => stages.has(d) && d !== s.name);
  if (options.device) devices.add(options.device);

  // Training curves, completed from earlier runs for cached and resumed stages.
  const history = new RunHistory(runDir, options.historyRuns ?? 200);
  const training: TrainingCurves[] = [];
  const runId = runStart?.run_id ?? basename(runDir);
  for (const s of stages.values()) {
    const p: Points = points.get(s.name) ?? new Map();
    const runs = p.size > 0 ? [runId] : [];
    if (options.historyRuns !== 0) await fillFromHistory(s, p, runs, history);
    if (p.size > 0) {
      const c = curvesOf(s.name, s.kind, p, runs);
      if (Object.keys(c.series).length > 0) training.push(c);
    }
  }

  // Result files among the outputs of stages that ran or were cached.
  const evaluation: EvalRow[] = [];
  const speculative: SpecReport[] = [];
  for (const s of stages.values()) {
    if (s.status !== "ran" && s.status !== "cached") continue;
    for (const out of Object.values(s.outputs)) {
      const path = isAbsolute(out) ? out : join(runDir, out);
      for (const file of await candidateFiles(path)) {
        const value = await readJsonObject(file).catch(() => undefined);
        const kind = detectResultKind(value);
        try {
          if (kind === "eval") evaluation.push(evalRow(s.name, file, value));
          else if (kind === "spec_bench") {
            speculative.push({ stage: s.name, file, results: parseSpecBenchResults(value, file) });
          }
        } catch (e) {
          problems.push(`stage ${s.name}: ${(e as Error).message}`);
        }
      }
    }
  }
  const order = [...stages.keys()];
  evaluation.sort((a, b) =>
    (a.role === "teacher" ? 0 : 1) - (b.role === "teacher" ? 0 : 1) ||
    b.attention_fraction - a.attention_fraction ||
    order.indexOf(a.stage) - order.indexOf(b.stage)
  );
  const evalTasks: string[] = [];
  for (const r of evaluation) {
    for (const t of Object.keys(r.tasks)) if (!evalTasks.includes(t)) evalTasks.push(t);
  }
  if (devices.size === 0) {
    // The log names no device: fall back to what the result files say.
    for (const r of evaluation) if (r.raw.config.device) devices.add(String(r.raw.config.device));
    for (const sp of speculative) if (sp.results.device) devices.add(String(sp.results.device));
  }

  const started = runStart?.time || events.find((e) => e.time)?.time || null;
  const lastTime = events.findLast((e) => e.time)?.time ?? null;
  const finished = runFinish?.time || null;
  return {
    format: 1,
    run_id: runId,
    run_dir: runDir,
    recipe: runStart?.recipe ?? "(unknown recipe)",
    recipe_path: runStart?.recipe_path ?? null,
    description: runStart?.description ?? null,
    status: runFinish?.status ?? "incomplete",
    started,
    finished,
    wall_s: runFinish?.wall_s ??
      (started && (finished ?? lastTime) ? secondsBetween(started, (finished ?? lastTime)!) : null),
    devices: [...devices],
    settings: runStart?.settings ?? {},
    has_deps: hasDeps,
    stages: [...stages.values()],
    training,
    evaluation,
    eval_tasks: evalTasks,
    speculative,
    logs,
    problems,
  };
}
