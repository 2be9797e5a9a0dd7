/**
 * Content digests: canonical JSON, streaming sha256 of files, and digests of directory trees.
 *
 * Digests are written `sha256:<64 hex>`. A file's digest is the sha256 of its bytes (so `sha256sum` agrees). A
 * directory's digest is the sha256 of a manifest listing, in byte order of their relative paths, every file (with
 * its digest and size), every symbolic link (with its target) and every empty directory. Names and content count;
 * timestamps and permissions do not.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { isAbsolute, join, normalize, relative, sep } from "node:path";
import { UserError } from "../util/errors.ts";
import { isInside } from "./paths.ts";

/** Prefix of every content digest. */
export const SHA256_PREFIX = "sha256:";

/** `sha256:<hex>` of a string (UTF-8) or bytes. */
export function sha256(data: string | Uint8Array): string {
  return SHA256_PREFIX + createHash("sha256").update(data).digest("hex");
}

/** The hex part of a `sha256:` digest. */
export function digestHex(digest: string): string {
  return digest.startsWith(SHA256_PREFIX) ? digest.slice(SHA256_PREFIX.length) : digest;
}

/** A short form for display: the first 12 hex digits. */
export function shortDigest(digest: string): string {
  return digestHex(digest).slice(0, 12);
}

/**
 * JSON with object keys sorted at every level and no whitespace: equal values always give equal text. Rejects
 * values JSON cannot represent faithfully (NaN, Infinity, functions, undefined inside arrays).
 */
export function canonicalJson(value: unknown): string {
  const walk = (v: unknown, path: string): string => {
    if (v === null || typeof v === "boolean" || typeof v === "string") return JSON.stringify(v);
    if (typeof v === "number") {
      if (!Number.isFinite(v)) throw new Error(`canonicalJson: non-finite number at ${path || "<root>"}`);
      return JSON.stringify(Object.is(v, -0) ? 0 : v);
    }
    if (Array.isArray(v)) {
      return "[" + v.map((x, i) => {
        if (x === undefined) throw new Error(`canonicalJson: undefined at ${path}[${i}]`);
        return walk(x, `${path}[${i}]`);
      }).join(",") + "]";
    }
    if (typeof v === "object") {
      const keys = Object.keys(v as object).filter((k) => (v as Record<string, unknown>)[k] !== undefined)
        .sort();
      return "{" + keys.map((k) =>
        JSON.stringify(k) + ":" + walk((v as Record<string, unknown>)[k], `${path}.${k}`)
      )
        .join(",") +
        "}";
    }
    throw new Error(`canonicalJson: cannot encode ${typeof v} at ${path || "<root>"}`);
  };
  return walk(value, "");
}

/** Streams a file through sha256. Returns its digest and size. */
export async function hashFile(path: string): Promise<{ digest: string; size: number }> {
  const h = createHash("sha256");
  const f = await Deno.open(path, { read: true });
  const buf = new Uint8Array(4 << 20);
  let size = 0;
  try {
    while (true) {
      const n = await f.read(buf);
      if (n === null) break;
      h.update(buf.subarray(0, n));
      size += n;
    }
  } finally {
    f.close();
  }
  return { digest: SHA256_PREFIX + h.digest("hex"), size };
}

/**
 * The stat fields that, unchanged, let a recorded digest be trusted without reading the file again: size, mtime,
 * ctime and inode. ctime moves on any write, chmod or `touch -d` (Deno reports it in whole seconds); the inode
 * changes when a file is replaced by another (`mv`, `cp -p`).
 */
export interface StatStamp {
  /** Size in bytes. */
  size: number;
  /** Modification time, ms since the epoch. */
  mtimeMs: number;
  /** Status-change time, ms since the epoch (second resolution). */
  ctimeMs: number;
  /** Inode number (0 where the platform has none). */
  ino?: number;
}

/** The {@linkcode StatStamp} of a stat result. */
export function stampOf(st: Deno.FileInfo): StatStamp {
  return {
    size: st.size,
    mtimeMs: st.mtime?.getTime() ?? 0,
    ctimeMs: st.ctime?.getTime() ?? 0,
    ino: st.ino ?? 0,
  };
}

/** True when two stamps are equal. */
export function sameStamp(a: StatStamp, b: StatStamp): boolean {
  return a.size === b.size && a.mtimeMs === b.mtimeMs && a.ctimeMs === b.ctimeMs &&
    (a.ino ?? 0) === (b.ino ?? 0);
}

/** One entry of a tree manifest. */
export interface TreeEntry {
  /** Path relative to the artifact root, `/`-separated (empty for a file artifact). */
  path: string;
  /** Regular file, symbolic link, or empty directory. */
  type: "file" | "symlink" | "emptydir";
  /** Content digest (files). */
  digest?: string;
  /** Link target as stored (symlinks). */
  target?: string;
  /** Stat stamp when last hashed (files). */
  stamp?: StatStamp;
}

/** What hashing an artifact found. */
export interface ArtifactHash {
  /** File or directory. */
  type: "file" | "dir";
  /** The artifact's digest. */
  digest: string;
  /** Total size of its files in bytes. */
  size: number;
  /** Every file, link and empty directory (one entry with path "" for a file artifact). */
  entries: TreeEntry[];
}

/** How {@linkcode hashArtifact} treats symbolic links. */
export type LinkPolicy =
  /** Inputs: follow links and hash what they point to. */
  | "follow"
  /** Outputs: keep links that stay inside the artifact (hashed by target); refuse any that point outside. */
  | "contain";

/** Options for {@linkcode hashArtifact}. */
export interface HashOptions {
  /** Symbolic-link policy (default `follow`). */
  links?: LinkPolicy;
  /** A digest already known for a file with this stamp (avoids re-reading unchanged files). */
  known?: (absPath: string, stamp: StatStamp) => string | undefined;
  /** Called after a file was actually read and hashed. */
  hashed?: (absPath: string, stamp: StatStamp, digest: string) => void;
  /** Name to use in messages for the artifact (e.g. `output "model" of stage distill`). */
  label?: string;
}

/** Digest of a directory from its manifest entries. */
export function treeDigest(entries: TreeEntry[]): string {
  const lines = ["distillery-tree-v1"];
  for (const e of [...entries].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))) {
    if (e.type === "file") lines.push(`file ${e.digest} ${e.stamp?.size ?? 0} ${JSON.stringify(e.path)}`);
    else if (e.type === "symlink") lines.push(`link ${JSON.stringify(e.target)} ${JSON.stringify(e.path)}`);
    else lines.push(`dir ${JSON.stringify(e.path)}`);
  }
  return sha256(lines.join("\n") + "\n");
}

/**
 * Hashes a file or directory. With `links: "contain"`, a symbolic link whose target is absolute or resolves
 * outside the artifact is refused with a {@linkcode UserError} (an artifact must be self-contained; a link out of
 * the cache would let its content change under a fixed digest).
 */
export async function hashArtifact(root: string, opts: HashOptions = {}): Promise<ArtifactHash> {
  const links = opts.links ?? "follow";
  const label = opts.label ?? root;
  const top = links === "follow" ? await Deno.stat(root) : await Deno.lstat(root);
  const fileDigest = async (abs: string, st: Deno.FileInfo) => {
    const stamp = stampOf(st);
    const known = opts.known?.(abs, stamp);
    if (known) return { digest: known, stamp };
    const { digest } = await hashFile(abs);
    opts.hashed?.(abs, stamp, digest);
    return { digest, stamp };
  };
  if (top.isSymlink) {
    throw new UserError(`${label} is a symbolic link; an artifact must be a regular file or a directory`);
  }
  if (top.isFile) {
    const { digest, stamp } = await fileDigest(root, top);
    return { type: "file", digest, size: stamp.size, entries: [{ path: "", type: "file", digest, stamp }] };
  }
  if (!top.isDirectory) throw new UserError(`${label} is neither a file nor a directory`);

  const entries: TreeEntry[] = [];
  let size = 0;
  const walk = async (dir: string, depth: number) => {
    if (depth > 64) {
      throw new UserError(`${label}: directories nested more than 64 deep (a symbolic-link loop?)`);
    }
    const names: string[] = [];
    for await (const d of Deno.readDir(dir)) names.push(d.name);
    names.sort();
    if (names.length === 0 && dir !== root) {
      entries.push({ path: relative(root, dir).split(sep).join("/"), type: "emptydir" });
    }
    for (const name of names) {
      const abs = join(dir, name);
      const rel = relative(root, abs).split(sep).join("/");
      const lst = await Deno.lstat(abs);
      if (lst.isSymlink && links === "contain") {
        const target = await Deno.readLink(abs);
        const resolved = normalize(join(dir, target));
        if (isAbsolute(target) || !isInside(root, resolved)) {
          throw new UserError(
            `${label}: ${rel} is a symbolic link to ${target}, outside the artifact; outputs must be ` +
              "self-contained (copy the file instead of linking it)",
          );
        }
        entries.push({ path: rel, type: "symlink", target });
        continue;
      }
      const st = lst.isSymlink ? await Deno.stat(abs) : lst;
      if (st.isDirectory) await walk(abs, depth + 1);
      else if (st.isFile) {
        const { digest, stamp } = await fileDigest(abs, st);
        entries.push({ path: rel, type: "file", digest, stamp });
        size += stamp.size;
      } else throw new UserError(`${label}: ${rel} is not a regular file or directory`);
    }
  };
  await walk(root, 0);
  return { type: "dir", digest: treeDigest(entries), size, entries };
}
