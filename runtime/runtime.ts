/**
 * The runtime: a device, its buffer pool, memory scopes and the autograd tape, plus tensor constructors.
 *
 * Autograd is tape-based reverse mode. An op computes its output, then calls {@linkcode Runtime.record} with its
 * inputs, outputs and a backward function; nothing is recorded when gradients are off ({@linkcode Runtime.noGrad})
 * or when no input requires a gradient, so frozen parameters cost no gradient memory or work.
 * {@linkcode Runtime.backward} walks the tape in reverse and accumulates into `leaf.grad` (in place, so several
 * backward passes accumulate gradients across micro-batches until the optimizer zeroes them).
 *
 * @module
 */
import { acquireDevice, type DeviceOptions, type GpuDevice } from "./device.ts";
import { BufferPool } from "./pool.ts";
import { deviceBytes, newStorage, numel, shapeStr, Tensor } from "./tensor.ts";
import type { DType } from "../kernels/kernel.ts";
import { axpyKernel, fillKernel } from "../kernels/fill.ts";

/** Backward function of a recorded op: gradients of the outputs in, gradients of the inputs out. */
export type BackwardFn = (gradOutputs: (Tensor | null)[]) => (Tensor | null)[];

interface TapeNode {
  name: string;
  inputs: Tensor[];
  outputs: Tensor[];
  backward: BackwardFn;
}

/** Device + pool + scopes + tape. Create one per process with {@linkcode acquireRuntime}. */
export class Runtime {
  /** The GPU device. */
  readonly dev: GpuDevice;
  /** The buffer pool. */
  readonly pool: BufferPool;
  #scopes: Set<Tensor>[] = [];
  #tape: TapeNode[] = [];
  #gradEnabled = true;
  #opOutputs = new WeakSet<Tensor>();
  /**
   * When true, every new tensor from {@linkcode Runtime.empty} is filled with NaN (floats) or 0xDEADBEEF (ints),
   * so a kernel that leaves elements unwritten fails its tests instead of passing on leftover memory.
   */
  poisonNewTensors = false;

  /** A runtime on a device. */
  constructor(dev: GpuDevice) {
    this.dev = dev;
    this.pool = new BufferPool(dev);
  }

  // ---- creation ----------------------------------------------------------------------------------------

  /** An uninitialised tensor (contents undefined: write every element before reading). */
  empty(shape: readonly number[], dtype: DType = "f32"): Tensor {
    const bytes = Math.max(4, numel(shape) * (dtype === "f16" ? 2 : 4));
    const t = new Tensor(this, shape, dtype, newStorage(this.pool.acquire(bytes)));
    this.track(t);
    if (this.poisonNewTensors) {
      if (dtype === "i32" || dtype === "u32") this.fillInPlace(t, dtype === "u32" ? 0xdeadbeef : -559038737);
      else this.fillInPlace(t, NaN);
    }
    return t;
  }

  /** A tensor holding `data` (numbers are converted to the dtype; f32 data narrowed for f16). */
  tensor(data: ArrayLike<number>, shape: readonly number[], dtype: DType = "f32"): Tensor {
    if (data.length !== numel(shape)) {
      throw new Error(`tensor: ${data.length} values do not fill shape ${shapeStr(shape)}`);
    }
    const t = this.empty(shape, dtype);
    const bytes = deviceBytes(dtype, data);
    // writeBuffer sizes must be multiples of 4 bytes: pad odd-length f16 data
    if (bytes.byteLength % 4 !== 0) {
      const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
      padded.set(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
      this.dev.write(t.buffer, 0, padded);
    } else {
      this.dev.write(t.buffer, 0, bytes);
    }
    return t;
  }

  /** A tensor filled with `value`. */
  full(shape: readonly number[], value: number, dtype: DType = "f32"): Tensor {
    const t = this.empty(shape, dtype);
    this.fillInPlace(t, value);
    return t;
  }

  /** A tensor of zeros. */
  zeros(shape: readonly number[], dtype: DType = "f32"): Tensor {
    const t = this.empty(shape, dtype);
    this.dev.encoder().clearBuffer(t.buffer, 0, t.paddedByteLength);
    return t;
  }

  /** Sets every element of `t` to `value` (recorded in order with other GPU work). */
  fillInPlace(t: Tensor, value: number): void {
    const { spec, uniforms, workgroups } = fillKernel(t.dtype, t.size, value);
    this.dev.dispatch(spec, [t.binding], workgroups, uniforms);
  }

  /** `y += alpha * x`, in place (same shape and dtype). */
  axpyInPlace(y: Tensor, x: Tensor, alpha = 1): void {
    if (y.size !== x.size || y.dtype !== x.dtype) {
      throw new Error(`axpy: ${y} and ${x} differ in size or dtype`);
    }
    const { spec, uniforms, workgroups } = axpyKernel(y.dtype, y.size, alpha);
    this.dev.dispatch(spec, [x.binding, y.binding], workgroups, uniforms);
  }

  /** A copy of `t` (not recorded on the tape). */
  clone(t: Tensor): Tensor {
    const c = this.empty(t.shape, t.dtype);
    this.dev.copyBuffer(t.buffer, 0, c.buffer, 0, t.paddedByteLength);
    return c;
  }

  /** Copies `src` into `dst` (same byte length). */
  copyInto(dst: Tensor, src: Tensor): void {
    if (dst.byteLength !== src.byteLength) throw new Error(`copyInto: ${dst} and ${src} differ in size`);
    this.dev.copyBuffer(src.buffer, 0, dst.buffer, 0, src.paddedByteLength);
  }

  /** A parameter: a kept tensor that requires grad (unless `trainable` is false). */
  parameter(
    data: ArrayLike<number>,
    shape: readonly number[],
    name: string,
    trainable = true,
    dtype: DType = "f32",
  ): Tensor {
    const t = this.tensor(data, shape, dtype).keep();
    t.name = name;
    t.requiresGrad = trainable;
    return t;
  }

  // ---- scopes -----------------------------------------------------------------------------------------

  /** Internal: registers a new tensor with the innermost scope. */
  track(t: Tensor): void {
    const s = this.#scopes[this.#scopes.length - 1];
    if (s) s.add(t);
  }

  /** Internal: removes a tensor from every scope. */
  untrack(t: Tensor): void {
    for (let i = this.#scopes.length - 1; i >= 0; i--) if (this.#scopes[i].delete(t)) return;
  }

  /**
   * Runs `fn`; tensors created inside are released afterwards, except those returned (found in arrays, plain
   * objects or Maps of the result) and kept ones. Returned tensors move to the enclosing scope.
   */
  scope<T>(fn: () => T): T {
    this.#scopes.push(new Set());
    let result: T;
    try {
      result = fn();
    } catch (e) {
      this.#endScope(undefined);
      throw e;
    }
    if (result instanceof Promise) {
      return result.then(
        (v) => {
          this.#endScope(v);
          return v;
        },
        (e) => {
          this.#endScope(undefined);
          throw e;
        },
      ) as T;
    }
    this.#endScope(result);
    return result;
  }

  #endScope(result: unknown): void {
    const scope = this.#scopes.pop()!;
    const survivors = new Set<Tensor>();
    collectTensors(result, survivors, 0);
    for (const t of scope) {
      if (survivors.has(t)) continue;
      t.dispose();
    }
    const parent = this.#scopes[this.#scopes.length - 1];
    if (parent) { for (const t of survivors) if (scope.has(t)) parent.add(t); }
  }

  // ---- autograd ---------------------------------------------------------------------------------------

  /** True while gradients are being recorded. */
  get gradEnabled(): boolean {
    return this.#gradEnabled;
  }

  /** Runs `fn` without recording gradients (inference, evaluation, teacher forwards). */
  noGrad<T>(fn: () => T): T {
    const prev = this.#gradEnabled;
    this.#gradEnabled = false;
    try {
      const r = fn();
      if (r instanceof Promise) {
        return r.finally(() => {
          this.#gradEnabled = prev;
        }) as T;
      }
      this.#gradEnabled = prev;
      return r;
    } catch (e) {
      this.#gradEnabled = prev;
      throw e;
    }
  }

  /** True when an op with these inputs must record itself. */
  needsGrad(...inputs: (Tensor | null | undefined)[]): boolean {
    return this.#gradEnabled && inputs.some((t) => t?.requiresGrad);
  }

  /**
   * Records an op on the tape if gradients are on and an input requires them. `backward` receives the outputs'
   * gradients (null where an output got none) and returns one gradient (or null) per input.
   */
  record(name: string, inputs: Tensor[], outputs: Tensor[], backward: BackwardFn): void {
    if (!this.needsGrad(...inputs)) return;
    for (const o of outputs) {
      o.requiresGrad = true;
      this.#opOutputs.add(o);
    }
    this.#tape.push({ name, inputs, outputs, backward });
  }

  /** Internal: a reshaped view passes gradients straight through. */
  recordView(base: Tensor, view: Tensor): void {
    this.record("view", [base], [view], ([g]) => [g ? g.view(base.shape) : null]);
  }

  /**
   * True when `t` is not the output of a recorded op (a parameter or an input tensor): its gradient accumulates
   * in `t.grad`. Ops whose backward can write a leaf's gradient in place (e.g. a matmul that accumulates into the
   * weight gradient) use this and return null for that input.
   */
  isLeaf(t: Tensor): boolean {
    return !this.#opOutputs.has(t);
  }

  /**
   * For a backward that writes a leaf's gradient itself: the leaf's `grad` to accumulate into, or a new (kept,
   * uninitialised) `grad` to overwrite when the leaf has none yet. Null when `t` is not a leaf that requires grad.
   * The backward then returns null for that input so the tape does not add it a second time.
   */
  leafGradTarget(t: Tensor): { grad: Tensor; accumulate: boolean } | null {
    if (!t.requiresGrad || !this.isLeaf(t)) return null;
    if (t.grad) return { grad: t.grad, accumulate: true };
    const g = this.empty(t.shape, t.dtype).keep();
    g.name = t.name ? `${t.name}.grad` : undefined;
    t.grad = g;
    return { grad: g, accumulate: false };
  }

  /** Number of ops on the tape (for tests). */
  get tapeLength(): number {
    return this.#tape.length;
  }

  /** Drops the tape without computing gradients. */
  clearTape(): void {
    this.#tape = [];
  }

  /**
   * Back-propagates from `output` (seeded with ones, or `seed`) and accumulates gradients into the `grad` of
   * every leaf that requires grad. Clears the tape. Call inside the same scope as the forward pass.
   */
  backward(output: Tensor, seed?: Tensor): void {
    // Gradients of intermediates are released as soon as no pending node needs them; `refs` counts map entries
    // per gradient tensor because an op may hand the same tensor to several inputs (add passes g to both sides).
    const grads = new Map<Tensor, Tensor>();
    const refs = new Map<Tensor, number>();
    const hold = (t: Tensor, g: Tensor) => {
      grads.set(t, g);
      refs.set(g, (refs.get(g) ?? 0) + 1);
    };
    const drop = (g: Tensor) => {
      const r = (refs.get(g) ?? 1) - 1;
      if (r > 0) return refs.set(g, r);
      refs.delete(g);
      if (g !== seed) g.dispose();
    };
    hold(output, seed ?? this.full(output.shape, 1, output.dtype));
    const tape = this.#tape;
    this.#tape = [];
    this.noGrad(() => {
      for (let n = tape.length - 1; n >= 0; n--) {
        const node = tape[n];
        const gOuts = node.outputs.map((o) => grads.get(o) ?? null);
        if (gOuts.every((g) => g === null)) continue;
        const gIns = node.backward(gOuts);
        if (gIns.length !== node.inputs.length) {
          throw new Error(
            `backward of ${node.name} returned ${gIns.length} grads for ${node.inputs.length} inputs`,
          );
        }
        for (let i = 0; i < node.inputs.length; i++) {
          const inp = node.inputs[i];
          const g = gIns[i];
          if (!g || !inp.requiresGrad) continue;
          if (g.size !== inp.size) {
            throw new Error(`backward of ${node.name}: grad ${g} does not match input ${inp}`);
          }
          if (!this.#opOutputs.has(inp)) {
            this.#accumulateLeaf(inp, g);
            continue;
          }
          const prev = grads.get(inp);
          if (!prev) {
            hold(inp, g);
          } else {
            // out of place: `prev` may be aliased by another input's gradient
            const sum = this.clone(prev);
            this.axpyInPlace(sum, g);
            drop(prev);
            hold(inp, sum);
          }
        }
        // input gradients that were copied into leaves or sums and are held nowhere are done
        for (const g of new Set(gIns)) {
          if (g && !refs.has(g) && g !== seed && !gOuts.includes(g)) g.dispose();
        }
        for (const o of node.outputs) {
          const g = grads.get(o);
          if (!g) continue;
          grads.delete(o);
          drop(g);
        }
      }
    });
    for (const g of grads.values()) drop(g);
  }

  #accumulateLeaf(leaf: Tensor, g: Tensor): void {
    if (leaf.grad) {
      this.axpyInPlace(leaf.grad, g);
    } else {
      const copy = this.empty(leaf.shape, leaf.dtype).keep();
      this.copyInto(copy, g);
      copy.name = leaf.name ? `${leaf.name}.grad` : undefined;
      leaf.grad = copy;
    }
  }
}

function collectTensors(v: unknown, out: Set<Tensor>, depth: number): void {
  if (depth > 4 || v === null || typeof v !== "object") return;
  if (v instanceof Tensor) {
    out.add(v);
    return;
  }
  if (Array.isArray(v)) {
    for (const x of v) collectTensors(x, out, depth + 1);
  } else if (v instanceof Map) {
    for (const x of v.values()) collectTensors(x, out, depth + 1);
  } else if (Object.getPrototypeOf(v) === Object.prototype) {
    for (const x of Object.values(v)) collectTensors(x, out, depth + 1);
  }
}

let sharedRuntime: Promise<Runtime> | null = null;

/** The process-wide runtime on the process-wide device (created on first use). */
export function acquireRuntime(opts: DeviceOptions = {}): Promise<Runtime> {
  sharedRuntime ??= acquireDevice(opts).then((d) => new Runtime(d));
  sharedRuntime.catch(() => {
    sharedRuntime = null;
  });
  return sharedRuntime;
}
