/**
 * `distillery gc`: removes cache entries and objects that no lock file (and no recent run) refers to.
 *
 * Kept: every stage key recorded in the given `distillery.lock` files (or all found under the project root), the
 * keys of runs newer than `keepDays`, and every object those entries or records name. Removed: other index
 * entries and objects, temporary directories of dead runs, idle lock files, and - only when asked - step
 * checkpoints (`--checkpoints`: they are what an interrupted stage resumes from) and downloads (`--downloads`).
 *
 * gc holds the store lock exclusively, so it waits for running runs to finish (or, with `--no-wait`, refuses).
 *
 * @module
 */
import { join, resolve } from "node:path";
import { UserError } from "../util/errors.ts";
import { SHA256_PREFIX } from "./hash.ts";
import { acquireLock } from "./locks.ts";
import { LOCK_FILE_NAME, readLockFile } from "./lockfile.ts";
import { listRuns } from "./runs.ts";
import { removeTree, type Store, treeSize } from "./store.ts";

/** Options of {@linkcode collectGarbage}. */
export interface GcOptions {
  /** The cache. */
  store: Store;
  /** Lock files whose records are kept. */
  lockFiles: string[];
  /** Run directories roots whose recent runs are kept. */
  runsDirs: string[];
  /** Keep the keys of runs started within this many days (0: ignore runs). */
  keepDays: number;
  /** Only report what would be removed. */
  dryRun: boolean;
  /** Also remove step checkpoints. */
  checkpoints: boolean;
  /** Also remove the shared downloads directory. */
  downloads: boolean;
  /** Wait for running runs (default) or refuse. */
  wait: boolean;
  /** Called once if gc must wait for runs. */
  onWait?: () => void;
}

/** What gc removed (or would remove) and kept. */
export interface GcResult {
  /** Index entries removed. */
  entriesRemoved: number;
  /** Objects removed. */
  objectsRemoved: number;
  /** Checkpoint directories removed. */
  checkpointsRemoved: number;
  /** Temporary directories removed. */
  tmpRemoved: number;
  /** Bytes freed. */
  bytesFreed: number;
  /** Index entries kept. */
  entriesKept: number;
  /** Objects kept. */
  objectsKept: number;
  /** Bytes still used by kept checkpoints (not removed without `checkpoints`). */
  checkpointBytesKept: number;
  /** Bytes in downloads kept. */
  downloadBytesKept: number;
}

/** Finds `distillery.lock` files under `root` (skipping .git, node_modules and hidden directories). */
export function findLockFiles(root: string, maxDepth = 6): string[] {
  const out: string[] = [];
  const walk = (dir: string, depth: number) => {
    let entries: Deno.DirEntry[];
    try {
      entries = [...Deno.readDirSync(dir)];
    } catch {
      return;
    }
    for (const e of entries) {
      if (e.isFile && e.name === LOCK_FILE_NAME) out.push(join(dir, e.name));
      else if (e.isDirectory && depth < maxDepth && !e.name.startsWith(".") && e.name !== "node_modules") {
        walk(join(dir, e.name), depth + 1);
      }
    }
  };
  walk(resolve(root), 0);
  return out.sort();
}

/** Removes unreferenced cache content. */
export async function collectGarbage(o: GcOptions): Promise<GcResult> {
  const { store } = o;
  const lock = await acquireLock(store.storeLockPath(), {
    exclusive: true,
    wait: o.wait,
    purpose: "gc",
    onWait: o.onWait,
  });
  if (!lock) {
    throw new UserError(`runs are using the cache ${store.root}; run gc again without --no-wait to wait`);
  }
  try {
    const keepKeys = new Set<string>();
    const keepDigests = new Set<string>();
    for (const lf of o.lockFiles) {
      for (const rec of Object.values(readLockFile(lf).recipes)) {
        for (const st of Object.values(rec.stages ?? {})) {
          if (st.key) keepKeys.add(st.key);
          for (const out of Object.values(st.outputs ?? {})) keepDigests.add(out.digest);
        }
      }
    }
    if (o.keepDays > 0) {
      const since = Date.now() - o.keepDays * 86400_000;
      for (const dir of o.runsDirs) {
        for (const run of listRuns(dir)) {
          if (!run.record || Date.parse(run.record.started) < since) continue;
          for (const s of run.record.stages) {
            if (s.key) keepKeys.add(s.key);
            for (const out of Object.values(s.outputs)) keepDigests.add(out.digest);
          }
        }
      }
    }
    const r: GcResult = {
      entriesRemoved: 0,
      objectsRemoved: 0,
      checkpointsRemoved: 0,
      tmpRemoved: 0,
      bytesFreed: 0,
      entriesKept: 0,
      objectsKept: 0,
      checkpointBytesKept: 0,
      downloadBytesKept: 0,
    };
    const rm = async (path: string) => {
      r.bytesFreed += await treeSize(path);
      if (!o.dryRun) await removeTree(path);
    };

    // Index entries.
    for (const d of listDir(join(store.root, "entries"))) {
      if (!d.endsWith(".json")) continue;
      const key = SHA256_PREFIX + d.slice(0, -5);
      const entry = store.readEntry(key);
      if (entry && keepKeys.has(key)) {
        r.entriesKept++;
        for (const out of Object.values(entry.outputs)) keepDigests.add(out.digest);
      } else {
        r.entriesRemoved++;
        await rm(join(store.root, "entries", d));
      }
    }
    // Objects and their manifests.
    for (const prefix of listDir(join(store.root, "objects"))) {
      const pdir = join(store.root, "objects", prefix);
      for (const name of listDir(pdir)) {
        const base = name.endsWith(".json") ? name.slice(0, -5) : name;
        const digest = SHA256_PREFIX + prefix + base;
        if (keepDigests.has(digest)) {
          if (!name.endsWith(".json")) r.objectsKept++;
          continue;
        }
        if (!name.endsWith(".json")) r.objectsRemoved++;
        await rm(join(pdir, name));
      }
    }
    // Temporary directories: no run holds the store lock now, so they are all leftovers.
    for (const d of listDir(join(store.root, "tmp"))) {
      r.tmpRemoved++;
      await rm(join(store.root, "tmp", d));
    }
    for (const d of listDir(join(store.root, "checkpoints"))) {
      const p = join(store.root, "checkpoints", d);
      if (o.checkpoints) {
        r.checkpointsRemoved++;
        await rm(p);
      } else r.checkpointBytesKept += await treeSize(p);
    }
    if (o.downloads) await rm(store.sharedDir());
    else r.downloadBytesKept = await treeSize(store.sharedDir());
    if (!o.dryRun) {
      for (const d of listDir(join(store.root, "locks"))) {
        if (d !== "store.lck") await Deno.remove(join(store.root, "locks", d)).catch(() => {});
      }
      await Deno.mkdir(store.sharedDir(), { recursive: true });
    }
    return r;
  } finally {
    lock.release();
  }
}

function listDir(dir: string): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((d) => d.name).sort();
  } catch {
    return [];
  }
}
