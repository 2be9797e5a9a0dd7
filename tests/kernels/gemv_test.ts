import assert from "node:assert/strict";
import {
  GEMV_MAX_ROWS,
  GEMV_SWIGLU_MAX_ROWS,
  gemvKernel,
  gemvQkvKernel,
  gemvShapeDefaults,
  gemvSplit3Kernel,
  gemvSwigluKernel,
} from "../../kernels/gemv.ts";
import { gemvDeviceOptions, linear, linearQkv, linearSwiglu } from "../../runtime/ops/matmul.ts";
import {
  linearAddResidual,
  linearGatedNormed,
  linearNormed,
  linearQkvNormed,
  linearSplitNormed,
  linearSwigluNormed,
} from "../../runtime/ops/linear_fused.ts";
import { convStepTaps } from "../../runtime/ops/conv1d.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import {
  assertClose,
  dot,
  finiteDifference,
  gpuTestOptions,
  randn,
  roundF16,
  sampleIndices,
  testRng,
  testRuntime,
  withKernelKeys,
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

Deno.test(
  "gemv kernel: every unroll depth (1..16 loads per step), with the norm prologue and the residual, f32 and f16",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gemv-unroll");
    // K = 1000 at 8 threads per row: 31 vec4 items per thread, so every depth runs its unrolled loop and a tail
    const [rows, n, k, tpr] = [2, 45, 1000, 8];
    for (const dtype of (rt.dev.features.f16 ? ["f32", "f16"] : ["f32"]) as DType[]) {
      const round = dtype === "f16" ? roundF16 : identity;
      for (const unroll of [1, 2, 8, 16]) {
        const x = round(randn(rng, rows * k, 0.4)), nw = round(randn(rng, k));
        const w = round(randn(rng, n * k)), res = round(randn(rng, rows * n));
        await rt.scope(async () => {
          const tx = rt.tensor(x, [rows, k], dtype), tnw = rt.tensor(nw, [k], dtype);
          const tw = rt.tensor(w, [n, k], dtype), tr = rt.tensor(res, [rows, n], dtype);
          const y = rt.empty([rows, n], dtype);
          const l = gemvKernel(dtype, rows, n, k, {
            threadsPerRow: tpr,
            unroll,
            residual: true,
            normIn: { eps: 0.05 },
          });
          rt.dev.dispatch(
            l.spec,
            [tx.binding, tnw.binding, tw.binding, tr.binding, y.binding],
            l.workgroups,
            l.uniforms,
          );
          const ref = round(refLinear(refNormRows(x, nw, rows, k, 0.05, round), w, rows, n, k)).map((v, i) =>
            v + res[i]
          );
          assertClose(await y.read(), ref, fusedTol(dtype, k), `gemv ${dtype} unroll=${unroll}`);
        });
      }
    }
  },
);

Deno.test(
  "gemv kernel: 1..16 rows, scalar and vector K, every thread grouping, f32",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gemv-f32");
    // K = 67: scalar path; K = 96: vec4 path; K = 1000: the 4-way unrolled loop plus its tail. N = 45 is not a multiple of any rows-per-workgroup.
    for (const k of [67, 96, 1000]) {
      for (const rows of [1, 2, 5, 16]) {
        for (const tpr of [4, 32, 128, 256]) {
          const n = 45;
          const x = randn(rng, rows * k), w = randn(rng, n * k);
          await rt.scope(async () => {
            const tx = rt.tensor(x, [rows, k]), tw = rt.tensor(w, [n, k]), y = rt.empty([rows, n]);
            const l = gemvKernel("f32", rows, n, k, {
              ...gemvDeviceOptions(rt),
              threadsPerRow: tpr,
              alpha: 0.5,
            });
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

// ---- fused prologue (RMSNorm of x) and epilogue (residual add) -----------------------------------------------

/**
 * HF RMSNorm of each row of x [rows, K] with weight w [K] in float64; with `round` (f16 storage), the normalised
 * value and its product with w are rounded to the storage type, as kernels/rmsnorm.ts stores them.
 */
function refNormRows(
  x: Float64Array,
  w: Float64Array,
  rows: number,
  k: number,
  eps: number,
  round: (v: Float64Array) => Float64Array,
): Float64Array {
  const out = new Float64Array(rows * k);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < k; j++) ss += x[r * k + j] ** 2;
    const inv = 1 / Math.sqrt(ss / k + eps);
    const h = round(x.subarray(r * k, (r + 1) * k).map((v) => v * inv));
    out.set(round(h.map((v, j) => v * w[j])), r * k);
  }
  return out;
}

const identity = (v: Float64Array) => v;

// Inputs of a fused-GEMV case: x of scale 0.4 and a norm eps of 0.05 (a third of mean(x^2)), so a kernel that
// skipped the norm, the eps or the weight would be far off; a norm weight of random sign.
function fusedInputs(rng: ReturnType<typeof testRng>, rows: number, k: number) {
  return { x: randn(rng, rows * k, 0.4), nw: randn(rng, k), eps: 0.05 };
}

// (rows, K) pairs: every row count the decode path uses, each K path (67: scalar loads; 96: vector loads, the
// tail loop only; 1000 at 16 threads per row: the unrolled loop and its tail) - not the whole cross product, since
// every pair is a pipeline compile (up to a second each on llvmpipe)
const FUSED_CASES: [number, number][] = [[1, 1000], [3, 67], [8, 96], [16, 1000]];
// f16 with the norm prologue: 16 rows on the scalar path only; the 16-row vector variants take 3-4 s each to
// compile on llvmpipe (the same code as f32's apart from the item type, which FUSED_CASES covers at 16 rows)
const fusedCases = (dtype: DType, norm: boolean): [number, number][] =>
  dtype === "f16" && norm ? [[1, 1000], [3, 67], [8, 96], [16, 67]] : FUSED_CASES;
// 128 threads per row (few rows per workgroup, long rows), 32 and 8 (many rows per workgroup); on a device with
// subgroups of 32 (gemvDeviceOptions), 128 and 32 take the subgroup sums with four subgroups a row and with one
const fusedTpr = (k: number) => (k === 1000 ? 128 : k === 96 ? 32 : 8);
const fusedTol = (dtype: DType, k: number) =>
  // f32: a tree-summed dot product of K unit-scale terms; f16: the output's rounding (2^-11) and the
  // normalised x's two roundings, on f32 accumulation
  dtype === "f32" ? { rtol: 1e-5, atol: 2e-6 * k } : { rtol: 2e-3, atol: 2e-3 * Math.sqrt(k) };

/**
 * Checks silu(g) u against float64, with g and u dot products that may each be off by a dot's tolerance: the
 * product's error is |silu'(g)| |u| dg + |silu(g)| du, so a large |u| amplifies the gate's error (f16 inputs
 * normalised in the kernel round where the reference rounds, but WGSL lets an f32 -> f16 conversion round to
 * either neighbour, and the H200 does not always agree with round-to-nearest).
 */
function assertSwigluClose(
  got: ArrayLike<number>,
  xin: Float64Array,
  wg: Float64Array,
  wu: Float64Array,
  rows: number,
  n: number,
  k: number,
  tol: { rtol: number; atol: number },
  label: string,
): void {
  const g = refLinear(xin, wg, rows, n, k), u = refLinear(xin, wu, rows, n, k);
  let bad = 0, first = "";
  for (let i = 0; i < g.length; i++) {
    const sig = 1 / (1 + Math.exp(-g[i]));
    const expected = g[i] * sig * u[i];
    const dSilu = sig * (1 + g[i] * (1 - sig));
    const dg = tol.atol + tol.rtol * Math.abs(g[i]), du = tol.atol + tol.rtol * Math.abs(u[i]);
    // the output's rounding, down to f16's smallest subnormal (a tiny product may flush to 0)
    const rounding = Math.max(tol.rtol * Math.abs(expected), 2 ** -24);
    const bound = Math.abs(dSilu * u[i]) * dg + Math.abs(g[i] * sig) * du + rounding;
    if (!(Math.abs(got[i] - expected) <= bound)) {
      if (!bad++) {
        first = `at ${i}: got ${got[i]}, expected ${expected} (g ${g[i]}, u ${u[i]}), bound ${bound}`;
      }
    }
  }
  if (bad) {
    throw new Error(`${label}: ${bad}/${g.length} elements outside the propagated tolerance; first ${first}`);
  }
}

for (const dtype of ["f32", "f16"] as DType[]) {
  Deno.test(
    `gemv normIn / residual kernels (${dtype}): norm prologue, residual epilogue, both, vs float64`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      if (dtype === "f16" && !rt.dev.features.f16) return console.warn("gemv fused f16: no shader-f16");
      const rng = testRng(`gemv-fused-${dtype}`);
      const round = dtype === "f16" ? roundF16 : identity;
      const n = 45; // not a multiple of any rows-per-workgroup
      const variants: [boolean, boolean, [number, number][]][] = [
        [true, false, fusedCases(dtype, true)],
        [false, true, fusedCases(dtype, false)],
        [true, true, [[3, 96], [16, 67]]],
      ];
      for (const [norm, residual, cases] of variants) {
        for (const [rows, k] of cases) {
          const { x: x0, nw: nw0, eps } = fusedInputs(rng, rows, k);
          const x = round(x0),
            nw = round(nw0),
            w = round(randn(rng, n * k)),
            res = round(randn(rng, rows * n));
          const alpha = 0.75;
          await rt.scope(async () => {
            const tx = rt.tensor(x, [rows, k], dtype), tw = rt.tensor(w, [n, k], dtype);
            const tnw = rt.tensor(nw, [k], dtype), tr = rt.tensor(res, [rows, n], dtype);
            const y = rt.empty([rows, n], dtype);
            const l = gemvKernel(dtype, rows, n, k, {
              ...gemvDeviceOptions(rt),
              threadsPerRow: fusedTpr(k),
              alpha,
              residual,
              normIn: norm ? { eps } : undefined,
            });
            const ins = [
              tx.binding,
              ...(norm ? [tnw.binding] : []),
              tw.binding,
              ...(residual ? [tr.binding] : []),
            ];
            rt.dev.dispatch(l.spec, [...ins, y.binding], l.workgroups, l.uniforms);
            const xin = norm ? refNormRows(x, nw, rows, k, eps, round) : x;
            let ref = refLinear(xin, w, rows, n, k).map((v) => alpha * v);
            if (residual) ref = round(ref).map((v, i) => v + res[i]);
            assertClose(
              await y.read(),
              ref,
              fusedTol(dtype, k),
              `${dtype} k=${k} rows=${rows} norm=${norm} residual=${residual}`,
            );
          });
        }
      }
    },
  );

  Deno.test(
    `gemv swiglu, qkv and split3 kernels with normIn (${dtype}): 1, 3, 8 (and 16 for qkv, split3) rows, vs float64`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      if (dtype === "f16" && !rt.dev.features.f16) return console.warn("gemv fused f16: no shader-f16");
      const rng = testRng(`gemv-fused-pairs-${dtype}`);
      const round = dtype === "f16" ? roundF16 : identity;
      for (const [rows, k] of fusedCases(dtype, true)) {
        const tpr = fusedTpr(k), tol = fusedTol(dtype, k);
        const { x: x0, nw: nw0, eps } = fusedInputs(rng, rows, k);
        const x = round(x0), nw = round(nw0);
        const xin = refNormRows(x, nw, rows, k, eps, round);
        if (rows <= GEMV_SWIGLU_MAX_ROWS) {
          const n = 45;
          const wg = round(randn(rng, n * k)), wu = round(randn(rng, n * k));
          await rt.scope(async () => {
            const tx = rt.tensor(x, [rows, k], dtype), tnw = rt.tensor(nw, [k], dtype);
            const tg = rt.tensor(wg, [n, k], dtype), tu = rt.tensor(wu, [n, k], dtype);
            const y = rt.empty([rows, n], dtype);
            const l = gemvSwigluKernel(dtype, rows, n, k, {
              ...gemvDeviceOptions(rt),
              threadsPerRow: tpr,
              normIn: { eps },
            });
            rt.dev.dispatch(
              l.spec,
              [tx.binding, tnw.binding, tg.binding, tu.binding, y.binding],
              l.workgroups,
              l.uniforms,
            );
            assertSwigluClose(
              await y.read(),
              xin,
              wg,
              wu,
              rows,
              n,
              k,
              tol,
              `swiglu ${dtype} k=${k} rows=${rows}`,
            );
          });
        }
        // nq = 37, nkv = 11: the q/k and k/v boundaries fall inside workgroups
        const [nq, nkv] = [37, 11];
        const wq = round(randn(rng, nq * k)),
          wk = round(randn(rng, nkv * k)),
          wv = round(randn(rng, nkv * k));
        await rt.scope(async () => {
          const tx = rt.tensor(x, [rows, k], dtype), tnw = rt.tensor(nw, [k], dtype);
          const tq = rt.tensor(wq, [nq, k], dtype), tk = rt.tensor(wk, [nkv, k], dtype);
          const tv = rt.tensor(wv, [nkv, k], dtype);
          const q = rt.empty([rows, nq], dtype), kk = rt.empty([rows, nkv], dtype);
          const v = rt.empty([rows, nkv], dtype);
          const l = gemvQkvKernel(dtype, rows, nq, nkv, k, {
            ...gemvDeviceOptions(rt),
            threadsPerRow: tpr,
            normIn: { eps },
          });
          rt.dev.dispatch(
            l.spec,
            [tx.binding, tnw.binding, tq.binding, tk.binding, tv.binding, q.binding, kk.binding, v.binding],
            l.workgroups,
            l.uniforms,
          );
          const what = `${dtype} k=${k} rows=${rows}`;
          assertClose(await q.read(), refLinear(xin, wq, rows, nq, k), tol, `q ${what}`);
          assertClose(await kk.read(), refLinear(xin, wk, rows, nkv, k), tol, `k ${what}`);
          assertClose(await v.read(), refLinear(xin, wv, rows, nkv, k), tol, `v ${what}`);
        });
        // one weight split three ways (Mamba2's in_proj: z | xBC | dt), boundaries inside workgroups
        const widths = [29, 45, 11] as const, nAll = 29 + 45 + 11;
        const w3 = round(randn(rng, nAll * k));
        await rt.scope(async () => {
          const tx = rt.tensor(x, [rows, k], dtype), tnw = rt.tensor(nw, [k], dtype);
          const tw = rt.tensor(w3, [nAll, k], dtype);
          const outs = widths.map((n) => rt.empty([rows, n], dtype));
          const l = gemvSplit3Kernel(dtype, rows, widths, k, {
            ...gemvDeviceOptions(rt),
            threadsPerRow: tpr,
            normIn: { eps },
          });
          rt.dev.dispatch(
            l.spec,
            [tx.binding, tnw.binding, tw.binding, ...outs.map((t) => t.binding)],
            l.workgroups,
            l.uniforms,
          );
          const full = refLinear(xin, w3, rows, nAll, k);
          let c0 = 0;
          for (let i = 0; i < 3; i++) {
            const want = new Float64Array(rows * widths[i]);
            for (let r = 0; r < rows; r++) {
              want.set(full.subarray(r * nAll + c0, r * nAll + c0 + widths[i]), r * widths[i]);
            }
            assertClose(await outs[i].read(), want, tol, `split part ${i} ${dtype} k=${k} rows=${rows}`);
            c0 += widths[i];
          }
        });
      }
    },
  );
}

/** The kernel keys of `fn`'s dispatches, without the test runtime's poison fills of new tensors. */
async function kernelsOf<T>(rt: Runtime, fn: () => T): Promise<{ out: T; keys: string[] }> {
  const { out, keys } = await withKernelKeys(rt, fn);
  return { out, keys: keys.filter((k) => !k.startsWith("fill_")) };
}

Deno.test(
  "fused decode ops: one GEMV with the norm or the residual up to the row limits, the unfused ops above, vs float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear-fused");
    const eps = 0.05;
    // D = 37: scalar loads; D = 40: vector loads. 20 tokens: above every GEMV limit; 12: above the SwiGLU one
    for (const [tokens, d] of [[1, 40], [3, 37], [8, 40], [12, 37], [16, 37], [20, 40]]) {
      const [nq, nkv, nOut] = [24, 8, 29];
      const x = randn(rng, tokens * d, 0.4), nw = randn(rng, d);
      const wq = randn(rng, nq * d), wk = randn(rng, nkv * d), wv = randn(rng, nkv * d);
      const wo = randn(rng, nOut * d), wg = randn(rng, nOut * d), wu = randn(rng, nOut * d);
      const res = randn(rng, tokens * nOut);
      const xn = refNormRows(x, nw, tokens, d, eps, identity);
      const tol = { rtol: 1e-5, atol: 2e-6 * d };
      await rt.scope(async () => {
        const tx = rt.tensor(x, [tokens, d]), tnw = rt.tensor(nw, [d]);
        const [tq, tk, tv] = [rt.tensor(wq, [nq, d]), rt.tensor(wk, [nkv, d]), rt.tensor(wv, [nkv, d])];
        const [to, tg, tu] = [rt.tensor(wo, [nOut, d]), rt.tensor(wg, [nOut, d]), rt.tensor(wu, [nOut, d])];
        const tr = rt.tensor(res, [tokens, nOut]);
        const what = `${tokens} tokens, D = ${d}`;
        const lin = await kernelsOf(rt, () => linearNormed(tx, tnw, eps, to));
        const qkv = await kernelsOf(rt, () => linearQkvNormed(tx, tnw, eps, tq, tk, tv));
        const sw = await kernelsOf(rt, () => linearSwigluNormed(tx, tnw, eps, tg, tu));
        const ar = await kernelsOf(rt, () => linearAddResidual(tx, to, tr));
        const gemv = tokens <= GEMV_MAX_ROWS, swGemv = tokens <= GEMV_SWIGLU_MAX_ROWS;
        assert.ok(lin.keys[0].startsWith(gemv ? "gemv_norm_" : "rmsnorm"), `${what}: ${lin.keys}`);
        assert.equal(lin.keys.length, gemv ? 1 : 2, `linearNormed ${what}: ${lin.keys}`);
        assert.equal(qkv.keys.length, gemv ? 1 : 4, `linearQkvNormed ${what}: ${qkv.keys}`);
        assert.ok(qkv.keys[0].startsWith(gemv ? "gemv_qkv_norm_" : "rmsnorm"), `${what}: ${qkv.keys}`);
        // above 8 rows: the norm, then the unfused SwiGLU (two GEMVs or matmuls and the combine)
        assert.equal(sw.keys.length, swGemv ? 1 : 4, `linearSwigluNormed ${what}: ${sw.keys}`);
        assert.ok(sw.keys[0].startsWith(swGemv ? "gemv_swiglu_norm_" : "rmsnorm"), `${what}: ${sw.keys}`);
        assert.equal(ar.keys.length, gemv ? 1 : 2, `linearAddResidual ${what}: ${ar.keys}`);
        assert.ok(ar.keys[0].startsWith(gemv ? "gemv_res_" : "matmul"), `${what}: ${ar.keys}`);
        assertClose(await lin.out.read(), refLinear(xn, wo, tokens, nOut, d), tol, `linearNormed ${what}`);
        assertClose(await qkv.out.q.read(), refLinear(xn, wq, tokens, nq, d), tol, `q ${what}`);
        assertClose(await qkv.out.k.read(), refLinear(xn, wk, tokens, nkv, d), tol, `k ${what}`);
        assertClose(await qkv.out.v.read(), refLinear(xn, wv, tokens, nkv, d), tol, `v ${what}`);
        assertClose(
          await sw.out.read(),
          refSwiglu(xn, wg, wu, tokens, nOut, d),
          { rtol: 2e-5, atol: 4e-6 * d },
          `linearSwigluNormed ${what}`,
        );
        assertClose(
          await ar.out.read(),
          refLinear(x, wo, tokens, nOut, d).map((v, i) => v + res[i]),
          tol,
          `linearAddResidual ${what}`,
        );
      });
    }
  },
);

// ---- gated grouped RMSNorm prologue (Mamba2's output norm before out_proj) -----------------------------------

/**
 * Mamba2's gated grouped RMSNorm of y, z [rows, K] with weight w [K] in float64 (kernels/gated_rmsnorm.ts):
 * g = y * SiLU(z), per group of `group` channels `g / sqrt(mean(g^2) + eps) * w`, rounded once to the storage
 * type by `round`, as that kernel stores it.
 */
function refGatedNorm(
  y: Float64Array,
  z: Float64Array,
  w: Float64Array,
  rows: number,
  k: number,
  group: number,
  eps: number,
  round: (v: Float64Array) => Float64Array,
): Float64Array {
  const g = y.map((v, i) => v * z[i] / (1 + Math.exp(-z[i])));
  const out = new Float64Array(rows * k);
  for (let r = 0; r < rows; r++) {
    for (let j0 = 0; j0 < k; j0 += group) {
      let ss = 0;
      for (let j = j0; j < j0 + group; j++) ss += g[r * k + j] ** 2;
      const inv = 1 / Math.sqrt(ss / group + eps);
      for (let j = j0; j < j0 + group; j++) out[r * k + j] = g[r * k + j] * inv * w[j];
    }
  }
  return round(out);
}

// Inputs of a gated case: y scaled per group (0.5, 1.5, 2.5, ...) so a norm over the wrong span of channels is far
// off; eps 0.1 against a mean(g^2) of about 0.36 at unit scale, so a kernel without it is off too.
function gatedInputs(rng: ReturnType<typeof testRng>, rows: number, k: number, group: number) {
  const y = randn(rng, rows * k).map((v, i) => v * (0.5 + Math.floor((i % k) / group)));
  return { y, z: randn(rng, rows * k), nw: randn(rng, k), eps: 0.1 };
}

// [rows, K, group, residual]: 1 row, 16 groups, the unrolled loop (vector loads); odd K (scalar loads, odd
// group) with and without the residual; 8 rows (the split per-group reduction); 16 rows with 25 groups (400
// units: one thread per unit, two passes) - f16 takes an odd K at 16 rows (see fusedCases on compile times)
const gatedCases = (dtype: DType): [number, number, number, boolean][] => [
  [1, 1024, 64, true],
  [1, 1024, 64, false],
  [3, 39, 13, true],
  [3, 39, 13, false],
  [8, 96, 32, true],
  dtype === "f16" ? [16, 75, 15, true] : [16, 1000, 40, true],
];

for (const dtype of ["f32", "f16"] as DType[]) {
  Deno.test(
    `gemv gatedNormIn kernel (${dtype}): Mamba2's gated grouped norm, out_proj and residual add, vs float64`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      if (dtype === "f16" && !rt.dev.features.f16) return console.warn("gemv gated f16: no shader-f16");
      const rng = testRng(`gemv-gated-${dtype}`);
      const round = dtype === "f16" ? roundF16 : identity;
      const n = 45, alpha = 0.75;
      for (const [rows, k, group, residual] of gatedCases(dtype)) {
        const inp = gatedInputs(rng, rows, k, group);
        const y = round(inp.y), z = round(inp.z), nw = round(inp.nw), eps = inp.eps;
        const w = round(randn(rng, n * k)), res = round(randn(rng, rows * n));
        await rt.scope(async () => {
          const [ty, tz] = [rt.tensor(y, [rows, k], dtype), rt.tensor(z, [rows, k], dtype)];
          const tnw = rt.tensor(nw, [k], dtype), tw = rt.tensor(w, [n, k], dtype);
          const tr = rt.tensor(res, [rows, n], dtype), out = rt.empty([rows, n], dtype);
          const l = gemvKernel(dtype, rows, n, k, {
            ...gemvDeviceOptions(rt),
            threadsPerRow: fusedTpr(k),
            alpha,
            residual,
            gatedNormIn: { group, eps },
          });
          const ins = [ty.binding, tz.binding, tnw.binding, tw.binding, ...(residual ? [tr.binding] : [])];
          rt.dev.dispatch(l.spec, [...ins, out.binding], l.workgroups, l.uniforms);
          const xin = refGatedNorm(y, z, nw, rows, k, group, eps, round);
          let ref = refLinear(xin, w, rows, n, k).map((v) => alpha * v);
          if (residual) ref = round(ref).map((v, i) => v + res[i]);
          // the normIn tolerances: f32, a tree-summed dot product of K unit-scale terms; f16, the output's
          // rounding and the normalised input's one rounding on f32 accumulation
          assertClose(
            await out.read(),
            ref,
            fusedTol(dtype, k),
            `${dtype} ${l.spec.key} k=${k} group=${group} rows=${rows} residual=${residual}`,
          );
        });
      }
      assert.throws(
        () => gemvKernel(dtype, 1, 4, 40, { gatedNormIn: { group: 16, eps: 1e-5 } }),
        /group 16 must divide K = 40/,
      );
      assert.throws(
        () => gemvKernel(dtype, 1, 4, 257, { gatedNormIn: { group: 1, eps: 1e-5 } }),
        /at most 256 groups/,
      );
    },
  );
}

Deno.test(
  "linearGatedNormed: one GEMV with the gated norm (and residual) up to 16 rows, the unfused ops above, vs float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear-gated");
    const nOut = 29;
    // D = 36 in groups of 12 (vector loads), D = 35 in groups of 7 (scalar); 20 tokens: above the GEMV limit
    for (const [tokens, d, group] of [[1, 36, 12], [3, 35, 7], [16, 36, 12], [20, 35, 7]]) {
      const { y, z, nw, eps } = gatedInputs(rng, tokens, d, group);
      const w = randn(rng, nOut * d), res = randn(rng, tokens * nOut);
      const ref = refLinear(refGatedNorm(y, z, nw, tokens, d, group, eps, identity), w, tokens, nOut, d);
      const tol = { rtol: 1e-5, atol: 2e-6 * d };
      await rt.scope(async () => {
        const [ty, tz] = [rt.tensor(y, [tokens, d]), rt.tensor(z, [tokens, d])];
        const tnw = rt.tensor(nw, [d]), tw = rt.tensor(w, [nOut, d]), tr = rt.tensor(res, [tokens, nOut]);
        const what = `${tokens} tokens, D = ${d}, group ${group}`;
        const plain = await kernelsOf(
          rt,
          () => rt.noGrad(() => linearGatedNormed(ty, tz, tnw, group, eps, tw)),
        );
        const withRes = await kernelsOf(rt, () => linearGatedNormed(ty, tz, tnw, group, eps, tw, tr));
        const gemv = tokens <= GEMV_MAX_ROWS;
        assert.equal(plain.keys.length, gemv ? 1 : 2, `${what}: ${plain.keys}`);
        assert.ok(plain.keys[0].startsWith(gemv ? "gemv_gnorm" : "gated_rmsnorm"), `${what}: ${plain.keys}`);
        // above 16 rows: the gated norm, the tiled matmul and the add
        assert.equal(withRes.keys.length, gemv ? 1 : 3, `${what}: ${withRes.keys}`);
        assert.ok(
          withRes.keys[0].startsWith(gemv ? "gemv_gnorm" : "gated_rmsnorm"),
          `${what}: ${withRes.keys}`,
        );
        assert.ok(!gemv || withRes.keys[0].includes("_res_"), `${what}: ${withRes.keys}`);
        assert.deepEqual([...withRes.out.shape], [tokens, nOut]);
        assertClose(await plain.out.read(), ref, tol, `linearGatedNormed ${what}`);
        assertClose(await withRes.out.read(), ref.map((v, i) => v + res[i]), tol, `+ residual ${what}`);
      });
    }
    await rt.scope(() => {
      const y = rt.tensor(randn(rng, 2 * 8), [2, 8]), z = rt.tensor(randn(rng, 2 * 8), [2, 8]);
      const nw = rt.tensor(randn(rng, 8), [8]), w = rt.tensor(randn(rng, 4 * 8), [4, 8]);
      assert.throws(() => linearGatedNormed(y, z, nw, 3, 1e-5, w), /group 3 must divide the row size 8/);
      assert.throws(
        () => linearGatedNormed(y, rt.tensor(randn(rng, 8), [1, 8]), nw, 4, 1e-5, w),
        /gate .* does not match input/,
      );
      assert.throws(
        () => linearGatedNormed(y, z, nw, 4, 1e-5, w, rt.tensor(randn(rng, 6), [6])),
        /residual .* does not hold 2 rows of 4/,
      );
      z.requiresGrad = true;
      assert.throws(() => linearGatedNormed(y, z, nw, 4, 1e-5, w), /linearGatedNormed is a decoding op/);
    });
  },
);

Deno.test("fused decode ops refuse gradients and mismatched operands", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("linear-fused-errors");
  rt.scope(() => {
    const x = rt.tensor(randn(rng, 2 * 8), [2, 8]), nw = rt.tensor(randn(rng, 8), [8]);
    const w = rt.tensor(randn(rng, 4 * 8), [4, 8]), r = rt.tensor(randn(rng, 2 * 4), [2, 4]);
    w.requiresGrad = true;
    w.name = "proj.weight";
    assert.throws(
      () => linearNormed(x, nw, 1e-5, w),
      /linearNormed is a decoding op.*proj\.weight requires them/,
    );
    assert.throws(() => linearAddResidual(x, w, r), /linearAddResidual is a decoding op/);
    assert.throws(() => linearSwigluNormed(x, nw, 1e-5, w, w), /decoding op/);
    assert.throws(() => linearQkvNormed(x, nw, 1e-5, w, w, w), /decoding op/);
    // inside noGrad the same call is inference
    rt.noGrad(() => linearNormed(x, nw, 1e-5, w));
    w.requiresGrad = false;
    assert.throws(
      () => linearNormed(x, rt.tensor(randn(rng, 7), [7]), 1e-5, w),
      /norm weight .* \(expected \[8\]/,
    );
    assert.throws(() => linearNormed(x, nw, -1, w), /eps must be >= 0/);
    assert.throws(() => linearAddResidual(x, w, rt.tensor(randn(rng, 6), [6])), /does not hold 2 rows of 4/);
    assert.throws(() => linearQkvNormed(x, nw, 1e-5, w, w, rt.tensor(randn(rng, 3 * 8), [3, 8])), /differ/);
  });
});

// ---- conv epilogue of the split GEMV (Mamba2's in_proj and its one-token conv) --------------------------------

/**
 * The split GEMV with the conv epilogue in float64: the product `alpha * xin W^T` split into z | y | dt, then
 * Mamba2's one-token conv of y's C channels (kernels/conv1d.ts conv1dStep) over each row's state [C, width - 1]
 * (oldest first) with taps [C, width + 1] (the weights, then the bias). y is rounded to the storage type first,
 * as the kernel stores it before the conv reads it; the new state is the old one shifted by a slot, then y.
 */
function refSplitConv(
  xin: Float64Array,
  w: Float64Array,
  alpha: number,
  widths: readonly [number, number, number],
  k: number,
  rows: number,
  taps: Float64Array,
  state: Float64Array,
  width: number,
  round: (v: Float64Array) => Float64Array,
) {
  const [n0, c, n2] = widths, nAll = n0 + c + n2, slots = width - 1;
  const full = refLinear(xin, w, rows, nAll, k).map((v) => alpha * v);
  const part = (c0: number, n: number) => {
    const out = new Float64Array(rows * n);
    for (let r = 0; r < rows; r++) out.set(full.subarray(r * nAll + c0, r * nAll + c0 + n), r * n);
    return out;
  };
  const y = round(part(n0, c));
  const pre = new Float64Array(rows * c), newState = new Float64Array(state.length);
  for (let r = 0; r < rows; r++) {
    for (let ch = 0; ch < c; ch++) {
      const s = (r * c + ch) * slots, t = ch * (width + 1);
      const window = [...state.subarray(s, s + slots), y[r * c + ch]];
      let acc = taps[t + width];
      for (let j = 0; j < width; j++) acc += taps[t + j] * window[j];
      pre[r * c + ch] = acc;
      newState.set(window.slice(1), s);
    }
  }
  return { z: part(0, n0), y, pre, dt: part(n0 + c, n2), newState };
}

/**
 * Checks the conv step's output against silu(pre) (or pre) in float64 with a bound propagated per element: the
 * conv input y may be off by `tolY` (the GEMV's tolerance), which moves pre by |w_last| dy; the f32 sum of the
 * width + 1 terms adds up to (width + 1) 2^-24 times their absolute sum; SiLU's slope is at most 1.1 in magnitude;
 * WGSL's f32 exp may be off by 3 + 2|pre| ulp, which moves silu(pre) relatively by no more, plus the sigmoid's
 * division and the product (one ulp each); the store rounds to the storage type (2^-11 for f16, floored at f16's
 * smallest subnormal, since a tiny output may flush to 0).
 */
function assertConvStepClose(
  got: ArrayLike<number>,
  ref: ReturnType<typeof refSplitConv>,
  taps: Float64Array,
  state: Float64Array,
  c: number,
  width: number,
  silu: boolean,
  tolY: { rtol: number; atol: number },
  dtype: DType,
  label: string,
): void {
  const slots = width - 1, u32 = 2 ** -24;
  let bad = 0, first = "";
  for (let i = 0; i < ref.pre.length; i++) {
    const ch = i % c, t = ch * (width + 1), s = i * slots;
    const y = ref.y[i], pre = ref.pre[i];
    let terms = Math.abs(taps[t + width]) + Math.abs(taps[t + slots] * y);
    for (let j = 0; j < slots; j++) terms += Math.abs(taps[t + j] * state[s + j]);
    const dpre = Math.abs(taps[t + slots]) * (tolY.atol + tolY.rtol * Math.abs(y)) +
      (width + 1) * u32 * terms;
    const expected = silu ? pre / (1 + Math.exp(-pre)) : pre;
    const activation = silu ? (3 + 2 * Math.abs(pre) + 2) * 2 * u32 * Math.abs(expected) : 0;
    const store = dtype === "f16"
      ? Math.max(2 ** -11 * Math.abs(expected), 2 ** -24)
      : u32 * Math.abs(expected);
    const bound = (silu ? 1.1 : 1) * dpre + activation + store;
    if (!(Math.abs(got[i] - expected) <= bound)) {
      if (!bad++) first = `at ${i}: got ${got[i]}, expected ${expected} (pre ${pre}), bound ${bound}`;
    }
  }
  if (bad) {
    throw new Error(`${label}: ${bad}/${ref.pre.length} outside the propagated tolerance; first ${first}`);
  }
}

/**
 * Fresh inputs of a conv-epilogue case: conv weights and biases of Mamba's init scale (U(+-0.5) there; normal
 * of std 0.5 here) and a state of unit scale, so every window slot, the bias and the new value all matter.
 */
function convInputs(rng: ReturnType<typeof testRng>, rows: number, c: number, width: number) {
  return { taps: randn(rng, c * (width + 1), 0.5), state: randn(rng, rows * c * (width - 1)) };
}

/**
 * Checks one split-conv result: z and dt as the plain split GEMV's, the new state's shifted slots bit for bit (a
 * copy in the storage type), its newest slot as y (the GEMV's tolerance), and the conv output by
 * {@linkcode assertConvStepClose}.
 */
async function checkSplitConv(
  outs: { z: Tensor; xBC: Tensor; dt: Tensor; state: Tensor },
  ref: ReturnType<typeof refSplitConv>,
  inputs: { taps: Float64Array; state: Float64Array },
  c: number,
  width: number,
  tol: { rtol: number; atol: number },
  dtype: DType,
  what: string,
): Promise<void> {
  const [z, xBC, dt, state] = await Promise.all([outs.z, outs.xBC, outs.dt, outs.state].map((t) => t.read()));
  assertClose(z, ref.z, tol, `z ${what}`);
  assertClose(dt, ref.dt, tol, `dt ${what}`);
  const slots = width - 1, cells = ref.newState.length / slots;
  const shifted = (a: ArrayLike<number>) =>
    Array.from(
      { length: cells * (slots - 1) },
      (_, i) => a[Math.floor(i / (slots - 1)) * slots + (i % (slots - 1))],
    );
  const newest = (a: ArrayLike<number>) => Array.from({ length: cells }, (_, i) => a[i * slots + slots - 1]);
  assertClose(shifted(state), shifted(ref.newState), { rtol: 0, atol: 0 }, `state's older slots ${what}`);
  assertClose(newest(state), newest(ref.newState), tol, `state's newest slot ${what}`);
  assertConvStepClose(xBC, ref, inputs.taps, inputs.state, c, width, true, tol, dtype, `conv output ${what}`);
}

// [rows, K, normIn, conv width]: vector and scalar loads, one and two rows, without the norm prologue, and the
// conv widths 4 (Mamba's), 3 and 2 (a one-slot state: nothing to shift but the new value)
const CONV_CASES: [number, number, boolean, number][] = [
  [1, 96, true, 4],
  [2, 67, true, 4],
  [2, 96, false, 4],
  [1, 67, true, 3],
  [2, 96, true, 2],
];

for (const dtype of ["f32", "f16"] as DType[]) {
  Deno.test(
    `gemv split3 kernel with the conv epilogue (${dtype}): z, the convolved xBC, dt and the new conv state vs float64`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      if (dtype === "f16" && !rt.dev.features.f16) return console.warn("gemv conv f16: no shader-f16");
      const rng = testRng(`gemv-split-conv-${dtype}`);
      const round = dtype === "f16" ? roundF16 : identity;
      // the boundaries between the parts fall inside workgroups; 45 channels convolved
      const widths = [29, 45, 11] as const, nAll = 29 + 45 + 11, c = widths[1], alpha = 0.75;
      for (const [rows, k, norm, width] of CONV_CASES) {
        const { x: x0, nw: nw0, eps } = fusedInputs(rng, rows, k);
        const x = round(x0), nw = round(nw0), w = round(randn(rng, nAll * k));
        const inp = convInputs(rng, rows, c, width);
        const taps = round(inp.taps), state = round(inp.state);
        const xin = norm ? refNormRows(x, nw, rows, k, eps, round) : x;
        const ref = refSplitConv(xin, w, alpha, widths, k, rows, taps, state, width, round);
        await rt.scope(async () => {
          const tx = rt.tensor(x, [rows, k], dtype), tnw = rt.tensor(nw, [k], dtype);
          const tw = rt.tensor(w, [nAll, k], dtype), tt = rt.tensor(taps, [c, width + 1], dtype);
          const ts = rt.tensor(state, [rows, c, width - 1], dtype);
          const [z, xBC, dt] = widths.map((n) => rt.empty([rows, n], dtype));
          const l = gemvSplit3Kernel(dtype, rows, widths, k, {
            ...gemvDeviceOptions(rt),
            threadsPerRow: fusedTpr(k),
            alpha,
            normIn: norm ? { eps } : undefined,
            conv: { width, silu: true },
          });
          assert.ok(l.spec.key.includes(`_conv${width}_silu_`), l.spec.key);
          const ins = [tx.binding, ...(norm ? [tnw.binding] : []), tw.binding, tt.binding];
          rt.dev.dispatch(
            l.spec,
            [...ins, z.binding, xBC.binding, dt.binding, ts.binding],
            l.workgroups,
            l.uniforms,
          );
          const what = `${dtype} ${l.spec.key} rows=${rows} k=${k} width=${width}`;
          await checkSplitConv(
            { z, xBC, dt, state: ts },
            ref,
            { taps, state },
            c,
            width,
            fusedTol(dtype, k),
            dtype,
            what,
          );
        });
      }
      assert.throws(
        () => gemvSplit3Kernel(dtype, 1, widths, 96, { conv: { width: 1, silu: true } }),
        /conv.width must be an integer >= 2/,
      );
    },
  );
}

Deno.test(
  "linearSplitNormed with a conv step: one GEMV up to 16 rows, GEMV and causalConv1dStep above or on a device " +
    "with fewer than 8 storage buffers, vs float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("linear-split-conv");
    const eps = 0.05, width = 4;
    const widths = [13, 20, 5] as const, nAll = 13 + 20 + 5, c = widths[1];
    const limits = rt.dev.limits;
    // D = 40: vector loads, D = 37: scalar; 17 rows: above the GEMV limit; and one row on a device that binds
    // only 7 storage buffers per stage
    for (const [tokens, d, maxBuffers] of [[1, 40, 0], [2, 37, 0], [17, 40, 0], [1, 40, 7]]) {
      const x = randn(rng, tokens * d, 0.4), nw = randn(rng, d), w = randn(rng, nAll * d);
      const inp = convInputs(rng, tokens, c, width);
      const weight = Float64Array.from({ length: c * width }, (_, i) => inp.taps[i + Math.floor(i / width)]);
      const bias = Float64Array.from({ length: c }, (_, ch) => inp.taps[ch * (width + 1) + width]);
      const xn = refNormRows(x, nw, tokens, d, eps, identity);
      const ref = refSplitConv(xn, w, 1, widths, d, tokens, inp.taps, inp.state, width, identity);
      await rt.scope(async () => {
        const tx = rt.tensor(x, [tokens, d]), tnw = rt.tensor(nw, [d]), tw = rt.tensor(w, [nAll, d]);
        const tWeight = rt.tensor(weight, [c, 1, width]), tBias = rt.tensor(bias, [c]);
        const state = rt.tensor(inp.state, [tokens, c, width - 1]);
        const taps = convStepTaps(tWeight, tBias);
        assert.deepEqual([...taps.shape], [c, width + 1]);
        assertClose(await taps.read(), inp.taps, { rtol: 0, atol: 0 }, "convStepTaps");
        const conv = { weight: tWeight, bias: tBias, taps, state, silu: true };
        const dev = rt.dev as { limits: GPUSupportedLimits };
        if (maxBuffers) {
          dev.limits = new Proxy(limits, {
            get: (t, key) => key === "maxStorageBuffersPerShaderStage" ? maxBuffers : Reflect.get(t, key, t),
          });
        }
        const { out: [z, xBC, dt], keys } = await kernelsOf(
          rt,
          () => linearSplitNormed(tx, tnw, eps, tw, widths, conv),
        ).finally(() => dev.limits = limits);
        const what = `${tokens} tokens, D = ${d}${maxBuffers ? `, ${maxBuffers} storage buffers` : ""}`;
        if (tokens <= GEMV_MAX_ROWS && !maxBuffers) {
          assert.deepEqual(keys.map((k) => k.replace(/_f32_.*/, "")), ["gemv_split3_norm_conv4_silu"], what);
        } else {
          assert.ok(keys.some((k) => k.startsWith("conv1d_step_f32_silu")), `${what}: ${keys}`);
        }
        // the fused kernel's f32 tolerance (a tree-summed dot product of D unit-scale terms)
        const tol = { rtol: 1e-5, atol: 2e-6 * d };
        await checkSplitConv({ z, xBC, dt, state }, ref, inp, c, width, tol, "f32", what);
      });
    }
    await rt.scope(() => {
      const x = rt.tensor(randn(rng, 2 * 8), [2, 8]), nw = rt.tensor(randn(rng, 8), [8]);
      const w = rt.tensor(randn(rng, 9 * 8), [9, 8]), weight = rt.tensor(randn(rng, 12), [3, 4]);
      const bias = rt.tensor(randn(rng, 3), [3]), taps = convStepTaps(weight, bias);
      const conv = { weight, bias, taps, state: rt.tensor(randn(rng, 9), [1, 3, 3]), silu: true };
      assert.throws(
        () => linearSplitNormed(x, nw, 1e-5, w, [3, 3, 3], conv),
        /conv state .* must be \[2, 3, 3\] f32/,
      );
      assert.throws(
        () => linearSplitNormed(x, nw, 1e-5, w, [3, 3, 3], { ...conv, taps: weight }),
        /conv taps .* must be \[3, 5\] f32/,
      );
    });
  },
);

Deno.test("gemvShapeDefaults: more threads a row for few outputs, about 1,024 workgroups, at most 128", () => {
  // the decode shapes of a 1B model
  assert.deepEqual(gemvShapeDefaults(2048), { threadsPerRow: 128, unroll: 4 }); // o_proj, out_proj, down_proj
  assert.deepEqual(gemvShapeDefaults(3072), { threadsPerRow: 64, unroll: 4 }); // q/k/v
  assert.deepEqual(gemvShapeDefaults(5152), { threadsPerRow: 32, unroll: 4 }); // Mamba2 in_proj
  assert.deepEqual(gemvShapeDefaults(8192), { threadsPerRow: 32, unroll: 4 }); // gate/up
  assert.deepEqual(gemvShapeDefaults(128256), { threadsPerRow: 32, unroll: 4 }); // lm_head
  assert.deepEqual(gemvShapeDefaults(45), { threadsPerRow: 128, unroll: 4 }); // tiny: never above 128
});

Deno.test("gemv subgroup sums: taken for whole subgroups a row, refused for bad sizes", () => {
  const key = (threadsPerRow: number, subgroupSize: number) =>
    gemvKernel("f32", 1, 64, 256, { threadsPerRow, subgroupSize }).spec;
  assert.match(key(32, 32).key, /_sg32$/);
  assert.match(key(128, 32).key, /_sg32$/);
  assert.doesNotMatch(key(16, 32).key, /_sg/, "fewer threads a row than a subgroup: the tree");
  assert.doesNotMatch(key(32, 0).key, /_sg/);
  assert.match(key(32, 32).code, /subgroupAdd/);
  assert.doesNotMatch(key(16, 32).code, /subgroupAdd|enable subgroups/);
  for (const bad of [3, 24, 512]) assert.throws(() => key(32, bad), /subgroupSize/);
});

Deno.test(
  "decode GEMVs take subgroup sums where the device has fixed-size subgroups",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const sg = gemvDeviceOptions(rt).subgroupSize;
    const rng = testRng("gemv-device-subgroups");
    const { keys } = await withKernelKeys(rt, () =>
      rt.scope(() => {
        const x = rt.tensor(randn(rng, 64), [1, 64]), nw = rt.tensor(randn(rng, 64), [64]);
        const w = rt.tensor(randn(rng, 2048 * 64), [2048, 64]);
        linearNormed(x, nw, 1e-5, w);
      }));
    const gemv = keys.filter((k) => k.startsWith("gemv"));
    assert.equal(gemv.length, 1, keys.join(" "));
    // 2048 outputs take 128 threads a row (gemvShapeDefaults), a multiple of any subgroup size up to 128
    if (sg) assert.ok(gemv[0].endsWith(`_sg${sg}`), `${gemv[0]} on subgroups of ${sg}`);
    else assert.doesNotMatch(gemv[0], /_sg/, `${gemv[0]} without fixed-size subgroups`);
  },
);
