import assert from "node:assert/strict";
import { concatLastDim, splitLastDim, takeRows } from "../../runtime/ops/columns.ts";
import { mul } from "../../runtime/ops/elementwise.ts";
import { assertClose, gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";

const EXACT = { rtol: 0, atol: 0 };

Deno.test("columns: split, concat and their gradients are exact copies", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("columns");
  const rows = 37, widths = [5, 13, 3];
  const W = 21;
  const x = randn(rng, rows * W);
  const w = [randn(rng, rows * 5), randn(rng, rows * 13), randn(rng, rows * 3)];
  await rt.scope(async () => {
    const tx = rt.tensor(x, [rows, W]);
    tx.requiresGrad = true;
    const parts = splitLastDim(tx, widths);
    // weight two parts and drop the third: its columns must get zero gradient
    const y0 = mul(parts[0], rt.tensor(w[0], [rows, 5]));
    const y1 = mul(parts[1], rt.tensor(w[1], [rows, 13]));
    const joined = concatLastDim([y0, y1]);
    rt.backward(joined);
    const [p0, p1, p2, gx, jd] = await Promise.all([
      ...parts.map((p) => p.read()),
      tx.grad!.read(),
      joined.read(),
    ]);
    const col = (r: number, c: number) => x[r * W + c];
    const refParts = widths.map((wd, i) => {
      const c0 = widths.slice(0, i).reduce((a, b) => a + b, 0);
      return Float64Array.from({ length: rows * wd }, (_, k) => col(Math.floor(k / wd), c0 + (k % wd)));
    });
    assertClose(p0, refParts[0], EXACT, "part 0");
    assertClose(p1, refParts[1], EXACT, "part 1");
    assertClose(p2, refParts[2], EXACT, "part 2");
    const refJoined = Float64Array.from({ length: rows * 18 }, (_, k) => {
      const r = Math.floor(k / 18), c = k % 18;
      return c < 5
        ? Math.fround(refParts[0][r * 5 + c] * w[0][r * 5 + c])
        : Math.fround(refParts[1][r * 13 + c - 5] * w[1][r * 13 + c - 5]);
    });
    assertClose(jd, refJoined, EXACT, "concat");
    const refGx = Float64Array.from({ length: rows * W }, (_, k) => {
      const r = Math.floor(k / W), c = k % W;
      return c < 5 ? w[0][r * 5 + c] : c < 18 ? w[1][r * 13 + c - 5] : 0;
    });
    assertClose(gx, refGx, EXACT, "split gradient");
    tx.grad!.dispose();
  });
});

Deno.test("columns: takeRows copies a row range", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const x = randn(testRng("rows"), 6 * 4);
  const got = await rt.scope(() => takeRows(rt.tensor(x, [6, 4]), 4, 2).read());
  assert.deepEqual([...got], [...x.slice(16, 24)]);
});

Deno.test(
  "columns: repeatGroupsLastDim forward copies groups, backward sums the copies",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { repeatGroupsLastDim } = await import("../../runtime/ops/columns.ts");
    const rng = testRng("repeat-groups");
    const rows = 7, G = 3, w = 5, rep = 2;
    const x = randn(rng, rows * G * w);
    const seed = randn(rng, rows * G * rep * w);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [rows, G * w]);
      tx.requiresGrad = true;
      const y = repeatGroupsLastDim(tx, w, rep);
      rt.backward(y, rt.tensor(seed, y.shape));
      const [gy, gx] = await Promise.all([y.read(), tx.grad!.read()]);
      const C = G * rep * w;
      const refY = Float64Array.from({ length: rows * C }, (_, i) => {
        const r = Math.floor(i / C), c = i % C;
        return x[r * G * w + Math.floor(Math.floor(c / w) / rep) * w + (c % w)];
      });
      assertClose(gy, refY, EXACT, "repeat forward");
      const refG = new Float64Array(rows * G * w);
      for (let i = 0; i < rows * C; i++) {
        const r = Math.floor(i / C), c = i % C;
        refG[r * G * w + Math.floor(Math.floor(c / w) / rep) * w + (c % w)] += seed[i];
      }
      assertClose(gx, refG, { rtol: 1e-6, atol: 1e-6 }, "repeat backward");
      tx.grad!.dispose();
    });
  },
);

Deno.test(
  "columns: addBias broadcasts over rows; its bias gradient is the scaled column sum",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { addBias } = await import("../../runtime/ops/columns.ts");
    const rng = testRng("bias");
    const rows = 33, C = 9;
    const x = randn(rng, rows * C), b = randn(rng, C), seed = randn(rng, rows * C);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [rows, C]), tb = rt.tensor(b, [C]);
      tx.requiresGrad = tb.requiresGrad = true;
      const y = addBias(tx, tb, 2);
      rt.backward(y, rt.tensor(seed, [rows, C]));
      const [gy, gx, gb] = await Promise.all([y.read(), tx.grad!.read(), tb.grad!.read()]);
      assertClose(gy, x.map((v, i) => v + 2 * b[i % C]), { rtol: 1e-6, atol: 1e-6 }, "forward");
      assertClose(gx, seed, EXACT, "x gradient");
      const refB = new Float64Array(C);
      seed.forEach((v, i) => refB[i % C] += 2 * v);
      assertClose(gb, refB, { rtol: 1e-5, atol: 1e-5 }, "bias gradient");
      tx.grad!.dispose();
      tb.grad!.dispose();
    });
  },
);

Deno.test(
  "columns: splits into 2, 3 (one-pass kernel) and 4 parts copy exactly",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("columns-split-n");
    const rows = 9;
    for (const widths of [[7, 14], [5, 13, 3], [1, 1, 30], [2, 4, 6, 9]]) {
      const W = widths.reduce((a, b) => a + b, 0);
      const x = randn(rng, rows * W);
      await rt.scope(async () => {
        const parts = splitLastDim(rt.tensor(x, [rows, W]), widths);
        const got = await Promise.all(parts.map((p) => p.read()));
        let c0 = 0;
        widths.forEach((wd, i) => {
          const ref = Float64Array.from(
            { length: rows * wd },
            (_, k) => x[Math.floor(k / wd) * W + c0 + (k % wd)],
          );
          assertClose(got[i], ref, EXACT, `widths ${widths} part ${i}`);
          c0 += wd;
        });
      });
    }
  },
);
