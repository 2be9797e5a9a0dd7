/**
 * Positioned reads: a byte range of a file without reading the rest, for lazy access to large weight files.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";

/**
 * Reads exactly `length` bytes at `offset` of `path` into a fresh buffer (so typed-array views of it are
 * aligned). A missing file or a file that ends early is a {@linkcode UserError} naming the file.
 */
export async function readFileRange(
  path: string,
  offset: number,
  length: number,
): Promise<Uint8Array<ArrayBuffer>> {
  const buf = new Uint8Array(length);
  let f: Deno.FsFile;
  try {
    f = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: file not found`, { cause: e });
    throw e;
  }
  try {
    await f.seek(offset, Deno.SeekMode.Start);
    let got = 0;
    while (got < length) {
      const n = await f.read(buf.subarray(got));
      if (n === null) {
        throw new UserError(
          `${path}: file ended at byte ${offset + got} while reading bytes ${offset}..${offset + length} ` +
            `(was it truncated or modified after it was opened?)`,
        );
      }
      got += n;
    }
  } finally {
    f.close();
  }
  return buf;
}
