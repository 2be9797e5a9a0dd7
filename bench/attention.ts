/**
 * Attention benchmarks: causal GQA forward and backward TFLOP/s at the Llama-3-8B / Mistral-7B head shape
 * (H=32, Hkv=8, hd=64 per the issue) for B = 1..4 at T = 2048, and KV-cache decode attention GB/s against a
 * 2048-long cache (1 query token and a K+1 = 5 token verification chunk).
 *
 * FLOPs count the useful causal work the way FlashAttention's benchmarks do: forward 4 * B * H * T^2 * hd / 2,
 * backward 2.5x that. Decode bytes count K and V of the visible cache once plus q and the output.
 *
 * Forward and backward are timed for both kernel generations (`variant` "v2", the default, and "v1", the first
 * kernels), and, with GPU timestamps, each kernel alone (`op` "kernel", field `kernel`): the forward, delta,
 * dq and dkv of v2, of v1 with its default tiles, and of v1 with 4-row/4-key micro-tiles (`v1_tm4`), which
 * isolates whether v1's slowness comes from its 2-row micro-tiles (see kernels/attention_v2.ts).
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
import type { BufferSlice } from "../runtime/device.ts";
import type { Launch } from "../kernels/fill.ts";
import {
  attentionForwardSgm,
  chooseSgmAttentionKeyTile,
  sgmAttentionApplies,
} from "../kernels/attention_sgm.ts";
import { useSubgroupMatrices } from "../runtime/ops/matmul.ts";
import {
  attentionBackwardDelta,
  attentionBackwardDkv,
  attentionBackwardDq,
  attentionForward,
  type AttentionShape,
  chooseDkvTiles,
  chooseDqTiles,
  chooseForwardTiles,
  dkvSharedBytes,
  dqSharedBytes,
  type KeyTiles,
  type RowTiles,
} from "../kernels/attention.ts";
import {
  attentionBackwardDkvV2,
  attentionBackwardDqV2,
  attentionForwardV2,
  chooseBackwardTiles,
  chooseForwardTilesV2,
} from "../kernels/attention_v2.ts";

/** Options of {@linkcode bench}. */
export interface BenchOptions {
  /** Tiny shapes for a smoke run on the CPU adapter. */
  quick: boolean;
}

function randomData(n: number, seed = 0x12345678): Float32Array {
  const data = new Float32Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    data[i] = ((x >>> 0) / 4294967296 - 0.5) * 2;
  }
  return data;
}

function randomTensor(rt: Runtime, shape: number[], dtype: DType): Tensor {
  return rt.tensor(randomData(shape.reduce((a, b) => a * b, 1)), shape, dtype).keep();
}

/**
 * Correctness on the benchmark's own device and shape (B = 1, f32): the v2 kernels against v1 (forward output,
 * log-sum-exp, dQ, dK, dV: max |v2 - v1| / max |v1|) and the forward against float64 on sampled rows. One row.
 */
async function checkV2(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  common: Record<string, unknown>,
  T: number,
  H: number,
  Hkv: number,
  hd: number,
): Promise<void> {
  const G = H / Hkv, scale = 1 / Math.sqrt(hd);
  const qd = randomData(T * H * hd, 0x9e3779b9), kd = randomData(T * Hkv * hd, 0x7f4a7c15);
  const vd = randomData(T * Hkv * hd, 0x2545f491), gd = randomData(T * H * hd, 0x6a09e667);
  await rt.scope(async () => {
    const q = rt.tensor(qd, [1, T, H, hd]), k = rt.tensor(kd, [1, T, Hkv, hd]);
    const v = rt.tensor(vd, [1, T, Hkv, hd]), g = rt.tensor(gd, [1, T, H, hd]);
    const shape: AttentionShape = {
      B: 1,
      T,
      H,
      Hkv,
      hd,
      qoff: 0,
      kvLen: T,
      kvBatchStride: T * Hkv * hd,
      window: 0,
      scale,
    };
    const runs = (["v1", "v2"] as const).map((variant) => {
      const { out, lse } = rt.noGrad(() => attentionWithLse(q, k, v, { forwardKernels: variant }));
      const gr = attentionBackwardRaw(rt, "f32", shape, q, k, v, out, lse, g, { backwardKernels: variant });
      return [out, lse, gr.dq!, gr.dk!, gr.dv!];
    });
    const reads = await rt.dev.readMany(
      runs.flat().map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })),
    );
    const arrays = reads.map((b) => new Float32Array(b));
    const names = ["o", "lse", "dq", "dk", "dv"];
    const row: Record<string, unknown> = {
      ...common,
      op: "check",
      what: "v2 vs v1 (B=1, f32)",
      B: 1,
      T,
      H,
      Hkv,
      hd,
    };
    names.forEach((name, i) => {
      const a = arrays[i], b = arrays[names.length + i];
      let diff = 0, mag = 0;
      for (let j = 0; j < a.length; j++) {
        diff = Math.max(diff, Math.abs(a[j] - b[j]));
        mag = Math.max(mag, Math.abs(a[j]));
      }
      row[`${name}_rel_maxdiff`] = +(diff / mag).toExponential(2);
    });
    // float64 forward of 16 sampled (token, head) rows against the v2 output
    const o2 = arrays[names.length];
    let worst = 0;
    for (let s = 0; s < 16; s++) {
      const t = Math.min(T - 1, Math.floor(((s + 0.5) / 16) * T)), h = (s * 7) % H, hk = Math.floor(h / G);
      const qo = (t * H + h) * hd;
      const sc: number[] = [];
      for (let j = 0; j <= t; j++) {
        let d = 0;
        for (let e = 0; e < hd; e++) d += qd[qo + e] * kd[(j * Hkv + hk) * hd + e];
        sc.push(d * scale);
      }
      const m = Math.max(...sc);
      const w = sc.map((x) => Math.exp(x - m)), z = w.reduce((a, b) => a + b, 0);
      for (let e = 0; e < hd; e++) {
        let acc = 0;
        for (let j = 0; j <= t; j++) acc += w[j] * vd[(j * Hkv + hk) * hd + e];
        worst = Math.max(worst, Math.abs(acc / z - o2[qo + e]));
      }
    }
    row.o_v2_vs_float64_maxabs = +worst.toExponential(2);
    row.ok = worst < 1e-4 && names.every((n) => (row[`${n}_rel_maxdiff`] as number) < 1e-4);
    log(row);
  });
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

/** v1 tiles with 4-row (dQ) / 4-key (dK/dV) micro-tiles, the largest that fit `limit` (diagnostic variant). */
function v1Tm4Tiles(hd: number, limit: number): { dq: RowTiles; dkv: KeyTiles } {
  const dqs: RowTiles[] = [{ br: 32, bc: 32, tm: 4, tn: 4 }, { br: 16, bc: 16, tm: 4, tn: 4 }];
  const dkvs: KeyTiles[] = [{ bc: 32, br: 32, tk: 4, tr: 4 }, { bc: 16, br: 16, tk: 4, tr: 4 }];
  return {
    dq: dqs.find((t) => dqSharedBytes(hd, t) <= limit) ?? dqs[1],
    dkv: dkvs.find((t) => dkvSharedBytes(hd, t) <= limit) ?? dkvs[1],
  };
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
      forwardV2: chooseForwardTilesV2(hd, limit),
      backwardV2: chooseBackwardTiles(hd, limit),
    }),
  };
  await checkV2(rt, log, common, T, H, Hkv, hd);
  for (const dtype of dtypes) {
    for (const B of batches) {
      const q = randomTensor(rt, [B, T, H, hd], dtype);
      const k = randomTensor(rt, [B, T, Hkv, hd], dtype);
      const v = randomTensor(rt, [B, T, Hkv, hd], dtype);
      const flopsFwd = (4 * B * H * T * T * hd) / 2;
      const sgm = dtype === "f16" && useSubgroupMatrices(rt.dev) &&
        sgmAttentionApplies(
          { B, T, H, Hkv, hd, qoff: 0, kvLen: T, kvBatchStride: T * Hkv * hd, window: 0, scale: 1 / 8 },
          limit,
        );
      for (const variant of sgm ? ["sgm", "v2", "v1"] as const : ["v2", "v1"] as const) {
        const fwdMs = await timeSteps(
          rt,
          () => {
            rt.noGrad(() => attentionWithLse(q, k, v, { forwardKernels: variant }));
          },
          warmupMs,
          minMs,
        );
        log({
          ...common,
          op: "forward",
          variant,
          dtype,
          B,
          T,
          H,
          Hkv,
          hd,
          ms: fwdMs,
          tflops: flopsFwd / fwdMs / 1e9,
        });
      }
      const { out, lse } = rt.noGrad(() => attentionWithLse(q, k, v));
      out.keep();
      lse.keep();
      const gOut = randomTensor(rt, [B, T, H, hd], dtype);
      const shape: AttentionShape = {
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
      for (const variant of sgm ? ["sgm", "v2", "v1"] as const : ["v2", "v1"] as const) {
        const bwdMs = await timeSteps(
          rt,
          () => {
            attentionBackwardRaw(rt, dtype, shape, q, k, v, out, lse, gOut, { backwardKernels: variant });
          },
          warmupMs,
          minMs,
        );
        log({
          ...common,
          op: "backward",
          variant,
          dtype,
          B,
          T,
          H,
          Hkv,
          hd,
          ms: bwdMs,
          tflops: (2.5 * flopsFwd) / bwdMs / 1e9,
        });
      }
      // each backward kernel alone on the GPU clock (B = 1 and the largest batch; the v1 kernels of the first
      // measurement took 100+ ms per step, so few iterations)
      if (rt.dev.features.timestamps && (B === 1 || B === batches[batches.length - 1])) {
        await timeBackwardKernels(rt, log, { ...common, dtype, B, T, H, Hkv, hd }, shape, {
          q,
          k,
          v,
          out,
          gOut,
          lse,
        }, quick);
      }
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

/** Times the forward, delta, dQ and dK/dV of both generations separately with GPU timestamps; one row each. */
async function timeBackwardKernels(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  common: Record<string, unknown>,
  shape: AttentionShape,
  t: { q: Tensor; k: Tensor; v: Tensor; out: Tensor; gOut: Tensor; lse: Tensor },
  quick: boolean,
): Promise<void> {
  const { B, T, H, hd } = shape;
  const dtype = t.q.dtype;
  const limit = rt.dev.limits.maxComputeWorkgroupStorageSize;
  const flopsFwd = (4 * B * H * T * T * hd) / 2;
  await rt.scope(async () => {
    const delta = rt.empty([B, T, H], "f32");
    const dq = rt.empty(t.q.shape, dtype);
    const dk = rt.empty(t.k.shape, dtype);
    const dv = rt.empty(t.v.shape, dtype);
    const fwdOut = rt.empty(t.q.shape, dtype);
    const fwdLse = rt.empty([B, T, H], "f32");
    const dl = attentionBackwardDelta(dtype, B * T * H, hd);
    rt.dev.dispatch(dl.spec, [t.out.binding, t.gOut.binding, delta.binding], dl.workgroups, dl.uniforms);
    await rt.dev.sync();
    const dqIn = [t.q, t.k, t.v, t.gOut, t.lse, delta].map((x) => x.binding);
    const tm4 = v1Tm4Tiles(hd, limit);
    const v2Tiles = chooseBackwardTiles(hd, limit);
    const kernels: {
      kernel: string;
      tiles: unknown;
      launch: Launch;
      bindings: BufferSlice[];
      flops: number;
    }[] = [
      ...(dtype === "f16" && useSubgroupMatrices(rt.dev) && sgmAttentionApplies(shape, limit)
        ? [{
          kernel: "fwd_sgm",
          tiles: { bc: chooseSgmAttentionKeyTile(hd, limit) },
          launch: attentionForwardSgm(shape, chooseSgmAttentionKeyTile(hd, limit)),
          bindings: [t.q, t.k, t.v, fwdOut, fwdLse].map((x) => x.binding),
          flops: flopsFwd,
        }]
        : []),
      {
        kernel: "fwd_v2",
        tiles: chooseForwardTilesV2(hd, limit),
        launch: attentionForwardV2(dtype, shape, chooseForwardTilesV2(hd, limit)),
        bindings: [t.q, t.k, t.v, fwdOut, fwdLse].map((x) => x.binding),
        flops: flopsFwd,
      },
      {
        kernel: "fwd_v1",
        tiles: chooseForwardTiles(hd, limit),
        launch: attentionForward(dtype, shape, chooseForwardTiles(hd, limit)),
        bindings: [t.q, t.k, t.v, fwdOut, fwdLse].map((x) => x.binding),
        flops: flopsFwd,
      },
      {
        kernel: "delta",
        tiles: null,
        launch: dl,
        bindings: [t.out.binding, t.gOut.binding, delta.binding],
        flops: 0,
      },
      // dQ recomputes S and dP and forms dS K: 1.5x the forward's matmul work; dK/dV 2x (S, dP, dV, dK)
      {
        kernel: "dq_v2",
        tiles: v2Tiles,
        launch: attentionBackwardDqV2(dtype, shape, v2Tiles),
        bindings: [...dqIn, dq.binding],
        flops: 1.5 * flopsFwd,
      },
      {
        kernel: "dkv_v2",
        tiles: v2Tiles,
        launch: attentionBackwardDkvV2(dtype, shape, v2Tiles),
        bindings: [...dqIn, dk.binding, dv.binding],
        flops: 2 * flopsFwd,
      },
      {
        kernel: "dq_v1",
        tiles: chooseDqTiles(hd, limit),
        launch: attentionBackwardDq(dtype, shape, chooseDqTiles(hd, limit)),
        bindings: [...dqIn, dq.binding],
        flops: 1.5 * flopsFwd,
      },
      {
        kernel: "dkv_v1",
        tiles: chooseDkvTiles(hd, limit),
        launch: attentionBackwardDkv(dtype, shape, chooseDkvTiles(hd, limit)),
        bindings: [...dqIn, dk.binding, dv.binding],
        flops: 2 * flopsFwd,
      },
      {
        kernel: "dq_v1_tm4",
        tiles: tm4.dq,
        launch: attentionBackwardDq(dtype, shape, tm4.dq),
        bindings: [...dqIn, dq.binding],
        flops: 1.5 * flopsFwd,
      },
      {
        kernel: "dkv_v1_tm4",
        tiles: tm4.dkv,
        launch: attentionBackwardDkv(dtype, shape, tm4.dkv),
        bindings: [...dqIn, dk.binding, dv.binding],
        flops: 2 * flopsFwd,
      },
    ];
    for (const kr of kernels) {
      // one dispatch first (compiles, and sizes the timed run), then enough copies for about 200 ms
      const once = await rt.dev.timeDispatch(
        kr.launch.spec,
        kr.bindings,
        kr.launch.workgroups,
        kr.launch.uniforms,
        1,
      );
      if (once === undefined) return;
      const iters = quick ? 2 : Math.max(2, Math.min(200, Math.round(200 / Math.max(once, 0.01))));
      const ms = await rt.dev.timeDispatch(
        kr.launch.spec,
        kr.bindings,
        kr.launch.workgroups,
        kr.launch.uniforms,
        iters,
      );
      log({
        ...common,
        op: "kernel",
        kernel: kr.kernel,
        kernel_tiles: JSON.stringify(kr.tiles),
        gpu_ms: ms,
        tflops: ms && kr.flops ? kr.flops / ms / 1e9 : undefined,
      });
    }
  });
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gi = Deno.args.indexOf("--gpu");
  const gpu = gi >= 0 ? Deno.args[gi + 1] as "dawn" | "builtin" | "auto" : undefined;
  const rt = await acquireRuntime({ gpu });
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick });
  rt.dev.destroy();
}
