/**
 * Reading dataset records from local files and Hub dataset repositories.
 *
 * A dataset is addressed by a path: a local file, a local directory (split resolution as on the Hub), a local
 * glob (`data/*.jsonl`), or `hf://datasets/org/name[@revision][/file-or-glob]`. Files are read in sorted path
 * order and records in file order, so the record sequence is deterministic; `offset` and `limit` then select a
 * window of it.
 *
 * Readers:
 * - `jsonl` (`.jsonl`, `.ndjson`): one JSON value per line, streamed; blank lines are skipped. A line that is
 *   not valid JSON becomes a record with `error` set (the format layer reports it under the `on_invalid` policy).
 * - `json` (`.json`): a JSON array of records, or an object whose `field` holds that array. A `.json` file
 *   that is really JSON Lines (as on many Hub repositories) is read as JSONL, like `datasets` does.
 * - `parquet`: read with hyparquet one row group at a time (memory bounded by the largest row group); whole
 *   row groups before `offset` are skipped without decoding. int64 values become numbers when exact.
 *   Codecs: snappy (built in), gzip, brotli and zstd (through node:zlib).
 * - `text` (`.txt`): each record is `{ text }`. `textMode` is `paragraphs` (default: documents separated by one
 *   or more blank lines, lines inside a document joined with "\n"), `lines` (one non-blank line per record)
 *   or `file` (the whole file, byte for byte, as one record).
 *
 * Every record carries its {@linkcode RecordSource}: the file (for Hub files an `hf://` label), the zero-based
 * index within that file, and the one-based line for line-oriented files.
 *
 * @module
 */
import {
  type AsyncBuffer,
  type Compressors,
  parquetMetadataAsync,
  parquetReadObjects,
  parquetSchema,
} from "hyparquet";
import * as zlib from "node:zlib";
import { isAbsolute, join, resolve } from "node:path";
import { UserError } from "../util/errors.ts";
import {
  fileTypeOf,
  globToRegExp,
  type HubDatasetResolver,
  hubFileLabel,
  isHubAddress,
  listLocalFiles,
  parseHubDatasetUrl,
  resolveSplitFiles,
} from "./data_files.ts";
import type { RecordSource } from "./problems.ts";

/** The readers this module has. */
export type RecordFileType = "parquet" | "jsonl" | "json" | "text";

/** How plain text files are cut into records. */
export type TextMode = "paragraphs" | "lines" | "file";

/** The text modes, for schema checks. */
export const TEXT_MODES: readonly TextMode[] = ["paragraphs", "lines", "file"];

/** Which records to read (the `dataset` block of a recipe). */
export interface DatasetSpec {
  /** Local file, directory or glob, or `hf://datasets/org/name[@rev][/file-or-glob]`. Relative to `baseDir`. */
  path: string;
  /** Split for directories and Hub repositories (default `train`); a single file is its own data. */
  split?: string;
  /** Subset/config name (README `configs:` or a top-level folder). */
  subset?: string;
  /** Force a reader instead of deciding by extension. */
  type?: RecordFileType;
  /** JSON only: the field of the top-level object that holds the list of records. */
  field?: string;
  /** Plain text only: how to cut records (default `paragraphs`). */
  textMode?: TextMode;
  /** Records to skip at the start of the (split's) record sequence. */
  offset?: number;
  /** At most this many records after `offset`. */
  limit?: number;
  /** Parquet only: decode just these columns (faster on wide tables). */
  columns?: string[];
}

/** One file of a resolved dataset. */
export interface ResolvedFile {
  /** Local path to read. */
  path: string;
  /** Name used in messages and record sources (the local path, or an `hf://` label for Hub files). */
  label: string;
  /** The reader to use. */
  type: RecordFileType;
}

/** A dataset resolved to concrete files (what the runner hashes for the cache key). */
export interface ResolvedDataset {
  /** The address as given. */
  label: string;
  /** The selected split. */
  split: string;
  /** The split's files in reading order. */
  files: ResolvedFile[];
  /** Splits that exist (for messages and `explain`). */
  availableSplits: string[];
}

/** One record and where it came from. */
export interface DatasetRecord {
  /** The parsed value (an object for JSON/parquet rows, `{ text }` for text files); undefined with `error`. */
  value: unknown;
  /** File, index and line. */
  source: RecordSource;
  /** Set when the record could not be parsed (e.g. a JSONL line that is not JSON). */
  error?: string;
}

/** Where to look things up while resolving a {@linkcode DatasetSpec}. */
export interface ResolveOptions {
  /** Directory that relative local paths are relative to (default: the working directory). */
  baseDir?: string;
  /** Hub access; required for `hf://` paths. */
  hub?: HubDatasetResolver;
}

function validateSpec(spec: DatasetSpec): void {
  const int = (v: unknown) => typeof v === "number" && Number.isInteger(v) && v >= 0;
  if (typeof spec.path !== "string" || spec.path.length === 0) {
    throw new UserError(`dataset: "path" must be a non-empty string, found ${JSON.stringify(spec.path)}`);
  }
  if (spec.offset !== undefined && !int(spec.offset)) {
    throw new UserError(
      `dataset ${spec.path}: "offset" must be a non-negative integer, found ${spec.offset}`,
    );
  }
  if (spec.limit !== undefined && !int(spec.limit)) {
    throw new UserError(`dataset ${spec.path}: "limit" must be a non-negative integer, found ${spec.limit}`);
  }
  if (spec.textMode !== undefined && !TEXT_MODES.includes(spec.textMode)) {
    throw new UserError(
      `dataset ${spec.path}: "text_mode" must be one of ${TEXT_MODES.join(", ")}, found "${spec.textMode}"`,
    );
  }
}

function typeFor(path: string, label: string, forced?: RecordFileType): RecordFileType {
  if (forced) return forced;
  const t = fileTypeOf(path);
  if (!t) {
    throw new UserError(
      `dataset file ${label}: unknown file type; expected .parquet, .jsonl, .ndjson, .json or .txt (or set type)`,
    );
  }
  return t;
}

/**
 * Resolves a {@linkcode DatasetSpec} to the files of its split.
 *
 * @throws {UserError} for a missing path, an unknown split or subset, no matching file, or an `hf://` path
 * without a Hub resolver.
 */
export async function resolveDataset(spec: DatasetSpec, opts: ResolveOptions = {}): Promise<ResolvedDataset> {
  validateSpec(spec);
  if (isHubAddress(spec.path)) {
    const ref = parseHubDatasetUrl(spec.path);
    if (!opts.hub) {
      throw new UserError(`dataset ${spec.path}: Hub datasets need the Hub cache, which is not set up`);
    }
    const listing = await opts.hub.listFiles(ref.repo, ref.revision);
    const readmeFile = listing.includes("README.md") ? "README.md" : null;
    const readme = readmeFile && !ref.pattern
      ? await Deno.readTextFile(await opts.hub.localPath(ref.repo, ref.revision, readmeFile))
      : null;
    const sel = resolveSplitFiles(listing, {
      split: spec.split,
      subset: spec.subset,
      pattern: ref.pattern,
      readme,
      label: spec.path,
    });
    const files: ResolvedFile[] = [];
    for (const f of sel.files) {
      const label = hubFileLabel(ref.repo, ref.revision, f);
      files.push({
        path: await opts.hub.localPath(ref.repo, ref.revision, f),
        label,
        type: typeFor(f, label, spec.type),
      });
    }
    return { label: spec.path, split: sel.split, files, availableSplits: sel.available };
  }
  const abs = isAbsolute(spec.path) ? spec.path : resolve(opts.baseDir ?? Deno.cwd(), spec.path);
  const stat = await Deno.stat(abs).catch(() => null);
  if (stat?.isFile) {
    return {
      label: spec.path,
      split: spec.split ?? "train",
      files: [{ path: abs, label: spec.path, type: typeFor(abs, spec.path, spec.type) }],
      availableSplits: [spec.split ?? "train"],
    };
  }
  let root = abs, pattern: string | null = null;
  if (!stat) {
    // A glob: the longest leading run of plain segments is the directory to list.
    const segs = abs.split("/");
    const first = segs.findIndex((s) => /[*?[]/.test(s));
    if (first < 0) throw new UserError(`dataset ${spec.path}: no such file or directory (${abs})`);
    root = segs.slice(0, first).join("/") || "/";
    pattern = segs.slice(first).join("/");
    globToRegExp(pattern);
    const rootStat = await Deno.stat(root).catch(() => null);
    if (!rootStat?.isDirectory) throw new UserError(`dataset ${spec.path}: no such directory ${root}`);
  } else if (!stat.isDirectory) {
    throw new UserError(`dataset ${spec.path}: not a file or directory (${abs})`);
  }
  const listing = await listLocalFiles(root);
  const readme = listing.includes("README.md") && !pattern
    ? await Deno.readTextFile(join(root, "README.md"))
    : null;
  const sel = resolveSplitFiles(listing, {
    split: spec.split,
    subset: spec.subset,
    pattern,
    readme,
    label: spec.path,
  });
  const files = sel.files.map((f) => {
    const path = join(root, f);
    const label = pattern ? path : join(spec.path, f);
    return { path, label, type: typeFor(f, label, spec.type) };
  });
  return { label: spec.path, split: sel.split, files, availableSplits: sel.available };
}

/** Options for {@linkcode iterateRecords} (the reading half of a {@linkcode DatasetSpec}). */
export type ReadOptions = Pick<DatasetSpec, "offset" | "limit" | "field" | "textMode" | "columns">;

/**
 * Streams the records of a resolved dataset in deterministic order, applying `offset` and `limit` over the
 * concatenation of its files.
 *
 * @throws {UserError} for unreadable files, JSON documents that are not valid JSON, a JSON object without the
 * named `field`, or a corrupt parquet file; each names the file.
 */
export async function* iterateRecords(
  ds: ResolvedDataset,
  opts: ReadOptions = {},
): AsyncGenerator<DatasetRecord> {
  let skip = opts.offset ?? 0;
  let left = opts.limit ?? Infinity;
  if (left <= 0) return;
  for (const file of ds.files) {
    const state = { skip };
    const gen = readFile(file, opts, state);
    for await (const rec of gen) {
      if (state.skip > 0) {
        state.skip--;
        continue;
      }
      yield rec;
      if (--left <= 0) return;
    }
    skip = state.skip;
  }
}

/** Resolves and reads a dataset into memory (convenience for small data and tests). */
export async function readRecords(spec: DatasetSpec, opts: ResolveOptions = {}): Promise<DatasetRecord[]> {
  const ds = await resolveDataset(spec, opts);
  const out: DatasetRecord[] = [];
  for await (const r of iterateRecords(ds, spec)) out.push(r);
  return out;
}

/** Counter shared with a reader so that it can skip whole row groups before `offset`. */
interface SkipState {
  skip: number;
}

function readFile(file: ResolvedFile, opts: ReadOptions, state: SkipState): AsyncGenerator<DatasetRecord> {
  switch (file.type) {
    case "jsonl":
      return readJsonl(file);
    case "json":
      return readJson(file, opts.field);
    case "text":
      return readText(file, opts.textMode ?? "paragraphs");
    case "parquet":
      return readParquet(file, opts.columns, state);
  }
}

async function openFile(file: ResolvedFile): Promise<Deno.FsFile> {
  try {
    return await Deno.open(file.path, { read: true });
  } catch (e) {
    throw new UserError(`dataset file ${file.label}: cannot open (${(e as Error).message})`, { cause: e });
  }
}

/** Streams the lines of a UTF-8 file with their one-based numbers (a trailing "\r" is removed). */
async function* fileLines(file: ResolvedFile): AsyncGenerator<{ text: string; line: number }> {
  const f = await openFile(file);
  const decoder = new TextDecoder("utf-8", { fatal: true });
  let carry = "";
  let line = 0;
  const buf = new Uint8Array(1 << 20);
  try {
    while (true) {
      const n = await f.read(buf);
      const done = n === null;
      let chunk: string;
      try {
        chunk = done ? decoder.decode() : decoder.decode(buf.subarray(0, n), { stream: true });
      } catch (e) {
        throw new UserError(`dataset file ${file.label}: not valid UTF-8 near line ${line + 1}`, {
          cause: e,
        });
      }
      carry += chunk;
      let start = 0;
      for (let i = carry.indexOf("\n"); i >= 0; i = carry.indexOf("\n", start)) {
        line++;
        let t = carry.slice(start, i);
        if (t.endsWith("\r")) t = t.slice(0, -1);
        if (line === 1 && t.charCodeAt(0) === 0xfeff) t = t.slice(1);
        yield { text: t, line };
        start = i + 1;
      }
      carry = carry.slice(start);
      if (done) break;
    }
    if (carry.length > 0) {
      line++;
      let t = carry.endsWith("\r") ? carry.slice(0, -1) : carry;
      if (line === 1 && t.charCodeAt(0) === 0xfeff) t = t.slice(1);
      yield { text: t, line };
    }
  } finally {
    f.close();
  }
}

async function* readJsonl(file: ResolvedFile): AsyncGenerator<DatasetRecord> {
  let index = 0;
  for await (const { text, line } of fileLines(file)) {
    if (text.trim() === "") continue;
    const source = { file: file.label, index: index++, line };
    try {
      yield { value: JSON.parse(text), source };
    } catch (e) {
      yield { value: undefined, source, error: `invalid JSON (${(e as Error).message})` };
    }
  }
}

/**
 * Offset of the first JSON syntax error in `text` (V8's JSON.parse messages do not always carry a position).
 * A small recursive-descent scan; used only after JSON.parse has failed.
 */
function jsonErrorOffset(text: string): number {
  let i = 0;
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const fail = (): never => {
    throw i;
  };
  const lit = (w: string) => (text.startsWith(w, i) ? (i += w.length) : fail());
  const str = () => {
    i++;
    while (i < text.length && text[i] !== '"') {
      if (text.charCodeAt(i) < 0x20) fail();
      i += text[i] === "\\" ? 2 : 1;
    }
    if (i >= text.length) fail();
    i++;
  };
  const value = (): void => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      ws();
      if (text[i] === "}") return void i++;
      while (true) {
        ws();
        if (text[i] !== '"') fail();
        str();
        ws();
        if (text[i] !== ":") fail();
        i++;
        value();
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "}") return void i++;
        else fail();
      }
    } else if (c === "[") {
      i++;
      ws();
      if (text[i] === "]") return void i++;
      while (true) {
        value();
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "]") return void i++;
        else fail();
      }
    } else if (c === '"') str();
    else if (c === "t") lit("true");
    else if (c === "f") lit("false");
    else if (c === "n") lit("null");
    else {
      const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
      if (!m) fail();
      i += m![0].length;
    }
  };
  try {
    value();
    ws();
    return i < text.length ? i : -1;
  } catch (pos) {
    return pos as number;
  }
}

/** `:line` of the first JSON syntax error in `text`, or "" when it cannot be located. */
function jsonErrorLine(text: string): string {
  const pos = jsonErrorOffset(text);
  if (pos < 0) return "";
  let line = 1;
  for (let k = 0; k < pos && k < text.length; k++) if (text.charCodeAt(k) === 10) line++;
  return `:${line}`;
}

async function* readJson(file: ResolvedFile, field: string | undefined): AsyncGenerator<DatasetRecord> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await Deno.readFile(file.path));
  } catch (e) {
    throw new UserError(`dataset file ${file.label}: cannot read as UTF-8 text (${(e as Error).message})`, {
      cause: e,
    });
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    // Many Hub repositories store JSON Lines under .json; datasets reads those as JSON Lines too.
    const first = text.split("\n").find((l) => l.trim() !== "");
    let firstIsJson = false;
    try {
      if (first !== undefined) JSON.parse(first), firstIsJson = true;
    } catch { /* not JSON Lines either */ }
    if (firstIsJson && field === undefined) {
      yield* readJsonl(file);
      return;
    }
    throw new UserError(
      `dataset file ${file.label}${jsonErrorLine(text)}: not valid JSON (${(e as Error).message})`,
      { cause: e },
    );
  }
  let list: unknown = doc;
  if (field !== undefined) {
    if (!doc || typeof doc !== "object" || Array.isArray(doc)) {
      throw new UserError(
        `dataset file ${file.label}: field "${field}" was set but the file is not a JSON object`,
      );
    }
    list = (doc as Record<string, unknown>)[field];
    if (!Array.isArray(list)) {
      const arrays = Object.entries(doc).filter(([, v]) => Array.isArray(v)).map(([k]) => k);
      throw new UserError(
        `dataset file ${file.label}: field "${field}" is not a list of records` +
          (arrays.length ? ` (fields holding lists: ${arrays.join(", ")})` : ""),
      );
    }
  } else if (!Array.isArray(doc)) {
    const arrays = doc && typeof doc === "object"
      ? Object.entries(doc).filter(([, v]) => Array.isArray(v))
      : [];
    throw new UserError(
      `dataset file ${file.label}: expected a JSON list of records` +
        (arrays.length ? `, found an object; set field to one of: ${arrays.map(([k]) => k).join(", ")}` : ""),
    );
  }
  const items = list as unknown[];
  for (let i = 0; i < items.length; i++) yield { value: items[i], source: { file: file.label, index: i } };
}

async function* readText(file: ResolvedFile, mode: TextMode): AsyncGenerator<DatasetRecord> {
  if (mode === "file") {
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(await Deno.readFile(file.path));
    } catch (e) {
      throw new UserError(`dataset file ${file.label}: cannot read as UTF-8 text (${(e as Error).message})`, {
        cause: e,
      });
    }
    yield { value: { text }, source: { file: file.label, index: 0, line: 1 } };
    return;
  }
  let index = 0;
  if (mode === "lines") {
    for await (const { text, line } of fileLines(file)) {
      if (text.trim() === "") continue;
      yield { value: { text }, source: { file: file.label, index: index++, line } };
    }
    return;
  }
  let lines: string[] = [];
  let startLine = 0;
  for await (const { text, line } of fileLines(file)) {
    if (text.trim() === "") {
      if (lines.length > 0) {
        yield {
          value: { text: lines.join("\n") },
          source: { file: file.label, index: index++, line: startLine },
        };
        lines = [];
      }
      continue;
    }
    if (lines.length === 0) startLine = line;
    lines.push(text);
  }
  if (lines.length > 0) {
    yield {
      value: { text: lines.join("\n") },
      source: { file: file.label, index: index++, line: startLine },
    };
  }
}

/** An AsyncBuffer over a local file that reads only the byte ranges hyparquet asks for. */
function fileAsyncBuffer(f: Deno.FsFile, size: number): AsyncBuffer {
  return {
    byteLength: size,
    async slice(start: number, end?: number): Promise<ArrayBuffer> {
      const stop = Math.min(end ?? size, size);
      const out = new Uint8Array(Math.max(0, stop - start));
      await f.seek(start, Deno.SeekMode.Start);
      let off = 0;
      while (off < out.length) {
        const n = await f.read(out.subarray(off));
        if (n === null) break;
        off += n;
      }
      return out.buffer;
    },
  };
}

const zstdDecompressSync = (zlib as unknown as { zstdDecompressSync?: (b: Uint8Array) => Uint8Array })
  .zstdDecompressSync;

/** Decompressors hyparquet does not ship (it has snappy built in). */
const COMPRESSORS: Compressors = {
  GZIP: (input) => new Uint8Array(zlib.gunzipSync(input)),
  BROTLI: (input) => new Uint8Array(zlib.brotliDecompressSync(input)),
  ...(zstdDecompressSync ? { ZSTD: (input: Uint8Array) => new Uint8Array(zstdDecompressSync(input)) } : {}),
};

function plainValue(v: unknown): unknown {
  if (typeof v === "bigint") return Number.isSafeInteger(Number(v)) ? Number(v) : v;
  if (Array.isArray(v)) return v.map(plainValue);
  if (v && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype) {
    const o: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) o[k] = plainValue(x);
    return o;
  }
  return v;
}

async function* readParquet(
  file: ResolvedFile,
  columns: string[] | undefined,
  state: SkipState,
): AsyncGenerator<DatasetRecord> {
  const f = await openFile(file);
  try {
    const size = (await f.stat()).size;
    const buffer = fileAsyncBuffer(f, size);
    const fail = (what: string, e: unknown) =>
      new UserError(`dataset file ${file.label}: ${what} (${(e as Error).message ?? e})`, { cause: e });
    let metadata;
    try {
      metadata = await parquetMetadataAsync(buffer);
    } catch (e) {
      throw fail("not a readable parquet file", e);
    }
    if (columns) {
      const have = new Set(parquetSchema(metadata).children.map((c) => c.element.name));
      const missing = columns.filter((c) => !have.has(c));
      if (missing.length) {
        throw new UserError(
          `dataset file ${file.label}: no column(s) ${missing.join(", ")} (has ${[...have].join(", ")})`,
        );
      }
    }
    let rowStart = 0;
    for (const rg of metadata.row_groups) {
      const n = Number(rg.num_rows);
      const rowEnd = rowStart + n;
      if (state.skip >= n) {
        // Whole row group before the offset: skip it without decoding.
        state.skip -= n;
        rowStart = rowEnd;
        continue;
      }
      const from = rowStart + state.skip;
      state.skip = 0;
      let rows: Record<string, unknown>[];
      try {
        rows = await parquetReadObjects({
          file: buffer,
          metadata,
          columns,
          rowStart: from,
          rowEnd,
          compressors: COMPRESSORS,
        });
      } catch (e) {
        throw fail(`cannot decode rows ${from}..${rowEnd - 1}`, e);
      }
      for (let i = 0; i < rows.length; i++) {
        yield { value: plainValue(rows[i]), source: { file: file.label, index: from + i } };
      }
      rowStart = rowEnd;
    }
  } finally {
    f.close();
  }
}
