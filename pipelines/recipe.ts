/**
 * Recipes: loading a YAML recipe, following `extends`, applying `--set` overrides.
 *
 * A recipe file looks like:
 *
 * ```yaml
 * name: zephyr-25
 * description: 25% attention, progressively from the 50% recipe
 * extends: zephyr-50.yaml          # optional: deep-merged base recipe (relative to this file)
 * settings: { seed: 1, dtype: f32 } # see RECIPE_SETTINGS in validate.ts
 * stages:
 *   distill:
 *     kind: distill
 *     params: { learning_rate: 8e-5 }
 *     inputs: { teacher: "hf://HuggingFaceH4/zephyr-7b-beta", data: "${pseudo.data}" }
 *   old_stage: null                  # removes a stage defined by the base recipe
 * ```
 *
 * Merge rules for `extends`: mappings merge key by key (recursively), lists and scalars in the child replace the
 * base's value, and a stage (or input) set to `null` in the child is removed. Every node keeps the position of the
 * file it came from, so errors in a base recipe point into the base file.
 *
 * `--set path=value` overrides apply to the merged tree before validation (so they are validated exactly like the
 * recipe, and problems name the flag). Paths: `<stage>.params.<field>[.<sub>...]`, `<stage>.inputs.<port>`,
 * `settings.<field>`; values are YAML (`--set distill.params.attn_layers=[1,3]`).
 *
 * @module
 */
import { dirname, resolve } from "node:path";
import { UserError } from "../util/errors.ts";
import { didYouMean, type Problems } from "./diagnostics.ts";
import { displayPath } from "./paths.ts";
import {
  describeNode,
  formatLoc,
  getEntry,
  type Loc,
  parseFlagValue,
  parseYaml,
  setEntry,
  type YEntry,
  type YMap,
  type YNode,
} from "./source.ts";

/** A recipe tree after `extends` is resolved, plus the files it was read from. */
export interface RecipeTree {
  /** The merged tree (no `extends` key left). */
  tree: YMap;
  /** Absolute paths of the recipe and every base it extends, the recipe itself first. */
  files: string[];
  /** For each top-level `name`: whether it was set in the recipe file itself rather than inherited. */
  nameFromSelf: boolean;
}

/** Merges `child` over `base`: mappings merge key by key, anything else in the child replaces the base. */
export function mergeTrees(base: YNode, child: YNode): YNode {
  if (base.kind !== "map" || child.kind !== "map") return child;
  const out: YMap = { kind: "map", loc: child.loc, entries: base.entries.map((e) => ({ ...e })) };
  for (const ce of child.entries) {
    const i = out.entries.findIndex((e) => e.key === ce.key);
    if (i >= 0) {
      out.entries[i] = { key: ce.key, keyLoc: ce.keyLoc, value: mergeTrees(out.entries[i].value, ce.value) };
    } else out.entries.push(ce);
  }
  return out;
}

function readText(path: string): string | { error: string } {
  try {
    return Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { error: "file not found" };
    if (e instanceof Deno.errors.IsADirectory) return { error: "is a directory, not a recipe file" };
    return { error: (e as Error).message };
  }
}

/**
 * Reads a recipe file and, recursively, the recipes it `extends`, and merges them. Problems (syntax, missing or
 * cyclic bases) are added to `problems`; returns null when nothing usable was read.
 *
 * @throws {UserError} when the top-level recipe file itself cannot be read
 */
export function loadRecipeTree(path: string, problems: Problems): RecipeTree | null {
  const abs = resolve(path);
  const text = readText(abs);
  if (typeof text !== "string") throw new UserError(`cannot read recipe ${displayPath(abs)}: ${text.error}`);
  return loadFrom(abs, text, problems, []);
}

function loadFrom(abs: string, text: string, problems: Problems, chain: string[]): RecipeTree | null {
  const file = displayPath(abs);
  const root = parseYaml(text, file, problems);
  if (root === null) return null;
  if (root.kind !== "map") {
    problems.add({
      loc: root.loc,
      message: `a recipe is a mapping with name, description, settings and stages; found ${
        root.kind === "scalar" && root.value === null ? "an empty file" : describeNode(root)
      }`,
    });
    return null;
  }
  const ext = getEntry(root, "extends");
  const own: YMap = { ...root, entries: root.entries.filter((e) => e.key !== "extends") };
  const nameFromSelf = getEntry(own, "name") !== undefined;
  if (!ext || (ext.value.kind === "scalar" && ext.value.value === null)) {
    return { tree: own, files: [abs], nameFromSelf };
  }
  if (ext.value.kind !== "scalar" || typeof ext.value.value !== "string" || ext.value.value === "") {
    problems.add({
      loc: ext.value.loc,
      path: "extends",
      message: `expected the path of a base recipe (relative to this file), found ${describeNode(ext.value)}`,
    });
    return { tree: own, files: [abs], nameFromSelf };
  }
  const baseAbs = resolve(dirname(abs), ext.value.value);
  const seen = [...chain, abs];
  if (seen.includes(baseAbs)) {
    const cycle = [...seen.slice(seen.indexOf(baseAbs)), baseAbs].map(displayPath).join(" -> ");
    problems.add({
      loc: ext.value.loc,
      path: "extends",
      message: `recipes extend each other in a cycle: ${cycle}`,
    });
    return { tree: own, files: [abs], nameFromSelf };
  }
  const baseText = readText(baseAbs);
  if (typeof baseText !== "string") {
    problems.add({
      loc: ext.value.loc,
      path: "extends",
      message: `cannot read base recipe ${displayPath(baseAbs)}: ${baseText.error}`,
    });
    return { tree: own, files: [abs], nameFromSelf };
  }
  const base = loadFrom(baseAbs, baseText, problems, seen);
  if (!base) return { tree: own, files: [abs], nameFromSelf };
  return { tree: mergeTrees(base.tree, own) as YMap, files: [abs, ...base.files], nameFromSelf };
}

/** Splits `a.b.c=value` into its path and value text; null when there is no `=`. */
export function splitOverride(text: string): { path: string[]; value: string } | null {
  const eq = text.indexOf("=");
  if (eq <= 0) return null;
  return { path: text.slice(0, eq).trim().split("."), value: text.slice(eq + 1) };
}

/**
 * Applies `--set path=value` overrides to a merged recipe tree in place. Each override's nodes are located at the
 * flag (`--set distill.params.lr=abc`), so validation problems name it.
 */
export function applyOverrides(tree: YMap, overrides: string[], problems: Problems): void {
  for (const text of overrides) {
    const flag = `--set ${text}`;
    const flagLoc: Loc = { file: flag, line: 0, col: 0 };
    const parsed = splitOverride(text);
    if (!parsed || parsed.path.some((p) => p === "")) {
      problems.add({
        loc: flagLoc,
        message:
          "expected --set <stage>.params.<field>=<value>, <stage>.inputs.<port>=<ref> or settings.<field>=<value>",
      });
      continue;
    }
    let path = parsed.path;
    if (path[0] === "stages") path = path.slice(1);
    const value = parseFlagValue(parsed.value, flag, problems);
    if (!value) continue;
    let target: string[];
    if (path[0] === "settings") {
      if (path.length < 2) {
        problems.add({ loc: flagLoc, message: "expected settings.<field>=<value>" });
        continue;
      }
      target = path;
    } else {
      const stages = getEntry(tree, "stages")?.value;
      const names = stages?.kind === "map" ? stages.entries.map((e) => e.key) : [];
      if (!names.includes(path[0])) {
        problems.add({
          loc: flagLoc,
          message: `no stage named "${path[0]}" in the recipe`,
          hint: path[0] === "name" || path[0] === "description"
            ? "top-level fields cannot be overridden"
            : didYouMean(path[0], [...names, "settings"]),
        });
        continue;
      }
      if (
        path.length < 3 || (path[1] !== "params" && path[1] !== "inputs") ||
        (path[1] === "inputs" && path.length !== 3)
      ) {
        problems.add({
          loc: flagLoc,
          message: `expected ${path[0]}.params.<field>[.<sub-field>]=<value> or ${
            path[0]
          }.inputs.<port>=<ref>`,
          hint: path.length >= 2 && path[1] !== "params" && path[1] !== "inputs"
            ? didYouMean(path[1], ["params", "inputs"])
            : undefined,
        });
        continue;
      }
      target = ["stages", ...path];
    }
    setPath(tree, target, value, flagLoc, problems);
  }
}

/** Sets the value at `path` in a tree, creating intermediate mappings; reports a non-mapping in the way. */
function setPath(tree: YMap, path: string[], value: YNode, flagLoc: Loc, problems: Problems): void {
  let map = tree;
  for (let i = 0; i < path.length - 1; i++) {
    const entry = getEntry(map, path[i]);
    if (!entry || (entry.value.kind === "scalar" && entry.value.value === null)) {
      const created: YMap = { kind: "map", loc: flagLoc, entries: [] };
      setEntry(map, { key: path[i], keyLoc: flagLoc, value: created });
      map = created;
    } else if (entry.value.kind === "map") {
      map = entry.value;
    } else {
      problems.add({
        loc: flagLoc,
        message: `cannot set ${path.slice(i + 1).join(".")} inside ${
          path.slice(0, i + 1).join(".")
        }, which is ${describeNode(entry.value)} (at ${formatLoc(entry.value.loc)})`,
      });
      return;
    }
  }
  const last: YEntry = { key: path[path.length - 1], keyLoc: flagLoc, value };
  setEntry(map, last);
}
