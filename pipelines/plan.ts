/**
 * Planning: for each stage, in dependency order, whether it is cached or will run, and why.
 *
 * {@linkcode evaluateStage} resolves a stage's inputs to artifacts, builds its key and looks the key up in the
 * store. It is used twice: by {@linkcode makePlan} before anything runs (an upstream stage that will run makes
 * its consumers' keys unknown, so they are planned to run "because upstream X will run") and by the runner just
 * before each stage, with the real upstream outputs (so a rerun upstream that reproduces the same bytes still
 * lets its consumers hit the cache).
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { listCheckpoints } from "./checkpoints.ts";
import { didYouMean } from "./diagnostics.ts";
import { ancestorsOf, descendantsOf } from "./dag.ts";
import { formatDuration, table } from "./format.ts";
import { shortDigest } from "./hash.ts";
import type { InputDigester } from "./inputs.ts";
import { buildKeyInputs, describeChange, diffKeyInputs, type KeyInputs, stageKey } from "./keys.ts";
import type { RecipeRecord, StageRecord } from "./lockfile.ts";
import type { Artifact, RuntimeFacts } from "./stage.ts";
import type { CacheEntry, Store, StoredOutput } from "./store.ts";
import type { Recipe, RecipeStage } from "./validate.ts";

/** Settings after flags and environment are applied. */
export interface EffectiveSettings {
  /** Recipe seed. */
  seed: number;
  /** Compute dtype. */
  dtype: "f32" | "f16";
  /** GPU provider preference. */
  gpu: "auto" | "dawn" | "builtin";
  /** Checkpoints kept per stage. */
  keepCheckpoints: number;
}

/** Resolves the runtime facts for device stages (provided by main.ts; the runner never imports runtime/). */
export type ResolveRuntimeFacts = (
  settings: { gpu: EffectiveSettings["gpu"]; dtype: EffectiveSettings["dtype"] },
) => Promise<RuntimeFacts>;

/** What planning and evaluation need. */
export interface PlanEnv {
  /** The validated recipe. */
  recipe: Recipe;
  /** The cache. */
  store: Store;
  /** Digests of local inputs. */
  digester: InputDigester;
  /** Effective settings. */
  settings: EffectiveSettings;
  /** Runtime facts, fetched at most once and only if a device stage needs them. */
  runtimeFacts: () => Promise<RuntimeFacts>;
  /** Re-hash every stored file instead of trusting stat stamps. */
  verify: boolean;
}

/** A stage's evaluation against the store. */
export interface Evaluation {
  /** The stage. */
  stage: RecipeStage;
  /** Upstream stages whose outputs are not known yet (they will run first). Empty when the key is known. */
  unknownUpstream: string[];
  /** Resolved inputs by port (always arrays), when known. */
  artifacts: Record<string, Artifact[]> | null;
  /** Key inputs, when known. */
  keyInputs: KeyInputs | null;
  /** The key, when known. */
  key: string | null;
  /** A valid cache entry for the key, or null. */
  entry: CacheEntry | null;
  /** Why an existing entry cannot be used (missing objects, corruption), or null. */
  entryProblem: string | null;
  /** True when the entry's objects are damaged (as opposed to missing): the runner deletes the entry. */
  entryCorrupt: boolean;
  /** Runtime facts in the key (device stages). */
  runtimeFacts: RuntimeFacts | null;
}

/** Outputs of stages evaluated so far: null when the stage will run (its outputs are not known yet). */
export type KnownOutputs = Map<string, Record<string, StoredOutput> | null>;

/** Resolves inputs, computes the key and checks the cache for one stage. */
export async function evaluateStage(
  env: PlanEnv,
  stage: RecipeStage,
  upstream: KnownOutputs,
): Promise<Evaluation> {
  const unknown = new Set<string>();
  const artifacts: Record<string, Artifact[]> = {};
  const digests: Record<string, string | string[]> = {};
  for (const [port, refs] of Object.entries(stage.inputs)) {
    const list: Artifact[] = [];
    for (const ref of refs) {
      if (ref.kind === "stage") {
        const outs = upstream.get(ref.stage);
        if (!outs) {
          unknown.add(ref.stage);
          continue;
        }
        const o = outs[ref.port];
        list.push({
          ref: ref.text,
          kind: "stage",
          path: env.store.objectPath(o.digest),
          digest: o.digest,
          type: o.type,
          from: { stage: ref.stage, port: ref.port },
        });
      } else if (ref.kind === "hub") {
        list.push({ ref: ref.text, kind: "hub", digest: ref.canonical, hub: ref.hub });
      } else {
        let d;
        try {
          d = await env.digester.digest(ref.path);
        } catch (e) {
          if (e instanceof Deno.errors.NotFound) {
            throw new UserError(
              `stage ${stage.name}: input ${port} (${ref.text}) disappeared: ${ref.path} not found`,
            );
          }
          throw e;
        }
        list.push({ ref: ref.text, kind: "file", path: ref.path, digest: d.digest, type: d.type });
      }
    }
    artifacts[port] = list;
    digests[port] = stage.kind.inputs[port]?.list ? list.map((a) => a.digest) : list[0]?.digest;
  }
  const base: Evaluation = {
    stage,
    unknownUpstream: [...unknown],
    artifacts: null,
    keyInputs: null,
    key: null,
    entry: null,
    entryProblem: null,
    entryCorrupt: false,
    runtimeFacts: null,
  };
  if (unknown.size > 0) return base;
  const runtimeFacts = stage.kind.usesDevice ? await env.runtimeFacts() : null;
  const keyInputs = buildKeyInputs({
    kind: stage.kind,
    params: stage.params,
    inputs: digests,
    runtimeFacts,
    seed: env.settings.seed,
  });
  const key = stageKey(keyInputs);
  const ev: Evaluation = { ...base, artifacts, keyInputs, key, runtimeFacts };
  const entry = env.store.readEntry(key);
  if (!entry) return ev;
  for (const [port, out] of Object.entries(entry.outputs)) {
    const check = await env.store.checkObject(out.digest, out.type, env.verify);
    if (!check.ok) {
      ev.entryProblem = check.missing
        ? `cache entry found but output ${port} is missing from the cache`
        : `cache entry is corrupt: ${check.reason}`;
      ev.entryCorrupt = !check.missing;
      return ev;
    }
  }
  if (Object.keys(stage.kind.outputs).some((p) => !(p in entry.outputs))) {
    ev.entryProblem = "cache entry lacks an output the stage kind declares";
    return ev;
  }
  ev.entry = entry;
  return ev;
}

/** What the user asked to run. */
export interface Selection {
  /** Positional stage names: run these and whatever they need. Empty = every stage. */
  targets: string[];
  /** `--only`: consider only these stages (their inputs must already be cached). */
  only: string[];
  /** `--from`: these stages and everything downstream, forced. */
  from: string[];
  /** `--force`: recompute these stages even if cached. */
  force: string[];
  /** `--force-all`: recompute every selected stage. */
  forceAll: boolean;
}

/** An empty selection: every stage, nothing forced. */
export const ALL_STAGES: Selection = { targets: [], only: [], from: [], force: [], forceAll: false };

/** The resolved selection. */
export interface ResolvedSelection {
  /** Stages that may run. */
  selected: Set<string>;
  /** Forced stages and why. */
  forced: Map<string, string>;
}

/**
 * Resolves stage names given on the command line against the recipe.
 *
 * @throws {UserError} for unknown stage names (with "did you mean") or contradictory flags
 */
export function resolveSelection(recipe: Recipe, sel: Selection): ResolvedSelection {
  const names = [...recipe.stages.keys()];
  const check = (list: string[], flag: string) => {
    for (const n of list) {
      if (!recipe.stages.has(n)) {
        throw new UserError(
          `${flag} ${n}: recipe ${recipe.name} has no stage "${n}" (${didYouMean(n, names, "a stage:")})`,
        );
      }
    }
  };
  check(sel.targets, "stage");
  check(sel.only, "--only");
  check(sel.from, "--from");
  check(sel.force, "--force");
  if (sel.only.length > 0 && sel.from.length > 0) throw new UserError("--only and --from cannot be combined");
  let selected: Set<string>;
  const forced = new Map<string, string>();
  if (sel.only.length > 0) {
    selected = new Set(sel.only);
  } else if (sel.from.length > 0) {
    selected = new Set<string>();
    for (const f of sel.from) {
      selected.add(f);
      forced.set(f, `forced (--from ${f})`);
      for (const d of descendantsOf(f, recipe.dag)) {
        selected.add(d);
        if (!forced.has(d)) forced.set(d, `forced (downstream of --from ${f})`);
      }
    }
  } else {
    selected = new Set(names);
  }
  if (sel.targets.length > 0) {
    const wanted = new Set<string>();
    for (const t of sel.targets) {
      wanted.add(t);
      for (const a of ancestorsOf(t, recipe.dag)) wanted.add(a);
    }
    selected = new Set([...selected].filter((s) => wanted.has(s)));
  }
  for (const f of sel.force) {
    if (!selected.has(f)) {
      throw new UserError(`--force ${f}: stage ${f} is not selected by the other options`);
    }
    forced.set(f, "forced (--force)");
  }
  if (sel.forceAll) { for (const s of selected) if (!forced.has(s)) forced.set(s, "forced (--force-all)"); }
  for (const s of [...forced.keys()]) if (!selected.has(s)) forced.delete(s);
  return { selected, forced };
}

/** One stage of a plan. */
export interface PlannedStage {
  /** Stage name. */
  name: string;
  /** Stage kind name. */
  kind: string;
  /** `cached` (outputs reused), `run`, or `skip` (not selected and not needed). */
  action: "cached" | "run" | "skip";
  /** Why, in words (first reason first). */
  reasons: string[];
  /** The evaluation (null for skipped stages). */
  evaluation: Evaluation | null;
  /** The checkpoint step it would resume from, if any. */
  resumeStep: number | null;
}

/** Reasons a stage with this evaluation will run. */
export function reasonsToRun(
  ev: Evaluation,
  record: StageRecord | undefined,
  forced: string | undefined,
  env: PlanEnv,
) {
  const reasons: string[] = [];
  const refs: Record<string, string | string[]> = {};
  for (const [p, list] of Object.entries(ev.stage.inputs)) {
    refs[p] = ev.stage.kind.inputs[p]?.list ? list.map((r) => r.text) : list[0]?.text;
  }
  if (forced) reasons.push(forced);
  if (ev.unknownUpstream.length > 0) {
    reasons.push(`upstream ${ev.unknownUpstream.join(", ")} will run first`);
    return reasons;
  }
  if (ev.entryProblem) reasons.push(ev.entryProblem);
  else if (!forced || ev.entry === null) {
    if (!record) reasons.push("new: never run, no record in distillery.lock");
    else if (record.key === ev.key) {
      if (record.status === "failed") {
        reasons.push(`previous attempt failed: ${firstLine(record.error ?? "")}`);
      } else if (!ev.entry) {
        reasons.push("no cache entry for this key (removed by gc, or a different cache directory)");
      }
    } else {
      const changes = diffKeyInputs(record.key_inputs ?? {}, ev.keyInputs ?? {});
      if (changes.length === 0) reasons.push("key changed");
      for (const c of changes) reasons.push(describeChange(c, refs));
    }
  }
  if (ev.key) {
    const cps = listCheckpoints(env.store.checkpointDir(ev.key));
    if (cps.length > 0) reasons.push(`will resume from checkpoint at step ${cps[cps.length - 1].step}`);
  }
  return reasons;
}

function firstLine(s: string): string {
  const l = s.split("\n")[0];
  return l.length > 100 ? l.slice(0, 97) + "..." : l;
}

/** Why a cached stage is cached, in words. */
export function reasonsCached(ev: Evaluation, record: StageRecord | undefined): string[] {
  const e = ev.entry!;
  const r = [
    `cached (key ${shortDigest(ev.key!)}, computed ${e.created.slice(0, 19).replace("T", " ")} in ${
      formatDuration(e.wallSeconds)
    })`,
  ];
  if (record && record.key !== ev.key) r.push("distillery.lock records a different key and will be updated");
  return r;
}

/**
 * Plans a run: evaluates every stage in dependency order, assuming stages that will run produce unknown outputs.
 *
 * @throws {UserError} when a stage outside the selection is needed but not cached
 */
export async function makePlan(
  env: PlanEnv,
  selection: ResolvedSelection,
  record: RecipeRecord | undefined,
): Promise<PlannedStage[]> {
  const known: KnownOutputs = new Map();
  const plan: PlannedStage[] = [];
  const needed = new Set<string>();
  for (const s of selection.selected) {
    needed.add(s);
    for (const a of ancestorsOf(s, env.recipe.dag)) needed.add(a);
  }
  const blocked: string[] = [];
  for (const name of env.recipe.order) {
    const stage = env.recipe.stages.get(name)!;
    if (!needed.has(name)) {
      plan.push({
        name,
        kind: stage.kind.kind,
        action: "skip",
        reasons: ["not selected"],
        evaluation: null,
        resumeStep: null,
      });
      continue;
    }
    const ev = await evaluateStage(env, stage, known);
    const forced = selection.forced.get(name);
    const rec = record?.stages[name];
    const resume = ev.key ? listCheckpoints(env.store.checkpointDir(ev.key)).at(-1)?.step ?? null : null;
    if (ev.entry && !forced) {
      known.set(name, ev.entry.outputs);
      plan.push({
        name,
        kind: stage.kind.kind,
        action: "cached",
        reasons: reasonsCached(ev, rec),
        evaluation: ev,
        resumeStep: null,
      });
      continue;
    }
    known.set(name, null);
    if (!selection.selected.has(name)) {
      blocked.push(name);
      plan.push({
        name,
        kind: stage.kind.kind,
        action: "skip",
        reasons: ["needed but not selected"],
        evaluation: ev,
        resumeStep: null,
      });
      continue;
    }
    plan.push({
      name,
      kind: stage.kind.kind,
      action: "run",
      reasons: reasonsToRun(ev, rec, forced, env),
      evaluation: ev,
      resumeStep: resume,
    });
  }
  if (blocked.length > 0) {
    const users = [...selection.selected].filter((s) =>
      blocked.some((b) => ancestorsOf(s, env.recipe.dag).has(b))
    );
    throw new UserError(
      `stage${blocked.length > 1 ? "s" : ""} ${blocked.join(", ")} must run first: ${users.join(", ")} need${
        users.length === 1 ? "s" : ""
      } ${
        blocked.length > 1 ? "their" : "its"
      } outputs, which are not cached. Run without --only, or use --from ${blocked[0]}`,
    );
  }
  return plan;
}

/** Renders a plan as a table plus a one-line summary. */
export function formatPlan(plan: PlannedStage[]): string {
  const rows: string[][] = [];
  for (const p of plan) {
    const status = p.action === "run" ? "will run" : p.action === "cached" ? "cached" : "skipped";
    const [first, ...rest] = p.reasons;
    rows.push([p.name, p.kind, status, first ?? ""]);
    for (const r of rest) rows.push(["", "", "", r]);
  }
  const n = (a: string) => plan.filter((p) => p.action === a).length;
  const summary = `${n("run")} to run, ${n("cached")} cached${n("skip") ? `, ${n("skip")} skipped` : ""}`;
  return table(["stage", "kind", "status", "why"], rows) + "\n" + summary + "\n";
}

/** JSON form of a plan (for `plan --json`): name, kind, action, reasons, key. */
export function planToJson(plan: PlannedStage[]): unknown {
  return plan.map((p) => ({
    stage: p.name,
    kind: p.kind,
    action: p.action,
    reasons: p.reasons,
    key: p.evaluation?.key ?? null,
    resume_step: p.resumeStep,
  }));
}
