import assert from "node:assert/strict";
import {
  max,
  maxLastDim,
  mean,
  meanLastDim,
  meanSquares,
  reduceAllInto,
  sum,
  sumLastDim,
  sumSquares,
} from "../../runtime/ops/reduce.ts";
import { reducePartials } from "../../kernels/reduce.ts";
import {
  assertClose,
  finiteDifference,
  gpuTestOptions,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import type { Tensor } from "../../runtime/tensor.ts";

const sumOf = (x: ArrayLike<number>, f: (v: number) => number = (v) => v) => {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += f(x[i]);
  return s;
};

// A long f32 reduction is exact only to about eps * log2(n) * sum|x| (tree order); state that as the tolerance.
const longTol = (x: ArrayLike<number>, f: (v: number) => number = Math.abs) => ({
  rtol: 1e-6,
  atol: 6e-8 * Math.log2(x.length + 2) * sumOf(x, (v) => Math.abs(f(v))),
});

Deno.test("reduce all: sum, mean, sum of squares, max in one and two passes", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("reduce-all");
  for (const n of [1, 1000, 300_001]) {
    const x = randn(rng, n, 2);
    await rt.scope(async () => {
      const t = rt.tensor(x, [n]);
      const outs = [sum(t), mean(t), sumSquares(t), meanSquares(t), max(t)];
      const [s, m, ss, ms, mx] = await Promise.all(outs.map((o) => o.read()));
      assertClose(s, [sumOf(x)], longTol(x), `sum n=${n}`);
      assertClose(m, [sumOf(x) / n], longTol(x.map((v) => v / n)), `mean n=${n}`);
      assertClose(ss, [sumOf(x, (v) => v * v)], longTol(x, (v) => v * v), `sumsq n=${n}`);
      assertClose(ms, [sumOf(x, (v) => v * v) / n], longTol(x, (v) => (v * v) / n), `meansq n=${n}`);
      assert.equal(mx[0], x.reduce((a, b) => Math.max(a, b), -Infinity), `max n=${n}`);
    });
  }
  assert.ok(reducePartials(300_001) > 1, "the large case really takes two passes");
});

Deno.test(
  "reduce all into an offset of a shared output; max of all-negative values",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("reduce-into");
    const a = randn(rng, 5000), b = randn(rng, 77).map((v) => Math.fround(-Math.abs(v) - 1));
    await rt.scope(async () => {
      const out = rt.empty([3], "f32");
      rt.fillInPlace(out, 7);
      reduceAllInto("sumsq", rt.tensor(a, [5000]), out, 2);
      reduceAllInto("max", rt.tensor(b, [77]), out, 0);
      const v = await out.read();
      assert.equal(v[0], Math.max(...b));
      assert.equal(v[1], 7, "untouched slot");
      assertClose([v[2]], [sumOf(a, (x) => x * x)], longTol(a, (x) => x * x), "slot 2");
    });
  },
);

Deno.test(
  "reduce last dim: sum, mean, max over odd row lengths (rows > 1 workgroup stride)",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("reduce-rows");
    for (const shape of [[7, 300], [5, 3, 17], [4, 1]]) {
      const d = shape[shape.length - 1], rows = shape.slice(0, -1).reduce((a, b) => a * b);
      const x = randn(rng, rows * d);
      const row = (r: number) => x.slice(r * d, (r + 1) * d);
      await rt.scope(async () => {
        const t = rt.tensor(x, shape);
        const s = sumLastDim(t);
        assert.deepEqual([...s.shape], shape.slice(0, -1));
        const [gs, gm, gx] = await Promise.all([s.read(), meanLastDim(t).read(), maxLastDim(t).read()]);
        const tol = { rtol: 1e-5, atol: 1e-6 * d };
        assertClose(gs, Array.from({ length: rows }, (_, r) => sumOf(row(r))), tol, `sum ${shape}`);
        assertClose(gm, Array.from({ length: rows }, (_, r) => sumOf(row(r)) / d), tol, `mean ${shape}`);
        assert.deepEqual(
          [...gx],
          Array.from({ length: rows }, (_, r) => Math.max(...row(r))),
          `max ${shape}`,
        );
      });
    }
  },
);

Deno.test(
  "reduce backward: sum, mean, sum of squares (all and last dim) vs finite differences",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("reduce-bwd");
    const [rows, d] = [6, 13];
    const x = randn(rng, rows * d), w = randn(rng, rows);
    await rt.scope(async () => {
      const cases: [string, (t: Tensor) => Tensor, () => number][] = [
        ["sum", sum, () => sumOf(x)],
        ["mean", mean, () => sumOf(x) / x.length],
        ["sumSquares", sumSquares, () => sumOf(x, (v) => v * v)],
        ["meanSquares", meanSquares, () => sumOf(x, (v) => v * v) / x.length],
        ["sumLastDim", sumLastDim, () => sumOf(w.map((wr, r) => wr * sumOf(x.slice(r * d, (r + 1) * d))))],
        [
          "meanLastDim",
          meanLastDim,
          () => sumOf(w.map((wr, r) => (wr * sumOf(x.slice(r * d, (r + 1) * d))) / d)),
        ],
      ];
      for (const [name, op, ref] of cases) {
        const t = rt.tensor(x, [rows, d]);
        t.requiresGrad = true;
        const y = op(t);
        rt.backward(y, y.size === 1 ? rt.full([1], 1) : rt.tensor(w, [rows]));
        const g = await t.grad!.read();
        const idx = sampleIndices(rng, x.length, 8);
        assertClose(
          idx.map((i) => g[i]),
          finiteDifference(ref, x, idx),
          { rtol: 1e-4, atol: 1e-5 },
          `${name} grad`,
        );
        t.grad!.dispose();
      }
    });
  },
);

Deno.test("reduce reads f16 inputs and accumulates in f32", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) return console.warn("reduce f16: adapter has no shader-f16");
  const x = Float64Array.from(new Float16Array(randn(testRng("reduce-f16"), 4099)));
  await rt.scope(async () => {
    const t = rt.tensor(x, [4099], "f16");
    const [s, ss] = await Promise.all([sum(t).read(), sumSquares(t).read()]);
    // inputs are exact f16 values; only the f32 tree adds error
    assertClose(s, [sumOf(x)], longTol(x), "f16 sum");
    assertClose(ss, [sumOf(x, (v) => v * v)], longTol(x, (v) => v * v), "f16 sumsq");
  });
});
