/**
 * Benchmark of the Mamba2 SSD kernels: the chunked scan forward and forward+backward, the decode step, and the
 * fused speculative-verification kernel against its unfused equivalent (K+1 single steps).
 *
 * Full size is one Llama-3.2-1B-shaped hybrid layer: B = 4, L = 2048, H = 32 heads, 8 key/value groups for x and
 * B, P = N = 64. Each row reports wall time per call averaged over many calls recorded between two syncs, after
 * at least a second of warm-up (GPU clocks ramp up under load). The inputs are f32, whose scans keep the f32 row
 * products; where the device could run them on its matrix units (opt-in for f16 scans with `DISTILLERY_SSD_SGM`;
 * `sgm_variants` lists those it asks for), the scan is timed with all four row products forced onto `wide` and
 * onto `sgm`, an A/B in one run.
 *
 * Run alone: `deno run -A bench/ssd.ts [--quick] [--gpu dawn|builtin]`.
 *
 * @module
 */
import { acquireRuntime, type Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import {
  ssdHeadParams,
  ssdScan,
  type SsdScanArgs,
  ssdScanVjp,
  ssdSgmRowVariants,
  ssdStep,
  ssdVerify,
  ssdVerifyCache,
} from "../runtime/ops/ssd.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { ssdRowsSgmApplies, type SsdRowsTiling } from "../kernels/ssd.ts";
import { useSubgroupMatrices } from "../runtime/ops/matmul.ts";
import { Rng } from "../util/rng.ts";

interface Shape {
  batch: number;
  seqlen: number;
  heads: number;
  groups: number;
  dim: number;
}

const FULL: Shape = { batch: 4, seqlen: 2048, heads: 32, groups: 8, dim: 64 };
const QUICK: Shape = { batch: 1, seqlen: 128, heads: 4, groups: 2, dim: 16 };

/** Times `fn` (which only records GPU work): warm-up, then calls between two syncs; returns ms per call. */
async function time(rt: Runtime, fn: () => void, quick: boolean, minCalls = 5): Promise<number> {
  const warmMs = quick ? 0 : 1000;
  const t0 = performance.now();
  let warm = 0;
  do {
    rt.scope(fn);
    await rt.dev.sync();
    warm++;
  } while (performance.now() - t0 < warmMs || warm < 2);
  // aim at about 0.5 s of timed work (a few calls on the CPU adapter)
  const per = (performance.now() - t0) / warm;
  const calls = Math.max(quick ? 2 : minCalls, Math.min(2000, Math.round((quick ? 100 : 500) / per)));
  const t1 = performance.now();
  for (let i = 0; i < calls; i++) rt.scope(fn);
  await rt.dev.sync();
  return (performance.now() - t1) / calls;
}

function randomTensor(rt: Runtime, rng: Rng, shape: number[], lo: number, hi: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return rt.tensor(rng.uniformArray(n, lo, hi), shape).keep();
}

/**
 * Logs rows `{ bench: "ssd", op, ... , ms, tokens_per_s }` for the scan (per chunk size), its backward, the
 * decode step and the verification kernel.
 */
export async function bench(
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: { quick: boolean } = { quick: false },
): Promise<void> {
  const s = opts.quick ? QUICK : FULL;
  const rng = new Rng("bench-ssd");
  const { batch: B, seqlen: L, heads: H, groups: G, dim: P } = s;
  const N = P;
  const owned: Tensor[] = [];
  const t = (shape: number[], lo: number, hi: number) => {
    const x = randomTensor(rt, rng, shape, lo, hi);
    owned.push(x);
    return x;
  };
  const args: SsdScanArgs = {
    x: t([B, L, G, P], -1, 1),
    B: t([B, L, G, N], -1, 1),
    C: t([B, L, H, N], -1, 1),
    dt: t([B, L, H], -4, 0),
    A: t([H], -2, -0.5),
    D: t([H], 0.5, 1.5),
    dtBias: t([H], -1, 0),
  };
  const gy = t([B, L, H, P], -1, 1);
  const tokens = B * L;
  const common = {
    bench: "ssd",
    provider: rt.dev.provider,
    adapter: rt.dev.adapterName,
    B,
    L,
    H,
    groups: G,
    P,
    N,
    sgm_variants: ssdSgmRowVariants(rt.dev, { dimP: P, dimN: N }).join(","),
  };
  // the matrix-unit row products are opt-in (DISTILLERY_SSD_SGM); time them wherever the device could run them
  const couldSgm = useSubgroupMatrices(rt.dev) &&
    ssdRowsSgmApplies({ dimP: P, dimN: N }, rt.dev.limits.maxComputeWorkgroupStorageSize);
  const tilings: (SsdRowsTiling | undefined)[] = couldSgm ? ["wide", "sgm"] : [undefined];
  for (const chunk of opts.quick ? [32, 64] : [64, 128, 256]) {
    for (const rowsTiling of tilings) {
      const o = { chunkSize: chunk, rowsTiling };
      const row = { ...common, chunk, row_tiling: rowsTiling ?? "auto" };
      const fwd = await time(rt, () => rt.noGrad(() => ssdScan(args, o)), opts.quick);
      log({ ...row, op: "scan_forward", ms: fwd, tokens_per_s: tokens / (fwd / 1000) });
      const both = await time(rt, () => ssdScanVjp(args, gy, null, o), opts.quick);
      log({ ...row, op: "scan_forward_backward", ms: both, tokens_per_s: tokens / (both / 1000) });
    }
  }

  // decode: batch 1 and the training batch, one token per call
  const dims = { headsX: G, headsB: G, headsC: H, dimP: P, dimN: N };
  const W = G * P + G * N + H * N;
  const heads = ssdHeadParams(args.A, args.D, args.dtBias).keep();
  owned.push(heads);
  for (const db of opts.quick ? [1] : [1, 16]) {
    const state = t([db, H, P, N], -1, 1);
    const xbc1 = t([db, 1, W], -1, 1), dt1 = t([db, 1, H], -4, 0);
    const step = await time(rt, () => ssdStep({ state, xBC: xbc1, dt: dt1, heads, dims }), opts.quick, 200);
    log({ ...common, op: "decode_step", B: db, L: 1, ms: step, tokens_per_s: db / (step / 1000) });
    // speculative verification with K = 4 drafts, 3 accepted in the previous round
    const K1 = 5;
    const xbc = t([db, K1, W], -1, 1), dtk = t([db, K1, H], -4, 0);
    const cache = ssdVerifyCache(rt, db, H, K1, dims).keep();
    const accepted = rt.tensor(new Uint32Array(db).fill(3), [db], "u32").keep();
    owned.push(cache, accepted);
    const fused = await time(
      rt,
      () => ssdVerify({ state, cache, parity: 0, accepted, xBC: xbc, dt: dtk, heads, dims }),
      opts.quick,
      200,
    );
    log({ ...common, op: "verify_fused", B: db, L: K1, K: K1 - 1, accepted: 3, ms: fused });
    const unfused = await time(
      rt,
      () => {
        for (let j = 0; j < 3; j++) ssdStep({ state, xBC: xbc, dt: dtk, heads, dims, token: j });
        for (let j = 0; j < K1; j++) ssdStep({ state, xBC: xbc, dt: dtk, heads, dims, token: j });
      },
      opts.quick,
      200,
    );
    log({ ...common, op: "verify_unfused_steps", B: db, L: K1, K: K1 - 1, accepted: 3, ms: unfused });
  }
  for (const x of owned) x.dispose();
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gi = Deno.args.indexOf("--gpu");
  const gpu = gi >= 0 ? parseProviderPreference(Deno.args[gi + 1], "--gpu") : undefined;
  const rt = await acquireRuntime({ gpu });
  await bench(rt, (row) => console.log(JSON.stringify(row)), { quick });
}
