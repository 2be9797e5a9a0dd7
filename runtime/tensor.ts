/**
 * Tensors: a shape, a dtype and a GPU buffer from the pool. Tensors are always contiguous (row-major); kernels
 * take transposes as flags instead of strided views, which keeps every kernel's indexing simple.
 *
 * Memory is managed with scopes (see {@linkcode Runtime.scope}): every tensor created inside a scope is released
 * when the scope ends, unless it is returned from the scope or marked with {@linkcode Tensor.keep}. Parameters,
 * optimizer state and caches are created outside scopes (or kept) and disposed explicitly.
 *
 * @module
 */
import type { BufferSlice } from "./device.ts";
import { type DType, dtypeBytes } from "../kernels/kernel.ts";
import type { Runtime } from "./runtime.ts";

/** Shared GPU storage of a tensor and its reshaped views. */
interface Storage {
  buffer: GPUBuffer;
  refs: number;
}

/** Number of elements of a shape. */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Formats a shape for messages: `[2, 3]`. */
export function shapeStr(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}

/** A typed CPU array matching a dtype. */
export type HostArray = Float32Array | Int32Array | Uint32Array;

/** A contiguous n-dimensional array on the GPU. */
export class Tensor {
  /** The runtime that owns the tensor. */
  readonly rt: Runtime;
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
  /** Element type in GPU memory. */
  readonly dtype: DType;
  /** Number of elements. */
  readonly size: number;
  /** Optional name, for messages and checkpoints. */
  name: string | undefined;
  /** True when gradients flow to (or through) this tensor. */
  requiresGrad = false;
  /** Accumulated gradient of a leaf that requires grad (after {@linkcode Runtime.backward}). */
  grad: Tensor | null = null;
  #storage: Storage | null;

  /** Internal: use `rt.empty`, `rt.tensor`, `rt.zeros` or `t.view` instead. */
  constructor(rt: Runtime, shape: readonly number[], dtype: DType, storage: Storage) {
    this.rt = rt;
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.size = numel(shape);
    this.#storage = storage;
  }

  /** The GPU buffer; throws if the tensor was disposed. */
  get buffer(): GPUBuffer {
    if (!this.#storage) throw new Error(`tensor ${this.name ?? shapeStr(this.shape)} used after dispose`);
    return this.#storage.buffer;
  }

  /** Bytes of data (not the buffer's rounded size). */
  get byteLength(): number {
    return this.size * dtypeBytes(this.dtype);
  }

  /** Data bytes rounded up to a multiple of 4 (WebGPU copy and binding sizes must be). */
  get paddedByteLength(): number {
    return Math.max(4, Math.ceil(this.byteLength / 4) * 4);
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.#storage === null;
  }

  /** The binding for a kernel: the whole data range. */
  get binding(): BufferSlice {
    // WebGPU binding sizes must be multiples of 4: f16 tensors of odd length bind the padded range.
    return { buffer: this.buffer, offset: 0, size: this.paddedByteLength };
  }

  /** Size of dimension `i` (negative counts from the end). */
  dim(i: number): number {
    return this.shape[i < 0 ? this.shape.length + i : i];
  }

  /** A tensor of another shape with the same elements, sharing storage (no copy). */
  view(shape: readonly number[]): Tensor {
    const inferred = [...shape];
    const neg = inferred.indexOf(-1);
    if (neg >= 0) inferred[neg] = this.size / numel(inferred.filter((_, i) => i !== neg));
    if (numel(inferred) !== this.size) {
      throw new Error(`view: cannot view ${shapeStr(this.shape)} as ${shapeStr(shape)}`);
    }
    const s = this.#storage;
    if (!s) throw new Error("view of a disposed tensor");
    s.refs++;
    const v = new Tensor(this.rt, inferred, this.dtype, s);
    v.requiresGrad = this.requiresGrad;
    this.rt.track(v);
    if (this.requiresGrad) this.rt.recordView(this, v);
    return v;
  }

  /** Removes the tensor from the scope it was created in, so the scope's end does not release it. */
  keep(): this {
    this.rt.untrack(this);
    return this;
  }

  /** Releases the storage to the pool (when no view shares it). Safe to call twice. */
  dispose(): void {
    const s = this.#storage;
    if (!s) return;
    this.#storage = null;
    this.rt.untrack(this);
    if (--s.refs === 0) this.rt.pool.release(s.buffer);
  }

  /** Reads the tensor to the CPU (waits for the GPU: call rarely). f16 is widened to Float32Array. */
  async read(): Promise<HostArray> {
    const bytes = await this.rt.dev.read(this.buffer, 0, this.byteLength);
    return hostArray(this.dtype, bytes);
  }

  /** Reads a scalar or one-element tensor. */
  async item(): Promise<number> {
    if (this.size !== 1) throw new Error(`item() on a tensor of shape ${shapeStr(this.shape)}`);
    return (await this.read())[0];
  }

  /** Debug string. */
  toString(): string {
    return `Tensor(${this.name ? this.name + ", " : ""}${shapeStr(this.shape)}, ${this.dtype})`;
  }
}

/** Converts raw bytes of a dtype to a host array (f16 widened to f32). */
export function hostArray(dtype: DType, bytes: ArrayBuffer): HostArray {
  switch (dtype) {
    case "f32":
      return new Float32Array(bytes);
    case "i32":
      return new Int32Array(bytes);
    case "u32":
      return new Uint32Array(bytes);
    case "f16":
      return Float32Array.from(new Float16Array(bytes));
  }
}

/** Converts host data to the bytes of a dtype (f32 data narrowed to f16 when dtype is f16). */
export function deviceBytes(dtype: DType, data: ArrayLike<number>): ArrayBufferView {
  switch (dtype) {
    case "f32":
      return data instanceof Float32Array ? data : Float32Array.from(data);
    case "i32":
      return data instanceof Int32Array ? data : Int32Array.from(data);
    case "u32":
      return data instanceof Uint32Array ? data : Uint32Array.from(data);
    case "f16":
      return Float16Array.from(data as ArrayLike<number>);
  }
}

/** Internal: creates storage records for the runtime. */
export function newStorage(buffer: GPUBuffer): Storage {
  return { buffer, refs: 1 };
}
