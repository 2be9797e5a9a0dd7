/**
 * Digests of local input files and directories, remembered by path and stat stamp.
 *
 * Local inputs (a teacher checkpoint on disk, a dataset) can be gigabytes; hashing them on every `plan` would make
 * a no-op run slow. {@linkcode InputDigester} keeps `<cache>/stats.json`, mapping absolute file paths to their
 * stat stamp (size, mtime, ctime, inode) and digest, and re-reads a file only when its stamp changed. Files modified in
 * the last two seconds before hashing are not remembered (their mtime might not change on a quick second write).
 *
 * @module
 */
import { writeFileAtomic } from "../util/atomic.ts";
import { hashArtifact, type StatStamp } from "./hash.ts";

type Row = [size: number, mtimeMs: number, ctimeMs: number, ino: number, digest: string];

/** Remembered digests of input files. */
export class InputDigester {
  readonly #path: string;
  #rows: Record<string, Row> = {};
  /** Digests computed in this process, racy ones included (a file is read at most once per run). */
  #memo = new Map<string, string>();
  #dirty = false;
  /** Files actually read and hashed by this instance (for tests and benchmarks). */
  hashedFiles = 0;

  /** Loads the stat cache at `path` (a missing or unreadable file is an empty cache). */
  constructor(path: string) {
    this.#path = path;
    try {
      const data = JSON.parse(Deno.readTextFileSync(path));
      if (data?.format === 1 && typeof data.files === "object") this.#rows = data.files;
    } catch {
      // start empty
    }
  }

  /** Digest and type of a local file or directory (following symbolic links). */
  async digest(path: string): Promise<{ digest: string; type: "file" | "dir"; size: number }> {
    const h = await hashArtifact(path, {
      links: "follow",
      known: (abs, s) => {
        const m = this.#memo.get(`${abs}\0${s.size}\0${s.mtimeMs}\0${s.ctimeMs}\0${s.ino ?? 0}`);
        if (m) return m;
        const r = this.#rows[abs];
        return r && r.length === 5 && r[0] === s.size && r[1] === s.mtimeMs && r[2] === s.ctimeMs &&
            r[3] === (s.ino ?? 0)
          ? r[4]
          : undefined;
      },
      hashed: (abs, s: StatStamp, digest) => {
        this.hashedFiles++;
        this.#memo.set(`${abs}\0${s.size}\0${s.mtimeMs}\0${s.ctimeMs}\0${s.ino ?? 0}`, digest);
        if (Date.now() - s.mtimeMs < 2000) return;
        this.#rows[abs] = [s.size, s.mtimeMs, s.ctimeMs, s.ino ?? 0, digest];
        this.#dirty = true;
      },
    });
    return { digest: h.digest, type: h.type, size: h.size };
  }

  /** Writes the stat cache back if it changed. */
  async save(): Promise<void> {
    if (!this.#dirty) return;
    // Merge with what concurrent runs wrote meanwhile; entries are self-validating (stamps), so any mix is safe.
    let current: Record<string, Row> = {};
    try {
      const data = JSON.parse(Deno.readTextFileSync(this.#path));
      if (data?.format === 1) current = data.files;
    } catch {
      // nothing to merge
    }
    await writeFileAtomic(this.#path, JSON.stringify({ format: 1, files: { ...current, ...this.#rows } }));
    this.#dirty = false;
  }
}
