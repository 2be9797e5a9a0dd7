/**
 * Kernels at few-row shapes, the ones of batch-1 decoding (1 token) and speculative verification (K+1 tokens),
 * at the Llama-3.2-1B shapes, timed on the GPU clock (timestamp queries around many back-to-back dispatches):
 *
 * - `linear`: GEMV against the tiled matmul for M = 1..16 rows of x and the 1B model's projection shapes. The
 *   H200 run of bench/spec.ts showed whole verification passes jumping from 4 ms (K <= 3) to 36-66 ms (K >= 4),
 *   exactly where `linear` switched from GEMV to the tiled matmul (then at 5 tokens).
 * - `gemv_fused`: the GEMV with the RMSNorm of x in its prologue, and with the residual add in its epilogue,
 *   against the plain GEMV and a separate norm (what the decode fusions of runtime/ops/linear_fused.ts cost on
 *   the GPU clock, against the dispatch each saves).
 * - `decode_attention`: the KV-cache attention kernels (forward + split-K combine) for 1..9 query tokens
 *   against a cache, for every row-tile candidate (H=32, Hkv=8, hd=64); `chosen` marks the heuristic's pick.
 *
 *   deno run -A bench/few_rows.ts --gpu dawn [--quick]
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import {
  type AttentionShape,
  chooseDecodeTiles,
  forwardSharedBytes,
  type RowTiles,
} from "../kernels/attention.ts";
import { planDecodeAttention } from "../kernels/attention_decode.ts";
import { GEMV_MAX_ROWS, gemvKernel } from "../kernels/gemv.ts";
import { matmulKernel } from "../kernels/matmul.ts";
import { rmsNormForward } from "../kernels/rmsnorm.ts";
import type { KernelSpec } from "../kernels/kernel.ts";
import type { BufferSlice } from "../runtime/device.ts";
import { LINEAR_GEMV_MAX_TOKENS } from "../runtime/ops/matmul.ts";
import { flag, randomTensor } from "./harness.ts";

const CANDIDATES: RowTiles[] = [
  { br: 4, bc: 64, tm: 1, tn: 4 },
  { br: 4, bc: 32, tm: 1, tn: 4 },
  { br: 8, bc: 64, tm: 1, tn: 4 },
  { br: 8, bc: 32, tm: 2, tn: 4 },
  { br: 16, bc: 64, tm: 2, tn: 8 },
  { br: 16, bc: 32, tm: 1, tn: 4 },
  { br: 32, bc: 64, tm: 4, tn: 8 },
  { br: 32, bc: 32, tm: 2, tn: 4 },
];

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
  const rt = new Runtime(await createDevice({ gpu }));
  const dev = rt.dev;
  console.log(
    JSON.stringify({ row: "device", device: dev.describe(), date: new Date().toISOString().slice(0, 10) }),
  );
  if (!dev.features.timestamps) {
    console.log(JSON.stringify({ row: "note", note: "no timestamp-query: no rows" }));
  }
  const H = quick ? 4 : 32, Hkv = quick ? 2 : 8, hd = quick ? 16 : 64;
  const iters = quick ? 2 : 200;
  const us = (ms: number | undefined) => ms === undefined ? null : +(ms * 1000).toFixed(2);

  // GEMV against the tiled matmul, y = x W^T, W [N, K] (q/o 2048x2048, k/v 512x2048, up 8192x2048, down)
  const shapes = quick ? [[24, 40]] : [[2048, 2048], [512, 2048], [8192, 2048], [2048, 8192]];
  for (const [n, k] of shapes) {
    const w = randomTensor(rt, [n, k], -1, 1).keep();
    for (const m of quick ? [1, 5, 16] : [1, 2, 4, 5, 8, 9, 12, 16]) {
      const x = randomTensor(rt, [m, k], -1, 1).keep();
      const y = rt.empty([m, n], "f32").keep();
      const g = gemvKernel("f32", Math.min(m, GEMV_MAX_ROWS), n, k);
      const gemv = await dev.timeDispatch(
        g.spec,
        [x.binding, w.binding, y.binding],
        g.workgroups,
        g.uniforms,
        iters,
      );
      const t = matmulKernel(
        { m, n, k, batch: 1, strideA: 0, strideB: 0, strideC: 0 },
        { dtype: "f32", transA: false, transB: true, accumulate: false },
      );
      const mm = await dev.timeDispatch(
        t.spec,
        [x.binding, w.binding, y.binding],
        t.workgroups,
        t.uniforms,
        iters,
      );
      console.log(JSON.stringify({
        row: "linear",
        m,
        n,
        k,
        gemv_us: us(gemv),
        matmul_us: us(mm),
        gemv_gbps: gemv === undefined ? null : +((n * k * 4) / (gemv * 1e6)).toFixed(0),
        linear_uses: m <= LINEAR_GEMV_MAX_TOKENS ? "gemv" : "matmul",
      }));
      x.dispose();
      y.dispose();
    }
    w.dispose();
  }
  // The decode fusions (kernels/gemv.ts): the GEMV with the RMSNorm of x in its prologue against the plain GEMV
  // plus a separate norm dispatch, and with the residual add in its epilogue against the plain GEMV. GPU time
  // only: the fusions' main gain, one dispatch fewer to record and launch, is not on this clock.
  for (const [n, k] of shapes) {
    const w = randomTensor(rt, [n, k], -1, 1).keep();
    const nw = randomTensor(rt, [k], 0.5, 1.5).keep();
    for (const m of quick ? [1, 5] : [1, 4, 8, 16]) {
      const x = randomTensor(rt, [m, k], -1, 1).keep();
      const u = rt.empty([m, k], "f32").keep(), rstd = rt.empty([m], "f32").keep();
      const r = randomTensor(rt, [m, n], -1, 1).keep();
      const y = rt.empty([m, n], "f32").keep();
      const time = (
        l: { spec: KernelSpec; workgroups: [number, number?, number?]; uniforms: ArrayBuffer },
        b: BufferSlice[],
      ) => dev.timeDispatch(l.spec, b, l.workgroups, l.uniforms, iters);
      const plain = await time(gemvKernel("f32", m, n, k), [x.binding, w.binding, y.binding]);
      const norm = await time(rmsNormForward("f32", m, k, 1e-5), [
        x.binding,
        nw.binding,
        u.binding,
        rstd.binding,
      ]);
      const normIn = await time(
        gemvKernel("f32", m, n, k, { normIn: { eps: 1e-5 } }),
        [x.binding, nw.binding, w.binding, y.binding],
      );
      const residual = await time(
        gemvKernel("f32", m, n, k, { residual: true }),
        [x.binding, w.binding, r.binding, y.binding],
      );
      console.log(JSON.stringify({
        row: "gemv_fused",
        m,
        n,
        k,
        gemv_us: us(plain),
        rmsnorm_us: us(norm),
        gemv_norm_in_us: us(normIn),
        gemv_residual_us: us(residual),
      }));
      for (const t of [x, u, rstd, r, y]) t.dispose();
    }
    w.dispose();
    nw.dispose();
  }
  const limit = dev.limits.maxComputeWorkgroupStorageSize;
  for (const cacheLen of quick ? [40] : [257, 1024]) {
    const maxT = cacheLen;
    const k = randomTensor(rt, [1, maxT, Hkv, hd], -1, 1).keep();
    const v = randomTensor(rt, [1, maxT, Hkv, hd], -1, 1).keep();
    for (const n of quick ? [1, 5] : [1, 2, 4, 5, 6, 9]) {
      const q = randomTensor(rt, [1, n, H, hd], -1, 1).keep();
      const s: AttentionShape = {
        B: 1,
        T: n,
        H,
        Hkv,
        hd,
        qoff: cacheLen - n,
        kvLen: cacheLen,
        kvBatchStride: maxT * Hkv * hd,
        window: 0,
        scale: 1 / Math.sqrt(hd),
      };
      const chosen = chooseDecodeTiles(hd, n * (H / Hkv), limit);
      for (const t of CANDIDATES) {
        if (forwardSharedBytes(hd, t) > limit) continue;
        const plan = planDecodeAttention("f32", s, t);
        const out = rt.empty([plan.nSplits, n * H * hd], "f32").keep();
        const lse = rt.empty([plan.nSplits, n * H], "f32").keep();
        const o = rt.empty([n * H * hd], "f32").keep();
        const l = rt.empty([n * H], "f32").keep();
        const f = plan.forward;
        const fwd = await dev.timeDispatch(
          f.spec,
          [
            q.binding,
            k.binding,
            v.binding,
            plan.combine ? out.binding : o.binding,
            plan.combine ? lse.binding : l.binding,
          ],
          f.workgroups,
          f.uniforms,
          iters,
        );
        const c = plan.combine;
        const comb = c
          ? await dev.timeDispatch(
            c.spec,
            [out.binding, lse.binding, o.binding, l.binding],
            c.workgroups,
            c.uniforms,
            iters,
          )
          : 0;
        console.log(JSON.stringify({
          row: "decode_attention",
          queries: n,
          cache: cacheLen,
          tiles: `${t.br}x${t.bc}/${t.tm}x${t.tn}`,
          splits: plan.nSplits,
          workgroups: f.workgroups,
          gpu_us: fwd === undefined ? null : us(fwd + (comb ?? 0)),
          forward_us: us(fwd),
          chosen: t.br === chosen.br && t.bc === chosen.bc && t.tm === chosen.tm && t.tn === chosen.tn,
        }));
        for (const x of [out, lse, o, l]) x.dispose();
      }
      q.dispose();
    }
    k.dispose();
    v.dispose();
  }
}
