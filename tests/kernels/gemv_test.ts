import assert from "node:assert/strict";
import { gemvKernel, gemvQkvKernel, gemvSwigluKernel } from "../../kernels/gemv.ts";
import { linear, linearQkv, linearSwiglu } from "../../runtime/ops/matmul.ts";
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
import { refMatmul } from "../reference/dense.ts";
import type { DType } from "../../kernels/kernel.ts";

/** y = x W^T in float64 for x [rows, K], W [N, K]. */
function refLinear(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  rows: number,
  n: number,
  k: number,
): Float64Array {
  return refMatmul(
    { data: x, batched: false, trans: false },
    { data: w, batched: false, trans: true },
    1,
    rows,
    n,
    k,
  );
}

const roundF16 = (v: Float64Array) => Float64Array.from(new Float16Array(v));

Deno.test(
  "gemv kernel: 1..16 rows, scalar and vector K, every thread grouping, f32",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gemv-f32");
    // K = 67: scalar path; K = 96: vec4 path; K = 1000: the 4-way unrolled loop plus its tail. N = 45 is not a multiple of any rows-per-workgroup.
    for (const k of [67, 96, 1000]) {
      for (const rows of [1, 2, 5, 16]) {
        for (const tpr of [4, 32, 256]) {
          const n = 45;
          const x = randn(rng, rows * k), w = randn(rng, n * k);
          await rt.scope(async () => {
            const tx = rt.tensor(x, [rows, k]), tw = rt.tensor(w, [n, k]), y = rt.empty([rows, n]);
            const l = gemvKernel("f32", rows, n, k, { threadsPerRow: tpr, alpha: 0.5 });
            rt.dev.dispatch(l.spec, [tx.binding, tw.binding, y.binding], l.workgroups, l.uniforms);
            // tree-summed f32 dot products of K unit-size terms
            assertClose(await y.read(), refLinear(x, w, rows, n, k).map((v) => 0.5 * v), {
              rtol: 1e-5,
              atol: 2e-6 * k,
            }, `gemv k=${k} rows=${rows} tpr=${tpr}`);
          });
        }
      }
    }
  },
);

Deno.test(
  "gemv kernel f16: packed eight-wide loads (K % 8 == 0) and the scalar path",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn("gemv f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)");
      return;
    }
    const rng = testRng("gemv-f16");
    for (const [k, rows] of [[128, 1], [136, 3], [70, 2]]) {
      const n = 37;
      const x = roundF16(randn(rng, rows * k)), w = roundF16(randn(rng, n * k));
      await rt.scope(async () => {
        const tx = rt.tensor(x, [rows, k], "f16"),
          tw = rt.tensor(w, [n, k], "f16"),
          y = rt.empty([rows, n], "f16");
        const l = gemvKernel("f16" as DType, rows, n, k);
        rt.dev.dispatch(l.spec, [tx.binding, tw.binding, y.binding], l.workgroups, l.uniforms);
        // f16 output rounding (2^-11 relative) on top of f32 accumulation
        assertClose(
          await y.read(),
          refLinear(x, w, rows, n, k),
          { rtol: 1e-2, atol: 1e-3 * Math.sqrt(k) },
          `f16 k=${k}`,
        );
      });
    }
  },
);

Deno.test(
  "linear: GEMV for 1, 3 and 9 tokens, tiled matmul for 37; grads of x and W",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear");
    const [nIn, nOut] = [24, 19];
    for (const shape of [[1, nIn], [3, nIn], [9, nIn], [37, nIn], [2, 3, nIn]]) {
      const tokens = shape.slice(0, -1).reduce((a, b) => a * b);
      const x = randn(rng, tokens * nIn), w = randn(rng, nOut * nIn), g = randn(rng, tokens * nOut);
      await rt.scope(async () => {
        const tx = rt.tensor(x, shape), tw = rt.tensor(w, [nOut, nIn]);
        tx.requiresGrad = tw.requiresGrad = true;
        const dispatches = rt.dev.stats.dispatches;
        const y = linear(tx, tw);
        assert.deepEqual([...y.shape], [...shape.slice(0, -1), nOut]);
        assert.ok(rt.dev.stats.dispatches - dispatches <= 2, "forward is one dispatch (+ poison fill)");
        rt.backward(y, rt.tensor(g, y.shape));
        const [gy, gx, gw] = await Promise.all([y.read(), tx.grad!.read(), tw.grad!.read()]);
        const f = () => dot(refLinear(x, w, tokens, nOut, nIn), g);
        assertClose(
          gy,
          refLinear(x, w, tokens, nOut, nIn),
          { rtol: 1e-5, atol: 2e-6 * nIn },
          `linear ${shape} y`,
        );
        const ix = sampleIndices(rng, x.length, 6), iw = sampleIndices(rng, w.length, 6);
        const gtol = { rtol: 1e-4, atol: 1e-5 * Math.sqrt(tokens * nOut) };
        assertClose(ix.map((i) => gx[i]), finiteDifference(f, x, ix), gtol, `linear ${shape} dx`);
        assertClose(iw.map((i) => gw[i]), finiteDifference(f, w, iw), gtol, `linear ${shape} dW`);
        tx.grad!.dispose();
        tw.grad!.dispose();
      });
    }
  },
);

Deno.test("linear rejects an input whose last dimension is not the weight's", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    assert.throws(() => linear(rt.empty([2, 5]), rt.empty([3, 4])), /expected \[\.\.\., 4\]/);
  });
});

/** silu(x Wg^T) * (x Wu^T) in float64. */
function refSwiglu(x: Float64Array, wg: Float64Array, wu: Float64Array, rows: number, n: number, k: number) {
  const g = refLinear(x, wg, rows, n, k), u = refLinear(x, wu, rows, n, k);
  return g.map((v, i) => (v / (1 + Math.exp(-v))) * u[i]);
}

Deno.test(
  "gemv swiglu kernel: silu(x Wg^T) * (x Wu^T) in one pass, 1..8 rows, scalar and vector K, f32 and f16",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gemv-swiglu");
    const n = 45;
    for (const dtype of ["f32", "f16"] as DType[]) {
      if (dtype === "f16" && !rt.dev.features.f16) continue;
      const round = dtype === "f16" ? roundF16 : (v: Float64Array) => v;
      for (const k of [67, 96, 1000]) {
        for (const rows of [1, 3, 8]) {
          const x = round(randn(rng, rows * k)), wg = round(randn(rng, n * k)), wu = round(randn(rng, n * k));
          await rt.scope(async () => {
            const tx = rt.tensor(x, [rows, k], dtype), y = rt.empty([rows, n], dtype);
            const tg = rt.tensor(wg, [n, k], dtype), tu = rt.tensor(wu, [n, k], dtype);
            const l = gemvSwigluKernel(dtype, rows, n, k, { threadsPerRow: k === 1000 ? 64 : 8 });
            rt.dev.dispatch(
              l.spec,
              [tx.binding, tg.binding, tu.binding, y.binding],
              l.workgroups,
              l.uniforms,
            );
            // both dot products are f32 tree sums of K unit-size terms; f16 adds the output's rounding
            const tol = dtype === "f32" ? { rtol: 1e-5, atol: 2e-6 * k } : { rtol: 1e-2, atol: 1e-3 * k };
            assertClose(
              await y.read(),
              refSwiglu(x, wg, wu, rows, n, k),
              tol,
              `${dtype} k=${k} rows=${rows}`,
            );
          });
        }
      }
    }
    assert.throws(() => gemvSwigluKernel("f32", 9, 4, 4), /rows must be 1\.\.8/);
  },
);

Deno.test(
  "linearSwiglu: one fused dispatch when decoding, the differentiable composite when gradients are needed",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear-swiglu");
    const [nIn, nOut] = [24, 19];
    for (const tokens of [1, 5, 12]) {
      const x = randn(rng, tokens * nIn), wg = randn(rng, nOut * nIn), wu = randn(rng, nOut * nIn);
      const ref = () => refSwiglu(x, wg, wu, tokens, nOut, nIn);
      await rt.scope(async () => {
        const tx = rt.tensor(x, [tokens, nIn]),
          tg = rt.tensor(wg, [nOut, nIn]),
          tu = rt.tensor(wu, [nOut, nIn]);
        const before = rt.dev.stats.dispatches;
        const y = rt.noGrad(() => linearSwiglu(tx, tg, tu));
        // one fused dispatch (+ the test runtime's poison fill of the output); 12 tokens exceed the fused
        // kernel's 8 rows: two GEMVs and the combine (+ fills)
        const used = rt.dev.stats.dispatches - before;
        assert.ok(tokens <= 8 ? used <= 2 : used >= 3, `${used} dispatches for ${tokens} tokens`);
        assertClose(await y.read(), ref(), { rtol: 1e-5, atol: 2e-6 * nIn }, `value, ${tokens} tokens`);
      });
    }
    // with gradients: the composite path, checked against finite differences of sum(g * y)
    const tokens = 2;
    const x = randn(rng, tokens * nIn), wg = randn(rng, nOut * nIn), wu = randn(rng, nOut * nIn);
    const g = randn(rng, tokens * nOut);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [tokens, nIn]),
        tg = rt.tensor(wg, [nOut, nIn]),
        tu = rt.tensor(wu, [nOut, nIn]);
      tx.requiresGrad = tg.requiresGrad = true;
      const y = linearSwiglu(tx, tg, tu);
      rt.backward(y, rt.tensor(g, y.shape));
      const [gx, gg] = await Promise.all([tx.grad!.read(), tg.grad!.read()]);
      const ix = sampleIndices(rng, x.length, 5), ig = sampleIndices(rng, wg.length, 5);
      const tol = { rtol: 1e-3, atol: 1e-4 };
      assertClose(
        ix.map((i) => gx[i]),
        finiteDifference(() => dot(refSwiglu(x, wg, wu, tokens, nOut, nIn), g), x, ix),
        tol,
        "dx",
      );
      assertClose(
        ig.map((i) => gg[i]),
        finiteDifference(() => dot(refSwiglu(x, wg, wu, tokens, nOut, nIn), g), wg, ig),
        tol,
        "dWg",
      );
      tx.grad!.dispose();
      tg.grad!.dispose();
    });
  },
);

Deno.test(
  "gemv qkv kernel: three projections in one dispatch, every output row from its own weight, vs float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gemv-qkv");
    // nq = 37 and nkv = 11: the q/k and k/v boundaries fall inside workgroups (8 rows each at 32 threads/row)
    const [nq, nkv] = [37, 11];
    for (const k of [67, 96, 1000]) {
      for (const rows of [1, 5, 16]) {
        const x = randn(rng, rows * k),
          wq = randn(rng, nq * k),
          wk = randn(rng, nkv * k),
          wv = randn(rng, nkv * k);
        await rt.scope(async () => {
          const tx = rt.tensor(x, [rows, k]);
          const tq = rt.tensor(wq, [nq, k]), tk = rt.tensor(wk, [nkv, k]), tv = rt.tensor(wv, [nkv, k]);
          const q = rt.empty([rows, nq]), kk = rt.empty([rows, nkv]), v = rt.empty([rows, nkv]);
          const l = gemvQkvKernel("f32", rows, nq, nkv, k, { alpha: 0.5 });
          rt.dev.dispatch(
            l.spec,
            [tx.binding, tq.binding, tk.binding, tv.binding, q.binding, kk.binding, v.binding],
            l.workgroups,
            l.uniforms,
          );
          const tol = { rtol: 1e-5, atol: 2e-6 * k };
          const half = (r: Float64Array) => r.map((z) => 0.5 * z);
          assertClose(await q.read(), half(refLinear(x, wq, rows, nq, k)), tol, `q k=${k} rows=${rows}`);
          assertClose(await kk.read(), half(refLinear(x, wk, rows, nkv, k)), tol, `k k=${k} rows=${rows}`);
          assertClose(await v.read(), half(refLinear(x, wv, rows, nkv, k)), tol, `v k=${k} rows=${rows}`);
        });
      }
    }
  },
);

Deno.test(
  "linearQkv: fused when decoding, three linears (with gradients) otherwise",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear-qkv");
    const [nIn, nq, nkv] = [24, 16, 8];
    for (const tokens of [1, 7, 20]) {
      const x = randn(rng, tokens * nIn), wq = randn(rng, nq * nIn), wk = randn(rng, nkv * nIn);
      const wv = randn(rng, nkv * nIn);
      await rt.scope(async () => {
        const tx = rt.tensor(x, [tokens, nIn]);
        const [tq, tk, tv] = [rt.tensor(wq, [nq, nIn]), rt.tensor(wk, [nkv, nIn]), rt.tensor(wv, [nkv, nIn])];
        const before = rt.dev.stats.dispatches;
        const out = rt.noGrad(() => linearQkv(tx, tq, tk, tv));
        const used = rt.dev.stats.dispatches - before;
        // one dispatch plus the test runtime's three poison fills; 20 tokens: three tiled matmuls (+ fills)
        assert.ok(tokens <= 16 ? used <= 4 : used >= 6, `${used} dispatches for ${tokens} tokens`);
        const tol = { rtol: 1e-5, atol: 2e-6 * nIn };
        assertClose(await out.q.read(), refLinear(x, wq, tokens, nq, nIn), tol, `q ${tokens}`);
        assertClose(await out.k.read(), refLinear(x, wk, tokens, nkv, nIn), tol, `k ${tokens}`);
        assertClose(await out.v.read(), refLinear(x, wv, tokens, nkv, nIn), tol, `v ${tokens}`);
      });
    }
    await rt.scope(async () => {
      const x = rt.tensor(randn(rng, 2 * nIn), [2, nIn]);
      const [tq, tk, tv] = [
        rt.tensor(randn(rng, nq * nIn), [nq, nIn]),
        rt.tensor(randn(rng, nkv * nIn), [nkv, nIn]),
        rt.tensor(randn(rng, nkv * nIn), [nkv, nIn]),
      ];
      tk.requiresGrad = true;
      const { k } = linearQkv(x, tq, tk, tv);
      rt.backward(k, rt.tensor(randn(rng, 2 * nkv), k.shape));
      const gk = await tk.grad!.read();
      assert.ok(gk.some((g) => g !== 0), "gradients flow through the unfused path");
      tk.grad!.dispose();
    });
  },
);
