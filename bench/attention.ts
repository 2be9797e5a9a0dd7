/**
 * Attention benchmarks: causal GQA forward and backward TFLOP/s at the Llama-3-8B / Mistral-7B head shape
 * (H=32, Hkv=8, hd=64 per the issue) for B = 1..4 at T = 2048, and KV-cache decode attention GB/s against a
 * 2048-long cache (1 query token and a K+1 = 5 token verification chunk).
 *
 * FLOPs count the useful causal work the way FlashAttention's benchmarks do: forward 4 * B * H * T^2 * hd / 2,
 * backward 2.5x that. Decode bytes count K and V of the visible cache once plus q and the output.
 *
 * Run alone with `deno run -A bench/attention.ts [--quick] [--gpu dawn|builtin]`; the lead's `bench/main.ts`
 * calls {@linkcode bench}. Quick mode uses tiny shapes so it finishes in seconds on the CPU adapter.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import { acquireRuntime } from "../runtime/runtime.ts";
import {
  appendKv,
  attentionBackwardRaw,
  attentionWithLse,
  decodeAttention,
  KvCache,
} from "../runtime/ops/attention.ts";
import type { Tensor } from "../runtime/tensor.ts";
import type { DType } from "../kernels/kernel.ts";
import { chooseDkvTiles, chooseDqTiles, chooseForwardTiles } from "../kernels/attention.ts";

/** Options of {@linkcode bench}. */
export interface BenchOptions {
  /** Tiny shapes for a smoke run on the CPU adapter. */
  quick: boolean;
}

function randomTensor(rt: Runtime, shape: number[], dtype: DType): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  let x = 0x12345678;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    data[i] = ((x >>> 0) / 4294967296 - 0.5) * 2;
  }
  return rt.tensor(data, shape, dtype).keep();
}

/**
 * Times `step` (which records GPU work): warm up for `warmupMs` (clocks ramp up after idle), then run batches
 * until `minMs` has passed; returns milliseconds per step. Waits once per batch, never per step.
 */
async function timeSteps(rt: Runtime, step: () => void, warmupMs: number, minMs: number): Promise<number> {
  const run = async (n: number) => {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) rt.scope(step);
    await rt.dev.sync();
    return performance.now() - t0;
  };
  let n = 1;
  let elapsed = await run(1); // compiles pipelines
  const warmEnd = performance.now() + warmupMs;
  while (performance.now() < warmEnd) {
    elapsed = await run(n);
    if (elapsed < 200) n *= 2;
  }
  let total = 0, steps = 0;
  while (total < minMs) {
    const ms = await run(n);
    total += ms;
    steps += n;
    if (ms < 100) n *= 2;
  }
  return total / steps;
}

/** Runs the attention benchmarks and logs one row per measurement. */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: BenchOptions = { quick: false },
): Promise<void> {
  const quick = opts.quick;
  const [H, Hkv, hd] = quick ? [4, 2, 64] : [32, 8, 64];
  const T = quick ? 128 : 2048;
  const batches = quick ? [1, 2] : [1, 2, 3, 4];
  const warmupMs = quick ? 0 : 1500;
  const minMs = quick ? 50 : 1000;
  const dtypes: DType[] = rt.dev.features.f16 && !quick ? ["f32", "f16"] : ["f32"];
  const limit = rt.dev.limits.maxComputeWorkgroupStorageSize;
  const common = {
    bench: "attention",
    provider: rt.dev.provider,
    adapter: rt.dev.adapterName,
    tiles: JSON.stringify({
      forward: chooseForwardTiles(hd, limit),
      dq: chooseDqTiles(hd, limit),
      dkv: chooseDkvTiles(hd, limit),
    }),
  };
  for (const dtype of dtypes) {
    for (const B of batches) {
      const q = randomTensor(rt, [B, T, H, hd], dtype);
      const k = randomTensor(rt, [B, T, Hkv, hd], dtype);
      const v = randomTensor(rt, [B, T, Hkv, hd], dtype);
      const flopsFwd = (4 * B * H * T * T * hd) / 2;
      const fwdMs = await timeSteps(
        rt,
        () => {
          rt.noGrad(() => attentionWithLse(q, k, v));
        },
        warmupMs,
        minMs,
      );
      log({ ...common, op: "forward", dtype, B, T, H, Hkv, hd, ms: fwdMs, tflops: flopsFwd / fwdMs / 1e9 });
      // backward alone: O and LSE computed once, then delta + dQ + dK/dV per step
      const { out, lse } = rt.noGrad(() => attentionWithLse(q, k, v));
      out.keep();
      lse.keep();
      const gOut = randomTensor(rt, [B, T, H, hd], dtype);
      const shape = {
        B,
        T,
        H,
        Hkv,
        hd,
        qoff: 0,
        kvLen: T,
        kvBatchStride: T * Hkv * hd,
        window: 0,
        scale: 1 / 8,
      };
      const bwdMs = await timeSteps(
        rt,
        () => {
          attentionBackwardRaw(rt, dtype, shape, q, k, v, out, lse, gOut);
        },
        warmupMs,
        minMs,
      );
      log({
        ...common,
        op: "backward",
        dtype,
        B,
        T,
        H,
        Hkv,
        hd,
        ms: bwdMs,
        tflops: (2.5 * flopsFwd) / bwdMs / 1e9,
      });
      for (const t of [q, k, v, out, lse, gOut]) t.dispose();
    }
    // decode against a long cache: 1 new token (plain decoding) and 5 (speculative verification of K = 4)
    const cacheLen = quick ? 256 : 2048;
    for (const n of [1, 5]) {
      const B = 1;
      const cache = new KvCache(rt, B, cacheLen + n, Hkv, hd, dtype);
      const kFill = randomTensor(rt, [B, cacheLen + n, Hkv, hd], dtype);
      const vFill = randomTensor(rt, [B, cacheLen + n, Hkv, hd], dtype);
      appendKv(cache, kFill, vFill);
      const q = randomTensor(rt, [B, n, H, hd], dtype);
      const ms = await timeSteps(
        rt,
        () => {
          decodeAttention(q, cache);
        },
        warmupMs,
        minMs,
      );
      const el = dtype === "f16" ? 2 : 4;
      const bytes = 2 * B * (cacheLen + n) * Hkv * hd * el + 2 * B * n * H * hd * el;
      log({
        ...common,
        op: "decode",
        dtype,
        B,
        cache: cacheLen + n,
        queries: n,
        H,
        Hkv,
        hd,
        ms,
        gbps: bytes / ms / 1e6,
      });
      for (const t of [kFill, vFill, q]) t.dispose();
      cache.dispose();
    }
  }
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gi = Deno.args.indexOf("--gpu");
  const gpu = gi >= 0 ? Deno.args[gi + 1] as "dawn" | "builtin" | "auto" : undefined;
  const rt = await acquireRuntime({ gpu });
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick });
  rt.dev.destroy();
}
