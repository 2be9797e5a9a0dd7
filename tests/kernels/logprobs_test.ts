import assert from "node:assert/strict";
import { greedyArgmax, maskedSum, sequenceLogprobs, tokenLogprobs } from "../../runtime/ops/loss.ts";
import {
  assertClose,
  dot,
  finiteDifference,
  gpuTestOptions,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";

/** Float64 log_softmax(logits[t])[target[t]], 0 for target -100. */
function refLogprobs(s: ArrayLike<number>, targets: Int32Array, V: number): Float64Array {
  const out = new Float64Array(targets.length);
  for (let t = 0; t < targets.length; t++) {
    if (targets[t] === -100) continue;
    let m = -Infinity;
    for (let i = 0; i < V; i++) m = Math.max(m, s[t * V + i]);
    let z = 0;
    for (let i = 0; i < V; i++) z += Math.exp(s[t * V + i] - m);
    out[t] = s[t * V + targets[t]] - m - Math.log(z);
  }
  return out;
}

// a logsumexp over up to 1000 f32 values: ~1e-6 relative
const TOL = { rtol: 2e-5, atol: 2e-6 };

Deno.test(
  "token log-probs: forward vs float64, backward vs analytic and finite differences",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("logprobs");
    const [B, T, V] = [2, 7, 1000];
    const N = B * T;
    const s = randn(rng, N * V, 4);
    const targets = new Int32Array(N).map(() => rng.int(V));
    targets[3] = -100;
    const g = randn(rng, N);
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const logits = rt.tensor(s, [B, T, V]);
        logits.requiresGrad = true;
        const lp = tokenLogprobs(logits, rt.tensor(targets, [B, T], "i32"), { maxBindingBytes: 8 * V * 4 });
        assert.deepEqual(lp.shape, [B, T]);
        rt.backward(lp, rt.tensor(g, [B, T]));
        const [got, dl] = await Promise.all([lp.read(), logits.grad!.read()]);
        assertClose(got, refLogprobs(s, targets, V), TOL, "logprobs");
        // d/ds of sum_t g_t logprob_t = g_t (onehot - softmax); ignored rows get exactly 0
        const want = new Float64Array(N * V);
        for (let t = 0; t < N; t++) {
          if (targets[t] === -100) continue;
          let m = -Infinity;
          for (let i = 0; i < V; i++) m = Math.max(m, s[t * V + i]);
          let z = 0;
          for (let i = 0; i < V; i++) z += Math.exp(s[t * V + i] - m);
          for (let i = 0; i < V; i++) {
            want[t * V + i] = g[t] * ((i === targets[t] ? 1 : 0) - Math.exp(s[t * V + i] - m) / z);
          }
        }
        assertClose(dl, want, { rtol: 1e-4, atol: 1e-8 }, "dlogits");
        assert.ok(dl.subarray(3 * V, 4 * V).every((x) => x === 0), "ignored row has a gradient");
        const xs = Float64Array.from(s);
        const idx = sampleIndices(rng, N * V, 10);
        idx.push(targets[5] + 5 * V); // the gathered entry itself
        const fd = finiteDifference(() => dot(refLogprobs(xs, targets, V), g), xs, idx);
        assertClose(idx.map((i) => dl[i]), fd, { rtol: 1e-4, atol: 1e-8 }, "dlogits vs finite differences");
        logits.grad!.dispose();
      }));
  },
);

Deno.test(
  "sequence log-probs: masked completion sums per sequence, with gradient",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("seq-logprobs");
    const [B, T, V] = [3, 300, 37]; // 300 positions: more than one 256-thread pass per row
    const s = randn(rng, B * T * V, 2);
    const targets = new Int32Array(B * T).map(() => rng.int(V));
    const mask = new Float64Array(B * T);
    for (let b = 0; b < B; b++) {
      // prompt of 10 + 20b tokens (mask 0), then the completion (mask 1); padding at the end of row 2
      for (let t = 10 + 20 * b; t < T - (b === 2 ? 50 : 0); t++) mask[b * T + t] = 1;
    }
    for (let t = T - 50; t < T; t++) targets[2 * T + t] = -100; // padding is ignored in the targets too
    const gs = randn(rng, B);
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const logits = rt.tensor(s, [B, T, V]);
        logits.requiresGrad = true;
        const seq = sequenceLogprobs(logits, rt.tensor(targets, [B, T], "i32"), rt.tensor(mask, [B, T]));
        rt.backward(seq, rt.tensor(gs, [B]));
        const [got, dl] = await Promise.all([seq.read(), logits.grad!.read()]);
        const lp = refLogprobs(s, targets, V);
        const want = Array.from({ length: B }, (_, b) => {
          let acc = 0;
          for (let t = 0; t < T; t++) acc += mask[b * T + t] * lp[b * T + t];
          return acc;
        });
        // sums of ~290 log-probs of magnitude ~4: f32 accumulation error ~1e-5 relative
        assertClose(got, want, { rtol: 5e-5, atol: 1e-4 }, "sequence logprobs");
        const f = (x: Float64Array) => {
          const l = refLogprobs(x, targets, V);
          let acc = 0;
          for (let b = 0; b < B; b++) {
            for (let t = 0; t < T; t++) acc += gs[b] * mask[b * T + t] * l[b * T + t];
          }
          return acc;
        };
        const xs = Float64Array.from(s);
        const idx = [
          ...sampleIndices(rng, B * T * V, 8),
          (2 * T + 5) * V + 1,
          (1 * T + 100) * V + targets[T + 100],
        ];
        const fd = finiteDifference(() => f(xs), xs, idx);
        assertClose(
          idx.map((i) => dl[i]),
          fd,
          { rtol: 1e-4, atol: 1e-8 },
          "d sequence logprobs vs finite differences",
        );
        // prompt positions (mask 0) get no gradient
        assert.ok(dl.subarray(0, 10 * V).every((x) => x === 0));
        logits.grad!.dispose();
      }));
  },
);

Deno.test(
  "masked sum: masked-out NaN entries are skipped, gradient is g * mask",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const x = rt.tensor([1, NaN, 3, 4, 5, 6], [2, 3]);
        x.requiresGrad = true;
        const out = maskedSum(x, rt.tensor([1, 0, 0.5, 0, 1, 1], [2, 3]));
        rt.backward(out, rt.tensor([2, -1], [2]));
        const [o, g] = await Promise.all([out.read(), x.grad!.read()]);
        assert.deepEqual([...o], [2.5, 11]);
        assert.deepEqual([...g], [2, 0, 1, -0, -1, -1]);
        x.grad!.dispose();
      }));
  },
);

Deno.test("greedy argmax: lowest index on ties, top-1/top-2 margin, row blocks", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("argmax");
  const [N, V] = [6, 1024]; // 4 KiB rows: any row count is aligned, so 2-row blocks
  const s = randn(rng, N * V).map(Math.fround);
  s[2 * V + 17] = 9;
  s[2 * V + 900] = 9; // tie: index 17 wins, margin 0
  s[4 * V + 1023] = 50; // the last column
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const { ids, margin } = greedyArgmax(rt.tensor(s, [N, V]), { maxBindingBytes: 2 * V * 4 });
      const [gi, gm] = await Promise.all([ids.read(), margin.read()]);
      for (let r = 0; r < N; r++) {
        const row = Array.from(s.subarray(r * V, (r + 1) * V));
        const best = Math.max(...row);
        const bi = row.indexOf(best);
        const rest = row.filter((_, i) => i !== bi);
        assert.equal(gi[r], bi, `row ${r} argmax`);
        assertClose([gm[r]], [best - Math.max(...rest)], { rtol: 1e-6, atol: 1e-6 }, `row ${r} margin`);
      }
      assert.equal(gi[2], 17);
      assert.equal(gm[2], 0);
      assert.equal(gi[4], 1023);
    }));
});

Deno.test("token log-probs: f16 logits", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) return;
  const rng = testRng("logprobs-f16");
  const V = 300;
  const s = randn(rng, 4 * V, 3).map((x) => Float16Array.of(x)[0]);
  const targets = new Int32Array([1, 299, 0, 150]);
  await rt.scope(async () => {
    const lp = tokenLogprobs(rt.tensor(s, [4, V], "f16"), rt.tensor(targets, [4], "i32"));
    // inputs are exactly representable in f16 and the math is f32: f32 tolerance applies
    assertClose(await lp.read(), refLogprobs(s, targets, V), TOL, "f16 logprobs");
  });
});
