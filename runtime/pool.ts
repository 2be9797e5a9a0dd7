/**
 * A buffer pool: released GPU buffers are kept by size class and handed out again, so steady-state training and
 * decoding allocate nothing new per step.
 *
 * Size classes are geometric with four classes per octave (at most 19% slack), so shapes that vary slightly from
 * step to step (a growing decode sequence) still reuse buffers. Reusing a buffer that pending GPU work still reads
 * is safe: WebGPU executes commands in submission order, so later writes land after earlier reads.
 *
 * @module
 */
import { bufferId, type GpuDevice } from "./device.ts";

const MIN_BYTES = 256;
const STORAGE_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** Rounds a byte size up to its size class. */
export function sizeClass(bytes: number): number {
  if (bytes <= MIN_BYTES) return MIN_BYTES;
  const octave = 2 ** Math.floor(Math.log2(bytes));
  const step = octave / 4;
  return Math.ceil(bytes / step) * step;
}

/** Memory accounting of a pool. */
export interface PoolStats {
  /** Bytes in buffers currently handed out. */
  liveBytes: number;
  /** Bytes in buffers kept for reuse. */
  freeBytes: number;
  /** Buffers ever created. */
  created: number;
  /** Largest liveBytes + freeBytes seen. */
  peakBytes: number;
}

/** Pool of storage buffers for one device. */
export class BufferPool {
  readonly #dev: GpuDevice;
  // free buffers per size class, ordered by creation (bufferId), highest first: acquire() pops the oldest
  readonly #free = new Map<number, GPUBuffer[]>();
  readonly #freeSet = new Set<GPUBuffer>();
  /** Counters. */
  readonly stats: PoolStats = { liveBytes: 0, freeBytes: 0, created: 0, peakBytes: 0 };

  /** A pool for `dev`. */
  constructor(dev: GpuDevice) {
    this.#dev = dev;
  }

  /** A storage buffer of at least `bytes` bytes. Its content is undefined. */
  acquire(bytes: number): GPUBuffer {
    const size = sizeClass(bytes);
    const list = this.#free.get(size);
    let buf = list?.pop();
    if (buf) {
      this.#freeSet.delete(buf);
      this.stats.freeBytes -= size;
    } else {
      if (size > this.#dev.limits.maxBufferSize) {
        throw new Error(
          `buffer of ${bytes} bytes exceeds the device's maxBufferSize ${this.#dev.limits.maxBufferSize}`,
        );
      }
      buf = this.#dev.gpu.createBuffer({ size, usage: STORAGE_USAGE });
      bufferId(buf); // its id now, so ids follow creation order
      this.stats.created++;
    }
    this.stats.liveBytes += size;
    this.stats.peakBytes = Math.max(this.stats.peakBytes, this.stats.liveBytes + this.stats.freeBytes);
    return buf;
  }

  /** Returns a buffer for reuse. */
  release(buf: GPUBuffer): void {
    if (this.#freeSet.has(buf)) throw new Error("BufferPool: buffer released twice");
    this.#freeSet.add(buf);
    const size = buf.size;
    this.stats.liveBytes -= size;
    this.stats.freeBytes += size;
    let list = this.#free.get(size);
    if (!list) this.#free.set(size, list = []);
    // Handing out the oldest free buffer (not the last released) makes each acquisition depend only on which
    // buffers are free, not on the order they came back: a training or decoding step that frees everything it
    // made then gets the same buffers for the same tensors every time, so its bind groups come from the cache
    // instead of being created anew (tens of microseconds each on Dawn) in every step.
    const id = bufferId(buf);
    let lo = 0, hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (bufferId(list[mid]) > id) lo = mid + 1;
      else hi = mid;
    }
    // insert at lo by hand: Array.prototype.splice is a slow generic builtin for these short lists, and a
    // decode step releases about a hundred buffers a token
    list.push(buf);
    for (let i = list.length - 1; i > lo; i--) list[i] = list[i - 1];
    list[lo] = buf;
  }

  /**
   * Starts a new high-water mark at the bytes held now (live and free), so `stats.peakBytes` afterwards is the
   * peak of what follows (one benchmark of several in a process).
   */
  resetPeak(): void {
    this.stats.peakBytes = this.stats.liveBytes + this.stats.freeBytes;
  }

  /** Destroys every free buffer (e.g. after a phase with different shapes). */
  trim(): void {
    // a buffer named by recorded-but-unsubmitted commands must not be destroyed before they are submitted
    this.#dev.flush();
    for (const list of this.#free.values()) {
      for (const b of list) {
        this.#dev.forgetBuffer(b);
        b.destroy();
      }
    }
    this.#free.clear();
    this.#freeSet.clear();
    this.stats.freeBytes = 0;
  }
}
