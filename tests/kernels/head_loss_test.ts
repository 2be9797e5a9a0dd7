import assert from "node:assert/strict";
import { defaultHeadLossChunkRows, headLoss, type HeadLossOptions } from "../../runtime/ops/head_loss.ts";
import { distillLoss } from "../../runtime/ops/loss.ts";
import { linear } from "../../runtime/ops/matmul.ts";
import {
  assertClose,
  F16_TOL,
  finiteDifference,
  gpuTestOptions,
  randn,
  roundF16,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";
import {
  refDistillLoss,
  refDistillLossGrad,
  refHeadLogits,
  type RefLossInput,
} from "../reference/distill_loss.ts";
import type { Rng } from "../../util/rng.ts";

// Sizes off every tile: N tokens (not a multiple of any chunk tried), hidden D and D_t, vocabulary V (not a
// multiple of 4, so the matmuls take their scalar paths).
const N = 37, D = 12, Dt = 8, V = 50;

/** Token count, student and teacher widths, and vocabulary of one case. */
interface Dims {
  N: number;
  D: number;
  Dt: number;
  V: number;
}
const DIMS: Dims = { N, D, Dt, V };

interface Data {
  h: Float64Array;
  w: Float64Array;
  th: Float64Array;
  tw: Float64Array;
  labels: Int32Array;
  mask: Float64Array;
}

function data(rng: Rng, { N, D, Dt, V }: Dims = DIMS): Data {
  const labels = new Int32Array(N).map(() => rng.int(V));
  for (const r of [0, 6, 7, 20, 36]) labels[r] = -100; // ignored tokens in several chunks
  const mask = new Float64Array(N).fill(1);
  mask[3] = 0;
  mask[11] = 0.5;
  return {
    h: randn(rng, N * D),
    w: randn(rng, V * D, 0.5),
    th: randn(rng, N * Dt),
    tw: randn(rng, V * Dt, 0.5),
    labels,
    mask,
  };
}

interface Variant {
  teacher: boolean;
  labels: boolean;
  mask: boolean;
  alpha: number;
  beta: number;
  tau: number;
}

/** Float64 loss and gradients of `distillLoss(h W^T)` for a variant. */
function reference(x: Data, v: Variant, { N, D, Dt, V }: Dims = DIMS) {
  const input = (h: Float64Array, w: Float64Array): RefLossInput => ({
    s: refHeadLogits(h, w, N, D, V),
    t: v.teacher ? refHeadLogits(x.th, x.tw, N, Dt, V) : null,
    labels: v.labels ? x.labels : null,
    mask: v.mask ? x.mask : null,
    N,
    V,
    alpha: v.alpha,
    beta: v.beta,
    tau: v.tau,
  });
  const inp = input(x.h, x.w);
  const res = refDistillLoss(inp);
  const g = refDistillLossGrad(inp);
  // dh = g W, dW = g^T h
  const dh = new Float64Array(N * D), dw = new Float64Array(V * D);
  for (let r = 0; r < N; r++) {
    for (let i = 0; i < V; i++) {
      const gi = g[r * V + i];
      if (gi === 0) continue;
      for (let d = 0; d < D; d++) {
        dh[r * D + d] += gi * x.w[i * D + d];
        dw[i * D + d] += gi * x.h[r * D + d];
      }
    }
  }
  return { ...res, dh, dw, lossOf: (h: Float64Array, w: Float64Array) => refDistillLoss(input(h, w)).loss };
}

// loss: sums of exp over 50 logits of magnitude ~5, then means over ~30 tokens: a few f32 ulps
const LOSS_TOL = { rtol: 2e-5, atol: 2e-6 };
// gradients: dlogits (sums of exp) times W, summed over 50 logits (dh) or 37 tokens (dW), with cancellation
const GRAD_TOL = { rtol: 1e-4, atol: 2e-6 };

const VARIANTS: Variant[] = [
  { teacher: false, labels: true, mask: false, alpha: 1, beta: 0, tau: 1 },
  { teacher: true, labels: true, mask: true, alpha: 0.7, beta: 0.4, tau: 2 },
  { teacher: true, labels: false, mask: false, alpha: 0, beta: 1, tau: 1 },
];

Deno.test(
  "headLoss: chunked lm_head + loss matches float64 for every chunk size, with and without teacher",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("head-loss");
    const x = data(rng);
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const pending = [];
        for (const [vi, v] of VARIANTS.entries()) {
          // 1 row per chunk, uneven chunks, one chunk, the default, and a lowered binding limit that forces
          // both smaller chunks and aligned row slices of hidden (37 x 12 f32 = 1776 bytes > 1024)
          const chunkings: Pick<HeadLossOptions, "chunkRows" | "maxBindingBytes">[] = [
            { chunkRows: 1 },
            { chunkRows: 5 },
            { chunkRows: 16 },
            { chunkRows: 37 },
            {},
            { chunkRows: 16, maxBindingBytes: 1024 },
          ];
          for (const ch of chunkings) {
            const h = rt.tensor(x.h, [N, D]), w = rt.tensor(x.w, [V, D]);
            h.requiresGrad = w.requiresGrad = true;
            const res = headLoss(h, w, {
              labels: v.labels ? rt.tensor(x.labels, [N], "i32") : undefined,
              mask: v.mask ? rt.tensor(x.mask, [N]) : undefined,
              teacherHidden: v.teacher ? rt.tensor(x.th, [N, Dt]) : undefined,
              teacherW: v.teacher ? rt.tensor(x.tw, [V, Dt]) : undefined,
              alpha: v.alpha,
              beta: v.beta,
              temperature: v.tau,
              ...ch,
            });
            rt.backward(res.loss);
            const reads = [res.loss.read(), res.totals.read(), res.ce.read(), h.grad!.read(), w.grad!.read()];
            if (res.kl) reads.push(res.kl.read());
            pending.push({ vi, ch, reads: Promise.all(reads), grads: [h, w] });
          }
        }
        for (const p of pending) {
          const v = VARIANTS[p.vi];
          const ref = reference(x, v);
          const label = `variant ${p.vi} ${JSON.stringify(p.ch)}`;
          const [loss, totals, ce, dh, dw, kl] = await p.reads;
          assertClose(loss, [ref.loss], LOSS_TOL, `${label} loss`);
          assertClose(totals, [ref.loss, ref.ceMean, ref.klMean, ref.W], LOSS_TOL, `${label} totals`);
          assertClose(ce, ref.ce, LOSS_TOL, `${label} ce`);
          if (v.teacher) assertClose(kl, ref.kl, LOSS_TOL, `${label} kl`);
          assertClose(dh, ref.dh, GRAD_TOL, `${label} dHidden`);
          assertClose(dw, ref.dw, GRAD_TOL, `${label} dW`);
          for (const t of p.grads) t.grad!.dispose();
        }
      }));
  },
);

Deno.test(
  "headLoss: gradients agree with finite differences of the float64 loss",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("head-loss-fd");
    const x = data(rng);
    const v = VARIANTS[1];
    const ref = reference(x, v);
    await rt.scope(async () => {
      const h = rt.tensor(x.h, [N, D]), w = rt.tensor(x.w, [V, D]);
      h.requiresGrad = w.requiresGrad = true;
      const res = headLoss(h, w, {
        labels: rt.tensor(x.labels, [N], "i32"),
        mask: rt.tensor(x.mask, [N]),
        teacherHidden: rt.tensor(x.th, [N, Dt]),
        teacherW: rt.tensor(x.tw, [V, Dt]),
        alpha: v.alpha,
        beta: v.beta,
        temperature: v.tau,
        chunkRows: 8,
      });
      rt.backward(res.loss);
      const [dh, dw] = await Promise.all([h.grad!.read(), w.grad!.read()]);
      const ih = sampleIndices(rng, x.h.length, 10), iw = sampleIndices(rng, x.w.length, 10);
      const fdTol = { rtol: 1e-4, atol: 1e-6 };
      assertClose(
        ih.map((i) => dh[i]),
        finiteDifference(() => ref.lossOf(x.h, x.w), x.h, ih),
        fdTol,
        "dh vs FD",
      );
      assertClose(
        iw.map((i) => dw[i]),
        finiteDifference(() => ref.lossOf(x.h, x.w), x.w, iw),
        fdTol,
        "dW vs FD",
      );
      h.grad!.dispose();
      w.grad!.dispose();
    });
  },
);

Deno.test(
  "headLoss equals distillLoss(linear(hidden, W)); upstream gradient scales; frozen W; dW accumulates",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("head-loss-eq");
    const x = data(rng);
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const labels = rt.tensor(x.labels, [N], "i32");
        const th = rt.tensor(x.th, [N, Dt]), tw = rt.tensor(x.tw, [V, Dt]);
        const opts = { labels, alpha: 0.8, beta: 0.3, temperature: 1.5 };
        // the unfused path: full logits, then the loss
        const h1 = rt.tensor(x.h, [N, D]), w1 = rt.tensor(x.w, [V, D]);
        h1.requiresGrad = w1.requiresGrad = true;
        const teacher = rt.noGrad(() => linear(th, tw));
        const r1 = distillLoss(linear(h1, w1), { ...opts, teacher });
        rt.backward(r1.loss, rt.tensor([2.5], [1]));
        // fused, with the same upstream gradient 2.5, run twice so W.grad accumulates (and h's grad too)
        const h2 = rt.tensor(x.h, [N, D]), w2 = rt.tensor(x.w, [V, D]);
        h2.requiresGrad = w2.requiresGrad = true;
        for (let i = 0; i < 2; i++) {
          const r2 = headLoss(h2, w2, { ...opts, teacherHidden: th, teacherW: tw, chunkRows: 7 });
          rt.backward(r2.loss, rt.tensor([2.5], [1]));
        }
        // frozen W (stage-1 distillation): no W gradient, dHidden unchanged
        const h3 = rt.tensor(x.h, [N, D]), w3 = rt.tensor(x.w, [V, D]);
        h3.requiresGrad = true;
        const r3 = headLoss(h3, w3, { ...opts, teacherHidden: th, teacherW: tw, chunkRows: 10 });
        rt.backward(r3.loss);
        assert.equal(w3.grad, null);
        // no gradients at all: only the loss
        const r4 = rt.noGrad(() => headLoss(h3, w3, { ...opts, teacherHidden: th, teacherW: tw }));
        const [l1, dh1, dw1, dh2, dw2, dh3, l4] = await Promise.all([
          r1.loss.read(),
          h1.grad!.read(),
          w1.grad!.read(),
          h2.grad!.read(),
          w2.grad!.read(),
          h3.grad!.read(),
          r4.loss.read(),
        ]);
        const ref = reference(x, {
          teacher: true,
          labels: true,
          mask: false,
          alpha: 0.8,
          beta: 0.3,
          tau: 1.5,
        });
        assertClose(l1, [ref.loss], LOSS_TOL, "unfused loss");
        assertClose(l4, [ref.loss], LOSS_TOL, "fused loss without gradients");
        assertClose(dh1, ref.dh.map((g) => 2.5 * g), GRAD_TOL, "unfused dh x 2.5");
        assertClose(dw1, ref.dw.map((g) => 2.5 * g), GRAD_TOL, "unfused dW x 2.5");
        assertClose(dh2, ref.dh.map((g) => 5 * g), GRAD_TOL, "fused dh x 2.5, accumulated twice");
        assertClose(dw2, ref.dw.map((g) => 5 * g), GRAD_TOL, "fused dW x 2.5, accumulated twice");
        assertClose(dh3, ref.dh, GRAD_TOL, "fused dh with frozen W");
        for (const t of [h1, w1, h2, w2, h3]) t.grad!.dispose();
      }));
  },
);

/**
 * f16 headLoss against float64 at `dims`: with M, N >= 32 and K >= 16 every product qualifies for the
 * subgroup-matrix kernel, so on a device with matrix units (the H200 under Dawn) this checks that path.
 */
async function checkF16HeadLoss(dims: Dims, chunkRows: number, seed: string): Promise<void> {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) {
    console.warn("headLoss f16: adapter has no shader-f16");
    return;
  }
  const { N, D, Dt, V } = dims;
  const rng = testRng(seed);
  const x = data(rng, dims);
  const x16 = { ...x, h: roundF16(x.h), w: roundF16(x.w), th: roundF16(x.th), tw: roundF16(x.tw) };
  const v = VARIANTS[1];
  const ref = reference(x16, v, dims);
  await rt.scope(async () => {
    const h = rt.tensor(x16.h, [N, D], "f16"), w = rt.tensor(x16.w, [V, D], "f16");
    h.requiresGrad = w.requiresGrad = true;
    const res = headLoss(h, w, {
      labels: rt.tensor(x.labels, [N], "i32"),
      mask: rt.tensor(x.mask, [N]),
      teacherHidden: rt.tensor(x16.th, [N, Dt], "f16"),
      teacherW: rt.tensor(x16.tw, [V, Dt], "f16"),
      alpha: v.alpha,
      beta: v.beta,
      temperature: v.tau,
      chunkRows,
    });
    rt.backward(res.loss);
    const [loss, dh, dw] = await Promise.all([res.loss.read(), h.grad!.read(), w.grad!.read()]);
    // f16 logits (|s| ~ 5, half an ulp 2e-3) feed the loss; f16 dlogits and f16 chunk sums of dW
    assertClose(loss, [ref.loss], F16_TOL, "f16 loss");
    assertClose(dh, ref.dh, { rtol: 2e-2, atol: 2e-3 }, "f16 dh");
    assertClose(dw, ref.dw, { rtol: 2e-2, atol: 2e-3 }, "f16 dW");
    h.grad!.dispose();
    w.grad!.dispose();
  });
}

Deno.test("headLoss on f16 storage stays within f16 tolerance", gpuTestOptions, async () => {
  await checkF16HeadLoss(DIMS, 9, "head-loss-f16");
});

Deno.test("headLoss on f16 storage at matrix-unit shapes (2 chunks of 40 rows)", gpuTestOptions, async () => {
  await checkF16HeadLoss({ N: 80, D: 32, Dt: 48, V: 136 }, 40, "head-loss-f16-sgm");
});

Deno.test("headLoss: shape and option errors name what was expected", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    const h = rt.zeros([4, 8]), w = rt.zeros([10, 8]), labels = rt.zeros([4], "i32");
    assert.throws(() => headLoss(h, rt.zeros([10, 6]), { labels }), /W must be \[V, 8\]/);
    assert.throws(() => headLoss(h, w), /alpha != 0 needs labels/);
    assert.throws(() => headLoss(h, w, { labels, beta: 0.5 }), /needs teacherHidden/);
    assert.throws(() => headLoss(h, w, { labels: rt.zeros([3], "i32") }), /expected 4 i32 values/);
    assert.throws(
      () => headLoss(h, w, { labels, teacherHidden: rt.zeros([4, 6]), teacherW: rt.zeros([11, 6]) }),
      /do not give \[4, 10\] logits/,
    );
  });
});

Deno.test("headLoss default chunk: whole 128-row blocks within 1 GiB and the binding limit", () => {
  const GiB = 1024 ** 3;
  // Llama-3 vocabulary in f16: 4,186 rows fit 1 GiB, 4,096 are whole blocks of the matrix-unit matmul
  assert.equal(defaultHeadLossChunkRows(128256, 2, 4 * GiB), 4096);
  assert.equal(defaultHeadLossChunkRows(128256, 4, 4 * GiB), 2048);
  assert.equal(defaultHeadLossChunkRows(128256, 4, 128 * 1024 ** 2), 256); // a 128 MiB binding limit
  assert.equal(defaultHeadLossChunkRows(32000, 4, 48 * 1024 ** 2), 384); // 393 rows fit
  assert.equal(defaultHeadLossChunkRows(1_000_000, 4, 400 * 1024 ** 2), 64); // 104 fit: a multiple of 64
  assert.equal(defaultHeadLossChunkRows(1_000_000, 4, 200 * 1024 ** 2), 52); // fewer than 64: all of them
});
