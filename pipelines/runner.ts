/**
 * The runner: executes a recipe's stages in dependency order with caching, locking, checkpoints and events.
 *
 * `runRecipe` is what `distillery run` does:
 * 1. load and validate the recipe (every problem at once), resolve settings, flags and the cache directory;
 * 2. plan: evaluate each stage against the cache and print what will run and why;
 * 3. for each stage: evaluate again with the real upstream outputs; reuse a valid cache entry, or take the
 *    stage key's lock, run the stage with a {@linkcode StageContext}, hash and move its outputs into the store,
 *    write the index entry (the commit point), update `distillery.lock`, and log events;
 * 4. print a summary, write `run.json` next to `events.jsonl`, and call the `onRunFinished` hook.
 *
 * A failing stage is recorded (event log, lock file), keeps its checkpoints, and stops the run. Stages run one at
 * a time: they share one GPU, and parallel CPU work belongs inside a stage.
 *
 * @module
 */
import { dirname, join, relative, resolve } from "node:path";
import { isUserError, UserError } from "../util/errors.ts";
import { StageCheckpoints } from "./checkpoints.ts";
import { cleanMetrics, type EventLog, type EventOutput } from "./events.ts";
import { formatBytes, formatDuration, formatValue, table } from "./format.ts";
import { shortDigest } from "./hash.ts";
import { InputDigester } from "./inputs.ts";
import { acquireLock, acquireLockOrExplain, describeHolder } from "./locks.ts";
import {
  lockFilePath,
  readLockFile,
  type RecipeRecord,
  type StageRecord,
  updateLockFile,
} from "./lockfile.ts";
import { displayPath, resolveStateDirs, type StateDirs } from "./paths.ts";
import {
  ALL_STAGES,
  type EffectiveSettings,
  evaluateStage,
  type Evaluation,
  formatPlan,
  type KnownOutputs,
  makePlan,
  type PlanEnv,
  type PlannedStage,
  reasonsToRun,
  type ResolveRuntimeFacts,
  resolveSelection,
  type Selection,
} from "./plan.ts";
import { Console, type Output, StageProgress } from "./progress.ts";
import type { StageRegistry } from "./registry.ts";
import { formatProblem } from "./diagnostics.ts";
import { createRunDir, type RunRecord, type StageResult, writeRunRecord } from "./runs.ts";
import type {
  Artifact,
  InputPorts,
  MetricValue,
  OutputPorts,
  RuntimeFacts,
  StageContext,
  StageSettings,
} from "./stage.ts";
import { removeTree, Store, type StoredOutput } from "./store.ts";
import { loadRecipe, type Recipe, type RecipeStage } from "./validate.ts";

/** Options shared by `run`, `plan` and `explain`. */
export interface SessionOptions {
  /** Recipe file. */
  recipePath: string;
  /** Stage kinds. */
  registry: StageRegistry;
  /** `--set path=value` overrides. */
  overrides?: string[];
  /** `--cache-dir`. */
  cacheDir?: string;
  /** `--gpu` (falls back to `DISTILLERY_GPU`, then the recipe). */
  gpu?: "auto" | "dawn" | "builtin";
  /** `--verify`: re-hash stored outputs instead of trusting stat stamps. */
  verify?: boolean;
  /** Supplies the runtime facts of device stages. */
  resolveRuntimeFacts: ResolveRuntimeFacts;
}

/** An opened recipe with its cache, ready to plan or run. */
export interface Session {
  /** The validated recipe. */
  recipe: Recipe;
  /** State directories. */
  dirs: StateDirs;
  /** The cache. */
  store: Store;
  /** Planning environment. */
  env: PlanEnv;
  /** `distillery.lock` beside the recipe. */
  lockPath: string;
  /** The recipe's record in the lock file, if any. */
  record: RecipeRecord | undefined;
}

const GPU_CHOICES = ["auto", "dawn", "builtin"] as const;

/** Loads the recipe and opens its cache (creating the cache layout). */
export async function openSession(opts: SessionOptions): Promise<Session> {
  const recipe = loadRecipe(opts.recipePath, opts.registry, opts.overrides ?? []);
  const dirs = resolveStateDirs(recipe.path, {
    flag: opts.cacheDir,
    recipeSetting: recipe.settings.cache_dir,
    recipeSettingBase: recipe.cacheDirBase,
  });
  const store = new Store(dirs.cache);
  try {
    await store.init();
  } catch (e) {
    throw new UserError(
      `cannot use cache directory ${dirs.cache} (from ${dirs.cacheSource}): ${(e as Error).message}`,
    );
  }
  const envGpu = Deno.env.get("DISTILLERY_GPU");
  if (envGpu !== undefined && !(GPU_CHOICES as readonly string[]).includes(envGpu)) {
    throw new UserError(`DISTILLERY_GPU=${envGpu}: expected one of ${GPU_CHOICES.join(", ")}`);
  }
  const settings: EffectiveSettings = {
    seed: recipe.settings.seed,
    dtype: recipe.settings.dtype,
    gpu: opts.gpu ?? (envGpu as EffectiveSettings["gpu"] | undefined) ?? recipe.settings.gpu,
    keepCheckpoints: recipe.settings.keep_checkpoints,
  };
  let facts: Promise<RuntimeFacts> | null = null;
  const env: PlanEnv = {
    recipe,
    store,
    digester: new InputDigester(join(dirs.cache, "stats.json")),
    settings,
    runtimeFacts: () => (facts ??= opts.resolveRuntimeFacts({ gpu: settings.gpu, dtype: settings.dtype })),
    verify: opts.verify ?? false,
  };
  const lockPath = lockFilePath(join(recipe.path, ".."));
  const record = readLockFile(lockPath).recipes[recipe.name];
  return { recipe, dirs, store, env, lockPath, record };
}

/** Options of {@linkcode runRecipe}. */
export interface RunOptions extends SessionOptions {
  /** Which stages to run and force. */
  selection?: Selection;
  /** Wait for locks held by other runs (default) or fail at once (`--no-wait`). */
  wait?: boolean;
  /** Where to print. */
  output: Output;
  /** The command line, recorded in the event log. */
  argv?: string[];
  /** Aborts the run (Ctrl-C). */
  signal?: AbortSignal;
  /** Called after the run record is written: the report writer's hook. Errors are printed as warnings. */
  onRunFinished?: (runDir: string, record: RunRecord) => Promise<void> | void;
}

/** The outcome of {@linkcode runRecipe}. */
export interface RunOutcome {
  /** The run record (also in `<runDir>/run.json`). */
  record: RunRecord;
  /** The process exit code: 0 ok, 2 user error in a stage, 1 internal error, 130 interrupted. */
  exitCode: number;
}

/** A stage failed (already recorded and printed); carries its result and the exit code for the CLI. */
class StageFailed extends Error {
  constructor(readonly stage: string, readonly exitCode: number, readonly result: StageResult) {
    super(result.error ?? "failed");
  }
}

/** Plans a recipe without running anything (`distillery plan`). */
export async function planRecipe(
  opts: SessionOptions & { selection?: Selection },
): Promise<{ session: Session; plan: PlannedStage[] }> {
  const session = await openSession(opts);
  const sel = resolveSelection(session.recipe, opts.selection ?? ALL_STAGES);
  const plan = await makePlan(session.env, sel, session.record);
  await session.env.digester.save();
  return { session, plan };
}

/** Runs a recipe (`distillery run`). Validation and flag problems throw a `UserError`; stage failures do not. */
export async function runRecipe(opts: RunOptions): Promise<RunOutcome> {
  const session = await openSession(opts);
  const { recipe, store, env, dirs } = session;
  const con = new Console(opts.output);
  const wait = opts.wait ?? true;
  const signal = opts.signal ?? new AbortController().signal;

  const storeLock = await acquireLock(store.storeLockPath(), {
    exclusive: false,
    wait,
    purpose: `run of ${recipe.name}`,
    signal,
    onWait: () => con.line(`waiting: the cache ${displayPath(store.root)} is being garbage-collected`),
  });
  if (!storeLock) {
    throw new UserError(
      `the cache ${displayPath(store.root)} is being garbage-collected; try again without --no-wait`,
    );
  }
  try {
    const selection = resolveSelection(recipe, opts.selection ?? ALL_STAGES);
    const plan = await makePlan(env, selection, session.record);
    for (const w of recipe.warnings) con.line(`warning: ${formatProblem(w)}`);
    const recipeFile = relative(join(session.lockPath, ".."), recipe.path).split("\\").join("/");
    if (session.record && session.record.recipe !== recipeFile) {
      con.line(
        `warning: ${displayPath(session.lockPath)} holds a record of recipe "${recipe.name}" from ` +
          `${session.record.recipe}; two recipes in one directory share a name, and their records overwrite each other`,
      );
    }

    const { runId, runDir, events } = createRunDir(dirs.runs, recipe.name);
    const started = new Date();
    events.write({
      type: "run_start",
      schema: 1,
      run_id: runId,
      recipe: recipe.name,
      recipe_path: recipe.path,
      argv: opts.argv ?? [],
      cache_dir: store.root,
      stages: plan.filter((p) => p.action !== "skip").map((p) => p.name),
      plan: plan.map((p) => ({
        stage: p.name,
        kind: p.kind,
        action: p.action,
        reasons: p.reasons,
        deps: [...new Set(recipe.dag.find((n) => n.name === p.name)?.deps.map((d) => d.stage) ?? [])],
      })),
    });
    const toRun = plan.filter((p) => p.action === "run").length;
    const cached = plan.filter((p) => p.action === "cached").length;
    con.line(
      `recipe ${recipe.name} (${displayPath(recipe.path)}): ${toRun} to run, ${cached} cached; cache ${
        displayPath(store.root)
      }`,
    );

    const results: StageResult[] = [];
    const known: KnownOutputs = new Map();
    let failure: StageFailed | null = null;
    let fatal: unknown = null;
    const active = plan.filter((p) => p.action !== "skip");
    let index = 0;
    for (const p of plan) {
      const stage = recipe.stages.get(p.name)!;
      if (p.action === "skip") {
        results.push(skipped(stage, p.reasons[0]));
        continue;
      }
      index++;
      if (failure || fatal || signal.aborted) {
        const reason = failure
          ? `stage ${failure.stage} failed`
          : fatal
          ? "the run stopped"
          : "run interrupted";
        events.write({ type: "stage_skipped", stage: p.name, reason });
        results.push(skipped(stage, reason));
        continue;
      }
      try {
        const r = await runOneStage({
          session,
          stage,
          index,
          total: active.length,
          known,
          forced: selection.forced.get(p.name),
          selected: selection.selected.has(p.name),
          con,
          events,
          runId,
          wait,
          signal,
        });
        results.push(r);
      } catch (e) {
        if (e instanceof StageFailed) {
          failure = e;
          results.push(e.result);
          continue;
        }
        // Not a failure of the stage's own code (a lock refused with --no-wait, a bug in the runner): close the
        // run's records properly, then let the CLI report it.
        const message = String((e as Error)?.message ?? e);
        events.write({ type: "log", stage: p.name, level: "error", message });
        fatal = e;
        results.push({ ...skipped(stage, message), action: "failed", error: message });
      }
    }

    const finished = new Date();
    const status: RunRecord["status"] = signal.aborted ? "interrupted" : failure || fatal ? "failed" : "ok";
    const count = (a: StageResult["action"]) => results.filter((r) => r.action === a).length;
    events.write({
      type: "run_finish",
      status,
      wall_s: (finished.getTime() - started.getTime()) / 1000,
      ran: count("ran"),
      cached: count("cached"),
      failed: count("failed") + count("interrupted"),
      skipped: count("skipped"),
    });
    events.close();
    await env.digester.save();
    const record: RunRecord = {
      format: 1,
      run_id: runId,
      recipe: recipe.name,
      recipe_path: recipe.path,
      status,
      started: started.toISOString(),
      finished: finished.toISOString(),
      wall_s: (finished.getTime() - started.getTime()) / 1000,
      run_dir: runDir,
      cache_dir: store.root,
      lock_file: session.lockPath,
      stages: results,
    };
    writeRunRecord(runDir, record);
    if (fatal && !signal.aborted) throw fatal; // an abort while waiting for a lock is an interruption
    printSummary(con, opts.output, record);
    if (opts.onRunFinished) {
      try {
        await opts.onRunFinished(runDir, record);
      } catch (e) {
        con.line(`warning: the run-finished hook failed: ${(e as Error).message}`);
      }
    }
    const exitCode = signal.aborted ? 130 : failure ? failure.exitCode : 0;
    return { record, exitCode };
  } finally {
    storeLock.release();
  }
}

function skipped(stage: RecipeStage, reason: string | undefined): StageResult {
  return {
    stage: stage.name,
    kind: stage.kind.kind,
    action: "skipped",
    key: null,
    wall_s: 0,
    outputs: {},
    metrics: {},
    reasons: reason ? [reason] : [],
  };
}

interface StageRunArgs {
  session: Session;
  stage: RecipeStage;
  index: number;
  total: number;
  known: KnownOutputs;
  forced: string | undefined;
  selected: boolean;
  con: Console;
  events: EventLog;
  runId: string;
  wait: boolean;
  signal: AbortSignal;
}

function eventOutputs(store: Store, outs: Record<string, StoredOutput>): Record<string, EventOutput> {
  const r: Record<string, EventOutput> = {};
  for (const [p, o] of Object.entries(outs)) r[p] = { ...o, path: store.objectPath(o.digest) };
  return r;
}

function inputRefs(stage: RecipeStage): Record<string, string | string[]> {
  const r: Record<string, string | string[]> = {};
  for (const [p, list] of Object.entries(stage.inputs)) {
    r[p] = stage.kind.inputs[p]?.list ? list.map((x) => x.text) : list[0]?.text;
  }
  return r;
}

function deviceOf(facts: RuntimeFacts | null): string | null {
  if (!facts) return null;
  const p = facts.provider !== undefined ? String(facts.provider) : "device";
  return facts.adapter !== undefined ? `${p}: ${facts.adapter}` : p;
}

async function recordStage(session: Session, name: string, rec: StageRecord): Promise<void> {
  const { recipe } = session;
  const recipeFile = relative(join(session.lockPath, ".."), recipe.path).split("\\").join("/");
  await updateLockFile(session.lockPath, session.dirs.locks, recipe.name, recipeFile, (r) => {
    for (const n of Object.keys(r.stages)) if (!recipe.stages.has(n)) delete r.stages[n];
    r.stages[name] = rec;
  });
}

/** Evaluates one stage and either reuses its cache entry or computes it. */
async function runOneStage(a: StageRunArgs): Promise<StageResult> {
  const { session, stage, con, events } = a;
  const { store, env } = session;
  let ev = await evaluateStage(env, stage, a.known);
  if (ev.key === null) throw new Error(`stage ${stage.name} evaluated before its upstream stages`);

  if (ev.entry && !a.forced) return useCached(a, ev, "");
  if (!a.selected) {
    throw new UserError(
      `stage ${stage.name} is needed but its cache entry is no longer usable (${
        ev.entryProblem ?? "missing"
      })`,
    );
  }

  const prefix = `[${a.index}/${a.total}] `;
  const key = ev.key!;
  const lock = await acquireLockOrExplain(store.keyLockPath(key), {
    wait: a.wait,
    purpose: `computing stage ${stage.name} of recipe ${session.recipe.name}`,
    signal: a.signal,
    onWait: (h) =>
      con.line(
        `${prefix}${stage.name}: waiting for ${describeHolder(h)}, which is computing the same result`,
      ),
  }, `stage ${stage.name} (key ${shortDigest(key)})`);
  try {
    // Another run may have stored the result while we waited.
    ev = await evaluateStage(env, stage, a.known);
    if (ev.entry && !a.forced) return await useCached(a, ev, " (computed by another run meanwhile)");
    if (ev.entryCorrupt) {
      con.line(`${prefix}${stage.name}: ${ev.entryProblem}; recomputing`);
      events.write({
        type: "log",
        stage: stage.name,
        level: "warn",
        message: `${ev.entryProblem}; recomputing`,
      });
      await store.removeEntry(key);
    }
    return await compute(a, ev);
  } finally {
    lock.release();
  }
}

async function useCached(a: StageRunArgs, ev: Evaluation, note: string): Promise<StageResult> {
  const { session, stage, con, events } = a;
  const entry = ev.entry!;
  a.known.set(stage.name, entry.outputs);
  events.write({
    type: "stage_cached",
    stage: stage.name,
    kind: stage.kind.kind,
    key: entry.key,
    outputs: eventOutputs(session.store, entry.outputs),
  });
  con.line(`[${a.index}/${a.total}] ${stage.name}: cached${note}`);
  const rec = session.record?.stages[stage.name];
  if (!rec || rec.key !== entry.key || rec.status !== "done") {
    await recordStage(session, stage.name, {
      kind: stage.kind.kind,
      status: "done",
      key: entry.key,
      key_inputs: ev.keyInputs!,
      inputs: inputRefs(stage),
      outputs: entry.outputs,
      metrics: entry.metrics,
      wall_s: entry.wallSeconds,
      device: entry.device,
      date: entry.created,
      run_id: entry.runId,
    });
  }
  return {
    stage: stage.name,
    kind: stage.kind.kind,
    action: "cached",
    key: entry.key,
    wall_s: 0,
    outputs: eventOutputs(session.store, entry.outputs),
    metrics: entry.metrics,
    reasons: [],
  };
}

function guardedSettings(
  kindName: string,
  usesSeed: boolean,
  usesDevice: boolean,
  s: EffectiveSettings,
): StageSettings {
  const refuse = (field: string, flag: string) => {
    throw new Error(
      `stage kind ${kindName} reads ctx.settings.${field} but does not declare ${flag}: true, so the value is not ` +
        "part of its cache key (declare it in the stage kind)",
    );
  };
  return {
    get seed() {
      return usesSeed ? s.seed : refuse("seed", "usesSeed");
    },
    get dtype() {
      return usesDevice ? s.dtype : refuse("dtype", "usesDevice");
    },
    get gpu() {
      return usesDevice ? s.gpu : refuse("gpu", "usesDevice");
    },
  };
}

/** Runs the stage's code and commits its outputs. Called with the stage key's lock held. */
async function compute(a: StageRunArgs, ev: Evaluation): Promise<StageResult> {
  const { session, stage, con, events, signal } = a;
  const { store, env } = session;
  const key = ev.key!;
  const kind = stage.kind;
  const prefix = `[${a.index}/${a.total}] `;
  const previous = store.readEntry(key); // present when forced: used for the determinism check

  // Temporary directories of earlier attempts at this key belong to dead processes (we hold the key's lock).
  for await (const d of Deno.readDir(join(store.root, "tmp"))) {
    if (d.name.startsWith(key.slice(7, 23) + ".")) await removeTree(join(store.root, "tmp", d.name));
  }
  const tmp = await store.makeTempDir(key);
  const outDir = join(tmp, "out");
  const workDir = join(tmp, "work");
  await Deno.mkdir(outDir);
  await Deno.mkdir(workDir);
  const outputs: Record<string, string> = {};
  for (const [port, o] of Object.entries(kind.outputs as OutputPorts)) {
    outputs[port] = join(outDir, port);
    if (o.type === "dir") await Deno.mkdir(outputs[port]);
  }

  const checkpoints = new StageCheckpoints(store.checkpointDir(key), env.settings.keepCheckpoints, (cp) => {
    events.write({ type: "checkpoint", stage: stage.name, step: cp.step });
  });
  const resume = checkpoints.latest();
  const planReasons = reasonsFor(a, ev);
  events.write({
    type: "stage_start",
    stage: stage.name,
    kind: kind.kind,
    key,
    index: a.index,
    total: a.total,
    resume_step: resume?.step ?? null,
  });
  con.line(
    `${prefix}${stage.name} (${kind.kind}): running${
      planReasons.length ? " (" + planReasons.join("; ") + ")" : ""
    }`,
  );

  const progress = new StageProgress({
    stage: stage.name,
    prefix,
    console: con,
    onSnapshot: (p) =>
      events.write({
        type: "progress",
        stage: stage.name,
        done: p.done,
        total: p.total,
        unit: p.unit,
        rate: p.rate,
        tokens_per_s: p.tokensPerSecond,
        eta_s: p.etaSeconds,
      }),
  });
  const metrics: Record<string, MetricValue> = {};
  let warnings = 0;
  const inputs: Record<string, Artifact | Artifact[] | undefined> = {};
  for (const [port, p] of Object.entries(kind.inputs as InputPorts)) {
    const list = ev.artifacts![port] ?? [];
    inputs[port] = p.list ? list : list[0];
  }
  const ctx: StageContext = {
    stage: stage.name,
    kind: kind.kind,
    key,
    params: stage.params as StageContext["params"],
    inputs: inputs as StageContext["inputs"],
    outputs,
    checkpoints,
    progress,
    log: {
      metric: (step, record) =>
        events.write({ type: "metric", stage: stage.name, step, values: cleanMetrics(record) }),
      info: (message) => {
        con.line(`  ${stage.name}: ${message}`);
        events.write({ type: "log", stage: stage.name, level: "info", message });
      },
      warn: (message) => {
        warnings++;
        con.line(`  warning: ${stage.name}: ${message}`);
        events.write({ type: "log", stage: stage.name, level: "warn", message });
      },
    },
    settings: guardedSettings(kind.kind, !!kind.usesSeed, !!kind.usesDevice, env.settings),
    runtimeFacts: ev.runtimeFacts,
    signal,
    setMetrics: (record) => Object.assign(metrics, cleanMetrics(record)),
    workDir,
    sharedCacheDir: store.sharedDir(),
    runId: a.runId,
    recipeDir: dirname(resolve(session.recipe.path)),
  };

  const t0 = performance.now();
  let stored: Record<string, StoredOutput>;
  try {
    await kind.run(ctx);
    progress.finish();
    stored = {};
    for (const [port, o] of Object.entries(kind.outputs as OutputPorts)) {
      stored[port] = await store.commitOutput(
        outputs[port],
        o.type,
        `output "${port}" of stage ${stage.name} (kind ${kind.kind})`,
      );
    }
  } catch (e) {
    progress.finish();
    const wall = (performance.now() - t0) / 1000;
    await removeTree(tmp);
    return await failStage(a, ev, e, wall, checkpoints.latest()?.step ?? null, metrics, planReasons);
  }
  const wall = (performance.now() - t0) / 1000;
  await removeTree(tmp);

  if (previous && kind.deterministic !== false) {
    const changed = Object.keys(stored).filter((p) => previous.outputs[p]?.digest !== stored[p].digest);
    if (changed.length > 0) {
      const msg =
        `stage kind ${kind.kind} is declared deterministic, but recomputing key ${
          shortDigest(key)
        } changed ` +
        `output ${changed.join(", ")} (${
          changed.map((p) => `${shortDigest(previous.outputs[p].digest)} -> ${shortDigest(stored[p].digest)}`)
            .join(", ")
        })`;
      warnings++;
      con.line(`  warning: ${stage.name}: ${msg}`);
      events.write({ type: "log", stage: stage.name, level: "warn", message: msg });
    }
  }
  const now = new Date().toISOString();
  const device = deviceOf(ev.runtimeFacts);
  await store.writeEntry({
    format: 1,
    key,
    stage: stage.name,
    kind: kind.kind,
    kindVersion: kind.version,
    outputs: stored,
    metrics,
    keyInputs: ev.keyInputs!,
    wallSeconds: wall,
    device,
    created: now,
    runId: a.runId,
  });
  await checkpoints.clear();
  a.known.set(stage.name, stored);
  await recordStage(session, stage.name, {
    kind: kind.kind,
    status: "done",
    key,
    key_inputs: ev.keyInputs!,
    inputs: inputRefs(stage),
    outputs: stored,
    metrics,
    wall_s: round3(wall),
    device,
    date: now,
    run_id: a.runId,
  });
  events.write({
    type: "stage_finish",
    stage: stage.name,
    kind: kind.kind,
    key,
    wall_s: wall,
    outputs: eventOutputs(store, stored),
    metrics,
  });
  const m = Object.entries(metrics).slice(0, 4).map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
  con.line(
    `${prefix}${stage.name}: done in ${formatDuration(wall)}${m ? ` (${m})` : ""}${
      warnings ? `, ${warnings} warning(s)` : ""
    }`,
  );
  return {
    stage: stage.name,
    kind: kind.kind,
    action: "ran",
    key,
    wall_s: wall,
    outputs: eventOutputs(store, stored),
    metrics,
    reasons: planReasons,
  };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

function reasonsFor(a: StageRunArgs, ev: Evaluation): string[] {
  const reasons = reasonsToRun(ev, a.session.record?.stages[a.stage.name], a.forced, a.session.env);
  // Resuming is announced by the stage's own log; keep the line short.
  return reasons.filter((r) => !r.startsWith("will resume"));
}

/** Records a stage failure everywhere and throws {@linkcode StageFailed}. */
async function failStage(
  a: StageRunArgs,
  ev: Evaluation,
  e: unknown,
  wall: number,
  checkpointStep: number | null,
  metrics: Record<string, MetricValue>,
  reasons: string[],
): Promise<never> {
  const { session, stage, con, events, signal } = a;
  const interrupted = signal.aborted;
  const user = isUserError(e);
  const message = e instanceof Error ? e.message : String(e);
  events.write({
    type: "stage_failed",
    stage: stage.name,
    kind: stage.kind.kind,
    key: ev.key!,
    wall_s: wall,
    error: message,
    user_error: user,
    interrupted,
    checkpoint_step: checkpointStep,
  });
  await recordStage(session, stage.name, {
    kind: stage.kind.kind,
    status: "failed",
    key: ev.key!,
    key_inputs: ev.keyInputs!,
    inputs: inputRefs(stage),
    outputs: {},
    metrics,
    wall_s: round3(wall),
    device: deviceOf(ev.runtimeFacts),
    date: new Date().toISOString(),
    run_id: a.runId,
    error: interrupted ? "interrupted" : message,
  });
  const cp = checkpointStep !== null
    ? ` (checkpoint at step ${checkpointStep} kept: the next run resumes from it)`
    : "";
  if (interrupted) {
    con.line(`[${a.index}/${a.total}] ${stage.name}: interrupted after ${formatDuration(wall)}${cp}`);
  } else if (user) {
    con.line(`[${a.index}/${a.total}] ${stage.name} (${stage.kind.kind}) failed: ${message}${cp}`);
  } else {
    const stack = e instanceof Error && e.stack ? e.stack : message;
    con.line(
      `[${a.index}/${a.total}] ${stage.name} (${stage.kind.kind}) failed with an internal error${cp}:\n${stack}`,
    );
  }
  throw new StageFailed(stage.name, interrupted ? 130 : user ? 2 : 1, {
    stage: stage.name,
    kind: stage.kind.kind,
    action: interrupted ? "interrupted" : "failed",
    key: ev.key,
    wall_s: wall,
    outputs: {},
    metrics,
    reasons,
    error: interrupted ? "interrupted" : message,
  });
}

/** Prints the end-of-run table and where the run directory is. */
function printSummary(con: Console, out: Output, record: RunRecord): void {
  const rows = record.stages.map((s) => {
    const outs = Object.entries(s.outputs).map(([p, o]) =>
      `${p} ${shortDigest(o.digest)} (${formatBytes(o.size)})`
    );
    const result = s.action === "failed" ? "FAILED" : s.action;
    return [
      s.stage,
      s.kind,
      result,
      s.action === "ran" || s.action === "failed" ? formatDuration(s.wall_s) : "-",
      outs.join(", "),
    ];
  });
  con.clearStatus();
  const status = record.status === "ok" ? "finished" : record.status;
  out.out(
    `\nrun ${record.run_id} ${status} in ${formatDuration(record.wall_s)}\n` +
      table(["stage", "kind", "result", "time", "outputs"], rows) + "\n" +
      `run directory: ${displayPath(record.run_dir)}\n`,
  );
}

export type { RunRecord, StageResult };
export { formatPlan };
