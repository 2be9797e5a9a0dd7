/**
 * Benchmarks of the dense kernels: matmul TFLOP/s (f32 and f16, 4096^3 and 8192^3, every tile configuration of
 * the sweep that fits the device), GEMV GB/s at 1x4096x14336 (f32, f16, several thread groupings), and device copy
 * GB/s (copyBufferToBuffer and a copy kernel), one JSON row per measurement.
 *
 * Method: inputs filled on the GPU with a hash (no large uploads); at least one second of warm-up per kernel
 * (GPU clocks ramp up after idle); then `iters` dispatches recorded back to back and timed by wall clock from
 * the first record to the end of a final read, with `iters` chosen so the timed run lasts about a second (the
 * read's sync latency is then a small bias, reported as `sync_ms`). With `timestamp-query`, the same dispatches
 * are also timed inside one compute pass (`gpu_ms`). A few outputs of each matmul are checked against a CPU dot
 * product of the same hashed inputs, so a miscompiled kernel cannot report a speed.
 *
 * Run alone: `deno run -A bench/kernels.ts [--quick] [--gpu dawn|builtin] [--only matmul,gemv,copy]
 * [--sizes 8192] [--dtypes f32] [--configs 128x128x16_8x8_sw,...] [--gemv-shapes 2048x2048,...] [--gemv-tpr 32,64]
 * [--gemv-unroll 4,8]` (config names as the rows print them; GEMV shapes are N x K); the
 * lead's runner imports
 * {@linkcode bench}. `bench/pytorch/kernels.py` measures the same shapes in PyTorch.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { type DType, grid2d, type KernelSpec, Uniforms, wgslHeader, wgslType } from "../kernels/kernel.ts";
import type { Launch } from "../kernels/fill.ts";
import { copyWordsKernel } from "../kernels/copy.ts";
import {
  MATMUL_SWEEP,
  type MatmulConfig,
  matmulConfigName,
  matmulKernel,
  matmulSharedBytes,
  parseMatmulConfig,
} from "../kernels/matmul.ts";
import { gemvKernel, gemvSwigluKernel } from "../kernels/gemv.ts";
import { gemvDeviceOptions } from "../runtime/ops/matmul.ts";

/** Options of {@linkcode bench}. */
export interface BenchOptions {
  /** Small sizes and short timings, to prove the benchmark runs on a CPU adapter. */
  quick: boolean;
  /** Tile configurations to sweep (default: {@linkcode MATMUL_SWEEP}). */
  configs?: readonly MatmulConfig[];
  /** Matmul cube sizes (default 4096 and 8192; 256 when quick). */
  sizes?: readonly number[];
  /** Storage types to time (default f32, and f16 where the device has it). */
  dtypes?: readonly DType[];
  /** Benchmarks to run (default all). */
  only?: readonly ("matmul" | "gemv" | "copy")[];
  /** GEMV weight shapes [N, K] (default 14336 x 4096; the decode shapes of a 1B model are 2048-8192 wide). */
  gemvShapes?: readonly [number, number][];
  /** GEMV threads per output row to time (default 32, 64, 128, 256). */
  gemvTpr?: readonly number[];
  /** GEMV loads in flight per thread to time (default 4). */
  gemvUnroll?: readonly number[];
  /** GEMV variants to time (default plain). */
  gemvVariants?: readonly GemvBenchVariant[];
}

/** A GEMV as decoding runs it: plain, with the RMSNorm prologue, the SwiGLU gate/up pair, or the pair normed. */
export type GemvBenchVariant = "plain" | "norm" | "swiglu" | "swiglu_norm";

// ---- GPU-side inputs: a hash of the index, reproducible on the CPU for spot checks -------------------------

/** The value at index i of a hashed input (the WGSL below computes the same), before rounding to the dtype. */
export function hashValue(i: number, seed: number): number {
  let h = (Math.imul(i, 0x9e3779b1) ^ seed) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  h = (h ^ (h >>> 16)) >>> 0;
  return Math.fround(Math.fround((h >>> 8) * (1 / 16777216)) - 0.5);
}

const fillSpecs = new Map<DType, KernelSpec>();
function hashFill(dtype: DType, n: number, seed: number): Launch {
  let spec = fillSpecs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key: `bench_hash_fill_${dtype}`,
      bindings: ["rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { n: u32, seed: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read_write> out: array<${T}>;
@group(0) @binding(1) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid;
  if (i >= p.n) { return; }
  var h = (i * 0x9e3779b1u) ^ p.seed;
  h = (h ^ (h >> 16u)) * 0x85ebca6bu;
  h = (h ^ (h >> 13u)) * 0xc2b2ae35u;
  h = h ^ (h >> 16u);
  out[i] = ${T}(f32(h >> 8u) * (1.0 / 16777216.0) - 0.5);
}
`,
    };
    fillSpecs.set(dtype, spec);
  }
  return { spec, uniforms: new Uniforms(16).u32(n).u32(seed).buffer, workgroups: grid2d(Math.ceil(n / 256)) };
}

/** A tensor filled on the GPU with {@linkcode hashValue} of each index (rounded to the dtype): no upload. */
export function hashed(rt: Runtime, shape: number[], dtype: DType, seed: number): Tensor {
  const t = rt.empty(shape, dtype);
  const f = hashFill(dtype, t.size, seed);
  rt.dev.dispatch(f.spec, [t.binding], f.workgroups, f.uniforms);
  return t;
}

const roundTo = (dtype: DType, v: number) => (dtype === "f16" ? new Float16Array([v])[0] : Math.fround(v));

// ---- timing ----------------------------------------------------------------------------------------------

interface Timing {
  /** Wall-clock milliseconds per iteration. */
  ms: number;
  /** Iterations in the timed run. */
  iters: number;
  /** GPU-timestamp milliseconds per iteration, when the adapter offers timestamps. */
  gpuMs?: number;
  /** Milliseconds of one empty read (the sync bias included once in the wall-clock total). */
  syncMs: number;
}

async function syncOnce(rt: Runtime, probe: Tensor): Promise<void> {
  await rt.dev.read(probe.buffer, 0, 4);
}

/**
 * Times `record` (which records one iteration of GPU work): warm-up of `warmupMs`, then a timed run sized to
 * about `targetMs`.
 */
async function timeIt(
  rt: Runtime,
  probe: Tensor,
  record: () => void,
  warmupMs: number,
  targetMs: number,
  single?: Launch & { bindings: GPUBuffer[] },
): Promise<Timing> {
  // warm-up, growing the batch so that each sync amortises over more work
  let batch = 1, t0 = performance.now(), perIter = Infinity;
  while (performance.now() - t0 < warmupMs) {
    const s = performance.now();
    for (let i = 0; i < batch; i++) record();
    await syncOnce(rt, probe);
    perIter = (performance.now() - s) / batch;
    if (performance.now() - s < 100) batch *= 2;
  }
  const s0 = performance.now();
  await syncOnce(rt, probe);
  const syncMs = performance.now() - s0;
  const iters = Math.max(3, Math.min(100_000, Math.round(targetMs / Math.max(perIter, 1e-3))));
  t0 = performance.now();
  for (let i = 0; i < iters; i++) record();
  await syncOnce(rt, probe);
  const ms = (performance.now() - t0) / iters;
  const gpuMs = single && rt.dev.features.timestamps
    ? await rt.dev.timeDispatch(
      single.spec,
      single.bindings.map((buffer) => ({ buffer })),
      single.workgroups,
      single.uniforms,
      iters,
    )
    : undefined;
  return { ms, iters, gpuMs, syncMs };
}

// ---- the benchmarks ----------------------------------------------------------------------------------------

/** Bytes of distinct weights a GEMV benchmark cycles through, several times the H200's 50 MB L2. */
const COLD_SPAN_BYTES = 256 << 20;

async function benchMatmul(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  dtype: DType,
  size: number,
  configs: readonly MatmulConfig[],
  warmupMs: number,
  targetMs: number,
): Promise<void> {
  const [m, n, k] = [size, size, size];
  await rt.scope(async () => {
    // Every config in C = A B^T, the linear layer's layout (x [tokens, in], W [out, in]: both operands run along
    // k, so both tiles are transposed into shared memory); the first config also in C = A B (B's tile loads
    // straight), to show what that transpose costs.
    const a = hashed(rt, [m, k], dtype, 1), b = hashed(rt, [n, k], dtype, 2), c = rt.empty([m, n], dtype);
    const probe = rt.empty([1], "f32");
    const runs = configs.map((config) => ({ config, transB: true }));
    if (configs.length > 0) runs.push({ config: configs[0], transB: false });
    for (const { config, transB } of runs) {
      if (matmulSharedBytes(config) > rt.dev.limits.maxComputeWorkgroupStorageSize) continue;
      const l = matmulKernel(
        { m, n, k, batch: 1, strideA: 0, strideB: 0, strideC: 0 },
        { dtype, transA: false, transB, accumulate: false },
        config,
      );
      const record = () =>
        rt.dev.dispatch(l.spec, [a.binding, b.binding, c.binding], l.workgroups, l.uniforms);
      let t: Timing;
      try {
        t = await timeIt(rt, probe, record, warmupMs, targetMs, {
          ...l,
          bindings: [a.buffer, b.buffer, c.buffer],
        });
      } catch (e) {
        log({ bench: "matmul", dtype, m, n, k, config: matmulConfigName(config), transB, error: String(e) });
        continue;
      }
      const maxErr = await spotCheck(rt, c, dtype, m, n, k, transB);
      const flops = 2 * m * n * k;
      log({
        bench: "matmul",
        layout: transB ? "A B^T" : "A B",
        dtype,
        m,
        n,
        k,
        config: matmulConfigName(config),
        tflops: +(flops / (t.ms * 1e-3) / 1e12).toFixed(3),
        gpu_tflops: t.gpuMs ? +(flops / (t.gpuMs * 1e-3) / 1e12).toFixed(3) : undefined,
        ms: +t.ms.toFixed(4),
        iters: t.iters,
        sync_ms: +t.syncMs.toFixed(2),
        check_max_rel_err: +maxErr.toExponential(2),
        ok: maxErr < (dtype === "f16" ? 1e-2 : 1e-4),
      });
    }
  });
}

/** Largest relative error of a few outputs of C = A B(^T) against CPU dot products of the hashed inputs. */
async function spotCheck(
  rt: Runtime,
  c: Tensor,
  dtype: DType,
  m: number,
  n: number,
  k: number,
  transB: boolean,
): Promise<number> {
  const points = [[0, 0], [m - 1, n - 1], [Math.floor(m / 3), Math.floor(n / 2)], [m - 1, 0]];
  const bytes = dtype === "f16" ? 2 : 4;
  const reads = await rt.dev.readMany(points.map(([i, j]) => {
    const off = (i * n + j) * bytes;
    const aligned = off - (off % 4);
    return { buffer: c.buffer, offset: aligned, size: 4 };
  }));
  let worst = 0;
  points.forEach(([i, j], p) => {
    const off = (i * n + j) * bytes;
    const got = dtype === "f16" ? new Float16Array(reads[p])[(off % 4) / 2] : new Float32Array(reads[p])[0];
    let s = 0, sa = 0;
    for (let q = 0; q < k; q++) {
      const bIndex = transB ? j * k + q : q * n + j;
      const prod = roundTo(dtype, hashValue(i * k + q, 1)) * roundTo(dtype, hashValue(bIndex, 2));
      s += prod;
      sa += Math.abs(prod);
    }
    worst = Math.max(worst, Math.abs(got - s) / Math.max(sa, 1e-30));
  });
  return worst;
}

async function benchGemv(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  dtype: DType,
  [n, k]: [number, number],
  warmupMs: number,
  targetMs: number,
  tprs: readonly number[],
  unrolls: readonly number[],
  variant: GemvBenchVariant = "plain",
): Promise<void> {
  const swiglu = variant.startsWith("swiglu"), norm = variant.endsWith("norm");
  const mats = swiglu ? 2 : 1;
  await rt.scope(async () => {
    // Decoding reads each weight once per token, from HBM. A weight smaller than the GPU's L2 (50 MB on the H200)
    // timed alone stays in L2 after the first dispatch, so the dispatches cycle through enough copies of W to
    // span 256 MB: every dispatch reads its W from memory, as in a decode step.
    const bytesW = mats * n * k * (dtype === "f16" ? 2 : 4);
    const copies = Math.max(1, Math.min(64, Math.ceil(COLD_SPAN_BYTES / bytesW)));
    const x = hashed(rt, [1, k], dtype, 3), y = rt.empty([1, n], dtype), nw = hashed(rt, [k], dtype, 2);
    // each copy: the weight, or the gate and up weights
    const ws = Array.from(
      { length: copies },
      (_, i) => Array.from({ length: mats }, (_, j) => hashed(rt, [n, k], dtype, 4 + 2 * i + j)),
    );
    const probe = rt.empty([1], "f32");
    for (const [tpr, unroll] of tprs.flatMap((t) => unrolls.map((u) => [t, u]))) {
      // the device's subgroup sums as decoding takes them (DISTILLERY_GEMV_SUBGROUPS=0 times the tree instead)
      const opts = {
        ...gemvDeviceOptions(rt),
        threadsPerRow: tpr,
        unroll,
        normIn: norm ? { eps: 1e-5 } : undefined,
      };
      const l = swiglu ? gemvSwigluKernel(dtype, 1, n, k, opts) : gemvKernel(dtype, 1, n, k, opts);
      // each copy's operands, built once: the timed loop only dispatches
      const operands = ws.map((w) => [x, ...(norm ? [nw] : []), ...w, y]);
      const slices = operands.map((ts) => ts.map((t) => t.binding));
      let next = 0;
      const record = () => rt.dev.dispatch(l.spec, slices[next++ % copies], l.workgroups, l.uniforms);
      // (the GPU-timed figure repeats one W: warm in L2 when W is smaller than it; the wall figure cycles)
      const t = await timeIt(rt, probe, record, warmupMs, targetMs, {
        ...l,
        bindings: operands[0].map((t) => t.buffer),
      });
      const bytes = (mats * n * k + k + n) * (dtype === "f16" ? 2 : 4);
      log({
        bench: "gemv",
        variant,
        dtype,
        m: 1,
        k,
        n,
        threads_per_row: tpr,
        unroll,
        weight_copies: copies,
        gbps: +(bytes / (t.ms * 1e-3) / 1e9).toFixed(1),
        gpu_gbps: t.gpuMs ? +(bytes / (t.gpuMs * 1e-3) / 1e9).toFixed(1) : undefined,
        us: +(t.ms * 1e3).toFixed(2),
        iters: t.iters,
      });
    }
  });
}

async function benchCopy(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  bytes: number,
  warmupMs: number,
  targetMs: number,
): Promise<void> {
  await rt.scope(async () => {
    const n = bytes / 4;
    const src = hashed(rt, [n], "f32", 5), dst = rt.empty([n], "f32");
    const probe = rt.empty([1], "f32");
    // bandwidth counts bytes read plus bytes written (2 x size), the usual convention for copies
    const moved = 2 * bytes;
    // the encoder's copy itself: `dev.copyBuffer` records storage-to-storage copies as the copy kernel
    const t1 = await timeIt(
      rt,
      probe,
      () => rt.dev.encoder().copyBufferToBuffer(src.buffer, 0, dst.buffer, 0, bytes),
      warmupMs,
      targetMs,
    );
    log({
      bench: "copy",
      method: "copyBufferToBuffer",
      bytes,
      gbps: +(moved / (t1.ms * 1e-3) / 1e9).toFixed(1),
    });
    const l = copyWordsKernel(0, 0, n);
    const t2 = await timeIt(
      rt,
      probe,
      () => rt.dev.dispatch(l.spec, [src.binding, dst.binding], l.workgroups, l.uniforms),
      warmupMs,
      targetMs,
      { ...l, bindings: [src.buffer, dst.buffer] },
    );
    log({
      bench: "copy",
      method: "kernel vec4",
      bytes,
      gbps: +(moved / (t2.ms * 1e-3) / 1e9).toFixed(1),
      gpu_gbps: t2.gpuMs ? +(moved / (t2.gpuMs * 1e-3) / 1e9).toFixed(1) : undefined,
    });
  });
}

/**
 * Runs every dense-kernel benchmark and logs one row per measurement (plus a first row describing the device).
 * Full sizes need a large GPU (8192^3 f32 takes 768 MB and about a second per config on an H200).
 */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: BenchOptions = { quick: false },
): Promise<void> {
  const quick = opts.quick;
  const warmupMs = quick ? 30 : 1000, targetMs = quick ? 30 : 1000;
  log({
    bench: "device",
    provider: rt.dev.provider,
    adapter: rt.dev.adapterName,
    features: rt.dev.features,
    max_workgroup_storage: rt.dev.limits.maxComputeWorkgroupStorageSize,
    date: new Date().toISOString(),
  });
  const configs = opts.configs ?? (quick ? MATMUL_SWEEP.slice(0, 2) : MATMUL_SWEEP);
  const dtypes = (opts.dtypes ?? ["f32", "f16"]).filter((d) => d === "f32" || rt.dev.features.f16);
  const runs = (what: "matmul" | "gemv" | "copy") => !opts.only || opts.only.includes(what);
  if (runs("matmul")) {
    for (const size of opts.sizes ?? (quick ? [256] : [4096, 8192])) {
      for (const dtype of dtypes) await benchMatmul(rt, log, dtype, size, configs, warmupMs, targetMs);
    }
  }
  if (runs("gemv")) {
    const shapes = opts.gemvShapes ?? (quick ? [[1024, 512]] : [[14336, 4096]]);
    for (const dtype of dtypes) {
      for (
        const [shape, variant] of shapes.flatMap((s) =>
          (opts.gemvVariants ?? ["plain"]).map((v) => [s, v] as const)
        )
      ) {
        await benchGemv(
          rt,
          log,
          dtype,
          shape,
          warmupMs,
          targetMs,
          opts.gemvTpr ?? [32, 64, 128, 256],
          opts.gemvUnroll ?? [4],
          variant,
        );
      }
    }
  }
  if (runs("copy")) await benchCopy(rt, log, quick ? 1 << 22 : 1 << 30, warmupMs, targetMs);
  rt.pool.trim();
}

if (import.meta.main) {
  const { Runtime } = await import("../runtime/runtime.ts");
  const { createDevice } = await import("../runtime/device.ts");
  const { parseProviderPreference } = await import("../runtime/provider.ts");
  const { flag } = await import("./harness.ts");
  const gpu = parseProviderPreference(flag("gpu") ?? Deno.env.get("DISTILLERY_GPU"), "--gpu");
  const rt = new Runtime(await createDevice({ gpu }));
  const list = (name: string) => flag(name)?.split(",").filter((x) => x);
  await bench(rt, (row) => console.log(JSON.stringify(row)), {
    quick: Deno.args.includes("--quick"),
    configs: list("configs")?.map(parseMatmulConfig),
    sizes: list("sizes")?.map(Number),
    dtypes: list("dtypes") as DType[] | undefined,
    only: list("only") as ("matmul" | "gemv" | "copy")[] | undefined,
    gemvShapes: list("gemv-shapes")?.map((s) => s.split("x").map(Number) as [number, number]),
    gemvTpr: list("gemv-tpr")?.map(Number),
    gemvUnroll: list("gemv-unroll")?.map(Number),
    gemvVariants: list("gemv-variants") as GemvBenchVariant[] | undefined,
  });
  rt.dev.destroy();
}
