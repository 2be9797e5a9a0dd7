/**
 * The GPU device: one object per process that owns the WebGPU device, compiles and caches kernels, and records
 * dispatches into as few command encoders and submits as possible.
 *
 * Why batching matters: a GPU->CPU sync costs about 12 ms on Deno's built-in WebGPU and a submit is not free on
 * any provider, so dispatches accumulate in one encoder and are submitted only when something must be read back
 * (a sampled token, a logged metric) or when {@linkcode GpuDevice.flush} is called explicitly.
 *
 * Kernel parameters (sizes, strides, scalars) travel in a uniform arena: each dispatch takes a 256-byte-aligned
 * slot of one uniform buffer bound with a dynamic offset, so bind groups are reused across dispatches and no
 * buffer is created per dispatch.
 *
 * @module
 */
import type { KernelSpec } from "../kernels/kernel.ts";
import { copyWordsKernel } from "../kernels/copy.ts";
import { readEnv } from "../util/env.ts";
import { installDawnSpinPacing } from "./dawn_spin.ts";
import { UserError } from "../util/errors.ts";
import {
  type ProviderName,
  type ProviderPreference,
  providerPreferenceFromEnv,
  requestProviderAdapter,
} from "./provider.ts";

/** Options for {@linkcode acquireDevice}. */
export interface DeviceOptions {
  /** Provider preference; defaults to `DISTILLERY_GPU` or `auto`. */
  gpu?: ProviderPreference;
  /** Print which adapter runs (default true). Tests pass false. */
  announce?: boolean;
}

/** Features the kernels can choose variants by. */
export interface DeviceFeatures {
  /** `shader-f16`: f16 storage and arithmetic in WGSL. */
  f16: boolean;
  /** `subgroups`: subgroup operations. */
  subgroups: boolean;
  /** `chromium-experimental-subgroup-matrix`: matrix units (Dawn only). */
  subgroupMatrix: boolean;
  /** `timestamp-query`: GPU timing. */
  timestamps: boolean;
}

/** One matrix shape the adapter's subgroup-matrix units support (`GPUAdapterInfo.subgroupMatrixConfigs`). */
export interface SubgroupMatrixConfig {
  /** Element type of the left and right operands, e.g. `f16`. */
  componentType: string;
  /** Element type of the result, e.g. `f32`. */
  resultComponentType: string;
  /** Rows of the left operand and the result. */
  M: number;
  /** Columns of the right operand and the result. */
  N: number;
  /** Columns of the left operand, rows of the right. */
  K: number;
}

/** A buffer range bound to a kernel's storage binding. */
export interface BufferSlice {
  /** The buffer. */
  buffer: GPUBuffer;
  /** Byte offset (multiple of the device's storage offset alignment, 256 is always safe). */
  offset?: number;
  /** Byte size; defaults to the rest of the buffer. */
  size?: number;
}

/** A compiled kernel: its pipeline and the layout its bind groups use. */
export interface CompiledKernel {
  /** The spec it was compiled from. */
  spec: KernelSpec;
  /** A number unique to this kernel on its device (seeds bind-group hashes). */
  id: number;
  /** The compute pipeline. */
  pipeline: GPUComputePipeline;
  /** Explicit layout: storage bindings in order, then the uniform (dynamic offset) if `spec.uniformBytes`. */
  layout: GPUBindGroupLayout;
}

/** Counters for tests and benchmarks. */
export interface DeviceStats {
  /** Dispatches recorded since the device was created. */
  dispatches: number;
  /** Queue submits. */
  submits: number;
  /** GPU->CPU reads (each one waits for the GPU). */
  reads: number;
  /** Pipelines compiled. */
  pipelines: number;
  /** Bind groups created (cache misses); steady-state loops should create none per step. */
  bindGroups: number;
}

/**
 * GPU timestamps of the compute passes recorded between {@linkcode GpuDevice.startPassTiming} and
 * {@linkcode GpuDevice.stopPassTiming}: pass i ran from `begin[i]` to `end[i]`, milliseconds after the first
 * pass began. Passes beyond the query capacity are counted in `untimed`.
 */
export interface PassTimes {
  begin: number[];
  end: number[];
  untimed: number;
  /** With `perDispatch` timing: the kernel key of each timed pass (each held one dispatch). */
  keys?: string[];
}

/**
 * The bind group layout of a kernel spec: its storage buffers in order (read-only or read-write), then, when it
 * has uniforms, one uniform buffer with a dynamic offset into the device's uniform arena.
 */
export function bindGroupLayoutEntries(spec: KernelSpec): GPUBindGroupLayoutEntry[] {
  const entries: GPUBindGroupLayoutEntry[] = spec.bindings.map((access, i) => ({
    binding: i,
    visibility: GPUShaderStage.COMPUTE,
    buffer: { type: access === "read" ? "read-only-storage" : "storage" },
  }));
  if (spec.uniformBytes) {
    entries.push({
      binding: spec.bindings.length,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: "uniform", hasDynamicOffset: true, minBindingSize: spec.uniformBytes },
    });
  }
  return entries;
}

const UNIFORM_ARENA_BYTES = 1 << 20;
/** Timestamps per query set of pass timing: WebGPU caps a query set at 4,096 queries (2,048 passes). */
const QUERIES_PER_SET = 4096;
/**
 * Environment variable: submit after every N dispatches (0: only when a read, a write or a full uniform arena
 * needs it, about 4,096 dispatches). Unset: {@linkcode DAWN_FLUSH_EVERY} on Dawn, 0 on the built-in provider.
 */
export const FLUSH_EVERY_ENV_VAR = "DISTILLERY_FLUSH_EVERY";

/**
 * Dispatches per submit on Dawn by default. Submitting early lets the GPU start on a long recording while the CPU
 * records the rest: a GPU-resident decode of 32 tokens per read (about 3,600 dispatches) went from 214 to 285
 * tokens/s for the 1B teacher on the H200 with 160 (BENCHMARKS.md). On llvmpipe it does not pay.
 */
export const DAWN_FLUSH_EVERY = 128;

/**
 * Dispatches in the first early submit after a wait; each later one doubles, up to the provider's dispatches per
 * submit. After a wait the GPU is idle until the first submit, so it should come soon: a training step of 958
 * dispatches went from 295 to 291 ms on the H200 (BENCHMARKS.md, eleventh session).
 */
export const FLUSH_RAMP_START = 8;

/** Dispatches before the next early submit, `submits` submits after the last wait (0: no early submits). */
export function earlySubmitAfter(flushEvery: number, submits: number): number {
  return Math.min(flushEvery, FLUSH_RAMP_START * 2 ** Math.min(submits, 20));
}

/** Dispatches per submit for a provider (0: no early submits). */
export function flushEveryFor(provider: ProviderName): number {
  const raw = readEnv(FLUSH_EVERY_ENV_VAR);
  if (raw === undefined || raw.trim() === "") return provider === "dawn" ? DAWN_FLUSH_EVERY : 0;
  const n = Number(raw);
  return Number.isInteger(n) && n > 0 ? n : 0;
}
const UNIFORM_SLOT_BYTES = 256;

const bufferIds = new WeakMap<GPUBuffer, number>();
let nextBufferId = 1;
/** A cached bind group: its kernel and bindings, compared exactly on a hash hit. */
interface CachedBindGroup {
  kernel: CompiledKernel;
  buffers: BufferSlice[];
  bindGroup: GPUBindGroup;
}

function sameBindings(a: readonly BufferSlice[], b: readonly BufferSlice[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    if (a[i].buffer !== b[i].buffer || (a[i].offset ?? 0) !== (b[i].offset ?? 0) || a[i].size !== b[i].size) {
      return false;
    }
  }
  return true;
}

/**
 * A number unique to a GPU buffer in this process, assigned on first use: ids grow with first use, so a pool that
 * asks for each buffer's id when it creates it can order its buffers by creation.
 */
export function bufferId(b: GPUBuffer): number {
  let id = bufferIds.get(b);
  if (id === undefined) {
    id = nextBufferId++;
    bufferIds.set(b, id);
  }
  return id;
}

/** A WebGPU device with a kernel cache and a batching command recorder. */
export class GpuDevice {
  /** Which provider runs. */
  readonly provider: ProviderName;
  /** Human-readable adapter description, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)". */
  readonly adapterName: string;
  /** True for software/fallback adapters. */
  readonly isFallbackAdapter: boolean;
  /** Why this provider was chosen. */
  readonly reason: string;
  /** The underlying WebGPU device. */
  readonly gpu: GPUDevice;
  /** Optional features that were enabled. */
  readonly features: DeviceFeatures;
  /** Limits the device was created with. */
  readonly limits: GPUSupportedLimits;
  /** Subgroup-matrix shapes of the adapter (empty without the feature). */
  readonly subgroupMatrixConfigs: readonly SubgroupMatrixConfig[];
  /** Smallest subgroup size of the adapter (0 when the provider does not say). */
  readonly subgroupMinSize: number;
  /** Largest subgroup size of the adapter (0 when the provider does not say). */
  readonly subgroupMaxSize: number;
  /** Counters. */
  readonly stats: DeviceStats = { dispatches: 0, submits: 0, reads: 0, pipelines: 0, bindGroups: 0 };

  #kernels = new Map<string, CompiledKernel>();
  /**
   * Bind groups by a numeric hash of (kernel, buffers, offsets, sizes), each bucket a short list checked exactly:
   * a decode step looks up one per dispatch, and with a string key built per lookup (kernel key, then each
   * buffer's id, offset and size) a token took 0.67 instead of 0.61 ms on Dawn's null backend.
   */
  #bindGroups = new Map<number, CachedBindGroup[]>();
  #bindGroupCount = 0;
  #encoder: GPUCommandEncoder | null = null;
  #pass: GPUComputePassEncoder | null = null;
  #uniformArena: GPUBuffer;
  #uniformMirror = new ArrayBuffer(UNIFORM_ARENA_BYTES);
  #uniformBytes = new Uint8Array(this.#uniformMirror);
  #uniformUsed = 0;
  #sinceFlush = 0;
  #flushEvery: number;
  /** Submits since the last wait for the GPU ({@linkcode earlySubmitAfter}). */
  #submitsSinceWait = 0;
  #uniformAlign: number;
  #staging: GPUBuffer[] = [];
  #lost = false;
  #pendingErrors: Promise<GPUError | null>[] = [];
  #uncaptured: string[] = [];
  #passTiming: {
    /** Query sets of {@linkcode QUERIES_PER_SET} timestamps, created as passes need them. */
    sets: GPUQuerySet[];
    capacity: number;
    used: number;
    untimed: number;
    /** One pass per dispatch, and the kernel key of each timed pass. */
    keys: string[] | null;
  } | null = null;
  /** Whether the open compute pass writes timestamps. */
  #passTimed = false;

  constructor(
    provider: ProviderName,
    adapterInfo: GPUAdapterInfo,
    reason: string,
    gpu: GPUDevice,
    features: DeviceFeatures,
  ) {
    this.provider = provider;
    this.#flushEvery = flushEveryFor(provider);
    this.adapterName = adapterInfo.description || adapterInfo.device || adapterInfo.vendor ||
      "unknown adapter";
    this.isFallbackAdapter = Boolean((adapterInfo as { isFallbackAdapter?: boolean }).isFallbackAdapter);
    this.reason = reason;
    this.gpu = gpu;
    this.features = features;
    this.limits = gpu.limits;
    // Dawn's config objects print as {} (their fields are getters): copy the fields out.
    const info = adapterInfo as GPUAdapterInfo & {
      subgroupMatrixConfigs?: readonly SubgroupMatrixConfig[];
      subgroupMinSize?: number;
      subgroupMaxSize?: number;
    };
    this.subgroupMatrixConfigs = features.subgroupMatrix
      ? (info.subgroupMatrixConfigs ?? []).map((c) => ({
        componentType: String(c.componentType),
        resultComponentType: String(c.resultComponentType),
        M: Number(c.M),
        N: Number(c.N),
        K: Number(c.K),
      }))
      : [];
    this.subgroupMinSize = Number(info.subgroupMinSize ?? 0);
    this.subgroupMaxSize = Number(info.subgroupMaxSize ?? 0);
    this.#uniformAlign = Math.max(UNIFORM_SLOT_BYTES, gpu.limits.minUniformBufferOffsetAlignment);
    this.#uniformArena = gpu.createBuffer({
      label: "uniform-arena",
      size: UNIFORM_ARENA_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    // An invalid command (say, one buffer bound both read-only and writable) is dropped by WebGPU with only an
    // uncaptured-error event; keep it so the next read throws instead of returning stale memory.
    gpu.addEventListener("uncapturederror", (ev) => {
      const msg = (ev as GPUUncapturedErrorEvent).error?.message ?? String(ev);
      if (this.#uncaptured.length < 10) this.#uncaptured.push(msg);
    });
    gpu.lost.then((info) => {
      this.#lost = true;
      if (info.reason !== "destroyed") console.error(`distillery: GPU device lost: ${info.message}`);
    });
  }

  /** One line saying which provider and adapter run, for logs. */
  describe(): string {
    const f = Object.entries(this.features).filter(([, v]) => v).map(([k]) => k).join(", ") || "none";
    return `${
      this.provider === "dawn" ? "Dawn (npm:webgpu)" : "Deno built-in WebGPU"
    } on ${this.adapterName}` +
      `${this.isFallbackAdapter ? " [software adapter]" : ""}; features: ${f}`;
  }

  /** Compiles (once) and returns the kernel for a spec; specs with equal `key` share a pipeline. */
  kernel(spec: KernelSpec): CompiledKernel {
    const hit = this.#kernels.get(spec.key);
    if (hit) return hit;
    const entries = bindGroupLayoutEntries(spec);
    this.gpu.pushErrorScope("validation");
    const module = this.gpu.createShaderModule({ label: spec.key, code: spec.code });
    const layout = this.gpu.createBindGroupLayout({ label: spec.key, entries });
    const pipeline = this.gpu.createComputePipeline({
      label: spec.key,
      layout: this.gpu.createPipelineLayout({ bindGroupLayouts: [layout] }),
      compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
    });
    this.#pendingErrors.push(
      this.gpu.popErrorScope().then(async (err) => {
        if (!err) return null;
        const info = await module.getCompilationInfo();
        const msgs = info.messages.map((m) => `  ${m.type} ${m.lineNum}:${m.linePos} ${m.message}`).join(
          "\n",
        );
        return new GPUValidationError(`kernel ${spec.key}: ${err.message}\n${msgs}`);
      }),
    );
    const compiled = { spec, pipeline, layout, id: this.#kernels.size + 1 };
    this.#kernels.set(spec.key, compiled);
    this.stats.pipelines++;
    return compiled;
  }

  /**
   * Records one dispatch. `buffers` bind to storage bindings 0..n-1 in order; `uniforms` (if the spec declares
   * `uniformBytes`) are copied into the uniform arena. Nothing runs until the next submit.
   */
  dispatch(
    spec: KernelSpec,
    buffers: readonly BufferSlice[],
    workgroups: readonly [number, number?, number?],
    uniforms?: ArrayBuffer | ArrayBufferView,
  ): void {
    if (this.#lost) throw new Error("GPU device was lost; restart the process");
    if (buffers.length !== spec.bindings.length) {
      throw new Error(`kernel ${spec.key}: expected ${spec.bindings.length} buffers, got ${buffers.length}`);
    }
    const [x, y = 1, z = 1] = workgroups;
    const maxWg = this.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxWg || y > maxWg || z > maxWg) {
      throw new Error(
        `kernel ${spec.key}: dispatch ${x}x${y}x${z} exceeds ${maxWg} workgroups per dimension`,
      );
    }
    if (x === 0 || y === 0 || z === 0) return;
    const k = this.kernel(spec);
    let uniformOffset = -1;
    if (spec.uniformBytes) {
      if (!uniforms || uniforms.byteLength < spec.uniformBytes) {
        throw new Error(`kernel ${spec.key}: needs ${spec.uniformBytes} bytes of uniforms`);
      }
      if (this.#uniformUsed + this.#uniformAlign > UNIFORM_ARENA_BYTES) this.flush();
      uniformOffset = this.#uniformUsed;
      const src = uniforms instanceof ArrayBuffer
        ? new Uint8Array(uniforms)
        : new Uint8Array(uniforms.buffer, uniforms.byteOffset, uniforms.byteLength);
      this.#uniformBytes.set(src, uniformOffset);
      this.#uniformUsed += this.#uniformAlign;
    }
    const bg = this.#bindGroup(k, buffers);
    const pass = this.#computePass();
    pass.setPipeline(k.pipeline);
    if (uniformOffset >= 0) pass.setBindGroup(0, bg, [uniformOffset]);
    else pass.setBindGroup(0, bg);
    pass.dispatchWorkgroups(x, y, z);
    this.stats.dispatches++;
    const keys = this.#passTiming?.keys;
    if (keys) {
      if (this.#passTimed) keys.push(spec.key);
      pass.end();
      this.#pass = null;
    }
    if (
      this.#flushEvery > 0 &&
      ++this.#sinceFlush >= earlySubmitAfter(this.#flushEvery, this.#submitsSinceWait)
    ) this.flush();
  }

  #bindGroup(k: CompiledKernel, buffers: readonly BufferSlice[]): GPUBindGroup {
    let h = k.id;
    for (const b of buffers) {
      h = Math.imul(h ^ bufferId(b.buffer), 0x9e3779b1);
      h = Math.imul(h ^ (b.offset ?? 0), 0x85ebca6b);
      h = Math.imul(h ^ (b.size ?? -1), 0xc2b2ae35);
    }
    const bucket = this.#bindGroups.get(h);
    if (bucket) {
      for (const c of bucket) if (c.kernel === k && sameBindings(c.buffers, buffers)) return c.bindGroup;
    }
    const entries: GPUBindGroupEntry[] = buffers.map((b, i) => ({
      binding: i,
      resource: { buffer: b.buffer, offset: b.offset ?? 0, size: b.size },
    }));
    if (k.spec.uniformBytes) {
      entries.push({
        binding: buffers.length,
        resource: { buffer: this.#uniformArena, offset: 0, size: k.spec.uniformBytes },
      });
    }
    const bg = this.gpu.createBindGroup({ layout: k.layout, entries });
    this.stats.bindGroups++;
    // Pooled buffers recur, so the cache hits in steady state; a bound keeps one-off shapes from piling up.
    if (this.#bindGroupCount >= 20000) {
      this.#bindGroups.clear();
      this.#bindGroupCount = 0;
    }
    const entry = {
      kernel: k,
      buffers: buffers.map((b) => ({ buffer: b.buffer, offset: b.offset, size: b.size })),
      bindGroup: bg,
    };
    if (bucket) bucket.push(entry);
    else this.#bindGroups.set(h, [entry]);
    this.#bindGroupCount++;
    return bg;
  }

  /** Forgets cached bind groups that mention a buffer (called when a buffer is destroyed). */
  forgetBuffer(buffer: GPUBuffer): void {
    for (const [h, bucket] of this.#bindGroups) {
      const kept = bucket.filter((c) => !c.buffers.some((b) => b.buffer === buffer));
      this.#bindGroupCount -= bucket.length - kept.length;
      if (kept.length === 0) this.#bindGroups.delete(h);
      else if (kept.length < bucket.length) this.#bindGroups.set(h, kept);
    }
  }

  #computePass(): GPUComputePassEncoder {
    if (!this.#pass) {
      this.#encoder ??= this.gpu.createCommandEncoder();
      const t = this.#passTiming;
      let desc: GPUComputePassDescriptor | undefined;
      this.#passTimed = !!t && t.used + 2 <= t.capacity;
      if (t && this.#passTimed) {
        const set = Math.floor(t.used / QUERIES_PER_SET), at = t.used % QUERIES_PER_SET;
        if (set === t.sets.length) {
          t.sets.push(this.gpu.createQuerySet({ type: "timestamp", count: QUERIES_PER_SET }));
        }
        desc = {
          timestampWrites: {
            querySet: t.sets[set],
            beginningOfPassWriteIndex: at,
            endOfPassWriteIndex: at + 1,
          },
        };
        t.used += 2;
      } else if (t) {
        t.untimed++;
      }
      this.#pass = this.#encoder.beginComputePass(desc);
    }
    return this.#pass;
  }

  /**
   * Writes a GPU timestamp at the beginning and the end of every compute pass recorded from now on, up to
   * `maxPasses`, so a benchmark can tell time the GPU spent executing from time it sat idle waiting for work
   * (see `bench/harness.ts` `gpuTimeline`). Pending work is submitted first. False without `timestamp-query`.
   * With `perDispatch`, every dispatch gets a pass of its own, so each kernel is timed where it runs in the
   * stream (caches as the work leaves them), at the cost of a pass boundary per dispatch.
   */
  startPassTiming(maxPasses = 2048, opts: { perDispatch?: boolean } = {}): boolean {
    if (!this.features.timestamps || this.#passTiming) return false;
    this.flush();
    this.#passTiming = {
      sets: [],
      capacity: 2 * Math.max(1, Math.floor(maxPasses)),
      used: 0,
      untimed: 0,
      keys: opts.perDispatch ? [] : null,
    };
    return true;
  }

  /** Stops pass timing, waits for the GPU and returns the timed passes; undefined when timing was not on. */
  async stopPassTiming(): Promise<PassTimes | undefined> {
    const t = this.#passTiming;
    if (!t) return undefined;
    this.flush();
    this.#passTiming = null;
    try {
      const keys = t.keys ?? undefined;
      if (t.used === 0) return { begin: [], end: [], untimed: t.untimed, keys };
      const resolve = this.gpu.createBuffer({
        size: t.used * 8,
        usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
      });
      t.sets.forEach((qs, i) => {
        const count = Math.min(QUERIES_PER_SET, t.used - i * QUERIES_PER_SET);
        this.encoder().resolveQuerySet(qs, 0, count, resolve, i * QUERIES_PER_SET * 8);
      });
      const [bytes] = await this.readMany([{ buffer: resolve, offset: 0, size: t.used * 8 }]);
      resolve.destroy();
      const ns = new BigUint64Array(bytes);
      const t0 = ns[0];
      const ms = (i: number) => Number(ns[i] - t0) / 1e6;
      const begin: number[] = [], end: number[] = [];
      for (let i = 0; i < t.used; i += 2) {
        begin.push(ms(i));
        end.push(ms(i + 1));
      }
      return { begin, end, untimed: t.untimed, keys };
    } finally {
      for (const qs of t.sets) qs.destroy();
    }
  }

  /** The open command encoder (ending any compute pass), for copies between dispatches. */
  encoder(): GPUCommandEncoder {
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
    this.#encoder ??= this.gpu.createCommandEncoder();
    return this.#encoder;
  }

  /** Records a buffer-to-buffer copy in order with the dispatches. */
  copyBuffer(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, size: number): void {
    if (size === 0) return;
    if (this.#copyByDispatch(src, srcOffset, dst, dstOffset, size)) return;
    this.encoder().copyBufferToBuffer(src, srcOffset, dst, dstOffset, size);
  }

  /**
   * Records a copy between two storage buffers as a dispatch ({@linkcode copyWordsKernel}), which keeps the open
   * compute pass open; false when it cannot (unaligned, the same buffer, a buffer that is not storage, or a range
   * past the binding size limit).
   */
  #copyByDispatch(
    src: GPUBuffer,
    srcOffset: number,
    dst: GPUBuffer,
    dstOffset: number,
    size: number,
  ): boolean {
    if (src === dst || (size | srcOffset | dstOffset) % 4 !== 0) return false;
    if (!(src.usage & GPUBufferUsage.STORAGE) || !(dst.usage & GPUBufferUsage.STORAGE)) return false;
    // bind from the aligned offset below each range; the kernel adds the rest in words
    const align = this.limits.minStorageBufferOffsetAlignment;
    const srcBase = srcOffset - srcOffset % align, dstBase = dstOffset - dstOffset % align;
    const srcSize = srcOffset + size - srcBase, dstSize = dstOffset + size - dstBase;
    if (Math.max(srcSize, dstSize) > this.limits.maxStorageBufferBindingSize) return false;
    const launch = copyWordsKernel((srcOffset - srcBase) / 4, (dstOffset - dstBase) / 4, size / 4);
    this.dispatch(
      launch.spec,
      [
        { buffer: src, offset: srcBase, size: srcSize },
        { buffer: dst, offset: dstBase, size: dstSize },
      ],
      launch.workgroups,
      launch.uniforms,
    );
    return true;
  }

  /** Submits everything recorded so far. Does not wait for the GPU. */
  flush(): void {
    if (!this.#encoder && !this.#pass) return;
    const enc = this.encoder();
    if (this.#uniformUsed > 0) {
      this.gpu.queue.writeBuffer(this.#uniformArena, 0, this.#uniformMirror, 0, this.#uniformUsed);
      this.#uniformUsed = 0;
    }
    this.gpu.queue.submit([enc.finish()]);
    this.#encoder = null;
    this.#sinceFlush = 0;
    this.#submitsSinceWait++;
    this.stats.submits++;
  }

  /** Writes CPU data into a buffer, ordered after everything recorded so far. */
  write(buffer: GPUBuffer, offset: number, data: ArrayBufferView): void {
    // queue.writeBuffer runs before the next submit, so pending dispatches must go first to keep program order.
    this.flush();
    this.gpu.queue.writeBuffer(
      buffer,
      offset,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
  }

  /**
   * Reads bytes back to the CPU: copies into a staging buffer after all recorded work, submits, waits.
   * This is the one place that waits for the GPU; call it rarely.
   */
  async read(buffer: GPUBuffer, offset: number, size: number): Promise<ArrayBuffer> {
    const reads = await this.readMany([{ buffer, offset, size }]);
    return reads[0];
  }

  /** Reads several ranges with one submit and one wait. */
  async readMany(
    ranges: readonly { buffer: GPUBuffer; offset: number; size: number }[],
  ): Promise<ArrayBuffer[]> {
    const sizes = ranges.map((r) => Math.ceil(r.size / 4) * 4);
    const total = sizes.reduce((a, b) => a + b, 0);
    const staging = this.#takeStaging(Math.max(total, 4));
    let off = 0;
    for (let i = 0; i < ranges.length; i++) {
      this.copyBuffer(ranges[i].buffer, ranges[i].offset, staging, off, sizes[i]);
      off += sizes[i];
    }
    this.flush();
    this.stats.reads++;
    await staging.mapAsync(GPUMapMode.READ, 0, Math.max(total, 4));
    this.#submitsSinceWait = 0; // the GPU is idle: early submits come sooner again
    const mapped = staging.getMappedRange(0, Math.max(total, 4));
    const out: ArrayBuffer[] = [];
    off = 0;
    for (let i = 0; i < ranges.length; i++) {
      out.push(mapped.slice(off, off + ranges[i].size));
      off += sizes[i];
    }
    staging.unmap();
    this.#staging.push(staging);
    await this.checkErrors();
    return out;
  }

  #takeStaging(size: number): GPUBuffer {
    const i = this.#staging.findIndex((b) => b.size >= size);
    if (i >= 0) return this.#staging.splice(i, 1)[0];
    const rounded = 2 ** Math.ceil(Math.log2(Math.max(size, 1024)));
    return this.gpu.createBuffer({ size: rounded, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  /**
   * GPU milliseconds per dispatch of one kernel: `iters` copies recorded inside one compute pass between two
   * timestamp queries, submitted on their own (pending work is flushed first). Undefined without
   * `timestamp-query`, or when the provider rejects timestamps inside passes. For benchmarks.
   */
  async timeDispatch(
    spec: KernelSpec,
    buffers: readonly BufferSlice[],
    workgroups: readonly [number, number?, number?],
    uniforms: ArrayBuffer | undefined,
    iters: number,
  ): Promise<number | undefined> {
    if (!this.features.timestamps) return undefined;
    const gpu = this.gpu;
    try {
      this.flush();
      const k = this.kernel(spec);
      const ubuf = gpu.createBuffer({ size: 256, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
      if (uniforms) gpu.queue.writeBuffer(ubuf, 0, uniforms);
      const entries: GPUBindGroupEntry[] = buffers.map((b, i) => ({
        binding: i,
        resource: { buffer: b.buffer, offset: b.offset ?? 0, size: b.size },
      }));
      if (spec.uniformBytes) {
        entries.push({
          binding: buffers.length,
          resource: { buffer: ubuf, offset: 0, size: spec.uniformBytes },
        });
      }
      const bg = gpu.createBindGroup({ layout: k.layout, entries });
      const qs = gpu.createQuerySet({ type: "timestamp", count: 2 });
      const resolve = gpu.createBuffer({
        size: 16,
        usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
      });
      const readback = gpu.createBuffer({
        size: 16,
        usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
      });
      const enc = gpu.createCommandEncoder();
      const pass = enc.beginComputePass({
        timestampWrites: { querySet: qs, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 },
      });
      pass.setPipeline(k.pipeline);
      if (spec.uniformBytes) pass.setBindGroup(0, bg, [0]);
      else pass.setBindGroup(0, bg);
      const [x, y = 1, z = 1] = workgroups;
      for (let i = 0; i < iters; i++) pass.dispatchWorkgroups(x, y, z);
      pass.end();
      enc.resolveQuerySet(qs, 0, 2, resolve, 0);
      enc.copyBufferToBuffer(resolve, 0, readback, 0, 16);
      gpu.queue.submit([enc.finish()]);
      await readback.mapAsync(GPUMapMode.READ);
      const [t0, t1] = new BigUint64Array(readback.getMappedRange());
      readback.unmap();
      for (const b of [ubuf, resolve, readback]) b.destroy();
      qs.destroy();
      const ns = Number(t1 - t0);
      return ns > 0 ? ns / 1e6 / iters : undefined;
    } catch {
      return undefined;
    }
  }

  /** Submits pending work and waits until the GPU has finished it. */
  async sync(): Promise<void> {
    this.flush();
    await this.gpu.queue.onSubmittedWorkDone();
    this.#submitsSinceWait = 0; // the GPU is idle: early submits come sooner again
    this.stats.reads++;
    await this.checkErrors();
  }

  /** Throws the first pipeline compilation error recorded so far (with the WGSL messages). */
  async checkErrors(): Promise<void> {
    if (this.#uncaptured.length > 0) {
      const msgs = this.#uncaptured.splice(0);
      throw new Error(`WebGPU error: ${msgs.join("\n")}`);
    }
    if (this.#pendingErrors.length === 0) return;
    const errs = await Promise.all(this.#pendingErrors);
    this.#pendingErrors = [];
    const first = errs.find((e) => e !== null);
    if (first) throw new Error(first.message);
  }

  /** Releases the device. */
  destroy(): void {
    this.flush();
    for (const b of this.#staging) b.destroy();
    this.#staging = [];
    this.#uniformArena.destroy();
    this.gpu.destroy();
  }
}

const OPTIONAL_FEATURES = [
  "shader-f16",
  "subgroups",
  "timestamp-query",
  "chromium-experimental-subgroup-matrix",
] as const;

const LIMITS_TO_MAX = [
  "maxBufferSize",
  "maxStorageBufferBindingSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY",
  "maxComputeWorkgroupSizeZ",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
  "maxBindingsPerBindGroup",
  "maxDynamicUniformBuffersPerPipelineLayout",
] as const;

/** Creates a device for the preference: the adapter's maximum limits and every optional feature it offers. */
export async function createDevice(opts: DeviceOptions = {}): Promise<GpuDevice> {
  const pref = opts.gpu ?? providerPreferenceFromEnv();
  const { provider, adapter, reason } = await requestProviderAdapter(pref);
  const offered = new Set<string>(adapter.features as unknown as Iterable<string>);
  const requiredFeatures = OPTIONAL_FEATURES.filter((f) => offered.has(f)) as GPUFeatureName[];
  const requiredLimits: Record<string, number> = {};
  for (const name of LIMITS_TO_MAX) {
    const v = (adapter.limits as unknown as Record<string, number>)[name];
    if (typeof v === "number") requiredLimits[name] = v;
  }
  let gpu: GPUDevice;
  try {
    gpu = await adapter.requestDevice({ requiredFeatures, requiredLimits });
  } catch (e) {
    throw new UserError(`could not create a WebGPU device on ${adapter.info.description}: ${e}`);
  }
  const dev = new GpuDevice(provider, adapter.info, reason, gpu, {
    f16: offered.has("shader-f16"),
    subgroups: offered.has("subgroups"),
    subgroupMatrix: offered.has("chromium-experimental-subgroup-matrix"),
    timestamps: offered.has("timestamp-query"),
  });
  // Dawn's binding polls with a native setImmediate callback per microsecond while it waits; under Deno each
  // one leaves a finalizer that costs O(n) to collect (runtime/dawn_spin.ts).
  if (provider === "dawn") installDawnSpinPacing();
  if (opts.announce ?? true) console.error(`distillery: GPU: ${dev.describe()} (${reason})`);
  return dev;
}

let shared: Promise<GpuDevice> | null = null;
let sharedPref: ProviderPreference | undefined;

/**
 * The process-wide device, created on first use. Stages and models call this; a different preference after
 * the device exists is an error, because kernels and tensors belong to one device.
 */
export function acquireDevice(opts: DeviceOptions = {}): Promise<GpuDevice> {
  const pref = opts.gpu ?? providerPreferenceFromEnv();
  if (shared) {
    if (pref !== sharedPref && pref !== "auto") {
      throw new Error(`GPU device already created with preference ${sharedPref}; cannot switch to ${pref}`);
    }
    return shared;
  }
  sharedPref = pref;
  shared = createDevice({ ...opts, gpu: pref });
  shared.catch(() => {
    shared = null;
  });
  return shared;
}
