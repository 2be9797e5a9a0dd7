/**
 * Atomic file output: write to a temporary sibling path, then rename into place, so a crash or `kill -9`
 * never leaves a half-written file under the final name.
 *
 * @module
 */
import { basename, dirname, join } from "node:path";

/** A unique temporary path next to `path` (same directory, so the final rename stays on one filesystem). */
export function tempPathFor(path: string): string {
  const rand = crypto.getRandomValues(new Uint32Array(2));
  return join(
    dirname(path),
    `.${basename(path)}.${Deno.pid}.${rand[0].toString(36)}${rand[1].toString(36)}.tmp`,
  );
}

/** Writes bytes to `path` atomically (temporary file, fsync, rename). */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const tmp = tempPathFor(path);
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const f = await Deno.open(tmp, { write: true, create: true, truncate: true });
  try {
    let off = 0;
    while (off < bytes.length) off += await f.write(bytes.subarray(off));
    await f.sync();
  } catch (e) {
    f.close();
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
  f.close();
  await Deno.rename(tmp, path);
}

/**
 * Creates a directory atomically: `fill` writes into a temporary directory, which is renamed to `path` only when
 * `fill` resolves. If `path` already exists it is replaced.
 */
export async function writeDirAtomic(path: string, fill: (tmpDir: string) => Promise<void>): Promise<void> {
  const tmp = tempPathFor(path);
  await Deno.mkdir(tmp, { recursive: true });
  try {
    await fill(tmp);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
  await Deno.remove(path, { recursive: true }).catch((e) => {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  });
  await Deno.rename(tmp, path);
}
