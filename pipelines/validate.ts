/**
 * Recipe validation: turns a merged recipe tree into a {@linkcode Recipe}, or reports every problem at once.
 *
 * Checked here: top-level fields, settings, stage names, kinds, parameters (against each kind's schema, with
 * defaults filled in), input ports and references (dangling stages and ports, types of wired artifacts, missing
 * local files), and cycles. Each problem carries `file:line:col`, the field path, what was expected and what was
 * found, and "did you mean" where a near miss exists.
 *
 * @module
 */
import { didYouMean, type Problem, Problems } from "./diagnostics.ts";
import { type DagNode, findCycles, topoOrder } from "./dag.ts";
import { type ParamFields, type ParamsOf, validateFields } from "./params.ts";
import { displayPath } from "./paths.ts";
import { baseDirFor, type InputRef, isPinnedRevision, parseRef } from "./refs.ts";
import type { StageRegistry } from "./registry.ts";
import { describeNode, formatLoc, getEntry, type Loc, type YMap, type YNode } from "./source.ts";
import type { AnyStageKind, InputPort, InputPorts } from "./stage.ts";
import { applyOverrides, loadRecipeTree, type RecipeTree } from "./recipe.ts";

/** Schema of the recipe's `settings:` block. */
export const RECIPE_SETTINGS = {
  cache_dir: {
    type: "string",
    nullable: true,
    doc:
      "Content-addressed cache directory, relative to this recipe file. Default: .distillery/cache at the " +
      "git root. Overridden by --cache-dir and DISTILLERY_CACHE.",
  },
  gpu: {
    type: "string",
    enum: ["auto", "dawn", "builtin"],
    default: "auto",
    doc:
      "WebGPU provider: dawn (the webgpu npm package), builtin (Deno's navigator.gpu) or auto (dawn when it " +
      "loads, else builtin). Overridden by --gpu and DISTILLERY_GPU.",
  },
  seed: {
    type: "number",
    integer: true,
    min: 0,
    default: 0,
    doc: "Seed for every random choice; enters the key of stages that use it.",
  },
  dtype: {
    type: "string",
    enum: ["f32", "f16"],
    default: "f32",
    doc: "Compute dtype for device stages (enters their key).",
  },
  keep_checkpoints: {
    type: "number",
    integer: true,
    min: 1,
    default: 2,
    doc: "How many step checkpoints each stage keeps while it runs (older ones are deleted).",
  },
} as const satisfies ParamFields;

/** Resolved recipe settings. */
export type RecipeSettings = ParamsOf<typeof RECIPE_SETTINGS>;

/** One stage of a validated recipe. */
export interface RecipeStage {
  /** Stage name (key under `stages:`). */
  name: string;
  /** Its kind. */
  kind: AnyStageKind;
  /** The optional `description:`. */
  description?: string;
  /** Validated parameters, defaults filled in. */
  params: Record<string, unknown>;
  /** References by input port (always a list; single-reference ports hold one). */
  inputs: Record<string, InputRef[]>;
  /** Where the stage is defined. */
  loc: Loc;
}

/** A validated recipe, ready to plan. */
export interface Recipe {
  /** `name:` - also the key of its record in `distillery.lock`. */
  name: string;
  /** `description:`. */
  description: string;
  /** Absolute path of the recipe file. */
  path: string;
  /** Absolute paths of the recipe and the bases it extends. */
  files: string[];
  /** Resolved settings. */
  settings: RecipeSettings;
  /** Directory `settings.cache_dir` is relative to (the file that set it). */
  cacheDirBase: string;
  /** Stages by name, in recipe order. */
  stages: Map<string, RecipeStage>;
  /** Stage names in dependency order. */
  order: string[];
  /** The stage graph. */
  dag: DagNode[];
  /** Non-fatal findings (e.g. unpinned Hub revisions). */
  warnings: Problem[];
}

const TOP_LEVEL = ["name", "description", "extends", "settings", "stages"];
const STAGE_FIELDS = ["kind", "params", "inputs", "description"];
const RECIPE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const STAGE_NAME = /^[A-Za-z_][A-Za-z0-9_-]*$/;

function isNull(n: YNode | undefined): boolean {
  return n !== undefined && n.kind === "scalar" && n.value === null;
}

/**
 * Validates a merged recipe tree against the registry. Problems are added to `problems`; the result is null when
 * there were any.
 */
export function validateRecipe(rt: RecipeTree, registry: StageRegistry, problems: Problems): Recipe | null {
  const before = problems.count;
  const tree = rt.tree;
  const warnings: Problem[] = [];

  for (const e of tree.entries) {
    if (!TOP_LEVEL.includes(e.key)) {
      problems.add({
        loc: e.keyLoc,
        path: e.key,
        message: `unknown top-level field "${e.key}"`,
        hint: didYouMean(e.key, TOP_LEVEL),
      });
    }
  }

  // name
  const nameEntry = getEntry(tree, "name");
  let name = "";
  if (!nameEntry) {
    problems.add({
      loc: tree.loc,
      path: "name",
      message: 'missing required field "name" (the recipe\'s name, e.g. tiny)',
    });
  } else if (nameEntry.value.kind !== "scalar" || typeof nameEntry.value.value !== "string") {
    problems.add({
      loc: nameEntry.value.loc,
      path: "name",
      message: `expected a string, found ${describeNode(nameEntry.value)}`,
    });
  } else if (!RECIPE_NAME.test(nameEntry.value.value)) {
    problems.add({
      loc: nameEntry.value.loc,
      path: "name",
      message: `expected letters, digits, ".", "_" or "-" (starting with a letter or digit), found ${
        JSON.stringify(nameEntry.value.value)
      }`,
    });
  } else {
    name = nameEntry.value.value;
    if (!rt.nameFromSelf && rt.files.length > 1) {
      problems.add({
        loc: tree.loc,
        path: "name",
        message:
          `${displayPath(rt.files[0])} extends another recipe but has no name of its own (it would share ` +
          `the record "${name}" in distillery.lock with its base)`,
        hint: "add a name: line to the recipe",
      });
    }
  }

  // description
  const descEntry = getEntry(tree, "description");
  let description = "";
  if (descEntry && !isNull(descEntry.value)) {
    if (descEntry.value.kind !== "scalar" || typeof descEntry.value.value !== "string") {
      problems.add({
        loc: descEntry.value.loc,
        path: "description",
        message: `expected a string, found ${describeNode(descEntry.value)}`,
      });
    } else description = descEntry.value.value;
  }

  // settings
  const settingsEntry = getEntry(tree, "settings");
  const settings = validateFields(RECIPE_SETTINGS, settingsEntry?.value, {
    path: "settings",
    loc: tree.loc,
    problems,
  }) as RecipeSettings;
  const cacheDirNode = settingsEntry?.value.kind === "map"
    ? getEntry(settingsEntry.value, "cache_dir")
    : undefined;
  const cacheDirBase = cacheDirNode && cacheDirNode.value.loc.line > 0
    ? baseDirFor(cacheDirNode.value.loc)
    : Deno.cwd();

  // stages
  const stagesEntry = getEntry(tree, "stages");
  const stages = new Map<string, RecipeStage>();
  const removed = new Map<string, Loc>();
  const refsByStage = new Map<string, { port: string; ref: InputRef; portType?: string }[]>();
  if (!stagesEntry) {
    problems.add({
      loc: tree.loc,
      path: "stages",
      message: 'missing required field "stages" (a mapping of stage name -> {kind, params, inputs})',
    });
  } else if (stagesEntry.value.kind !== "map") {
    problems.add({
      loc: stagesEntry.value.loc,
      path: "stages",
      message: `expected a mapping of stage name -> {kind, params, inputs}, found ${
        describeNode(stagesEntry.value)
      }`,
    });
  } else {
    for (const se of stagesEntry.value.entries) {
      if (isNull(se.value)) {
        removed.set(se.key, se.keyLoc);
        continue;
      }
      const stage = validateStage(se.key, se.keyLoc, se.value, registry, problems, warnings);
      if (stage) {
        if (stage.stage) stages.set(se.key, stage.stage);
        refsByStage.set(se.key, stage.refs);
      }
    }
    if (stages.size === 0 && stagesEntry.value.entries.length === 0) {
      problems.add({
        loc: stagesEntry.value.loc,
        path: "stages",
        message: "a recipe needs at least one stage",
      });
    }
  }

  // references between stages
  const dag: DagNode[] = [];
  for (const [sname, refs] of refsByStage) {
    const node: DagNode = { name: sname, deps: [] };
    for (const { port, ref, portType } of refs) {
      if (ref.kind !== "stage") continue;
      const path = `stages.${sname}.inputs.${port}`;
      const producer = stages.get(ref.stage);
      if (!producer) {
        if (refsByStage.has(ref.stage)) continue; // exists but failed validation: already reported
        const at = removed.get(ref.stage);
        problems.add({
          loc: ref.loc,
          path,
          message: at
            ? `${ref.text} refers to stage "${ref.stage}", which is removed (set to null at ${formatLoc(at)})`
            : `${ref.text} refers to stage "${ref.stage}", which does not exist`,
          hint: at ? undefined : didYouMean(ref.stage, [...refsByStage.keys()], "a stage:"),
        });
        continue;
      }
      const out = producer.kind.outputs[ref.port];
      if (!out) {
        problems.add({
          loc: ref.loc,
          path,
          message:
            `${ref.text}: stage "${ref.stage}" (kind ${producer.kind.kind}) has no output "${ref.port}"`,
          hint: didYouMean(ref.port, Object.keys(producer.kind.outputs), "an output:"),
        });
        continue;
      }
      if (portType && out.type !== portType) {
        problems.add({
          loc: ref.loc,
          path,
          message: `expected a ${portType === "dir" ? "directory" : "file"}, found ${ref.text}, which is a ${
            out.type === "dir" ? "directory" : "file"
          }`,
        });
      }
      node.deps.push({ stage: ref.stage, loc: ref.loc });
    }
    dag.push(node);
  }
  for (const c of findCycles(dag)) {
    problems.add({
      loc: c.loc,
      path: `stages.${c.path[0]}.inputs`,
      message: `stages read each other's outputs in a cycle: ${c.path.join(" -> ")}`,
    });
  }

  if (problems.count > before) return null;
  return {
    name,
    description,
    path: rt.files[0],
    files: rt.files,
    settings,
    cacheDirBase,
    stages,
    order: topoOrder(dag),
    dag,
    warnings,
  };
}

function validateStage(
  name: string,
  keyLoc: Loc,
  node: YNode,
  registry: StageRegistry,
  problems: Problems,
  warnings: Problem[],
): { stage: RecipeStage | null; refs: { port: string; ref: InputRef; portType?: string }[] } | null {
  const base = `stages.${name}`;
  const before = problems.count;
  if (!STAGE_NAME.test(name)) {
    problems.add({
      loc: keyLoc,
      path: base,
      message: `stage names use letters, digits, "_" and "-" and start with a letter or "_"; found ${
        JSON.stringify(name)
      }`,
    });
  }
  if (name === "settings") {
    problems.add({
      loc: keyLoc,
      path: base,
      message: `"settings" is reserved (--set settings.x=... sets recipe settings)`,
    });
  }
  if (node.kind !== "map") {
    problems.add({
      loc: node.loc,
      path: base,
      message: `expected a mapping with kind, params and inputs, found ${describeNode(node)}`,
    });
    return null;
  }
  for (const e of node.entries) {
    if (!STAGE_FIELDS.includes(e.key)) {
      problems.add({
        loc: e.keyLoc,
        path: `${base}.${e.key}`,
        message: `unknown stage field "${e.key}"`,
        hint: didYouMean(e.key, STAGE_FIELDS),
      });
    }
  }
  let description: string | undefined;
  const de = getEntry(node, "description");
  if (de && !isNull(de.value)) {
    if (de.value.kind === "scalar" && typeof de.value.value === "string") description = de.value.value;
    else {problems.add({
        loc: de.value.loc,
        path: `${base}.description`,
        message: `expected a string, found ${describeNode(de.value)}`,
      });}
  }

  const ke = getEntry(node, "kind");
  let kind: AnyStageKind | undefined;
  if (!ke) {
    problems.add({
      loc: node.loc,
      path: `${base}.kind`,
      message: `missing required field "kind"`,
      hint: `one of ${kindChoices(registry)}; \`deno task stages\` documents them`,
    });
  } else if (ke.value.kind !== "scalar" || typeof ke.value.value !== "string") {
    problems.add({
      loc: ke.value.loc,
      path: `${base}.kind`,
      message: `expected a stage kind name, found ${describeNode(ke.value)}`,
    });
  } else {
    kind = registry.get(ke.value.value);
    if (!kind) {
      problems.add({
        loc: ke.value.loc,
        path: `${base}.kind`,
        message: `unknown stage kind "${ke.value.value}"`,
        hint: didYouMean(ke.value.value, registry.names(), "a kind:") +
          " `deno task stages` lists all kinds",
      });
    }
  }

  // Params need the kind's schema; without a kind only the shape can be checked.
  const pe = getEntry(node, "params");
  let params: Record<string, unknown> = {};
  if (pe && !isNull(pe.value) && pe.value.kind !== "map") {
    problems.add({
      loc: pe.value.loc,
      path: `${base}.params`,
      message: `expected a mapping of parameter -> value, found ${describeNode(pe.value)}`,
    });
  } else if (kind) {
    params = validateFields(kind.params as ParamFields, pe?.value, {
      path: `${base}.params`,
      loc: node.loc,
      problems,
    });
  }

  // Inputs
  const refs: { port: string; ref: InputRef; portType?: string }[] = [];
  const inputs: Record<string, InputRef[]> = {};
  const ie = getEntry(node, "inputs");
  const inputsMap: YMap | undefined = ie?.value.kind === "map" ? ie.value : undefined;
  if (ie && !isNull(ie.value) && !inputsMap) {
    problems.add({
      loc: ie.value.loc,
      path: `${base}.inputs`,
      message: `expected a mapping of input port -> reference, found ${describeNode(ie.value)}`,
    });
  }
  for (const e of inputsMap?.entries ?? []) {
    const path = `${base}.inputs.${e.key}`;
    const port: InputPort | undefined = kind?.inputs[e.key];
    if (kind && !port) {
      problems.add({
        loc: e.keyLoc,
        path,
        message: `stage kind ${kind.kind} has no input "${e.key}"`,
        hint: didYouMean(e.key, Object.keys(kind.inputs), "an input:"),
      });
      continue;
    }
    if (isNull(e.value)) continue; // removed in a child recipe
    const items: YNode[] = e.value.kind === "seq" ? e.value.items : [e.value];
    if (e.value.kind === "seq" && port && !port.list) {
      problems.add({
        loc: e.value.loc,
        path,
        message: `expected one reference, found ${
          describeNode(e.value)
        } (this input takes a single artifact)`,
      });
      continue;
    }
    if (e.value.kind === "map") {
      problems.add({
        loc: e.value.loc,
        path,
        message: `expected a reference string (\${stage.output}, hf://org/name or a path), found a mapping`,
      });
      continue;
    }
    if (e.value.kind === "seq" && items.length === 0 && !port?.optional) {
      problems.add({
        loc: e.value.loc,
        path,
        message: "expected at least one reference, found an empty list",
      });
      continue;
    }
    const list: InputRef[] = [];
    items.forEach((item, i) => {
      const ipath = e.value.kind === "seq" ? `${path}[${i}]` : path;
      if (item.kind !== "scalar" || typeof item.value !== "string") {
        problems.add({
          loc: item.loc,
          path: ipath,
          message: `expected a reference string (\${stage.output}, hf://org/name or a path), found ${
            describeNode(item)
          }`,
        });
        return;
      }
      const ref = parseRef(item.value, item.loc);
      if ("error" in ref) {
        problems.add({ loc: item.loc, path: ipath, message: ref.error });
        return;
      }
      if (ref.kind === "file") checkLocalPath(ref, port?.type, ipath, problems);
      if (ref.kind === "hub" && !isPinnedRevision(ref.hub.revision)) {
        warnings.push({
          loc: item.loc,
          path: ipath,
          message:
            `${ref.text} is not pinned to a commit: the cache key stays the same when the repository changes`,
          hint: "append @<commit sha> for a reproducible key",
        });
      }
      list.push(ref);
      refs.push({ port: e.key, ref, portType: port?.type });
    });
    inputs[e.key] = list;
  }
  if (kind) {
    for (const [pname, port] of Object.entries(kind.inputs as InputPorts)) {
      if (
        !port.optional && !(pname in inputs) &&
        !inputsMap?.entries.some((e) => e.key === pname && !isNull(e.value))
      ) {
        problems.add({
          loc: inputsMap?.loc ?? node.loc,
          path: `${base}.inputs.${pname}`,
          message: `missing required input "${pname}" of stage kind ${kind.kind}: ${port.doc}`,
        });
      }
    }
  }
  if (!kind || problems.count > before) return { stage: null, refs };
  return { stage: { name, kind, description, params, inputs, loc: keyLoc }, refs };
}

/** The kind names to suggest: the real ones, or every one when only test kinds are registered. */
function kindChoices(registry: StageRegistry): string {
  const real = registry.names().filter((n) => !registry.get(n)!.testOnly);
  return (real.length > 0 ? real : registry.names()).join(", ");
}

function checkLocalPath(
  ref: InputRef & { kind: "file" },
  type: string | undefined,
  path: string,
  problems: Problems,
) {
  let st: Deno.FileInfo;
  try {
    st = Deno.statSync(ref.path);
  } catch {
    problems.add({
      loc: ref.loc,
      path,
      message: `input ${JSON.stringify(ref.text)} not found: looked for ${displayPath(ref.path)}`,
      hint: ref.loc.line > 0
        ? "relative paths are resolved against the recipe file that contains them"
        : undefined,
    });
    return;
  }
  if (type === "dir" && !st.isDirectory) {
    problems.add({
      loc: ref.loc,
      path,
      message: `expected a directory, found the file ${JSON.stringify(ref.text)}`,
    });
  } else if (type === "file" && !st.isFile) {
    problems.add({
      loc: ref.loc,
      path,
      message: `expected a file, found the directory ${JSON.stringify(ref.text)}`,
    });
  }
}

/**
 * Reads a recipe file (following `extends`), applies `--set` overrides and validates the result.
 *
 * @throws {RecipeError} listing every problem (a `UserError`: exit code 2)
 */
export function loadRecipe(path: string, registry: StageRegistry, overrides: string[] = []): Recipe {
  const problems = new Problems();
  const rt = loadRecipeTree(path, problems);
  let recipe: Recipe | null = null;
  if (rt) {
    applyOverrides(rt.tree, overrides, problems);
    recipe = validateRecipe(rt, registry, problems);
  }
  problems.throwIfAny(`recipe ${displayPath(path)}`);
  return recipe!;
}
