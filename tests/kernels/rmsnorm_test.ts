import assert from "node:assert/strict";
import { addRmsNorm, rmsNorm } from "../../runtime/ops/norm.ts";
import { add, mul } from "../../runtime/ops/elementwise.ts";
import { sum } from "../../runtime/ops/reduce.ts";
import {
  assertClose,
  dot,
  F32_TOL,
  finiteDifference,
  gpuTestOptions,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import { refRmsNorm } from "../reference/dense.ts";

const EPS = 1e-5;

Deno.test("rmsNorm f32: forward vs float64, dx and dw vs finite differences", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("rmsnorm");
  // d = 300 > one workgroup stride; 130 rows > 2 weight-gradient chunks of 64; d = 5 and 1 row: tiny
  for (const [rows, d] of [[7, 300], [130, 33], [1, 5]]) {
    const x = randn(rng, rows * d, 2), w = randn(rng, d), g = randn(rng, rows * d);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [rows, d]), tw = rt.tensor(w, [d]);
      tx.requiresGrad = tw.requiresGrad = true;
      const y = rmsNorm(tx, tw, EPS);
      rt.backward(y, rt.tensor(g, [rows, d]));
      const [gy, gx, gw] = await Promise.all([y.read(), tx.grad!.read(), tw.grad!.read()]);
      assertClose(gy, refRmsNorm(x, w, d, EPS), F32_TOL, `rmsNorm ${rows}x${d} forward`);
      const f = () => dot(refRmsNorm(x, w, d, EPS), g);
      const ix = sampleIndices(rng, x.length, 8), iw = sampleIndices(rng, d, 6);
      // dw sums `rows` terms: a looser absolute floor for the long sum
      assertClose(
        ix.map((i) => gx[i]),
        finiteDifference(f, x, ix),
        { rtol: 1e-4, atol: 1e-5 },
        `${rows}x${d} dx`,
      );
      assertClose(
        iw.map((i) => gw[i]),
        finiteDifference(f, w, iw),
        { rtol: 1e-4, atol: 1e-5 * rows },
        `${rows}x${d} dw`,
      );
      tx.grad!.dispose();
      tw.grad!.dispose();
    });
  }
});

Deno.test(
  "rmsNorm: weight grads accumulate over two backward passes; 3-D input",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rmsnorm-acc");
    const [b, t, d] = [2, 3, 16];
    const x = randn(rng, b * t * d), w = randn(rng, d);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [b, t, d]), tw = rt.tensor(w, [d]);
      tw.requiresGrad = true;
      for (let i = 0; i < 2; i++) rt.scope(() => rt.backward(rmsNorm(tx, tw, EPS)));
      const f = () => refRmsNorm(x, w, d, EPS).reduce((a, v) => a + v, 0);
      const fd = finiteDifference(f, w);
      assertClose(await tw.grad!.read(), fd.map((v) => 2 * v), { rtol: 1e-4, atol: 1e-5 }, "2x dw");
      assert.equal(tx.grad, null, "frozen input gets no grad");
      tw.grad!.dispose();
    });
  },
);

Deno.test(
  "rmsNorm f16 storage: HF's cast before the weight, within f16 tolerance",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) return console.warn("rmsNorm f16: adapter has no shader-f16");
    const rng = testRng("rmsnorm-f16");
    const [rows, d] = [9, 40];
    const x = Float64Array.from(new Float16Array(randn(rng, rows * d)));
    const w = Float64Array.from(new Float16Array(randn(rng, d)));
    const g = Float64Array.from(new Float16Array(randn(rng, rows * d)));
    await rt.scope(async () => {
      const tx = rt.tensor(x, [rows, d], "f16"), tw = rt.tensor(w, [d], "f16");
      tx.requiresGrad = tw.requiresGrad = true;
      const y = rmsNorm(tx, tw, EPS);
      rt.backward(y, rt.tensor(g, [rows, d], "f16"));
      const [gy, gx] = await Promise.all([y.read(), tx.grad!.read()]);
      // two f16 roundings (normalised value, product): about 2 * 2^-11 relative
      assertClose(gy, refRmsNorm(x, w, d, EPS), { rtol: 2e-3, atol: 1e-3 }, "f16 forward");
      const ix = sampleIndices(rng, x.length, 6);
      const fd = finiteDifference(() => dot(refRmsNorm(x, w, d, EPS), g), x, ix, 1e-3);
      assertClose(ix.map((i) => gx[i]), fd, { rtol: 1e-2, atol: 1e-2 }, "f16 dx");
      tx.grad!.dispose();
      tw.grad!.dispose();
    });
  },
);

Deno.test("rmsNorm rejects a weight of the wrong length", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => assert.throws(() => rmsNorm(rt.empty([2, 8]), rt.empty([7]), EPS), /expected \[8\]/));
});

Deno.test(
  "addRmsNorm (fused residual): h and y vs float64; grads of x, r, w through both outputs",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("add-rmsnorm");
    const [rows, d] = [70, 37];
    const x = randn(rng, rows * d), r = randn(rng, rows * d), w = randn(rng, d);
    const wh = randn(rng, rows * d), wy = randn(rng, rows * d);
    const hRef = () => x.map((v, i) => v + r[i]);
    // L = sum(h * wh) + sum(y * wy): gradient reaches x and r through the residual path and through the norm
    const loss = () => dot(hRef(), wh) + dot(refRmsNorm(hRef(), w, d, EPS), wy);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [rows, d]), tr = rt.tensor(r, [rows, d]), tw = rt.tensor(w, [d]);
      tx.requiresGrad = tr.requiresGrad = tw.requiresGrad = true;
      const { h, y } = addRmsNorm(tx, tr, tw, EPS);
      // (mul's gradient with respect to its first operand is g * b, all this needs)
      const l = add(sum(mul(h, rt.tensor(wh, [rows, d]))), sum(mul(y, rt.tensor(wy, [rows, d]))));
      rt.backward(l);
      const [gh, gy, gx, gr, gw] = await Promise.all(
        [h, y, tx.grad!, tr.grad!, tw.grad!].map((t) => t.read()),
      );
      assertClose(gh, hRef().map(Math.fround), { rtol: 0, atol: 0 }, "h is the f32 sum");
      assertClose(gy, refRmsNorm(hRef(), w, d, EPS), F32_TOL, "y");
      const ix = sampleIndices(rng, x.length, 6), iw = sampleIndices(rng, d, 5);
      const tol = { rtol: 1e-4, atol: 1e-5 * Math.sqrt(rows) };
      assertClose(ix.map((i) => gx[i]), finiteDifference(loss, x, ix), tol, "dx");
      assertClose(ix.map((i) => gr[i]), finiteDifference(loss, r, ix), tol, "dr");
      assertClose(
        iw.map((i) => gw[i]),
        finiteDifference(loss, w, iw),
        { rtol: 1e-4, atol: 1e-5 * rows },
        "dw",
      );
      [tx, tr, tw].forEach((t) => t.grad!.dispose());
    });
  },
);
