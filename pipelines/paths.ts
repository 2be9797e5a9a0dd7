/**
 * Paths: where Distillery keeps its state, safe joining of user-controlled names, and display of paths.
 *
 * State lives in `.distillery/` at the git root that contains the recipe (or beside the recipe when it is not in
 * a git repository): `cache/` (the content-addressed store, overridable), `runs/` (one directory per run) and
 * `locks/`.
 *
 * @module
 */
import { dirname, isAbsolute, join, normalize, relative, resolve, sep } from "node:path";
import { UserError } from "../util/errors.ts";

/**
 * Joins `rel` under `root`, refusing anything that would land outside `root` (`..` segments, absolute paths,
 * NUL bytes). Use it for every file name that comes from parameters or data.
 *
 * @throws {UserError} naming the offending path
 */
export function safeJoin(root: string, rel: string): string {
  if (rel.includes("\0")) throw new UserError(`path ${JSON.stringify(rel)} contains a NUL byte`);
  if (isAbsolute(rel) || /^[A-Za-z]:[\\/]/.test(rel)) {
    throw new UserError(`path ${JSON.stringify(rel)} must be relative (it is written under ${root})`);
  }
  const joined = normalize(join(root, rel));
  const r = relative(root, joined);
  if (r === ".." || r.startsWith(".." + sep) || isAbsolute(r)) {
    throw new UserError(`path ${JSON.stringify(rel)} escapes ${root}: output paths must stay inside it`);
  }
  return joined;
}

/** True when `child` is `parent` or inside it (both absolute, normalised). */
export function isInside(parent: string, child: string): boolean {
  const r = relative(parent, child);
  return r === "" || (!r.startsWith(".." + sep) && r !== ".." && !isAbsolute(r));
}

/** The nearest directory at or above `start` that contains `.git` (a directory or a worktree file), or null. */
export function findGitRoot(start: string): string | null {
  let dir = resolve(start);
  while (true) {
    try {
      Deno.statSync(join(dir, ".git"));
      return dir;
    } catch {
      // keep looking upwards
    }
    const up = dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

/** The directories a run uses. */
export interface StateDirs {
  /** `.distillery/` at the project root. */
  state: string;
  /** The content-addressed store. */
  cache: string;
  /** Where run directories go. */
  runs: string;
  /** Locks that are not per cache entry (the lock file's writer lock). */
  locks: string;
}

/** Where the cache directory setting came from, for messages. */
export type CacheDirSource = "flag" | "env" | "recipe" | "default";

/**
 * Resolves the state directories for a recipe. The cache directory is, in order: `flag` (`--cache-dir`), the
 * `DISTILLERY_CACHE` environment variable, the recipe's `settings.cache_dir` (relative to the recipe file), or
 * `.distillery/cache` at the project root.
 */
export function resolveStateDirs(
  recipePath: string,
  opts: { flag?: string; recipeSetting?: string | null; recipeSettingBase?: string } = {},
): StateDirs & { cacheSource: CacheDirSource } {
  const recipeDir = dirname(resolve(recipePath));
  const root = findGitRoot(recipeDir) ?? recipeDir;
  const state = join(root, ".distillery");
  let cache = join(state, "cache");
  let cacheSource: CacheDirSource = "default";
  const env = Deno.env.get("DISTILLERY_CACHE");
  if (opts.flag) {
    cache = resolve(opts.flag);
    cacheSource = "flag";
  } else if (env) {
    cache = resolve(env);
    cacheSource = "env";
  } else if (opts.recipeSetting) {
    cache = resolve(opts.recipeSettingBase ?? recipeDir, opts.recipeSetting);
    cacheSource = "recipe";
  }
  return { state, cache, runs: join(state, "runs"), locks: join(state, "locks"), cacheSource };
}

/** A path as the user should see it: relative to the working directory when that is shorter. */
export function displayPath(path: string): string {
  const abs = resolve(path);
  const rel = relative(Deno.cwd(), abs);
  if (rel === "") return ".";
  return rel.length < abs.length && !rel.startsWith(".." + sep + ".." + sep + "..") ? rel : abs;
}
