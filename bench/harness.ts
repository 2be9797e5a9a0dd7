/**
 * Shared pieces of the benchmark scripts: command-line flags, a warm-up-then-time loop, and deterministic
 * random input tensors.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";

/** The value after `--name` on the command line, or `dflt`. */
export function flag(name: string): string | undefined;
/** The value after `--name` on the command line, or `dflt`. */
export function flag(name: string, dflt: string): string;
export function flag(name: string, dflt?: string): string | undefined {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : dflt;
}

/**
 * Runs `body` (one scope per run) repeatedly for at least a second after a warm-up of 1.5 s (GPU clocks ramp up
 * after idle), syncing after growing batches, and returns milliseconds per run. `quick` skips both waits.
 */
export async function timeLoop(rt: Runtime, body: () => void, opts: { quick: boolean }): Promise<number> {
  const warmMs = opts.quick ? 0 : 1500, minMs = opts.quick ? 0 : 1000;
  const batch = async (n: number) => {
    for (let i = 0; i < n; i++) rt.scope(body);
    await rt.dev.sync();
  };
  let n = 1;
  const w0 = performance.now();
  do {
    await batch(n);
    n = Math.min(n * 2, 64);
  } while (performance.now() - w0 < warmMs);
  let runs = 0;
  const t0 = performance.now();
  do {
    await batch(n);
    runs += n;
  } while (performance.now() - t0 < minMs);
  return (performance.now() - t0) / runs;
}

/**
 * The host CPU (model name and logical cores, from /proc/cpuinfo where readable): the same GPU decoded 20-25%
 * slower on another H200 host, because batch-1 decode records its dispatches on the CPU (BENCHMARKS.md).
 */
export function hostCpu(): string {
  try {
    const info = Deno.readTextFileSync("/proc/cpuinfo");
    const model = info.match(/^model name\s*:\s*(.+)$/m)?.[1]?.trim() ?? "unknown CPU";
    return `${model}, ${navigator.hardwareConcurrency} logical cores`;
  } catch {
    return `unknown CPU, ${navigator.hardwareConcurrency} logical cores`;
  }
}

/** A kept f32 tensor of uniform values in [lo, hi) from a fixed linear congruential sequence. */
export function randomTensor(rt: Runtime, shape: number[], lo: number, hi: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    data[i] = lo + (hi - lo) * (s / 2 ** 32);
  }
  return rt.tensor(data, shape).keep();
}

/** One kernel's share of a recorded workload: GPU time summed over its dispatches. */
export interface KernelTime {
  /** Kernel key (the WGSL variant). */
  kernel: string;
  /** Dispatches of it in the workload. */
  dispatches: number;
  /** Summed GPU milliseconds of those dispatches. */
  ms: number;
  /** The largest dispatch's workgroup count. */
  maxWorkgroups: number;
}

/**
 * Times every dispatch that `record` makes, one at a time with timestamp queries (`GpuDevice.timeDispatch`, each
 * repeated `iters` times in its own pass), and sums them per kernel, slowest first. The dispatches still run
 * normally once; their buffers stay alive while they are timed, so call this inside a scope. Undefined without
 * `timestamp-query`. Each timed dispatch reruns on the inputs it last saw, which is fine for timing and wrong
 * for values: the workload's outputs are garbage afterwards.
 *
 * `cold`: before each dispatch, copy 256 MB through the GPU so that its L2 holds none of the dispatch's inputs,
 * and time one run. Use it for decode steps: there each weight is read once per token from memory, while a
 * dispatch repeated alone finds weights smaller than the L2 (50 MB on the H200) cached after its first run.
 */
export async function profileDispatches(
  rt: Runtime,
  record: () => void | Promise<void>,
  iters = 3,
  cold = false,
): Promise<KernelTime[] | undefined> {
  const dev = rt.dev;
  if (!dev.features.timestamps) return undefined;
  const seen: Parameters<typeof dev.dispatch>[] = [];
  const dispatch = dev.dispatch;
  dev.dispatch = (spec, buffers, workgroups, uniforms) => {
    const u = uniforms === undefined
      ? undefined
      : uniforms instanceof ArrayBuffer
      ? uniforms.slice(0)
      : uniforms.buffer.slice(uniforms.byteOffset, uniforms.byteOffset + uniforms.byteLength);
    seen.push([spec, [...buffers], workgroups, u as ArrayBuffer | undefined]);
    dispatch.call(dev, spec, buffers, workgroups, uniforms);
  };
  try {
    await record();
  } finally {
    dev.dispatch = dispatch;
  }
  await dev.sync();
  const flushBytes = 128 << 20;
  const scratch = cold
    ? [0, 1].map(() =>
      dev.gpu.createBuffer({
        size: flushBytes,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      })
    )
    : [];
  const byKernel = new Map<string, KernelTime>();
  for (const [spec, buffers, workgroups, uniforms] of seen) {
    if (cold) dev.copyBuffer(scratch[0], 0, scratch[1], 0, flushBytes);
    // undefined: below the timer's resolution (or timestamps refused inside a pass), counted as 0
    const ms = await dev.timeDispatch(
      spec,
      buffers,
      workgroups,
      uniforms as ArrayBuffer | undefined,
      cold ? 1 : iters,
    ) ?? 0;
    const wg = workgroups.reduce<number>((a, b) => a * (b ?? 1), 1);
    const row = byKernel.get(spec.key) ?? { kernel: spec.key, dispatches: 0, ms: 0, maxWorkgroups: 0 };
    row.dispatches++;
    row.ms += ms;
    row.maxWorkgroups = Math.max(row.maxWorkgroups, wg);
    byKernel.set(spec.key, row);
  }
  for (const b of scratch) b.destroy();
  return [...byKernel.values()].sort((a, b) => b.ms - a.ms);
}

/**
 * Times every dispatch of `work` where it runs in the stream: each gets a compute pass of its own with
 * timestamps (`GpuDevice.startPassTiming` with `perDispatch`), so caches are as the work before it left them,
 * unlike {@linkcode profileDispatches}, which times each dispatch alone. The pass boundaries add a little of their
 * own. Per kernel key, summed; sorted by time. `maxWorkgroups` is not known here (0). Undefined without
 * `timestamp-query`; at most `maxPasses` dispatches are timed.
 */
export async function profileInStream(
  rt: Runtime,
  work: () => Promise<void>,
  maxPasses = 2048,
): Promise<{ kernels: KernelTime[]; untimed: number } | undefined> {
  await rt.dev.sync();
  if (!rt.dev.startPassTiming(maxPasses, { perDispatch: true })) return undefined;
  let times;
  try {
    await work();
  } finally {
    times = await rt.dev.stopPassTiming();
  }
  if (!times?.keys) return undefined;
  const byKernel = new Map<string, KernelTime>();
  times.keys.forEach((kernel, i) => {
    const row = byKernel.get(kernel) ?? { kernel, dispatches: 0, ms: 0, maxWorkgroups: 0 };
    row.dispatches++;
    row.ms += times.end[i] - times.begin[i];
    byKernel.set(kernel, row);
  });
  return { kernels: [...byKernel.values()].sort((a, b) => b.ms - a.ms), untimed: times.untimed };
}

/** Wall time of a workload next to what the GPU did in it (see {@linkcode gpuTimeline}). */
export interface GpuTimeline {
  /** Wall milliseconds from the call to the end of the workload's last GPU work. */
  wallMs: number;
  /** Milliseconds the GPU spent inside the workload's compute passes (summed, overlaps merged). */
  busyMs: number;
  /** Milliseconds from the first pass's beginning to the last pass's end. */
  spanMs: number;
  /** Compute passes timed, and passes beyond the query capacity (not timed). */
  passes: number;
  untimed: number;
}

/**
 * Runs `work` with every compute pass timestamped (`GpuDevice.startPassTiming`) and compares wall time with
 * GPU busy time: wall much above span means the GPU started late or the CPU waited after it; span much above
 * busy means the GPU sat idle between passes (waiting for the CPU to record or submit). Undefined without
 * `timestamp-query`.
 */
export async function gpuTimeline(rt: Runtime, work: () => Promise<void>): Promise<GpuTimeline | undefined> {
  await rt.dev.sync();
  if (!rt.dev.startPassTiming()) return undefined;
  const t0 = performance.now();
  let wallMs = 0;
  let times;
  try {
    await work();
    await rt.dev.sync();
    wallMs = performance.now() - t0;
  } finally {
    times = await rt.dev.stopPassTiming();
  }
  if (!times) return undefined;
  const order = times.begin.map((_, i) => i).sort((a, b) => times.begin[a] - times.begin[b]);
  let busyMs = 0, reach = -Infinity, spanEnd = -Infinity;
  for (const i of order) {
    const b = Math.max(times.begin[i], reach), e = times.end[i];
    if (e > b) busyMs += e - b;
    reach = Math.max(reach, e);
    spanEnd = Math.max(spanEnd, e);
  }
  const spanMs = order.length ? spanEnd - times.begin[order[0]] : 0;
  return { wallMs, busyMs, spanMs, passes: order.length, untimed: times.untimed };
}

/** A {@linkcode GpuTimeline} as benchmark row fields. */
export function timelineRow(t: GpuTimeline): Record<string, number> {
  return {
    wall_ms: +t.wallMs.toFixed(2),
    gpu_busy_ms: +t.busyMs.toFixed(2),
    gpu_span_ms: +t.spanMs.toFixed(2),
    passes: t.passes,
    untimed_passes: t.untimed,
  };
}

/**
 * Wall milliseconds per copy of `record` when `reps` copies are recorded back to back and synced once (after
 * `warmup` synced copies), and the CPU milliseconds per copy spent recording. Each copy runs in its own scope
 * when `scoped` (its tensors go back to the pool at once, as in a real loop); otherwise all live until the end.
 */
export async function timeRecorded(
  rt: Runtime,
  record: () => unknown,
  reps: number,
  opts: { warmup?: number; scoped?: boolean } = {},
): Promise<{ ms: number; recordMs: number }> {
  for (let w = 0; w < (opts.warmup ?? 2); w++) {
    await rt.scope(async () => {
      record();
      await rt.dev.sync();
    });
  }
  const t0 = performance.now();
  let recordMs = 0;
  await rt.scope(async () => {
    for (let i = 0; i < reps; i++) opts.scoped ? rt.scope(() => void record()) : record();
    recordMs = performance.now() - t0;
    await rt.dev.sync();
  });
  return { ms: (performance.now() - t0) / reps, recordMs: recordMs / reps };
}
