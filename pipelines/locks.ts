/**
 * Inter-process locks on files (advisory `flock`).
 *
 * The operating system releases these locks when the holding process exits for any reason, `kill -9` included,
 * so a crashed run never leaves a stale lock behind: the next run simply acquires it. The holder writes its pid,
 * host, start time and purpose into the lock file so a waiting process can say whom it waits for.
 *
 * Lock files are never deleted while runs may use them (deleting a locked file lets a second process lock a new
 * file under the same name); `gc` removes idle ones while it holds the store lock.
 *
 * @module
 */
import { dirname } from "node:path";
import { UserError } from "../util/errors.ts";

/** Who holds a lock, as written into the lock file. */
export interface LockHolder {
  /** Process id. */
  pid: number;
  /** Host name. */
  host: string;
  /** ISO time the lock was taken. */
  since: string;
  /** What the holder is doing, e.g. `computing stage distill`. */
  purpose: string;
}

/** A held lock; release it when done (closing the process also releases it). */
export interface HeldLock {
  /** The lock file. */
  path: string;
  /** Releases the lock. Safe to call twice. */
  release(): void;
}

/** Options for {@linkcode acquireLock}. */
export interface AcquireOptions {
  /** Exclusive (default) or shared. */
  exclusive?: boolean;
  /** Wait for the holder (default) or give up at once. */
  wait?: boolean;
  /** What this process will do while holding it (written into the file for exclusive locks). */
  purpose: string;
  /** Called once when the lock is busy and we start waiting. */
  onWait?: (holder: LockHolder | null) => void;
  /** Stops waiting (rejects with the signal's reason). */
  signal?: AbortSignal;
  /** Poll interval while waiting, ms (default 100). */
  pollMs?: number;
}

/** Reads the holder information from a lock file, if any. */
export function readHolder(path: string): LockHolder | null {
  try {
    const text = Deno.readTextFileSync(path).trim();
    return text ? JSON.parse(text) as LockHolder : null;
  } catch {
    return null;
  }
}

/** Describes a holder for messages: `pid 1234 on host (since 12:01:02): computing stage distill`. */
export function describeHolder(h: LockHolder | null): string {
  if (!h) return "another process";
  const since = h.since ? ` since ${h.since.replace("T", " ").replace(/\.\d+Z$/, "Z")}` : "";
  return `process ${h.pid} on ${h.host}${since} (${h.purpose})`;
}

/**
 * Takes a lock on `path` (created if missing). Returns the held lock, or null when `wait` is false and the lock
 * is busy.
 */
export async function acquireLock(path: string, opts: AcquireOptions): Promise<HeldLock | null> {
  const exclusive = opts.exclusive ?? true;
  await Deno.mkdir(dirname(path), { recursive: true });
  const file = await Deno.open(path, { read: true, write: true, create: true });
  let notified = false;
  try {
    while (!(await file.tryLock(exclusive))) {
      if (!opts.wait) {
        file.close();
        return null;
      }
      if (!notified) {
        notified = true;
        opts.onWait?.(readHolder(path));
      }
      if (opts.signal?.aborted) throw opts.signal.reason;
      await new Promise((r) => setTimeout(r, opts.pollMs ?? 100));
    }
  } catch (e) {
    try {
      file.close();
    } catch { /* already closed */ }
    throw e;
  }
  if (exclusive) {
    const holder: LockHolder = {
      pid: Deno.pid,
      host: Deno.hostname(),
      since: new Date().toISOString(),
      purpose: opts.purpose,
    };
    await file.truncate(0);
    await file.write(new TextEncoder().encode(JSON.stringify(holder) + "\n"));
  }
  let released = false;
  return {
    path,
    release() {
      if (released) return;
      released = true;
      try {
        file.unlockSync();
      } catch { /* closing releases it anyway */ }
      file.close();
    },
  };
}

/** Like {@linkcode acquireLock} but throws a {@linkcode UserError} naming the holder when it is busy and `wait` is false. */
export async function acquireLockOrExplain(
  path: string,
  opts: AcquireOptions,
  what: string,
): Promise<HeldLock> {
  const held = await acquireLock(path, opts);
  if (held) return held;
  throw new UserError(
    `${what} is locked by ${describeHolder(readHolder(path))}; run again without --no-wait to wait for it`,
  );
}
