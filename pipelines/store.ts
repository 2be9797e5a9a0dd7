/**
 * The content-addressed store: artifacts by digest, and an index from stage key to the outputs it produced.
 *
 * Layout of a cache directory:
 *
 * ```text
 * CACHEDIR.TAG                    marks the directory for backup tools
 * objects/ab/cdef...              an artifact (file or directory), named by its digest; files are read-only
 * objects/ab/cdef....json         its manifest: type, size, and per file the digest and stat stamp
 * entries/<key hex>.json          index: what a stage key produced (outputs, metrics, key inputs, timing)
 * checkpoints/<key hex>/step-N/   step checkpoints of an unfinished stage
 * tmp/<key hex>.<pid>.<rand>/     outputs and scratch space of a running stage
 * locks/                          one lock per stage key, per object, and the store lock (runs share it, gc
 *                                 takes it exclusively)
 * shared/                         persistent downloads (Hub snapshots), not content-addressed
 * stats.json                      digests of input files by path and stat stamp
 * ```
 *
 * An object is hashed once, when a stage's output is committed. Later checks compare each file's stat stamp (size,
 * mtime, ctime) with the manifest and re-hash only the files whose stamp changed; `verify` re-hashes everything. A
 * mismatch means the entry is corrupt: it is removed and the stage recomputed.
 *
 * @module
 */
import { join } from "node:path";
import { writeFileAtomic } from "../util/atomic.ts";
import { UserError } from "../util/errors.ts";
import {
  type ArtifactHash,
  digestHex,
  hashArtifact,
  hashFile,
  sameStamp,
  stampOf,
  type TreeEntry,
} from "./hash.ts";
import { acquireLock } from "./locks.ts";
import type { ArtifactType, MetricValue } from "./stage.ts";

/** A stored artifact. */
export interface StoredOutput {
  /** Content digest. */
  digest: string;
  /** File or directory. */
  type: ArtifactType;
  /** Total bytes. */
  size: number;
}

/** An index entry: what one stage key produced. */
export interface CacheEntry {
  /** Entry format version. */
  format: 1;
  /** The stage key (`sha256:...`). */
  key: string;
  /** Stage name when it was computed (informational; the key does not depend on it). */
  stage: string;
  /** Stage kind and version. */
  kind: string;
  /** Stage kind version. */
  kindVersion: number;
  /** Outputs by port. */
  outputs: Record<string, StoredOutput>;
  /** Final metrics the stage set. */
  metrics: Record<string, MetricValue>;
  /** The inputs of the key, by name. */
  keyInputs: Record<string, unknown>;
  /** Wall time of the computation, seconds. */
  wallSeconds: number;
  /** Device description when the stage used one. */
  device: string | null;
  /** ISO time it was stored. */
  created: string;
  /** Run that computed it. */
  runId: string;
}

/** A stored object's manifest. */
export interface ObjectManifest {
  /** Manifest format version. */
  format: 1;
  /** Digest (also the object's name). */
  digest: string;
  /** File or directory. */
  type: ArtifactType;
  /** Total bytes. */
  size: number;
  /** Files, links and empty directories with their digests and stat stamps. */
  entries: TreeEntry[];
}

/** Result of checking a stored object. */
export type ObjectCheck =
  | { ok: true; rehashed: number }
  | { ok: false; missing: boolean; reason: string };

/** The cache directory. */
export class Store {
  /** Absolute path of the cache directory. */
  readonly root: string;

  /** A store rooted at `root` (call {@linkcode Store.init} before writing). */
  constructor(root: string) {
    this.root = root;
  }

  /** Creates the directory layout if needed. */
  async init(): Promise<void> {
    for (const d of ["objects", "entries", "checkpoints", "tmp", "locks", "shared"]) {
      await Deno.mkdir(join(this.root, d), { recursive: true });
    }
    const tag = join(this.root, "CACHEDIR.TAG");
    try {
      await Deno.stat(tag);
    } catch {
      await writeFileAtomic(
        tag,
        "Signature: 8a477f597d28d172789f06886806bc55\n# Distillery cache (content-addressed artifacts).\n",
      );
    }
  }

  /** Path of an object. */
  objectPath(digest: string): string {
    const h = digestHex(digest);
    return join(this.root, "objects", h.slice(0, 2), h.slice(2));
  }

  /** Path of an object's manifest. */
  manifestPath(digest: string): string {
    return this.objectPath(digest) + ".json";
  }

  /** Path of the index entry for a stage key. */
  entryPath(key: string): string {
    return join(this.root, "entries", digestHex(key) + ".json");
  }

  /** Directory of a stage key's checkpoints. */
  checkpointDir(key: string): string {
    return join(this.root, "checkpoints", digestHex(key));
  }

  /** Lock file for a stage key. */
  keyLockPath(key: string): string {
    return join(this.root, "locks", "key-" + digestHex(key).slice(0, 32) + ".lck");
  }

  /** The store lock: runs hold it shared, gc exclusively. */
  storeLockPath(): string {
    return join(this.root, "locks", "store.lck");
  }

  /** Directory for persistent downloads. */
  sharedDir(): string {
    return join(this.root, "shared");
  }

  /** A fresh temporary directory for one attempt at a stage key. */
  async makeTempDir(key: string): Promise<string> {
    const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
    const dir = join(this.root, "tmp", `${digestHex(key).slice(0, 16)}.${Deno.pid}.${rand}`);
    await Deno.mkdir(dir, { recursive: true });
    return dir;
  }

  /** Reads the index entry for a key; null when absent or unreadable. */
  readEntry(key: string): CacheEntry | null {
    try {
      const e = JSON.parse(Deno.readTextFileSync(this.entryPath(key))) as CacheEntry;
      return e.format === 1 && e.key === key ? e : null;
    } catch {
      return null;
    }
  }

  /** Writes an index entry atomically (this is the commit point of a stage). */
  async writeEntry(entry: CacheEntry): Promise<void> {
    await writeFileAtomic(this.entryPath(entry.key), JSON.stringify(entry, null, 1) + "\n");
  }

  /** Removes an index entry (the objects stay until gc). */
  async removeEntry(key: string): Promise<void> {
    await Deno.remove(this.entryPath(key)).catch(() => {});
  }

  /** Reads an object's manifest, or null. */
  readManifest(digest: string): ObjectManifest | null {
    try {
      const m = JSON.parse(Deno.readTextFileSync(this.manifestPath(digest))) as ObjectManifest;
      return m.format === 1 && m.digest === digest ? m : null;
    } catch {
      return null;
    }
  }

  /**
   * Checks that an object is present and unchanged. Files whose stat stamp differs from the manifest (or every
   * file with `verify`) are re-hashed; if the content still matches, the manifest's stamps are refreshed.
   */
  async checkObject(digest: string, type: ArtifactType, verify = false): Promise<ObjectCheck> {
    const m = this.readManifest(digest);
    const path = this.objectPath(digest);
    if (!m) return { ok: false, missing: true, reason: "its output is missing from the cache" };
    let top: Deno.FileInfo;
    try {
      top = await Deno.lstat(path);
    } catch {
      return { ok: false, missing: true, reason: "its output is missing from the cache" };
    }
    if (m.type !== type || (type === "file" ? !top.isFile : !top.isDirectory)) {
      return { ok: false, missing: false, reason: `${path} is not a ${type}` };
    }
    let rehashed = 0;
    let changedStamps = false;
    const byPath = new Map(m.entries.map((e) => [e.path, e]));
    const seen = new Set<string>();
    const checkFile = async (e: TreeEntry, abs: string): Promise<string | null> => {
      let st: Deno.FileInfo;
      try {
        st = await Deno.lstat(abs);
      } catch {
        return `${e.path || "the file"} is missing`;
      }
      if (!st.isFile) return `${e.path || "the file"} is no longer a regular file`;
      const stamp = stampOf(st);
      if (!verify && e.stamp && sameStamp(stamp, e.stamp)) return null;
      rehashed++;
      const { digest: d } = await hashFile(abs);
      if (d !== e.digest) return `${e.path || "the file"} changed (expected ${e.digest}, found ${d})`;
      e.stamp = stamp;
      changedStamps = true;
      return null;
    };
    if (type === "file") {
      const problem = await checkFile(m.entries[0], path);
      if (problem) return { ok: false, missing: false, reason: `${path}: ${problem}` };
    } else {
      // Walk the directory: files added or removed corrupt it as much as files changed.
      const walk = async (dir: string, rel: string): Promise<string | null> => {
        const names: string[] = [];
        for await (const d of Deno.readDir(dir)) names.push(d.name);
        if (names.length === 0 && rel !== "") {
          seen.add(rel);
          return byPath.get(rel)?.type === "emptydir" ? null : `${rel}/ is an unexpected empty directory`;
        }
        for (const name of names) {
          const r = rel ? `${rel}/${name}` : name;
          const abs = join(dir, name);
          const st = await Deno.lstat(abs);
          if (st.isDirectory) {
            const p = await walk(abs, r);
            if (p) return p;
            continue;
          }
          seen.add(r);
          const e = byPath.get(r);
          if (!e) return `${r} was added`;
          if (e.type === "symlink") {
            if (!st.isSymlink || (await Deno.readLink(abs)) !== e.target) return `link ${r} changed`;
            continue;
          }
          const p = await checkFile(e, abs);
          if (p) return p;
        }
        return null;
      };
      const problem = await walk(path, "");
      if (problem) return { ok: false, missing: false, reason: `${path}: ${problem}` };
      for (const e of m.entries) {
        if (!seen.has(e.path)) return { ok: false, missing: false, reason: `${path}: ${e.path} is missing` };
      }
    }
    if (changedStamps) await this.#writeManifest(m);
    return { ok: true, rehashed };
  }

  /**
   * Moves a finished output into the store: hashes it (refusing symbolic links that leave it), renames it to
   * its digest (or drops it when an identical object is already stored), makes its files read-only and writes the
   * manifest.
   */
  async commitOutput(tmpPath: string, type: ArtifactType, label: string): Promise<StoredOutput> {
    let st: Deno.FileInfo;
    try {
      st = await Deno.lstat(tmpPath);
    } catch {
      throw new Error(
        `${label} was not written (expected a ${type === "dir" ? "directory" : "file"} at ${tmpPath})`,
      );
    }
    if (st.isSymlink) {
      throw new UserError(
        `${label} is a symbolic link; outputs must be real files or directories inside the output path`,
      );
    }
    if (type === "dir" ? !st.isDirectory : !st.isFile) {
      throw new Error(`${label} must be a ${type === "dir" ? "directory" : "regular file"}`);
    }
    const h = await hashArtifact(tmpPath, { links: "contain", label });
    const lock = await acquireLock(
      join(this.root, "locks", "obj-" + digestHex(h.digest).slice(0, 32) + ".lck"),
      {
        wait: true,
        purpose: `storing ${label}`,
      },
    );
    try {
      const dest = this.objectPath(h.digest);
      if (this.readManifest(h.digest) && (await this.checkObject(h.digest, type)).ok) {
        await removeTree(tmpPath);
      } else {
        await removeTree(dest);
        await Deno.mkdir(join(dest, ".."), { recursive: true });
        await Deno.rename(tmpPath, dest);
        await this.#sealAndRecord(dest, h);
      }
    } finally {
      lock!.release();
    }
    return { digest: h.digest, type, size: h.size };
  }

  /** Makes files read-only and records their final stat stamps in the manifest. */
  async #sealAndRecord(dest: string, h: ArtifactHash): Promise<void> {
    const entries: TreeEntry[] = [];
    for (const e of h.entries) {
      if (e.type !== "file") {
        entries.push(e);
        continue;
      }
      const abs = e.path === "" ? dest : join(dest, ...e.path.split("/"));
      await Deno.chmod(abs, 0o444);
      entries.push({ ...e, stamp: stampOf(await Deno.lstat(abs)) });
    }
    await this.#writeManifest({ format: 1, digest: h.digest, type: h.type, size: h.size, entries });
  }

  async #writeManifest(m: ObjectManifest): Promise<void> {
    await writeFileAtomic(this.manifestPath(m.digest), JSON.stringify(m) + "\n");
  }

  /** Removes an object and its manifest. */
  async removeObject(digest: string): Promise<void> {
    await Deno.remove(this.manifestPath(digest)).catch(() => {});
    await removeTree(this.objectPath(digest));
  }
}

/** Removes a file or directory tree, read-only files included; missing paths are fine. */
export async function removeTree(path: string): Promise<void> {
  try {
    await Deno.remove(path, { recursive: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
}

/** Total size in bytes of a file or directory tree (not following links); 0 when missing. */
export async function treeSize(path: string): Promise<number> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.lstat(path);
  } catch {
    return 0;
  }
  if (!st.isDirectory) return st.size;
  let total = 0;
  for await (const d of Deno.readDir(path)) total += await treeSize(join(path, d.name));
  return total;
}
