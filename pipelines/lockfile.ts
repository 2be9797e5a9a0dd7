/**
 * `distillery.lock`: the run record beside the recipe, in readable YAML (like `dvc.lock`).
 *
 * For every recipe (by name) and stage it records the stage key and every input of that key, the outputs with
 * digests and sizes, the final metrics, wall time, device and date. `plan` and `explain` compare the current
 * recipe against it to say why a stage will run; commit it so that teammates and CI see what produced what.
 *
 * Updates are read-modify-write under an inter-process lock and written atomically, so concurrent runs of
 * different recipes in one directory never lose each other's records.
 *
 * @module
 */
import { join } from "node:path";
import { parse, stringify } from "yaml";
import { writeFileAtomic } from "../util/atomic.ts";
import { UserError } from "../util/errors.ts";
import { sha256 } from "./hash.ts";
import { acquireLock } from "./locks.ts";
import { displayPath } from "./paths.ts";
import type { MetricValue } from "./stage.ts";

/** File name of the run record. */
export const LOCK_FILE_NAME = "distillery.lock";

/** A stage's recorded output. */
export interface LockedOutput {
  /** Content digest. */
  digest: string;
  /** `file` or `dir`. */
  type: "file" | "dir";
  /** Bytes. */
  size: number;
}

/** The record of one stage. */
export interface StageRecord {
  /** Stage kind. */
  kind: string;
  /** `done` (outputs stored) or `failed`. */
  status: "done" | "failed";
  /** The stage key. */
  key: string;
  /** Every input of the key, by name (see keys.ts). */
  key_inputs: Record<string, unknown>;
  /** Input references as written in the recipe, by port. */
  inputs: Record<string, string | string[]>;
  /** Outputs by port (empty when failed). */
  outputs: Record<string, LockedOutput>;
  /** Final metrics. */
  metrics: Record<string, MetricValue>;
  /** Wall time of the computation, seconds. */
  wall_s: number;
  /** Device description, or null for stages that use none. */
  device: string | null;
  /** ISO date the record was made (when the outputs were computed). */
  date: string;
  /** Run that computed it. */
  run_id: string;
  /** Error message, when failed. */
  error?: string;
}

/** The records of one recipe. */
export interface RecipeRecord {
  /** Recipe file, relative to the lock file's directory. */
  recipe: string;
  /** Stages by name. */
  stages: Record<string, StageRecord>;
}

/** The whole lock file. */
export interface LockFile {
  /** Format version. */
  format: 1;
  /** Recipes by name. */
  recipes: Record<string, RecipeRecord>;
}

const HEADER =
  "# distillery.lock: written by `distillery run`. It records what every stage was computed from\n" +
  "# (its cache key and each input of the key) and what it produced. Commit it; do not edit it by hand.\n";

/** Path of the lock file for a recipe in `dir`. */
export function lockFilePath(recipeDir: string): string {
  return join(recipeDir, LOCK_FILE_NAME);
}

/**
 * Reads a lock file; an absent file is an empty record.
 *
 * @throws {UserError} when the file exists but is not a valid lock file
 */
export function readLockFile(path: string): LockFile {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { format: 1, recipes: {} };
    throw e;
  }
  let data: unknown;
  try {
    data = parse(text);
  } catch (e) {
    throw new UserError(
      `${displayPath(path)} is not valid YAML (${(e as Error).message}); delete it to start afresh`,
    );
  }
  if (data === null || data === undefined) return { format: 1, recipes: {} };
  const lf = data as LockFile;
  if (typeof lf !== "object" || lf.format !== 1 || typeof lf.recipes !== "object" || lf.recipes === null) {
    throw new UserError(
      `${displayPath(path)} is not a distillery.lock of format 1; delete it to start afresh`,
    );
  }
  return lf;
}

/** Serialises a lock file (stable key order as inserted; no line folding). */
export function formatLockFile(lf: LockFile): string {
  return HEADER + stringify(lf, { lineWidth: 0, aliasDuplicateObjects: false });
}

/**
 * Updates the record of one recipe under an inter-process lock: re-reads the file, lets `mutate` change the
 * recipe's record, and writes the result atomically (only if it changed).
 *
 * @param path the lock file
 * @param lockDir where to keep the writer lock (`.distillery/locks`)
 * @param recipeName the recipe's name
 * @param recipeFile the recipe file, relative to the lock file's directory
 * @param mutate edits the record in place
 */
export async function updateLockFile(
  path: string,
  lockDir: string,
  recipeName: string,
  recipeFile: string,
  mutate: (rec: RecipeRecord) => void,
): Promise<void> {
  const held = await acquireLock(join(lockDir, "lockfile-" + sha256(path).slice(7, 23) + ".lck"), {
    wait: true,
    purpose: `updating ${path}`,
  });
  try {
    const lf = readLockFile(path);
    const before = JSON.stringify(lf);
    const rec = lf.recipes[recipeName] ?? { recipe: recipeFile, stages: {} };
    rec.recipe = recipeFile;
    mutate(rec);
    lf.recipes[recipeName] = rec;
    if (JSON.stringify(lf) !== before) await writeFileAtomic(path, formatLockFile(lf));
  } finally {
    held!.release();
  }
}
