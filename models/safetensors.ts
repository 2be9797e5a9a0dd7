/**
 * Reading and writing the safetensors format (https://github.com/huggingface/safetensors), single files and
 * sharded checkpoints (`model.safetensors.index.json`).
 *
 * A file is an 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape, data_offsets}}`
 * plus an optional `__metadata__` string map), then the data section. Opening a file reads and checks only the
 * header; tensor bytes are read on demand with positioned reads, so one tensor of a 15 GB shard costs its own
 * size, not the shard's.
 *
 * The checks follow the format's rules: a sane header length inside the file, valid JSON, known dtypes,
 * `prod(shape) * dtype size == end - begin` for every tensor, and tensors that tile the data section exactly
 * (inside it, no overlap, no holes). A file that breaks one is refused with a {@linkcode UserError} naming the
 * file and the tensor.
 *
 * @module
 */
import { dirname, isAbsolute, join, normalize } from "node:path";
import { UserError } from "../util/errors.ts";
import { tempPathFor } from "../util/atomic.ts";
import { readFileRange } from "./file_range.ts";
import {
  bf16BitsToF32,
  type Dtype,
  DTYPE_SIZE,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  FLOAT_DTYPES,
  INT_DTYPES,
  isDtype,
} from "./dtype.ts";

/** Largest header accepted (the reference implementation's limit): larger ones are corrupt or hostile. */
export const MAX_HEADER_BYTES = 100_000_000;

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("Distillery's tensor I/O assumes a little-endian host");
}

/** Where one tensor lives in a safetensors file. */
export interface TensorInfo {
  /** Tensor name (state-dict key). */
  name: string;
  /** Stored element type. */
  dtype: Dtype;
  /** Shape, outermost dimension first. */
  shape: number[];
  /** Absolute byte offset of the first element in the file. */
  offset: number;
  /** Byte length of the tensor data. */
  byteLength: number;
  /** The file the tensor is stored in. */
  file: string;
}

/** Read access to a set of named tensors (one safetensors file, or all shards of a checkpoint). */
export interface TensorSource {
  /** A short description for messages (a file or index path). */
  readonly path: string;
  /** Tensor names in sorted order. */
  names(): string[];
  /** True when the source has a tensor of this name. */
  has(name: string): boolean;
  /** Location, dtype and shape of a tensor; a {@linkcode UserError} if it is absent. */
  info(name: string): TensorInfo;
  /** The tensor's raw little-endian bytes, as stored. */
  readBytes(name: string): Promise<Uint8Array>;
  /** A floating-point tensor converted to float32 (F32, F16, BF16, F64). */
  readFloat32(name: string): Promise<Float32Array>;
  /** An integer or BOOL tensor as int32; a {@linkcode UserError} if a value does not fit. */
  readInt32(name: string): Promise<Int32Array>;
}

/** Number of elements of a shape (1 for a scalar). */
export function numElements(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function fail(path: string, what: string): never {
  throw new UserError(`${path}: not a valid safetensors file: ${what}`);
}

/** Converts raw little-endian tensor bytes of a floating-point dtype to float32. */
export function bytesToFloat32(bytes: Uint8Array, dtype: Dtype, where: string): Float32Array {
  const n = bytes.byteLength / DTYPE_SIZE[dtype];
  if (bytes.byteOffset % DTYPE_SIZE[dtype] !== 0) bytes = bytes.slice(); // typed views need alignment
  switch (dtype) {
    case "F32":
      return new Float32Array(bytes.buffer, bytes.byteOffset, n);
    case "F16":
      return f16BitsToF32(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
    case "BF16":
      return bf16BitsToF32(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
    case "F64":
      return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, n));
    default:
      throw new UserError(
        `${where}: dtype ${dtype} is not a floating-point type (expected one of ${FLOAT_DTYPES})`,
      );
  }
}

/** Converts raw little-endian tensor bytes of an integer (or BOOL) dtype to int32, refusing values that do not fit. */
export function bytesToInt32(bytes: Uint8Array, dtype: Dtype, where: string): Int32Array {
  const n = bytes.byteLength / DTYPE_SIZE[dtype];
  if (bytes.byteOffset % DTYPE_SIZE[dtype] !== 0) bytes = bytes.slice();
  const b = bytes.buffer, o = bytes.byteOffset;
  const check = (v: number | bigint, i: number): number => {
    if (v < -2147483648 || v > 2147483647) {
      throw new UserError(`${where}: element ${i} = ${v} does not fit in int32`);
    }
    return Number(v);
  };
  switch (dtype) {
    case "I32":
      return new Int32Array(b, o, n);
    case "I16":
      return Int32Array.from(new Int16Array(b, o, n));
    case "I8":
      return Int32Array.from(new Int8Array(b, o, n));
    case "U16":
      return Int32Array.from(new Uint16Array(b, o, n));
    case "U8":
    case "BOOL":
      return Int32Array.from(new Uint8Array(b, o, n));
    case "U32":
      return Int32Array.from(new Uint32Array(b, o, n), check);
    case "I64":
      return Int32Array.from(new BigInt64Array(b, o, n), check);
    case "U64":
      return Int32Array.from(new BigUint64Array(b, o, n), check);
    default:
      throw new UserError(`${where}: dtype ${dtype} is not an integer type (expected one of ${INT_DTYPES})`);
  }
}

/** Parses and checks a safetensors header; `fileSize` is the whole file's size in bytes. */
export function parseSafetensorsHeader(
  path: string,
  prefix: Uint8Array,
  fileSize: number,
): { headerLength: number; metadata: Record<string, string>; tensors: Map<string, TensorInfo> } {
  if (fileSize < 8 || prefix.byteLength < 8) {
    fail(path, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
  }
  const n64 = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n64 < 2n) fail(path, `header length ${n64} is too small to hold a JSON object`);
  if (n64 > BigInt(MAX_HEADER_BYTES)) {
    fail(
      path,
      `header length ${n64} is larger than the ${MAX_HEADER_BYTES}-byte limit (corrupt length field?)`,
    );
  }
  const n = Number(n64);
  if (8 + n > fileSize) {
    fail(path, `header length ${n} runs past the end of the ${fileSize}-byte file (truncated?)`);
  }
  if (prefix.byteLength < 8 + n) throw new Error("parseSafetensorsHeader: prefix shorter than the header");
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(prefix.subarray(8, 8 + n)));
  } catch (e) {
    throw new UserError(
      `${path}: not a valid safetensors file: header is not valid UTF-8 JSON (${(e as Error).message})`,
      {
        cause: e,
      },
    );
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail(path, "header JSON is not an object");
  }
  const dataStart = 8 + n;
  const dataSize = fileSize - dataStart;
  const metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, raw] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
        fail(path, "__metadata__ is not an object");
      }
      for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
        if (typeof v !== "string") fail(path, `__metadata__["${k}"] is not a string`);
        metadata[k] = v;
      }
      continue;
    }
    const t = `tensor "${name}"`;
    if (typeof raw !== "object" || raw === null) fail(path, `${t}: entry is not an object`);
    const { dtype, shape, data_offsets: offs } = raw as Record<string, unknown>;
    if (!isDtype(dtype)) fail(path, `${t}: unknown dtype ${JSON.stringify(dtype)}`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      fail(path, `${t}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    if (
      !Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isSafeInteger(d) && d >= 0) ||
      offs[0] > offs[1]
    ) {
      fail(path, `${t}: data_offsets ${JSON.stringify(offs)} is not a [begin, end] pair with begin <= end`);
    }
    const [begin, end] = offs as number[];
    const need = numElements(shape as number[]) * DTYPE_SIZE[dtype];
    if (need !== end - begin) {
      fail(
        path,
        `${t}: shape [${shape}] of ${dtype} needs ${need} bytes but data_offsets [${begin}, ${end}] hold ${
          end - begin
        }`,
      );
    }
    if (end > dataSize) {
      fail(
        path,
        `${t}: data_offsets [${begin}, ${end}] run past the ${dataSize}-byte data section (truncated?)`,
      );
    }
    ranges.push({ name, begin, end });
    tensors.set(name, {
      name,
      dtype,
      shape: [...(shape as number[])],
      offset: dataStart + begin,
      byteLength: end - begin,
      file: path,
    });
  }
  // The data section must be tiled exactly: overlaps alias tensors, holes hide bytes nobody accounts for.
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev = "";
  for (const r of ranges) {
    if (r.begin < pos) {
      fail(
        path,
        `tensor "${r.name}" (bytes ${r.begin}..${r.end}) overlaps tensor "${prev}" (ends at ${pos})`,
      );
    }
    if (r.begin > pos) {
      fail(
        path,
        `tensor "${r.name}" starts at byte ${r.begin} but the previous data ends at ${pos} (a hole)`,
      );
    }
    pos = r.end;
    prev = r.name;
  }
  if (pos !== dataSize) {
    fail(
      path,
      `tensors cover ${pos} bytes of the ${dataSize}-byte data section (trailing bytes or truncation)`,
    );
  }
  return { headerLength: n, metadata, tensors };
}

/** One opened safetensors file: header checked on open, tensor data read lazily. */
export class SafetensorsFile implements TensorSource {
  /** Path of the file. */
  readonly path: string;
  /** The `__metadata__` string map (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Length of the JSON header in bytes. */
  readonly headerLength: number;
  /** Size of the whole file in bytes. */
  readonly fileSize: number;
  #tensors: Map<string, TensorInfo>;

  private constructor(
    path: string,
    fileSize: number,
    parsed: ReturnType<typeof parseSafetensorsHeader>,
  ) {
    this.path = path;
    this.fileSize = fileSize;
    this.metadata = parsed.metadata;
    this.headerLength = parsed.headerLength;
    this.#tensors = parsed.tensors;
  }

  /** Opens a file and checks its header; no tensor data is read. */
  static async open(path: string): Promise<SafetensorsFile> {
    let size: number;
    try {
      const st = await Deno.stat(path);
      if (!st.isFile) throw new UserError(`${path}: not a file`);
      size = st.size;
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: file not found`, { cause: e });
      throw e;
    }
    if (size < 8) fail(path, `file is ${size} bytes, shorter than the 8-byte header length`);
    const lenBytes = await readFileRange(path, 0, 8);
    const n = new DataView(lenBytes.buffer).getBigUint64(0, true);
    // Read the header only when its length is plausible; the parser then reports the precise problem.
    const want = n >= 2n && n <= BigInt(MAX_HEADER_BYTES) && 8n + n <= BigInt(size) ? 8 + Number(n) : 8;
    const prefix = want > 8 ? await readFileRange(path, 0, want) : lenBytes;
    return new SafetensorsFile(path, size, parseSafetensorsHeader(path, prefix, size));
  }

  /** Tensor names in sorted order. */
  names(): string[] {
    return [...this.#tensors.keys()].sort();
  }

  /** True when the file has a tensor of this name. */
  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  /** Location, dtype and shape of a tensor. */
  info(name: string): TensorInfo {
    const t = this.#tensors.get(name);
    if (!t) throw new UserError(`${this.path}: no tensor named "${name}"`);
    return t;
  }

  /** The tensor's raw bytes. */
  readBytes(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    return readFileRange(this.path, t.offset, t.byteLength);
  }

  /** A floating-point tensor as float32. */
  async readFloat32(name: string): Promise<Float32Array> {
    const t = this.info(name);
    return bytesToFloat32(await this.readBytes(name), t.dtype, `${this.path}: tensor "${name}"`);
  }

  /** An integer tensor as int32. */
  async readInt32(name: string): Promise<Int32Array> {
    const t = this.info(name);
    return bytesToInt32(await this.readBytes(name), t.dtype, `${this.path}: tensor "${name}"`);
  }
}

/** Opens one safetensors file (header checked, data lazy). */
export function openSafetensors(path: string): Promise<SafetensorsFile> {
  return SafetensorsFile.open(path);
}

/**
 * A sharded checkpoint: an index file (`model.safetensors.index.json`, or `pytorch_model.bin.index.json` with
 * another shard opener) plus the shard files its `weight_map` names.
 */
export class ShardedSafetensors implements TensorSource {
  /** Path of the index file. */
  readonly path: string;
  /** The index's `metadata` object (e.g. `total_size`). */
  readonly metadata: Readonly<Record<string, unknown>>;
  /** The opened shards, by file name. */
  readonly shards: ReadonlyMap<string, TensorSource>;
  #where: Map<string, TensorSource>;

  private constructor(
    path: string,
    metadata: Record<string, unknown>,
    shards: Map<string, TensorSource>,
    where: Map<string, TensorSource>,
  ) {
    this.path = path;
    this.metadata = metadata;
    this.shards = shards;
    this.#where = where;
  }

  /**
   * Opens an index file and every shard it names (with `openShard`, safetensors by default); checks each
   * named tensor is in its shard.
   */
  static async open(
    indexPath: string,
    openShard: (path: string) => Promise<TensorSource> = SafetensorsFile.open,
  ): Promise<ShardedSafetensors> {
    let text: string;
    try {
      text = await Deno.readTextFile(indexPath);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new UserError(`${indexPath}: file not found`, { cause: e });
      }
      throw e;
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new UserError(`${indexPath}: not valid JSON (${(e as Error).message})`, { cause: e });
    }
    const obj = json as { weight_map?: unknown; metadata?: unknown };
    if (
      typeof obj !== "object" || obj === null || typeof obj.weight_map !== "object" || obj.weight_map === null
    ) {
      throw new UserError(
        `${indexPath}: expected an object with a "weight_map" object (tensor name -> shard file)`,
      );
    }
    const dir = dirname(indexPath);
    const shards = new Map<string, TensorSource>();
    const where = new Map<string, TensorSource>();
    for (const [name, file] of Object.entries(obj.weight_map as Record<string, unknown>)) {
      if (typeof file !== "string" || file === "" || isAbsolute(file) || normalize(file).startsWith("..")) {
        throw new UserError(
          `${indexPath}: weight_map["${name}"] = ${JSON.stringify(file)} is not a file name inside ${dir}`,
        );
      }
      let shard = shards.get(file);
      if (!shard) {
        shard = await openShard(join(dir, file));
        shards.set(file, shard);
      }
      if (!shard.has(name)) {
        throw new UserError(
          `${indexPath}: tensor "${name}" is mapped to ${file}, which has no tensor of that name`,
        );
      }
      where.set(name, shard);
    }
    const metadata = typeof obj.metadata === "object" && obj.metadata !== null
      ? obj.metadata as Record<string, unknown>
      : {};
    return new ShardedSafetensors(indexPath, metadata, shards, where);
  }

  /** Tensor names in sorted order. */
  names(): string[] {
    return [...this.#where.keys()].sort();
  }

  /** True when the index maps this name. */
  has(name: string): boolean {
    return this.#where.has(name);
  }

  #shard(name: string): TensorSource {
    const s = this.#where.get(name);
    if (!s) throw new UserError(`${this.path}: no tensor named "${name}"`);
    return s;
  }

  /** Location, dtype and shape of a tensor. */
  info(name: string): TensorInfo {
    return this.#shard(name).info(name);
  }

  /** The tensor's raw bytes. */
  readBytes(name: string): Promise<Uint8Array> {
    return this.#shard(name).readBytes(name);
  }

  /** A floating-point tensor as float32. */
  readFloat32(name: string): Promise<Float32Array> {
    return this.#shard(name).readFloat32(name);
  }

  /** An integer tensor as int32. */
  readInt32(name: string): Promise<Int32Array> {
    return this.#shard(name).readInt32(name);
  }
}

/** Opens a sharded checkpoint from its `*.safetensors.index.json`. */
export function openShardedSafetensors(indexPath: string): Promise<ShardedSafetensors> {
  return ShardedSafetensors.open(indexPath);
}

/** A tensor to write: float32 data stored as F32, F16 or BF16, or integer data stored as is. */
export type TensorToWrite =
  | { shape: readonly number[]; data: Float32Array; dtype?: "F32" | "F16" | "BF16" }
  | { shape: readonly number[]; data: Int32Array; dtype: "I32" }
  | { shape: readonly number[]; data: BigInt64Array; dtype: "I64" }
  | { shape: readonly number[]; data: Uint8Array; dtype: "U8" | "BOOL" };

function encodeTensor(name: string, t: TensorToWrite): { dtype: Dtype; bytes: Uint8Array } {
  const dtype: Dtype = t.dtype ?? "F32";
  const n = numElements(t.shape);
  if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new Error(`writeSafetensors: tensor "${name}" has an invalid shape [${t.shape}]`);
  }
  if (t.data.length !== n) {
    throw new Error(
      `writeSafetensors: tensor "${name}" has shape [${t.shape}] (${n} elements) but ${t.data.length} values`,
    );
  }
  let view: ArrayBufferView;
  if (dtype === "F16") view = f32ToF16Bits(t.data as Float32Array);
  else if (dtype === "BF16") view = f32ToBf16Bits(t.data as Float32Array);
  else view = t.data;
  return { dtype, bytes: new Uint8Array(view.buffer, view.byteOffset, view.byteLength) };
}

/**
 * Builds the header bytes for tensors in sorted name order, padded with spaces to a multiple of 8 bytes so the
 * data section stays 8-byte aligned. The same tensors and metadata always give the same bytes.
 */
function buildHeader(
  entries: { name: string; dtype: Dtype; shape: readonly number[]; size: number }[],
  metadata: Record<string, string> | undefined,
): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) {
    const m: Record<string, string> = {};
    for (const k of Object.keys(metadata).sort()) {
      if (typeof metadata[k] !== "string") {
        throw new Error(`writeSafetensors: metadata["${k}"] is not a string`);
      }
      m[k] = metadata[k];
    }
    header.__metadata__ = m;
  }
  let off = 0;
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: [...e.shape], data_offsets: [off, off + e.size] };
    off += e.size;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20, 8);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}

/**
 * Writes tensors to a safetensors file atomically (temporary sibling file, fsync, rename) and streams tensor by
 * tensor, so a checkpoint larger than memory allows as one buffer can be written. Keys are sorted and the header
 * is canonical, so equal inputs give byte-identical files (stable digests).
 */
export async function writeSafetensors(
  path: string,
  tensors: ReadonlyMap<string, TensorToWrite> | Readonly<Record<string, TensorToWrite>>,
  metadata?: Record<string, string>,
): Promise<void> {
  const map = tensors instanceof Map
    ? tensors as ReadonlyMap<string, TensorToWrite>
    : new Map(Object.entries(tensors as Record<string, TensorToWrite>));
  const names = [...map.keys()].sort();
  for (const name of names) {
    if (name === "__metadata__") throw new Error('writeSafetensors: "__metadata__" is reserved');
  }
  const entries = names.map((name) => {
    const t = map.get(name)!;
    const dtype: Dtype = t.dtype ?? "F32";
    return { name, dtype, shape: t.shape, size: numElements(t.shape) * DTYPE_SIZE[dtype] };
  });
  const header = buildHeader(entries, metadata);
  const tmp = tempPathFor(path);
  const f = await Deno.open(tmp, { write: true, create: true, truncate: true });
  try {
    const writeAll = async (b: Uint8Array) => {
      let off = 0;
      while (off < b.length) off += await f.write(b.subarray(off));
    };
    await writeAll(header);
    for (const name of names) await writeAll(encodeTensor(name, map.get(name)!).bytes);
    await f.sync();
    f.close();
  } catch (e) {
    f.close();
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
  await Deno.rename(tmp, path);
}

/** Serialises tensors to safetensors bytes in memory (same bytes as {@linkcode writeSafetensors}). */
export function encodeSafetensors(
  tensors: ReadonlyMap<string, TensorToWrite> | Readonly<Record<string, TensorToWrite>>,
  metadata?: Record<string, string>,
): Uint8Array {
  const map = tensors instanceof Map
    ? tensors as ReadonlyMap<string, TensorToWrite>
    : new Map(Object.entries(tensors as Record<string, TensorToWrite>));
  const names = [...map.keys()].sort();
  const encoded = names.map((name) => ({
    name,
    shape: map.get(name)!.shape,
    ...encodeTensor(name, map.get(name)!),
  }));
  const header = buildHeader(
    encoded.map((e) => ({ name: e.name, dtype: e.dtype, shape: e.shape, size: e.bytes.byteLength })),
    metadata,
  );
  const out = new Uint8Array(header.length + encoded.reduce((s, e) => s + e.bytes.byteLength, 0));
  out.set(header, 0);
  let off = header.length;
  for (const e of encoded) {
    out.set(e.bytes, off);
    off += e.bytes.byteLength;
  }
  return out;
}
