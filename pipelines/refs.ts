/**
 * Input references: the strings a recipe writes under a stage's `inputs:`.
 *
 * - `${stage.port}` - another stage's output port; these references define the DAG.
 * - `hf://org/name[@revision]` - a model on the Hugging Face Hub; `hf://datasets/org/name[@revision]` - a dataset.
 *   The cache key holds the canonical reference string, so pin a commit sha (`@<40 hex digits>`) for a
 *   reproducible key: a branch name such as `main` keeps the same key when the repository changes.
 * - Anything else is a local file or directory path, relative to the recipe file that wrote it (or to the working
 *   directory for `--set` flags). Its content, not its name, enters the key.
 *
 * @module
 */
import { dirname, isAbsolute, resolve } from "node:path";
import type { HubRef } from "./stage.ts";
import type { Loc } from "./source.ts";

/** A parsed reference to another stage's output. */
export interface StageOutputRef {
  /** Discriminant. */
  kind: "stage";
  /** The reference as written. */
  text: string;
  /** The producing stage. */
  stage: string;
  /** Its output port. */
  port: string;
  /** Where the reference is written. */
  loc: Loc;
}

/** A parsed Hub reference. */
export interface HubInputRef {
  /** Discriminant. */
  kind: "hub";
  /** The reference as written. */
  text: string;
  /** Repository type, name and revision. */
  hub: HubRef;
  /** Canonical form (`hf://[datasets/]org/name[@revision]`): the digest that enters the key. */
  canonical: string;
  /** Where the reference is written. */
  loc: Loc;
}

/** A parsed local path. */
export interface FileInputRef {
  /** Discriminant. */
  kind: "file";
  /** The reference as written. */
  text: string;
  /** Absolute path. */
  path: string;
  /** Where the reference is written. */
  loc: Loc;
}

/** Any parsed input reference. */
export type InputRef = StageOutputRef | HubInputRef | FileInputRef;

const STAGE_REF = /^\$\{([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)\}$/;
const HUB_REF =
  /^hf:\/\/(datasets\/)?([A-Za-z0-9][A-Za-z0-9._-]*(?:\/[A-Za-z0-9][A-Za-z0-9._-]*)?)(?:@([A-Za-z0-9][A-Za-z0-9._/-]*))?$/;

/** True for a revision that names a commit (40 hex digits): the only kind of Hub reference that cannot move. */
export function isPinnedRevision(revision: string | undefined): boolean {
  return revision !== undefined && /^[0-9a-f]{40}$/.test(revision);
}

/** The directory that relative paths written at `loc` resolve against. */
export function baseDirFor(loc: Loc): string {
  return loc.line > 0 ? dirname(resolve(loc.file)) : Deno.cwd();
}

/**
 * Parses one reference string. Returns the parsed reference, or a message saying what form was expected.
 */
export function parseRef(text: string, loc: Loc): InputRef | { error: string } {
  if (text.trim() === "") {
    return { error: 'expected a reference (${stage.output}, hf://org/name or a path), found ""' };
  }
  const m = STAGE_REF.exec(text);
  if (m) return { kind: "stage", text, stage: m[1], port: m[2], loc };
  if (text.includes("${")) {
    return {
      error: `expected a whole reference of the form \${stage.output}, found ${JSON.stringify(text)} ` +
        "(references are not interpolated into longer strings)",
    };
  }
  if (text.startsWith("hf://")) {
    const h = HUB_REF.exec(text);
    if (!h || h[2].startsWith("spaces/")) {
      return {
        error: `expected hf://org/name[@revision] or hf://datasets/org/name[@revision], found ${
          JSON.stringify(text)
        }`,
      };
    }
    const hub: HubRef = { repoType: h[1] ? "dataset" : "model", repo: h[2], revision: h[3] };
    const canonical = `hf://${h[1] ?? ""}${h[2]}${h[3] ? "@" + h[3] : ""}`;
    return { kind: "hub", text, hub, canonical, loc };
  }
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(text);
  if (scheme) {
    return {
      error: `unsupported reference scheme ${scheme[1]}:// in ${JSON.stringify(text)} (use hf:// or a path)`,
    };
  }
  const path = isAbsolute(text) ? resolve(text) : resolve(baseDirFor(loc), text);
  return { kind: "file", text, path, loc };
}
