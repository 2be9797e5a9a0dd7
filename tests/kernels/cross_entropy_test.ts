import assert from "node:assert/strict";
import { crossEntropy, distillLoss, type DistillLossOptions, rowBlocks } from "../../runtime/ops/loss.ts";
import {
  assertClose,
  finiteDifference,
  gpuTestOptions,
  randn,
  roundF16,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";
import type { Rng } from "../../util/rng.ts";

/** Float64 reference of the distillation loss, exactly as documented in kernels/cross_entropy.ts. */
function refLoss(
  s: Float64Array,
  t: Float64Array | null,
  labels: Int32Array | null,
  mask: Float64Array | null,
  N: number,
  V: number,
  alpha: number,
  beta: number,
  tau: number,
) {
  const ce = new Float64Array(N), kl = new Float64Array(N), w = new Float64Array(N);
  const lse = (x: Float64Array, off: number, f: number) => {
    let m = -Infinity;
    for (let i = 0; i < V; i++) m = Math.max(m, x[off + i] * f);
    let z = 0;
    for (let i = 0; i < V; i++) z += Math.exp(x[off + i] * f - m);
    return m + Math.log(z);
  };
  for (let r = 0; r < N; r++) {
    w[r] = (labels && labels[r] === -100 ? 0 : 1) * (mask ? mask[r] : 1);
    if (w[r] === 0) continue;
    const o = r * V;
    if (labels) ce[r] = lse(s, o, 1) - s[o + labels[r]];
    if (t) {
      const la = lse(t, o, 1 / tau), lb = lse(s, o, 1 / tau);
      let k = 0;
      for (let i = 0; i < V; i++) {
        const lp = t[o + i] / tau - la, lq = s[o + i] / tau - lb;
        k += Math.exp(lp) * (lp - lq);
      }
      kl[r] = tau * tau * k;
    }
  }
  const W = w.reduce((a, b) => a + b, 0);
  let sc = 0, sk = 0;
  for (let r = 0; r < N; r++) {
    sc += w[r] * ce[r];
    sk += w[r] * kl[r];
  }
  const ceMean = W ? sc / W : 0, klMean = W ? sk / W : 0;
  return { ce, kl, loss: alpha * ceMean + beta * klMean, ceMean, klMean, W };
}

/** Analytic float64 gradient of the loss w.r.t. the student logits. */
function refGrad(
  s: Float64Array,
  t: Float64Array | null,
  labels: Int32Array | null,
  mask: Float64Array | null,
  N: number,
  V: number,
  alpha: number,
  beta: number,
  tau: number,
) {
  const g = new Float64Array(N * V);
  const { W } = refLoss(s, t, labels, mask, N, V, alpha, beta, tau);
  const softmax = (x: Float64Array, o: number, f: number) => {
    let m = -Infinity;
    for (let i = 0; i < V; i++) m = Math.max(m, x[o + i] * f);
    const e = Array.from({ length: V }, (_, i) => Math.exp(x[o + i] * f - m));
    const z = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / z);
  };
  for (let r = 0; r < N; r++) {
    const w = (labels && labels[r] === -100 ? 0 : 1) * (mask ? mask[r] : 1);
    if (w === 0 || W === 0) continue;
    const o = r * V;
    const ps = softmax(s, o, 1), q = softmax(s, o, 1 / tau), p = t ? softmax(t, o, 1 / tau) : null;
    for (let i = 0; i < V; i++) {
      let gi = labels ? alpha * (ps[i] - (i === labels[r] ? 1 : 0)) : 0;
      if (p) gi += beta * tau * (q[i] - p[i]);
      g[o + i] = (w / W) * gi;
    }
  }
  return g;
}

interface Setup {
  N: number;
  V: number;
  s: Float64Array;
  t: Float64Array;
  labels: Int32Array;
  mask: Float64Array;
}

function setup(rng: Rng, N: number, V: number, scale = 3): Setup {
  const s = randn(rng, N * V, scale), t = randn(rng, N * V, scale);
  const labels = new Int32Array(N).map(() => rng.int(V));
  const mask = new Float64Array(N).fill(1);
  labels[1] = -100; // ignored by label
  if (N > 3) mask[3] = 0; // ignored by mask
  if (N > 4) mask[4] = 0.5; // a fractional weight
  return { N, V, s, t, labels, mask };
}

// Sums of exp over up to 1000 entries and a log: a few f32 ulps of the largest logit, ~1e-6 relative.
const TOL = { rtol: 2e-5, atol: 2e-6 };

async function check(
  name: string,
  x: Setup,
  o: Omit<DistillLossOptions, "labels" | "mask" | "teacher"> & {
    useLabels?: boolean;
    useMask?: boolean;
    useTeacher?: boolean;
    dtype?: "f32" | "f16";
  },
) {
  const rt = await testRuntime();
  const { N, V } = x;
  const alpha = o.alpha ?? 1, beta = o.beta ?? (o.useTeacher ? 0.1 : 0), tau = o.temperature ?? 1;
  const dtype = o.dtype ?? "f32";
  const r16 = (a: Float64Array) => dtype === "f16" ? roundF16(a) : a;
  const s = r16(x.s), t = r16(x.t);
  const labels = o.useLabels === false ? null : x.labels;
  const mask = o.useMask ? x.mask : null;
  const teacher = o.useTeacher ? t : null;
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const logits = rt.tensor(s, [N, V], dtype);
      logits.requiresGrad = true;
      const res = distillLoss(logits, {
        ...o,
        labels: labels ? rt.tensor(labels, [N], "i32") : undefined,
        mask: mask ? rt.tensor(mask, [N]) : undefined,
        teacher: teacher ? rt.tensor(teacher, [N, V], dtype) : undefined,
      });
      rt.backward(res.loss);
      const [loss, ce, totals, g] = await Promise.all([
        res.loss.read(),
        res.ce.read(),
        res.totals.read(),
        (o.inPlaceGrad ? logits : logits.grad!).read(),
      ]);
      const kl = res.kl ? await res.kl.read() : null;
      const ref = refLoss(s, teacher, labels, mask, N, V, alpha, beta, tau);
      const tol = dtype === "f16" ? { rtol: 1e-4, atol: 1e-5 } : TOL; // inputs are f16-exact; math is f32
      assertClose(ce, ref.ce, tol, `${name} ce`);
      if (kl) assertClose(kl, ref.kl, { rtol: 1e-4, atol: 1e-5 }, `${name} kl`); // difference of two lse: cancellation
      assertClose(loss, [ref.loss], tol, `${name} loss`);
      assertClose(totals, [ref.loss, ref.ceMean, ref.klMean, ref.W], tol, `${name} totals`);
      const rg = refGrad(s, teacher, labels, mask, N, V, alpha, beta, tau);
      // f16 dlogits are rounded to f16 on store
      assertClose(
        g,
        rg,
        dtype === "f16" ? { rtol: 2e-3, atol: 1e-6 } : { rtol: 1e-4, atol: 1e-7 },
        `${name} dlogits`,
      );
      // masked tokens contribute nothing: their gradient rows are exactly zero
      for (let r = 0; r < N; r++) {
        const w = (labels && labels[r] === -100 ? 0 : 1) * (mask ? mask[r] : 1);
        if (w === 0) {
          assert.ok(g.subarray(r * V, (r + 1) * V).every((v) => v === 0), `${name}: row ${r} grad not 0`);
        }
      }
      if (dtype === "f32") {
        // finite differences of the float64 reference loss at sampled coordinates
        const rng = testRng(`${name}-fd`);
        const idx = sampleIndices(rng, N * V, 10);
        const xs = Float64Array.from(s);
        const fd = finiteDifference(
          () => refLoss(xs, teacher, labels, mask, N, V, alpha, beta, tau).loss,
          xs,
          idx,
        );
        assertClose(
          idx.map((i) => g[i]),
          fd,
          { rtol: 1e-4, atol: 1e-8 },
          `${name} dlogits vs finite differences`,
        );
      }
      if (!o.inPlaceGrad) logits.grad!.dispose();
    }));
}

Deno.test(
  "distill loss: CE + KL at temperature 2 with ignored and masked tokens, V off the chunk",
  gpuTestOptions,
  async () => {
    const x = setup(testRng("ce-kl"), 9, 1000);
    await check("ce+kl", x, { useTeacher: true, useMask: true, alpha: 1, beta: 0.3, temperature: 2 });
  },
);

Deno.test("distill loss: CE only, KL only (no labels), and temperature 1", gpuTestOptions, async () => {
  const x = setup(testRng("ce-only"), 6, 300);
  await check("ce", x, {});
  await check("kl-only", x, { useLabels: false, useTeacher: true, alpha: 0, beta: 1, temperature: 0.5 });
  await check("t1", x, { useTeacher: true, useMask: true });
});

Deno.test(
  "distill loss: row blocks (logits split over bindings) and in-place gradient",
  gpuTestOptions,
  async () => {
    const x = setup(testRng("blocks"), 11, 130);
    // 64-row bindings of [70, 64] f32 logits: two blocks, the second bound at a 16 KiB offset
    const rt = await testRuntime();
    const blocks = rt.scope(() => rowBlocks(rt, [rt.empty([70, 64])], 70, 64, 64 * 64 * 4));
    assert.deepEqual(blocks.map((b) => [b.row0, b.rows, b.slices[0].offset]), [[0, 64, 0], [64, 6, 16384]]);
    await check("blocks", setup(testRng("blocks64"), 70, 64), {
      useTeacher: true,
      useMask: true,
      maxBindingBytes: 64 * 64 * 4,
    });
    await check("inplace", x, { useTeacher: true, useMask: true, inPlaceGrad: true, temperature: 1.5 });
  },
);

Deno.test(
  "distill loss: large logits stay finite (max subtraction) and f16 storage",
  gpuTestOptions,
  async () => {
    const big = setup(testRng("big"), 5, 257, 60); // logits ~ +-180: exp would overflow f32 without max subtraction
    await check("big", big, { useTeacher: true, temperature: 3 });
    const rt = await testRuntime();
    if (rt.dev.features.f16) {
      await check("f16", setup(testRng("f16"), 5, 200), {
        useTeacher: true,
        dtype: "f16",
      });
    }
  },
);

Deno.test(
  "cross entropy: out-of-vocabulary label gives NaN; every token ignored gives 0",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    await rt.scope(async () => {
      const logits = rt.tensor(randn(testRng("oov"), 3 * 10), [3, 10]);
      const bad = crossEntropy(logits, rt.tensor([1, 10, 2], [3], "i32"));
      const none = crossEntropy(logits, rt.tensor([-100, -100, -100], [3], "i32"));
      const [b, n] = await Promise.all([bad.totals.read(), none.totals.read()]);
      assert.ok(Number.isNaN(b[0]), "a label outside the vocabulary must poison the loss");
      assert.deepEqual([...n], [0, 0, 0, 0]);
      assert.throws(
        () => distillLoss(logits, { labels: rt.tensor([1, 2], [2], "i32") }),
        /expected 3 i32 values/,
      );
      assert.throws(() => distillLoss(logits, { alpha: 0, beta: 1 }), /needs teacher logits/);
    });
  },
);
