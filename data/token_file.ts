/**
 * The binary token artifact: what the `tokenize` stage writes and training/evaluation read.
 *
 * Layout (all integers little-endian; every section starts at a multiple of 8 bytes):
 *
 * | bytes                   | content                                                                          |
 * | ----------------------- | -------------------------------------------------------------------------------- |
 * | 0..8                    | magic `DSTTOKv1` (ASCII)                                                         |
 * | 8..12                   | u32 `H`: size of the header region that follows (a multiple of 8)                |
 * | 12..16                  | u32 0 (reserved)                                                                 |
 * | 16..16+H                | header: UTF-8 JSON object, padded with spaces to `H` bytes                       |
 * | ids                     | u32 x `num_tokens`                                                               |
 * | mask                    | u8 x `num_tokens` (0/1; 1 = training target), zero-padded to 8                   |
 * | offsets                 | u64 x (`num_sequences` + 1): token offset where each sequence starts; last = N    |
 * | doc_starts              | u64 x `num_docs`: absolute token positions where a document starts               |
 * | doc_records             | u32 x `num_docs`: record index (within its file) of each document, zero-padded   |
 *
 * The header carries `magic`, `version`, `dtype`, the counts, `tokenizer` (`digest`, `bos_id`, `eos_id`,
 * `vocab_size`), `format`, `layout` (`sequences`, or `pairs`: sequences 2i and 2i+1 are the chosen and rejected
 * sides of preference pair i), `max_length`, `packing`, the byte offset and size of every section,
 * `payload_sha256` (of all bytes after the header region) and a free-form `meta` object (e.g. tokenize
 * parameters and statistics). The header has no timestamps and its keys are written in a fixed order (`meta`
 * canonicalised), so equal inputs give byte-identical files and stable cache digests.
 *
 * Writing streams ids to the final file's temporary sibling and masks to a second temporary file, appends the
 * small tables, writes the header last, fsyncs and renames (util/atomic.ts), so a crash never leaves a partial
 * file under the final name. Reading loads only the header and the offset tables; `read(i)` fetches one
 * sequence's bytes. Every size and table is checked on open, and problems name the file.
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { tempPathFor } from "../util/atomic.ts";
import { UserError } from "../util/errors.ts";
import type { PackingMode } from "./packing.ts";

/** Magic bytes at the start of every token file. */
export const TOKEN_FILE_MAGIC = "DSTTOKv1";
/** Current format version. */
export const TOKEN_FILE_VERSION = 1;
/** Default size of the header region (JSON + padding). */
export const DEFAULT_HEADER_BYTES = 4096;

const PREFIX = 16;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** What the tokenizer was (so readers can check they use the same one). */
export interface TokenizerInfo {
  /** A digest of the tokenizer files (computed by the caller, e.g. sha256 of tokenizer.json + config). */
  digest: string;
  /** BOS id or null. */
  bos_id: number | null;
  /** EOS id or null. */
  eos_id: number | null;
  /** Vocabulary size when known: every id is checked to be below it. */
  vocab_size: number | null;
}

/** How sequences are grouped. */
export type TokenLayout = "sequences" | "pairs";

/** What the writer is told about the data. */
export interface TokenFileInfo {
  /** The dataset format the sequences were made from (`text`, `chat`, `preference`, ...). */
  format: string;
  /** `sequences`, or `pairs` for preference data. */
  layout: TokenLayout;
  /** The tokenize stage's max_length, or null. */
  max_length: number | null;
  /** How documents became sequences. */
  packing: PackingMode;
  /** The tokenizer. */
  tokenizer: TokenizerInfo;
  /** Anything else worth recording (tokenize parameters, statistics); must be JSON. */
  meta?: Record<string, unknown>;
}

/** Byte range of a section. */
export interface SectionRange {
  /** Byte offset from the start of the file. */
  offset: number;
  /** Size in bytes (without padding). */
  bytes: number;
}

/** The parsed header of a token file. */
export interface TokenFileHeader extends TokenFileInfo {
  /** Always `distillery.tokens`. */
  magic: string;
  /** Format version. */
  version: number;
  /** Always `u32`. */
  dtype: "u32";
  /** Total tokens. */
  num_tokens: number;
  /** Sequences (twice the pairs for layout `pairs`). */
  num_sequences: number;
  /** Documents recorded. */
  num_docs: number;
  /** Tokens with mask 1. */
  num_target_tokens: number;
  /** Longest sequence. */
  max_sequence_length: number;
  /** Where the sections are. */
  sections: {
    ids: SectionRange;
    mask: SectionRange;
    offsets: SectionRange;
    doc_starts: SectionRange;
    doc_records: SectionRange;
  };
  /** SHA-256 (hex) of every byte after the header region. */
  payload_sha256: string;
  /** Free-form metadata, keys sorted (always present; `{}` when none). */
  meta: Record<string, unknown>;
}

/** One sequence as appended to a writer. */
export interface SequenceInput {
  /** Token ids. */
  ids: ArrayLike<number>;
  /** Loss mask, 0/1, same length. */
  mask: ArrayLike<number>;
  /** Positions (within the sequence) where documents start; default `[0]`. */
  docStarts?: readonly number[];
  /** Record index of each document; default `[-1]` is stored as 0xFFFFFFFF (unknown). */
  docRecords?: readonly number[];
}

/** One sequence as read back. */
export interface SequenceData {
  /** Token ids. */
  ids: Uint32Array;
  /** Loss mask (0/1). */
  mask: Uint8Array;
  /** Positions (within the sequence) where documents start. */
  docStarts: number[];
  /** Record index of each of those documents (0xFFFFFFFF = unknown). */
  docRecords: number[];
}

function pad8(n: number): number {
  return (n + 7) & ~7;
}

/** JSON with object keys sorted at every level (deterministic bytes for free-form metadata). */
function canonical(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === "object") {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) o[k] = canonical((v as Record<string, unknown>)[k]);
    return o;
  }
  return v;
}

class ChunkedFileWriter {
  #file: Deno.FsFile;
  #buf: Uint8Array;
  #used = 0;
  #hash: Hash | null;
  written = 0;
  constructor(file: Deno.FsFile, hash: Hash | null, size = 1 << 20) {
    this.#file = file;
    this.#hash = hash;
    this.#buf = new Uint8Array(size);
  }
  async write(bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.length) {
      const n = Math.min(bytes.length - off, this.#buf.length - this.#used);
      this.#buf.set(bytes.subarray(off, off + n), this.#used);
      this.#used += n;
      off += n;
      if (this.#used === this.#buf.length) await this.flush();
    }
    this.written += bytes.length;
  }
  async flush(): Promise<void> {
    let off = 0;
    const data = this.#buf.subarray(0, this.#used);
    this.#hash?.update(data);
    while (off < data.length) off += await this.#file.write(data.subarray(off));
    this.#used = 0;
  }
}

/**
 * Streams sequences into a token file. Usage: `const w = await TokenFileWriter.create(path, info)`, then
 * `await w.append(seq)` for each sequence, then `await w.finish()` (or `await w.abort()` on failure).
 */
export class TokenFileWriter {
  readonly #path: string;
  readonly #info: TokenFileInfo;
  readonly #headerBytes: number;
  readonly #tmp: string;
  readonly #maskTmp: string;
  readonly #file: Deno.FsFile;
  readonly #maskFile: Deno.FsFile;
  readonly #hash: Hash;
  readonly #ids: ChunkedFileWriter;
  readonly #masks: ChunkedFileWriter;
  #offsets: number[] = [0];
  #docStarts: number[] = [];
  #docRecords: number[] = [];
  #tokens = 0;
  #targets = 0;
  #longest = 0;
  #done = false;

  private constructor(
    path: string,
    info: TokenFileInfo,
    headerBytes: number,
    tmp: string,
    maskTmp: string,
    file: Deno.FsFile,
    maskFile: Deno.FsFile,
  ) {
    this.#path = path;
    this.#info = info;
    this.#headerBytes = headerBytes;
    this.#tmp = tmp;
    this.#maskTmp = maskTmp;
    this.#file = file;
    this.#maskFile = maskFile;
    this.#hash = createHash("sha256");
    this.#ids = new ChunkedFileWriter(file, this.#hash);
    this.#masks = new ChunkedFileWriter(maskFile, null);
  }

  /** Opens a writer for `path` (the file appears only when {@linkcode TokenFileWriter.finish} succeeds). */
  static async create(
    path: string,
    info: TokenFileInfo,
    opts: { headerBytes?: number } = {},
  ): Promise<TokenFileWriter> {
    const headerBytes = opts.headerBytes ?? DEFAULT_HEADER_BYTES;
    if (headerBytes % 8 !== 0 || headerBytes < 256) {
      throw new RangeError(`headerBytes must be a multiple of 8 >= 256`);
    }
    if (info.layout !== "sequences" && info.layout !== "pairs") {
      throw new RangeError(`unknown layout ${info.layout}`);
    }
    const tmp = tempPathFor(path), maskTmp = tempPathFor(`${path}.mask`);
    const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
    let maskFile: Deno.FsFile;
    try {
      maskFile = await Deno.open(maskTmp, { read: true, write: true, create: true, truncate: true });
      await file.seek(PREFIX + headerBytes, Deno.SeekMode.Start);
    } catch (e) {
      file.close();
      await Deno.remove(tmp).catch(() => {});
      throw e;
    }
    return new TokenFileWriter(path, info, headerBytes, tmp, maskTmp, file, maskFile);
  }

  /** Sequences appended so far. */
  get numSequences(): number {
    return this.#offsets.length - 1;
  }

  /**
   * Appends one sequence.
   *
   * @throws {RangeError} for empty sequences, length mismatches, ids outside u32 (or the vocabulary), mask
   * values other than 0/1, or document starts out of order (these are bugs in the caller, not user errors).
   */
  async append(seq: SequenceInput): Promise<void> {
    if (this.#done) throw new Error("TokenFileWriter: append after finish/abort");
    const n = seq.ids.length;
    if (n === 0) throw new RangeError("TokenFileWriter: empty sequence");
    if (seq.mask.length !== n) {
      throw new RangeError(`TokenFileWriter: ${n} ids but ${seq.mask.length} mask values`);
    }
    const vocab = this.#info.tokenizer.vocab_size;
    const ids = new Uint32Array(n), mask = new Uint8Array(n);
    let targets = 0;
    for (let i = 0; i < n; i++) {
      const id = seq.ids[i], m = seq.mask[i];
      if (!Number.isInteger(id) || id < 0 || id > 0xffffffff || (vocab !== null && id >= vocab)) {
        throw new RangeError(
          `TokenFileWriter: sequence ${this.numSequences} token ${i}: id ${id} out of range`,
        );
      }
      if (m !== 0 && m !== 1) throw new RangeError(`TokenFileWriter: mask value ${m} (expected 0 or 1)`);
      ids[i] = id;
      mask[i] = m;
      targets += m;
    }
    const starts = seq.docStarts ?? [0];
    const records = seq.docRecords ?? starts.map(() => -1);
    if (records.length !== starts.length) {
      throw new RangeError("TokenFileWriter: docStarts/docRecords lengths differ");
    }
    for (let k = 0; k < starts.length; k++) {
      const s = starts[k];
      if (!Number.isInteger(s) || s < 0 || s >= n || (k > 0 && s <= starts[k - 1])) {
        throw new RangeError(`TokenFileWriter: bad document start ${s} in a sequence of ${n}`);
      }
    }
    // Validation is complete: only now does the writer's state change.
    for (let k = 0; k < starts.length; k++) {
      this.#docStarts.push(this.#tokens + starts[k]);
      this.#docRecords.push(records[k] < 0 ? 0xffffffff : records[k]);
    }
    await this.#ids.write(LITTLE_ENDIAN ? new Uint8Array(ids.buffer) : toLittleEndianU32(ids));
    await this.#masks.write(mask);
    this.#targets += targets;
    this.#tokens += n;
    this.#longest = Math.max(this.#longest, n);
    this.#offsets.push(this.#tokens);
  }

  /**
   * Completes the file: appends the tables, writes the header, fsyncs and renames into place. `meta` entries
   * known only at the end (statistics) are merged over the `meta` given at creation.
   */
  async finish(meta?: Record<string, unknown>): Promise<TokenFileHeader> {
    if (this.#done) throw new Error("TokenFileWriter: finish called twice");
    try {
      if (this.#info.layout === "pairs" && this.numSequences % 2 !== 0) {
        throw new RangeError(
          `TokenFileWriter: layout pairs needs an even number of sequences, got ${this.numSequences}`,
        );
      }
      await this.#ids.flush();
      await this.#masks.flush();
      const idsOff = PREFIX + this.#headerBytes;
      const idsBytes = this.#tokens * 4;
      // ids are 4-byte units, so the mask section starts 8-aligned after at most 4 bytes of padding.
      const hashed = (bytes: Uint8Array) => {
        this.#hash.update(bytes);
        return bytes;
      };
      const w = async (bytes: Uint8Array) => {
        let off = 0;
        while (off < bytes.length) off += await this.#file.write(bytes.subarray(off));
      };
      await w(hashed(new Uint8Array(pad8(idsBytes) - idsBytes)));
      const maskOff = idsOff + pad8(idsBytes);
      await this.#maskFile.seek(0, Deno.SeekMode.Start);
      const chunk = new Uint8Array(1 << 20);
      let copied = 0;
      while (copied < this.#tokens) {
        const n = await this.#maskFile.read(chunk);
        if (n === null) throw new Error("TokenFileWriter: mask temp file shorter than expected");
        await w(hashed(chunk.subarray(0, n)));
        copied += n;
      }
      await w(hashed(new Uint8Array(pad8(this.#tokens) - this.#tokens)));
      const offsetsOff = maskOff + pad8(this.#tokens);
      const offsets = u64Bytes(this.#offsets);
      await w(hashed(offsets));
      const startsOff = offsetsOff + offsets.length;
      const starts = u64Bytes(this.#docStarts);
      await w(hashed(starts));
      const recordsOff = startsOff + starts.length;
      const records = new Uint8Array(pad8(this.#docRecords.length * 4));
      const dv = new DataView(records.buffer);
      this.#docRecords.forEach((r, i) => dv.setUint32(i * 4, r, true));
      await w(hashed(records));
      const header: TokenFileHeader = {
        magic: "distillery.tokens",
        version: TOKEN_FILE_VERSION,
        dtype: "u32",
        format: this.#info.format,
        layout: this.#info.layout,
        max_length: this.#info.max_length,
        packing: this.#info.packing,
        tokenizer: {
          digest: this.#info.tokenizer.digest,
          bos_id: this.#info.tokenizer.bos_id,
          eos_id: this.#info.tokenizer.eos_id,
          vocab_size: this.#info.tokenizer.vocab_size,
        },
        num_tokens: this.#tokens,
        num_sequences: this.numSequences,
        num_docs: this.#docStarts.length,
        num_target_tokens: this.#targets,
        max_sequence_length: this.#longest,
        sections: {
          ids: { offset: idsOff, bytes: idsBytes },
          mask: { offset: maskOff, bytes: this.#tokens },
          offsets: { offset: offsetsOff, bytes: offsets.length },
          doc_starts: { offset: startsOff, bytes: starts.length },
          doc_records: { offset: recordsOff, bytes: this.#docRecords.length * 4 },
        },
        payload_sha256: this.#hash.digest("hex"),
        meta: canonical({ ...this.#info.meta, ...meta }) as Record<string, unknown>,
      };
      const json = new TextEncoder().encode(JSON.stringify(header));
      if (json.length > this.#headerBytes) {
        throw new RangeError(
          `TokenFileWriter: header is ${json.length} bytes, more than the ${this.#headerBytes} reserved (shrink meta)`,
        );
      }
      const head = new Uint8Array(PREFIX + this.#headerBytes).fill(0x20);
      head.set(new TextEncoder().encode(TOKEN_FILE_MAGIC), 0);
      const hv = new DataView(head.buffer);
      hv.setUint32(8, this.#headerBytes, true);
      hv.setUint32(12, 0, true);
      head.set(json, PREFIX);
      await this.#file.seek(0, Deno.SeekMode.Start);
      await w(head);
      await this.#file.sync();
      this.#file.close();
      this.#maskFile.close();
      this.#done = true;
      await Deno.remove(this.#maskTmp).catch(() => {});
      await Deno.rename(this.#tmp, this.#path);
      return header;
    } catch (e) {
      await this.abort();
      throw e;
    }
  }

  /** Discards everything written; the final path is untouched. */
  async abort(): Promise<void> {
    if (!this.#done) {
      this.#done = true;
      try {
        this.#file.close();
      } catch { /* already closed */ }
      try {
        this.#maskFile.close();
      } catch { /* already closed */ }
    }
    await Deno.remove(this.#tmp).catch(() => {});
    await Deno.remove(this.#maskTmp).catch(() => {});
  }
}

function toLittleEndianU32(a: Uint32Array): Uint8Array {
  const out = new Uint8Array(a.length * 4);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < a.length; i++) dv.setUint32(i * 4, a[i], true);
  return out;
}

function u64Bytes(values: readonly number[]): Uint8Array {
  const out = new Uint8Array(values.length * 8);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < values.length; i++) dv.setBigUint64(i * 8, BigInt(values[i]), true);
  return out;
}

/** Writes a whole token file from an iterable of sequences (see {@linkcode TokenFileWriter}). */
export async function writeTokenFile(
  path: string,
  info: TokenFileInfo,
  sequences: Iterable<SequenceInput> | AsyncIterable<SequenceInput>,
  opts: { headerBytes?: number } = {},
): Promise<TokenFileHeader> {
  const w = await TokenFileWriter.create(path, info, opts);
  try {
    for await (const s of sequences) await w.append(s);
  } catch (e) {
    await w.abort();
    throw e;
  }
  return await w.finish();
}

/** Something sequences can be read from by index (a token file, or memory in tests). */
export interface SequenceSource {
  /** Number of sequences. */
  readonly numSequences: number;
  /** Length of sequence `i` in tokens (without reading it). */
  sequenceLength(i: number): number;
  /** Sequence `i`. */
  read(i: number): SequenceData;
}

/** Reads a token file; keeps the file open until {@linkcode TokenFileReader.close}. */
export class TokenFileReader implements SequenceSource {
  /** The validated header. */
  readonly header: TokenFileHeader;
  /** The file's path. */
  readonly path: string;
  readonly #file: Deno.FsFile;
  readonly #offsets: Float64Array;
  readonly #docStarts: Float64Array;
  readonly #docRecords: Uint32Array;

  private constructor(
    path: string,
    file: Deno.FsFile,
    header: TokenFileHeader,
    offsets: Float64Array,
    docStarts: Float64Array,
    docRecords: Uint32Array,
  ) {
    this.path = path;
    this.#file = file;
    this.header = header;
    this.#offsets = offsets;
    this.#docStarts = docStarts;
    this.#docRecords = docRecords;
  }

  /**
   * Opens and validates a token file (magic, version, header fields, every section's position and size, the
   * file size, and the offset and document tables).
   *
   * @throws {UserError} naming the file and what is wrong with it.
   */
  static async open(path: string): Promise<TokenFileReader> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (e) {
      throw new UserError(`token file ${path}: cannot open (${(e as Error).message})`, { cause: e });
    }
    try {
      const size = (await file.stat()).size;
      const corrupt = (what: string) =>
        new UserError(
          `token file ${path} is damaged or not a token file: ${what}; re-run the tokenize stage`,
        );
      const readAt = async (offset: number, n: number) => {
        const out = new Uint8Array(n);
        await file.seek(offset, Deno.SeekMode.Start);
        let got = 0;
        while (got < n) {
          const k = await file.read(out.subarray(got));
          if (k === null) throw corrupt(`file ends at byte ${offset + got}, expected ${offset + n}`);
          got += k;
        }
        return out;
      };
      if (size < PREFIX) throw corrupt(`only ${size} bytes`);
      const prefix = await readAt(0, PREFIX);
      const magic = new TextDecoder().decode(prefix.subarray(0, 8));
      if (magic !== TOKEN_FILE_MAGIC) {
        throw corrupt(`magic is ${JSON.stringify(magic)}, expected "${TOKEN_FILE_MAGIC}"`);
      }
      const hBytes = new DataView(prefix.buffer).getUint32(8, true);
      if (hBytes % 8 !== 0 || PREFIX + hBytes > size) {
        throw corrupt(`header size ${hBytes} does not fit the file`);
      }
      let header: TokenFileHeader;
      try {
        header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(await readAt(PREFIX, hBytes)));
      } catch (e) {
        if (e instanceof UserError) throw e;
        throw corrupt(`header is not valid JSON (${(e as Error).message})`);
      }
      validateHeader(header, PREFIX + hBytes, size, corrupt);
      const s = header.sections;
      const offsets = readU64(await readAt(s.offsets.offset, s.offsets.bytes));
      const docStarts = readU64(await readAt(s.doc_starts.offset, s.doc_starts.bytes));
      const recBytes = await readAt(s.doc_records.offset, s.doc_records.bytes);
      const docRecords = new Uint32Array(header.num_docs);
      const rv = new DataView(recBytes.buffer);
      for (let i = 0; i < docRecords.length; i++) docRecords[i] = rv.getUint32(i * 4, true);
      if (offsets[0] !== 0 || offsets[offsets.length - 1] !== header.num_tokens) {
        throw corrupt(
          `sequence offsets run from ${offsets[0]} to ${
            offsets[offsets.length - 1]
          }, expected 0 to ${header.num_tokens}`,
        );
      }
      let longest = 0;
      for (let i = 1; i < offsets.length; i++) {
        const len = offsets[i] - offsets[i - 1];
        if (!(len > 0)) throw corrupt(`sequence ${i - 1} has length ${len}`);
        longest = Math.max(longest, len);
      }
      if (longest !== header.max_sequence_length) {
        throw corrupt(`longest sequence is ${longest}, header says ${header.max_sequence_length}`);
      }
      for (let i = 0; i < docStarts.length; i++) {
        if (
          !(docStarts[i] >= 0 && docStarts[i] < header.num_tokens) ||
          (i > 0 && docStarts[i] <= docStarts[i - 1])
        ) {
          throw corrupt(
            `document start ${i} is ${docStarts[i]} (must increase and stay below ${header.num_tokens})`,
          );
        }
      }
      return new TokenFileReader(path, file, header, offsets, docStarts, docRecords);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  /** Number of sequences. */
  get numSequences(): number {
    return this.header.num_sequences;
  }

  /** Number of preference pairs (layout `pairs`). */
  get numPairs(): number {
    return this.header.layout === "pairs" ? this.header.num_sequences / 2 : 0;
  }

  /** Length of sequence `i`. */
  sequenceLength(i: number): number {
    this.#check(i);
    return this.#offsets[i + 1] - this.#offsets[i];
  }

  /** Token offset of sequence `i` in the whole stream. */
  sequenceOffset(i: number): number {
    this.#check(i);
    return this.#offsets[i];
  }

  /**
   * Reads sequence `i` (its ids, mask and document starts) with two small reads.
   *
   * @throws {UserError} when the bytes read are inconsistent (mask values other than 0/1, ids outside the
   * vocabulary): the file was damaged after it was written.
   */
  read(i: number): SequenceData {
    this.#check(i);
    const start = this.#offsets[i], end = this.#offsets[i + 1], n = end - start;
    const s = this.header.sections;
    const idBytes = this.#readSync(s.ids.offset + start * 4, n * 4);
    let ids: Uint32Array;
    if (LITTLE_ENDIAN) ids = new Uint32Array(idBytes.buffer, 0, n);
    else {
      ids = new Uint32Array(n);
      const dv = new DataView(idBytes.buffer);
      for (let k = 0; k < n; k++) ids[k] = dv.getUint32(k * 4, true);
    }
    const mask = this.#readSync(s.mask.offset + start, n);
    const vocab = this.header.tokenizer.vocab_size;
    for (let k = 0; k < n; k++) {
      if (mask[k] > 1 || (vocab !== null && ids[k] >= vocab)) {
        throw new UserError(
          `token file ${this.path} is damaged: sequence ${i} token ${k} has id ${ids[k]} mask ${mask[k]}; ` +
            `re-run the tokenize stage`,
        );
      }
    }
    const docStarts: number[] = [], docRecords: number[] = [];
    for (
      let d = lowerBound(this.#docStarts, start);
      d < this.#docStarts.length && this.#docStarts[d] < end;
      d++
    ) {
      docStarts.push(this.#docStarts[d] - start);
      docRecords.push(this.#docRecords[d]);
    }
    return { ids, mask, docStarts, docRecords };
  }

  /** Reads preference pair `p` (layout `pairs`). */
  readPair(p: number): { chosen: SequenceData; rejected: SequenceData } {
    if (this.header.layout !== "pairs") throw new Error(`token file ${this.path}: layout is not pairs`);
    return { chosen: this.read(2 * p), rejected: this.read(2 * p + 1) };
  }

  /**
   * Recomputes the payload digest and compares it with the header (reads the whole file).
   *
   * @throws {UserError} when they differ.
   */
  async verify(): Promise<void> {
    const h = createHash("sha256");
    const start = this.header.sections.ids.offset;
    await this.#file.seek(start, Deno.SeekMode.Start);
    const buf = new Uint8Array(1 << 20);
    while (true) {
      const n = await this.#file.read(buf);
      if (n === null) break;
      h.update(buf.subarray(0, n));
    }
    const got = h.digest("hex");
    if (got !== this.header.payload_sha256) {
      throw new UserError(
        `token file ${this.path} is damaged: payload sha256 ${got} differs from the header's ` +
          `${this.header.payload_sha256}; re-run the tokenize stage`,
      );
    }
  }

  /** Closes the file. */
  close(): void {
    this.#file.close();
  }

  /** Closes the file (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }

  #check(i: number): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.header.num_sequences) {
      throw new RangeError(
        `token file ${this.path}: sequence ${i} out of range 0..${this.header.num_sequences - 1}`,
      );
    }
  }

  #readSync(offset: number, n: number): Uint8Array {
    const out = new Uint8Array(n);
    this.#file.seekSync(offset, Deno.SeekMode.Start);
    let got = 0;
    while (got < n) {
      const k = this.#file.readSync(out.subarray(got));
      if (k === null) throw new UserError(`token file ${this.path} is truncated at byte ${offset + got}`);
      got += k;
    }
    return out;
  }
}

function readU64(bytes: Uint8Array): Float64Array {
  const n = bytes.length / 8;
  const out = new Float64Array(n);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < n; i++) out[i] = Number(dv.getBigUint64(i * 8, true));
  return out;
}

function lowerBound(a: Float64Array, x: number): number {
  let lo = 0, hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function validateHeader(
  h: TokenFileHeader,
  dataStart: number,
  size: number,
  corrupt: (w: string) => UserError,
): void {
  const isCount = (v: unknown) => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
  if (!h || typeof h !== "object") throw corrupt("header is not an object");
  if (h.magic !== "distillery.tokens") throw corrupt(`header magic is ${JSON.stringify(h.magic)}`);
  if (h.version !== TOKEN_FILE_VERSION) {
    throw corrupt(
      `version ${h.version} is not supported (this Distillery reads version ${TOKEN_FILE_VERSION})`,
    );
  }
  if (h.dtype !== "u32") throw corrupt(`dtype ${JSON.stringify(h.dtype)}, expected "u32"`);
  if (h.layout !== "sequences" && h.layout !== "pairs") throw corrupt(`layout ${JSON.stringify(h.layout)}`);
  for (
    const k of [
      "num_tokens",
      "num_sequences",
      "num_docs",
      "num_target_tokens",
      "max_sequence_length",
    ] as const
  ) {
    if (!isCount(h[k])) throw corrupt(`${k} is ${JSON.stringify(h[k])}`);
  }
  if (h.layout === "pairs" && h.num_sequences % 2 !== 0) {
    throw corrupt(`layout pairs with ${h.num_sequences} sequences`);
  }
  const t = h.tokenizer;
  if (!t || typeof t.digest !== "string" || !(t.vocab_size === null || isCount(t.vocab_size))) {
    throw corrupt("tokenizer info missing or malformed");
  }
  const s = h.sections;
  if (!s || typeof s !== "object") throw corrupt("sections missing");
  const expect = {
    ids: h.num_tokens * 4,
    mask: h.num_tokens,
    offsets: (h.num_sequences + 1) * 8,
    doc_starts: h.num_docs * 8,
    doc_records: h.num_docs * 4,
  };
  let at = dataStart;
  for (const name of ["ids", "mask", "offsets", "doc_starts", "doc_records"] as const) {
    const r = s[name];
    if (!r || r.offset !== at || r.bytes !== expect[name]) {
      throw corrupt(
        `section ${name} is ${JSON.stringify(r)}, expected {"offset":${at},"bytes":${
          expect[name]
        }} for the counts`,
      );
    }
    at += pad8(r.bytes);
  }
  if (size !== at) throw corrupt(`file is ${size} bytes, the header's counts give ${at}`);
}
