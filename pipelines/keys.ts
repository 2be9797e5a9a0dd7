/**
 * Stage keys: what a stage's result depends on, made explicit.
 *
 * A key is `sha256` over the canonical JSON (sorted keys) of a flat map of named *key inputs*:
 *
 * | name                | value                                                                    |
 * | ------------------- | ------------------------------------------------------------------------ |
 * | `scheme`            | {@linkcode KEY_SCHEME}: bumped if this list ever changes meaning          |
 * | `kind`              | the stage kind                                                           |
 * | `kind_version`      | the kind's implementation version                                        |
 * | `params.<name>`     | each resolved parameter (defaults and `--set` overrides included), except those declared `inKey: false` |
 * | `inputs.<port>`     | the digest of each input (a list for list ports): upstream output digests, local file/directory content digests, canonical `hf://` references |
 * | `settings.seed`     | the recipe seed, only for kinds with `usesSeed`                          |
 * | `runtime.<fact>`    | provider, adapter, dtype... only for kinds with `usesDevice`             |
 *
 * Output paths, stage names, recipe names and file *names* of inputs are not key inputs: renaming a stage or
 * moving a data file does not rerun anything, changing a byte does. The map is stored in the lock file and the
 * cache index, so `explain` can print it and `plan` can say which entry changed.
 *
 * @module
 */
import { canonicalJson, sha256, shortDigest } from "./hash.ts";
import type { AnyStageKind, RuntimeFacts } from "./stage.ts";

/** Version of the key scheme. */
export const KEY_SCHEME = "distillery-key-v1";

/** The named inputs of a stage key. */
export type KeyInputs = Record<string, unknown>;

/** What goes into {@linkcode buildKeyInputs}. */
export interface KeyInputsArgs {
  /** The stage kind. */
  kind: AnyStageKind;
  /** Resolved parameters. */
  params: Record<string, unknown>;
  /** Digest (or digests, for list ports) of each wired input. */
  inputs: Record<string, string | string[]>;
  /** Runtime facts (only used for kinds with `usesDevice`). */
  runtimeFacts: RuntimeFacts | null;
  /** Recipe seed (only used for kinds with `usesSeed`). */
  seed: number;
}

/** Builds the key-input map of a stage (entries in a fixed, readable order). */
export function buildKeyInputs(a: KeyInputsArgs): KeyInputs {
  const k: KeyInputs = { scheme: KEY_SCHEME, kind: a.kind.kind, kind_version: a.kind.version };
  for (const name of Object.keys(a.params).sort()) {
    // Parameters declared `inKey: false` (log intervals and the like) cannot change outputs.
    if (a.params[name] !== undefined && a.kind.params[name]?.inKey !== false) {
      k[`params.${name}`] = a.params[name];
    }
  }
  for (const port of Object.keys(a.inputs).sort()) k[`inputs.${port}`] = a.inputs[port];
  if (a.kind.usesSeed) k["settings.seed"] = a.seed;
  if (a.kind.usesDevice) {
    if (!a.runtimeFacts) {
      throw new Error(`stage kind ${a.kind.kind} uses the device but no runtime facts were given`);
    }
    for (const f of Object.keys(a.runtimeFacts).sort()) k[`runtime.${f}`] = a.runtimeFacts[f];
  }
  return k;
}

/** The stage key of a key-input map: `sha256:` over its canonical JSON. */
export function stageKey(inputs: KeyInputs): string {
  return sha256(canonicalJson(inputs));
}

/** One difference between two key-input maps. */
export interface KeyChange {
  /** Key-input name, e.g. `params.learning_rate`. */
  name: string;
  /** `changed`, `added` (only now) or `removed` (only before). */
  change: "changed" | "added" | "removed";
  /** Value in the recorded run. */
  before?: unknown;
  /** Value now. */
  after?: unknown;
}

/** Lists the entries that differ between a recorded key-input map and the current one. */
export function diffKeyInputs(before: KeyInputs, after: KeyInputs): KeyChange[] {
  const out: KeyChange[] = [];
  const names = [...new Set([...Object.keys(after), ...Object.keys(before)])];
  for (const name of names) {
    const inB = name in before, inA = name in after;
    if (inB && !inA) out.push({ name, change: "removed", before: before[name] });
    else if (!inB && inA) out.push({ name, change: "added", after: after[name] });
    else if (canonicalJson(before[name]) !== canonicalJson(after[name])) {
      out.push({ name, change: "changed", before: before[name], after: after[name] });
    }
  }
  return out;
}

/** A key-input value for display: digests shortened, long JSON cut. */
export function showKeyValue(v: unknown, max = 60): string {
  if (typeof v === "string" && v.startsWith("sha256:")) return `sha256:${shortDigest(v)}`;
  if (Array.isArray(v) && v.every((x) => typeof x === "string" && x.startsWith("sha256:"))) {
    return `[${v.map((x) => showKeyValue(x)).join(", ")}]`;
  }
  const s = JSON.stringify(v) ?? String(v);
  return s.length > max ? s.slice(0, max - 3) + "..." : s;
}

/**
 * Says in words why a change matters, e.g. `params.learning_rate changed: 0.001 -> 0.002` or
 * `input data changed (upstream tokenize produced a different output)`.
 *
 * @param refs input references by port as written now, to tell upstream outputs from local files
 */
export function describeChange(c: KeyChange, refs: Record<string, string | string[]> = {}): string {
  if (c.name.startsWith("inputs.")) {
    const port = c.name.slice(7);
    const ref = refs[port];
    const text = Array.isArray(ref) ? ref.join(", ") : ref;
    if (c.change === "added") return `input ${port} is new (${text ?? "?"})`;
    if (c.change === "removed") return `input ${port} was removed`;
    const upstream = text && /^\$\{/.test(text)
      ? `output of ${text} changed`
      : `content of ${text ?? port} changed`;
    return `input ${port}: ${upstream} (${showKeyValue(c.before, 30)} -> ${showKeyValue(c.after, 30)})`;
  }
  if (c.change === "added") return `${c.name} is new: ${showKeyValue(c.after)}`;
  if (c.change === "removed") return `${c.name} was removed (was ${showKeyValue(c.before)})`;
  return `${c.name} changed: ${showKeyValue(c.before)} -> ${showKeyValue(c.after)}`;
}

/** Canonical JSON of a value, with `undefined` (an absent key input) shown as `<absent>`. */
export function canonicalJsonSafe(v: unknown): string {
  return v === undefined ? "<absent>" : canonicalJson(v);
}
