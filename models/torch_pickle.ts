/**
 * A reader for PyTorch checkpoints (`pytorch_model.bin`, `torch.save` zip format, PyTorch >= 1.6), which many
 * released hybrids ship instead of safetensors.
 *
 * The file is a zip archive (entries stored uncompressed) holding `<name>/data.pkl`, a pickle of the state
 * dict, and `<name>/data/<key>`, one raw little-endian storage per key. The pickle is interpreted by a small
 * virtual machine that knows only what a state dict contains (dicts, tuples, numbers, strings, storages and
 * the `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` constructors); any other global is refused, so
 * loading never runs code from the file (like `torch.load(weights_only=True)`). Tensor data is read lazily,
 * per tensor; views (offsets, strides, shared storages) are resolved. The pre-1.6 serialization is refused
 * with the command that converts it.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { type Dtype, DTYPE_SIZE } from "./dtype.ts";
import { readFileRange } from "./file_range.ts";
import {
  bytesToFloat32,
  bytesToInt32,
  numElements,
  type TensorInfo,
  type TensorSource,
} from "./safetensors.ts";

/** PyTorch storage classes and the element type they hold. */
const STORAGE_DTYPES: Record<string, Dtype> = {
  FloatStorage: "F32",
  HalfStorage: "F16",
  BFloat16Storage: "BF16",
  DoubleStorage: "F64",
  LongStorage: "I64",
  IntStorage: "I32",
  ShortStorage: "I16",
  CharStorage: "I8",
  ByteStorage: "U8",
  BoolStorage: "BOOL",
};

interface ZipEntry {
  name: string;
  dataOffset: number;
  size: number;
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await Deno.stat(path)).size;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: file not found`, { cause: e });
    throw e;
  }
}

/** Reads the central directory of a zip file (ZIP64 included); only stored (uncompressed) entries are allowed. */
async function readZipDirectory(path: string): Promise<Map<string, ZipEntry>> {
  const size = await fileSize(path);
  const bad = (what: string): never => {
    throw new UserError(`${path}: not a valid PyTorch zip checkpoint: ${what}`);
  };
  const tailLen = Math.min(size, 65536 + 22);
  const tail = await readFileRange(path, size - tailLen, tailLen);
  const dv = new DataView(tail.buffer);
  let eocd = -1;
  for (let i = tailLen - 22; i >= 0; i--) {
    if (dv.getUint32(i, true) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) bad("no end-of-central-directory record (truncated?)");
  let count = dv.getUint16(eocd + 10, true);
  let cdSize = dv.getUint32(eocd + 12, true);
  let cdOffset = dv.getUint32(eocd + 16, true);
  if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
    const loc = eocd - 20;
    if (loc < 0 || dv.getUint32(loc, true) !== 0x07064b50) bad("ZIP64 locator missing");
    const rec = Number(dv.getBigUint64(loc + 8, true));
    const r = new DataView((await readFileRange(path, rec, 56)).buffer);
    if (r.getUint32(0, true) !== 0x06064b50) bad("ZIP64 end record missing");
    count = Number(r.getBigUint64(32, true));
    cdSize = Number(r.getBigUint64(40, true));
    cdOffset = Number(r.getBigUint64(48, true));
  }
  if (cdOffset + cdSize > size) bad("central directory runs past the end of the file (truncated?)");
  const cd = await readFileRange(path, cdOffset, cdSize);
  const c = new DataView(cd.buffer);
  const entries = new Map<string, ZipEntry>();
  let p = 0;
  for (let k = 0; k < count; k++) {
    if (p + 46 > cdSize || c.getUint32(p, true) !== 0x02014b50) {
      bad(`central directory entry ${k} is damaged`);
    }
    const method = c.getUint16(p + 10, true);
    let compSize = c.getUint32(p + 20, true);
    let rawSize = c.getUint32(p + 24, true);
    const nameLen = c.getUint16(p + 28, true),
      extraLen = c.getUint16(p + 30, true),
      commentLen = c.getUint16(p + 32, true);
    let local = c.getUint32(p + 42, true);
    const name = new TextDecoder().decode(cd.subarray(p + 46, p + 46 + nameLen));
    // ZIP64 extra field: the 64-bit values for whichever fields hold 0xffffffff, in this order.
    let e = p + 46 + nameLen;
    const eEnd = e + extraLen;
    while (e + 4 <= eEnd) {
      const id = c.getUint16(e, true), len = c.getUint16(e + 2, true);
      if (id === 0x0001) {
        let q = e + 4;
        if (rawSize === 0xffffffff) (rawSize = Number(c.getBigUint64(q, true))), (q += 8);
        if (compSize === 0xffffffff) (compSize = Number(c.getBigUint64(q, true))), (q += 8);
        if (local === 0xffffffff) local = Number(c.getBigUint64(q, true));
      }
      e += 4 + len;
    }
    if (method !== 0) bad(`entry ${name} is compressed (method ${method}); PyTorch writes stored entries`);
    if (compSize !== rawSize) bad(`entry ${name} has differing stored and raw sizes`);
    entries.set(name, { name, dataOffset: local, size: rawSize });
    p += 46 + nameLen + extraLen + commentLen;
  }
  // Data starts after each entry's local header, whose extra field may differ from the central one.
  for (const entry of entries.values()) {
    if (entry.dataOffset + 30 > size) bad(`entry ${entry.name} points past the end of the file`);
    const h = new DataView((await readFileRange(path, entry.dataOffset, 30)).buffer);
    if (h.getUint32(0, true) !== 0x04034b50) bad(`entry ${entry.name} has no local header`);
    entry.dataOffset += 30 + h.getUint16(26, true) + h.getUint16(28, true);
    if (entry.dataOffset + entry.size > size) {
      bad(`entry ${entry.name} runs past the end of the file (truncated?)`);
    }
  }
  return entries;
}

interface Storage {
  kind: "storage";
  dtype: Dtype;
  key: string;
  numel: number;
}

interface TorchTensor {
  kind: "tensor";
  storage: Storage;
  offset: number;
  shape: number[];
  stride: number[];
}

class Global {
  constructor(readonly module: string, readonly name: string) {}
}

const MARK = Symbol("mark");

/** Interprets a state-dict pickle; returns the top-level object. */
function unpickle(data: Uint8Array, where: string): unknown {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const stack: unknown[] = [];
  const memo = new Map<number, unknown>();
  let pos = 0;
  const bad = (what: string): never => {
    throw new UserError(`${where}: unsupported or damaged pickle: ${what}`);
  };
  const popMark = (): unknown[] => {
    const i = stack.lastIndexOf(MARK);
    if (i < 0) bad("MARK missing");
    const items = stack.splice(i);
    items.shift();
    return items;
  };
  const text = (n: number) => {
    const s = new TextDecoder().decode(data.subarray(pos, pos + n));
    pos += n;
    return s;
  };
  const setItem = (d: unknown, k: unknown, v: unknown) => {
    if (!(d instanceof Map)) bad("SETITEM on a non-dict");
    (d as Map<unknown, unknown>).set(k, v);
  };
  const call = (f: unknown, args: unknown): unknown => {
    if (!(f instanceof Global) || !Array.isArray(args)) bad("REDUCE of a non-callable");
    const g = f as Global, a = args as unknown[];
    const full = `${g.module}.${g.name}`;
    if (full === "collections.OrderedDict") return new Map();
    if (full === "torch._utils._rebuild_tensor_v2" || full === "torch._utils._rebuild_tensor") {
      const [storage, offset, shape, stride] = a as [Storage, number, number[], number[]];
      if ((storage as Storage)?.kind !== "storage") bad(`${full} without a storage`);
      return {
        kind: "tensor",
        storage,
        offset,
        shape: [...shape],
        stride: [...stride],
      } satisfies TorchTensor;
    }
    if (full === "torch._utils._rebuild_parameter" || full === "torch._utils._rebuild_parameter_with_state") {
      return a[0];
    }
    return bad(`call of ${full} (only tensors, parameters and dicts are read)`);
  };
  while (pos < data.length) {
    const op = data[pos++];
    switch (op) {
      case 0x80: // PROTO
        pos++;
        break;
      case 0x95: // FRAME
        pos += 8;
        break;
      case 0x2e: // STOP
        return stack.pop();
      case 0x28: // MARK
        stack.push(MARK);
        break;
      case 0x7d: // EMPTY_DICT
        stack.push(new Map());
        break;
      case 0x5d: // EMPTY_LIST
        stack.push([]);
        break;
      case 0x29: // EMPTY_TUPLE
        stack.push([]);
        break;
      case 0x74: // TUPLE
        stack.push(popMark());
        break;
      case 0x85: // TUPLE1
        stack.push([stack.pop()]);
        break;
      case 0x86: { // TUPLE2
        const b = stack.pop(), a = stack.pop();
        stack.push([a, b]);
        break;
      }
      case 0x87: { // TUPLE3
        const c = stack.pop(), b = stack.pop(), a = stack.pop();
        stack.push([a, b, c]);
        break;
      }
      case 0x71: // BINPUT
        memo.set(data[pos++], stack[stack.length - 1]);
        break;
      case 0x72: // LONG_BINPUT
        memo.set(dv.getUint32(pos, true), stack[stack.length - 1]);
        pos += 4;
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, stack[stack.length - 1]);
        break;
      case 0x68: // BINGET
        stack.push(memo.get(data[pos++]));
        break;
      case 0x6a: // LONG_BINGET
        stack.push(memo.get(dv.getUint32(pos, true)));
        pos += 4;
        break;
      case 0x58: { // BINUNICODE
        const n = dv.getUint32(pos, true);
        pos += 4;
        stack.push(text(n));
        break;
      }
      case 0x8c: // SHORT_BINUNICODE
        stack.push(text(data[pos++]));
        break;
      case 0x8d: { // BINUNICODE8
        const n = Number(dv.getBigUint64(pos, true));
        pos += 8;
        stack.push(text(n));
        break;
      }
      case 0x55: // SHORT_BINSTRING
        stack.push(text(data[pos++]));
        break;
      case 0x54: { // BINSTRING
        const n = dv.getUint32(pos, true);
        pos += 4;
        stack.push(text(n));
        break;
      }
      case 0x4b: // BININT1
        stack.push(data[pos++]);
        break;
      case 0x4d: // BININT2
        stack.push(dv.getUint16(pos, true));
        pos += 2;
        break;
      case 0x4a: // BININT
        stack.push(dv.getInt32(pos, true));
        pos += 4;
        break;
      case 0x8a: { // LONG1
        const n = data[pos++];
        let v = 0n;
        for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[pos + i]);
        if (n > 0 && data[pos + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
        pos += n;
        if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER)) {
          bad("integer too large");
        }
        stack.push(Number(v));
        break;
      }
      case 0x47: // BINFLOAT
        stack.push(dv.getFloat64(pos, false));
        pos += 8;
        break;
      case 0x88: // NEWTRUE
        stack.push(true);
        break;
      case 0x89: // NEWFALSE
        stack.push(false);
        break;
      case 0x4e: // NONE
        stack.push(null);
        break;
      case 0x63: { // GLOBAL: "module\nname\n"
        const end1 = data.indexOf(0x0a, pos);
        const module = text(end1 - pos);
        pos++;
        const end2 = data.indexOf(0x0a, pos);
        const name = text(end2 - pos);
        pos++;
        stack.push(new Global(module, name));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = stack.pop(), module = stack.pop();
        stack.push(new Global(String(module), String(name)));
        break;
      }
      case 0x51: { // BINPERSID
        const pid = stack.pop();
        if (!Array.isArray(pid) || pid[0] !== "storage" || !(pid[1] instanceof Global)) {
          bad("unexpected persistent id");
        }
        const [, cls, key, , numel] = pid as [string, Global, string, string, number];
        const dtype = STORAGE_DTYPES[cls.name];
        if (cls.module !== "torch" || !dtype) bad(`storage type ${cls.module}.${cls.name} is not supported`);
        stack.push({ kind: "storage", dtype, key: String(key), numel } satisfies Storage);
        break;
      }
      case 0x52: { // REDUCE
        const args = stack.pop();
        const f = stack.pop();
        stack.push(call(f, args));
        break;
      }
      case 0x81: { // NEWOBJ
        const args = stack.pop();
        const cls = stack.pop();
        if (cls instanceof Global && cls.module === "collections" && cls.name === "OrderedDict") {
          stack.push(new Map());
        } else {bad(
            `NEWOBJ of ${cls instanceof Global ? `${cls.module}.${cls.name}` : "?"} (${
              JSON.stringify(args)
            })`,
          );}
        break;
      }
      case 0x62: // BUILD: object state (e.g. an OrderedDict's _metadata); irrelevant for the weights
        stack.pop();
        break;
      case 0x73: { // SETITEM
        const v = stack.pop(), k = stack.pop();
        setItem(stack[stack.length - 1], k, v);
        break;
      }
      case 0x75: { // SETITEMS
        const items = popMark();
        const d = stack[stack.length - 1];
        for (let i = 0; i + 1 < items.length; i += 2) setItem(d, items[i], items[i + 1]);
        break;
      }
      case 0x64: { // DICT
        const items = popMark();
        const d = new Map();
        for (let i = 0; i + 1 < items.length; i += 2) d.set(items[i], items[i + 1]);
        stack.push(d);
        break;
      }
      case 0x61: { // APPEND
        const v = stack.pop();
        (stack[stack.length - 1] as unknown[]).push(v);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark();
        (stack[stack.length - 1] as unknown[]).push(...items);
        break;
      }
      case 0x6c: // LIST
        stack.push(popMark());
        break;
      case 0x30: // POP
        stack.pop();
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        stack.push(stack[stack.length - 1]);
        break;
      default:
        bad(`opcode 0x${op.toString(16)} at byte ${pos - 1}`);
    }
  }
  return bad("no STOP opcode");
}

/** Flattens nested dicts of tensors into dotted names. */
function collectTensors(obj: unknown, prefix: string, out: Map<string, TorchTensor>): void {
  if (obj instanceof Map) {
    for (const [k, v] of obj) collectTensors(v, prefix ? `${prefix}.${k}` : String(k), out);
    return;
  }
  if ((obj as TorchTensor)?.kind === "tensor") {
    out.set(prefix, obj as TorchTensor);
    return;
  }
  // Non-tensor entries (step counters, config values) carry no weights.
}

function isContiguous(t: TorchTensor): boolean {
  let expect = 1;
  for (let d = t.shape.length - 1; d >= 0; d--) {
    if (t.shape[d] !== 1 && t.stride[d] !== expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

/** An opened `torch.save` zip checkpoint: the pickle is read on open, tensor data on demand. */
export class TorchCheckpoint implements TensorSource {
  /** Path of the file. */
  readonly path: string;
  #entries: Map<string, ZipEntry>;
  #prefix: string;
  #tensors: Map<string, TorchTensor>;

  private constructor(
    path: string,
    entries: Map<string, ZipEntry>,
    prefix: string,
    tensors: Map<string, TorchTensor>,
  ) {
    this.path = path;
    this.#entries = entries;
    this.#prefix = prefix;
    this.#tensors = tensors;
  }

  /** Opens a checkpoint: reads the zip directory and the pickle, checks every storage is present. */
  static async open(path: string): Promise<TorchCheckpoint> {
    const head = await readFileRange(path, 0, Math.min(4, await fileSize(path)));
    if (!(head[0] === 0x50 && head[1] === 0x4b)) {
      const legacy = head[0] === 0x80;
      throw new UserError(
        `${path}: ${
          legacy ? "a PyTorch checkpoint in the pre-1.6 format" : "not a PyTorch zip checkpoint"
        }, which ` +
          `Distillery does not read; convert it to safetensors: \`python -c "import torch; ` +
          `from safetensors.torch import save_file; sd = torch.load('${path}', weights_only=True); ` +
          `save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors', {'format': 'pt'})"\``,
      );
    }
    const entries = await readZipDirectory(path);
    const pkl = [...entries.keys()].find((n) => n.endsWith("/data.pkl") || n === "data.pkl");
    if (!pkl) throw new UserError(`${path}: no data.pkl in the archive: not a torch.save checkpoint`);
    const prefix = pkl.slice(0, pkl.length - "data.pkl".length);
    const order = entries.get(`${prefix}byteorder`);
    if (order) {
      const e = await readFileRange(path, order.dataOffset, order.size);
      const s = new TextDecoder().decode(e);
      if (s !== "little") {
        throw new UserError(`${path}: saved with byte order "${s}"; only little-endian is supported`);
      }
    }
    const p = entries.get(pkl)!;
    const pickle = await readFileRange(path, p.dataOffset, p.size);
    let root: unknown;
    try {
      root = unpickle(pickle, path);
    } catch (e) {
      if (e instanceof UserError) throw e;
      throw new UserError(`${path}: damaged pickle in ${pkl} (${(e as Error).message})`, { cause: e });
    }
    const tensors = new Map<string, TorchTensor>();
    collectTensors(root, "", tensors);
    if (!(root instanceof Map)) throw new UserError(`${path}: the checkpoint is not a dict of tensors`);
    for (const [name, t] of tensors) {
      const e = entries.get(`${prefix}data/${t.storage.key}`);
      if (!e) {
        throw new UserError(
          `${path}: tensor "${name}": storage ${t.storage.key} is missing from the archive`,
        );
      }
      const es = DTYPE_SIZE[t.storage.dtype];
      if (e.size !== t.storage.numel * es) {
        throw new UserError(
          `${path}: tensor "${name}": storage ${t.storage.key} holds ${e.size} bytes, expected ${
            t.storage.numel * es
          }`,
        );
      }
      const n = numElements(t.shape);
      if (n > 0) {
        let last = t.offset;
        for (let d = 0; d < t.shape.length; d++) last += (t.shape[d] - 1) * t.stride[d];
        if (t.offset < 0 || last >= t.storage.numel || t.stride.some((s) => s < 0)) {
          throw new UserError(
            `${path}: tensor "${name}" ([${t.shape}], offset ${t.offset}) reaches outside its storage`,
          );
        }
      }
    }
    return new TorchCheckpoint(path, entries, prefix, tensors);
  }

  /** Tensor names in sorted order. */
  names(): string[] {
    return [...this.#tensors.keys()].sort();
  }

  /** True when the checkpoint has a tensor of this name. */
  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  #tensor(name: string): TorchTensor {
    const t = this.#tensors.get(name);
    if (!t) throw new UserError(`${this.path}: no tensor named "${name}"`);
    return t;
  }

  /**
   * Dtype and shape of a tensor; `offset`/`byteLength` give its storage's span in the file (a view may use
   * only part of it).
   */
  info(name: string): TensorInfo {
    const t = this.#tensor(name);
    const e = this.#entries.get(`${this.#prefix}data/${t.storage.key}`)!;
    return {
      name,
      dtype: t.storage.dtype,
      shape: [...t.shape],
      offset: e.dataOffset,
      byteLength: e.size,
      file: this.path,
    };
  }

  /** The tensor's elements as contiguous row-major little-endian bytes (views resolved). */
  async readBytes(name: string): Promise<Uint8Array> {
    const t = this.#tensor(name);
    const e = this.#entries.get(`${this.#prefix}data/${t.storage.key}`)!;
    const es = DTYPE_SIZE[t.storage.dtype];
    const n = numElements(t.shape);
    if (isContiguous(t)) return await readFileRange(this.path, e.dataOffset + t.offset * es, n * es);
    const storage = await readFileRange(this.path, e.dataOffset, e.size);
    const out = new Uint8Array(n * es);
    const idx = new Array(t.shape.length).fill(0);
    for (let i = 0; i < n; i++) {
      let src = t.offset;
      for (let d = 0; d < idx.length; d++) src += idx[d] * t.stride[d];
      out.set(storage.subarray(src * es, src * es + es), i * es);
      for (let d = idx.length - 1; d >= 0; d--) {
        if (++idx[d] < t.shape[d]) break;
        idx[d] = 0;
      }
    }
    return out;
  }

  /** A floating-point tensor as float32. */
  async readFloat32(name: string): Promise<Float32Array> {
    const t = this.#tensor(name);
    return bytesToFloat32(await this.readBytes(name), t.storage.dtype, `${this.path}: tensor "${name}"`);
  }

  /** An integer tensor as int32. */
  async readInt32(name: string): Promise<Int32Array> {
    const t = this.#tensor(name);
    return bytesToInt32(await this.readBytes(name), t.storage.dtype, `${this.path}: tensor "${name}"`);
  }
}

/** Opens a `torch.save` zip checkpoint such as `pytorch_model.bin`. */
export function openTorchCheckpoint(path: string): Promise<TorchCheckpoint> {
  return TorchCheckpoint.open(path);
}
