import assert from "node:assert/strict";
import { linear, matmul, matmulInto } from "../../runtime/ops/matmul.ts";
import {
  MATMUL_MEDIUM,
  MATMUL_SMALL,
  MATMUL_SWEEP,
  type MatmulConfig,
  matmulConfigName,
  matmulSharedBytes,
  splitKSlices,
} from "../../kernels/matmul.ts";
import {
  assertClose,
  dot,
  F16_TOL,
  finiteDifference,
  gpuTestOptions,
  randn,
  roundF16,
  sampleIndices,
  testRng,
  testRuntime,
  type Tolerance,
} from "../helpers/gpu.ts";
import { refMatmul } from "../reference/dense.ts";
import type { Tensor } from "../../runtime/tensor.ts";

// f32 tolerance: 1e-5 relative, plus an absolute floor that grows with K because outputs that cancel to near 0
// keep the rounding error of their K unit-size terms (about K * 6e-8 each way).
const tolF32 = (k: number): Tolerance => ({ rtol: 1e-5, atol: 2e-6 * Math.max(k, 1) });

interface Case {
  name: string;
  batch: number; // 0: 2-D
  aBatched: boolean;
  bBatched: boolean;
  m: number;
  n: number;
  k: number;
  transA: boolean;
  transB: boolean;
  alpha?: number;
  config?: MatmulConfig;
}

function storedShape(batched: boolean, batch: number, rows: number, cols: number): number[] {
  return batched ? [batch, rows, cols] : [rows, cols];
}

/** Runs forward + backward of one case and checks both against float64 (grads by finite differences). */
async function checkCase(c: Case, gradCheck = true): Promise<void> {
  const rt = await testRuntime();
  const rng = testRng(`matmul-${c.name}`);
  const batch = Math.max(c.batch, 1);
  const aShape = storedShape(c.aBatched, batch, c.transA ? c.k : c.m, c.transA ? c.m : c.k);
  const bShape = storedShape(c.bBatched, batch, c.transB ? c.n : c.k, c.transB ? c.k : c.n);
  const aN = aShape.reduce((x, y) => x * y), bN = bShape.reduce((x, y) => x * y);
  const a = randn(rng, aN), b = randn(rng, bN);
  const outN = batch * c.m * c.n;
  const w = randn(rng, outN);
  const ref = () =>
    refMatmul(
      { data: a, batched: c.aBatched, trans: c.transA },
      { data: b, batched: c.bBatched, trans: c.transB },
      batch,
      c.m,
      c.n,
      c.k,
      c.alpha ?? 1,
    );
  await rt.scope(async () => {
    const ta = rt.tensor(a, aShape), tb = rt.tensor(b, bShape);
    ta.requiresGrad = tb.requiresGrad = gradCheck;
    const y = matmul(ta, tb, { transA: c.transA, transB: c.transB, alpha: c.alpha, config: c.config });
    const expectShape = c.aBatched || c.bBatched ? [batch, c.m, c.n] : [c.m, c.n];
    assert.deepEqual([...y.shape], expectShape, `${c.name}: output shape`);
    if (gradCheck) rt.backward(y, rt.tensor(w, expectShape));
    const reads: Promise<ArrayLike<number>>[] = [y.read()];
    if (gradCheck) reads.push(ta.grad!.read(), tb.grad!.read());
    const [gy, ga, gb] = await Promise.all(reads);
    assertClose(gy, ref(), tolF32(c.k), `${c.name} forward`);
    if (!gradCheck) return;
    const loss = () => dot(ref(), w);
    const ia = sampleIndices(rng, aN, 6), ib = sampleIndices(rng, bN, 6);
    // f32 GPU gradient vs float64 central differences of the float64 forward (exact for a bilinear map up to
    // the difference quotient's rounding): a sum of M*N (or batch*M*N) products per coordinate
    const gtol = { rtol: 1e-4, atol: 1e-5 * Math.sqrt(outN) };
    assertClose(ia.map((i) => ga[i]), finiteDifference(loss, a, ia), gtol, `${c.name} dA`);
    assertClose(ib.map((i) => gb[i]), finiteDifference(loss, b, ib), gtol, `${c.name} dB`);
    ta.grad!.dispose();
    tb.grad!.dispose();
  });
}

const TRANSPOSES = [[false, false], [true, false], [false, true], [true, true]] as const;

Deno.test(
  "matmul 2-D, odd sizes 37x53x29 and 1x64x7, every transpose: forward + grads",
  gpuTestOptions,
  async () => {
    for (const [transA, transB] of TRANSPOSES) {
      for (const [m, n, k] of [[37, 53, 29], [1, 64, 7]]) {
        await checkCase({
          name: `${m}x${n}x${k}_${+transA}${+transB}`,
          batch: 0,
          aBatched: false,
          bBatched: false,
          m,
          n,
          k,
          transA,
          transB,
        });
      }
    }
  },
);

Deno.test(
  "matmul 2-D, multiples of 4 (vec4 loads/stores), every transpose, alpha",
  gpuTestOptions,
  async () => {
    for (const [transA, transB] of TRANSPOSES) {
      await checkCase({
        name: `vec_36x52x28_${+transA}${+transB}`,
        batch: 0,
        aBatched: false,
        bBatched: false,
        m: 36,
        n: 52,
        k: 28,
        transA,
        transB,
        alpha: 0.37,
      });
    }
  },
);

Deno.test(
  "matmul batched 3-D (batch 3), and 2-D operands broadcast over the batch",
  gpuTestOptions,
  async () => {
    const cases: [boolean, boolean, boolean, boolean][] = [
      [true, true, false, false],
      [true, true, true, true],
      [true, false, false, true], // folded into one [3*M, K] x [N, K]^T
      [true, false, true, false], // A transposed: batched with B broadcast; dB sums over the batch
      [false, true, false, false], // A broadcast: dA sums over the batch
      [false, true, true, true],
    ];
    for (const [aB, bB, tA, tB] of cases) {
      for (const [m, n, k] of [[13, 11, 9], [12, 8, 20]]) {
        await checkCase({
          name: `batch3_${+aB}${+bB}_${+tA}${+tB}_${m}x${n}x${k}`,
          batch: 3,
          aBatched: aB,
          bBatched: bB,
          m,
          n,
          k,
          transA: tA,
          transB: tB,
        });
      }
    }
  },
);

Deno.test(
  "matmul: every swept tile config is correct on sizes that cut its tiles",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    // Each config in the benchmark's layout (x W^T, all dimensions multiples of 4: vec4 everywhere), on sizes
    // that leave partial tiles; the first also with odd sizes (scalar paths) and the other transposes. The
    // smaller configs cover every layout in the tests above. (Unrolled big tiles compile slowly on llvmpipe.)
    // The knobs (swizzled tiles, one buffer, subgroup blocks) also on small tiles with a k loop, every case.
    const knobs: MatmulConfig[] = [
      { ...MATMUL_SMALL, swizzle: true, buffers: 1 },
      { ...MATMUL_MEDIUM, swizzle: true, warpRows: 4 },
    ];
    for (const [ci, config] of [...knobs, ...MATMUL_SWEEP].entries()) {
      if (matmulSharedBytes(config) > rt.dev.limits.maxComputeWorkgroupStorageSize) continue;
      const cases = [[132, 260, 40, false, true], [131, 135, 37, true, false], [
        36,
        52,
        28,
        true,
        true,
      ]] as const;
      for (const [m, n, k, tA, tB] of ci <= knobs.length ? cases : cases.slice(0, 1)) {
        await checkCase({
          name: `cfg_${matmulConfigName(config)}_${m}x${n}x${k}`,
          batch: 0,
          aBatched: false,
          bBatched: false,
          m,
          n,
          k,
          transA: tA,
          transB: tB,
          config,
        }, false);
      }
    }
  },
);

Deno.test(
  "matmulInto accumulates C += A B; leaf grads accumulate across backward passes",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("matmul-acc");
    const [m, n, k] = [19, 22, 13];
    const a = randn(rng, m * k), b = randn(rng, k * n), c0 = randn(rng, m * n);
    const ab = refMatmul(
      { data: a, batched: false, trans: false },
      { data: b, batched: false, trans: false },
      1,
      m,
      n,
      k,
    );
    await rt.scope(async () => {
      const ta = rt.tensor(a, [m, k]), tb = rt.tensor(b, [k, n]), tc = rt.tensor(c0, [m, n]);
      matmulInto(tc, ta, tb, { accumulate: true, alpha: 2, config: MATMUL_SMALL });
      assertClose(await tc.read(), c0.map((v, i) => v + 2 * ab[i]), tolF32(k), "C += 2AB");

      ta.requiresGrad = true;
      let grad: Tensor | null = null;
      for (let i = 0; i < 2; i++) {
        rt.scope(() => rt.backward(matmul(ta, tb)));
        grad = ta.grad;
      }
      // d/dA sum(AB) = 1 B^T: every row is the row sums of B; twice after two passes
      const rowSums = Array.from(
        { length: k },
        (_, p) => b.slice(p * n, (p + 1) * n).reduce((x, y) => x + y),
      );
      const expect = Array.from({ length: m * k }, (_, i) => 2 * rowSums[i % k]);
      assertClose(await grad!.read(), expect, tolF32(n), "accumulated dA");
      ta.grad!.dispose();
    });
  },
);

Deno.test(
  "matmul f16 storage (f32 accumulation), odd and vec4 sizes, with grads",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn("matmul f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)");
      return;
    }
    const rng = testRng("matmul-f16");
    for (
      const [m, n, k, tA, tB] of [[37, 53, 29, false, true], [32, 48, 64, true, false], [
        5,
        16,
        24,
        false,
        false,
      ]] as const
    ) {
      // inputs rounded to f16 so the float64 reference sees what the GPU sees
      const a = Float64Array.from(new Float16Array(randn(rng, m * k))),
        b = Float64Array.from(new Float16Array(randn(rng, k * n)));
      const w = Float64Array.from(new Float16Array(randn(rng, m * n)));
      await rt.scope(async () => {
        const ta = rt.tensor(a, tA ? [k, m] : [m, k], "f16"), tb = rt.tensor(b, tB ? [n, k] : [k, n], "f16");
        ta.requiresGrad = tb.requiresGrad = true;
        const y = matmul(ta, tb, { transA: tA, transB: tB });
        rt.backward(y, rt.tensor(w, [m, n], "f16"));
        const [gy, ga] = await Promise.all([y.read(), ta.grad!.read()]);
        const ref = refMatmul(
          { data: a, batched: false, trans: tA },
          { data: b, batched: false, trans: tB },
          1,
          m,
          n,
          k,
        );
        // f16 output rounding (2^-11 relative) plus cancellation in K unit-size terms
        assertClose(gy, ref, { rtol: F16_TOL.rtol, atol: 2e-3 * Math.sqrt(k) }, `f16 ${m}x${n}x${k} forward`);
        const ia = sampleIndices(rng, m * k, 10);
        const fd = finiteDifference(
          () =>
            dot(
              refMatmul(
                { data: a, batched: false, trans: tA },
                { data: b, batched: false, trans: tB },
                1,
                m,
                n,
                k,
              ),
              w,
            ),
          a,
          ia,
          1e-3,
        );
        assertClose(
          ia.map((i) => ga[i]),
          fd,
          { rtol: F16_TOL.rtol, atol: 2e-3 * Math.sqrt(n) },
          `f16 ${m}x${n}x${k} dA`,
        );
        ta.grad!.dispose();
        tb.grad!.dispose();
      });
    }
  },
);

Deno.test("matmul rejects mismatched shapes with a message naming both", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    assert.throws(
      () => matmul(rt.empty([3, 4]), rt.empty([5, 6])),
      /inner dimensions differ: \[3, 4\] x \[5, 6\]/,
    );
    assert.throws(() => matmul(rt.empty([2, 3, 4]), rt.empty([3, 4, 6])), /batch sizes differ/);
  });
});

Deno.test(
  "linear and matmul beyond the storage binding limit (lowered): M blocks forward/dX, K blocks for dW, vs float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("matmul-split");
    // [tokens, in] x [out, in]^T with a binding limit below x, y and dY but above W and dW, so the forward and
    // dX run in blocks of rows and dW accumulates blocks of tokens. The odd case (in = 63: 252-byte rows) needs
    // 64-row steps to keep every slice offset 256-byte aligned, and exercises the scalar (non-vec4) loads.
    const cases = [
      { T: 150, nIn: 64, nOut: 12, limit: 4096, dtype: "f32" as const },
      { T: 300, nIn: 63, nOut: 12, limit: 16384, dtype: "f32" as const },
      { T: 70, nIn: 64, nOut: 16, limit: 4096, dtype: "f16" as const },
    ].filter((c) => c.dtype === "f32" || rt.dev.features.f16);
    await rt.scope(async () => {
      const pending = cases.map((c) => {
        const r16 = (a: Float64Array) => c.dtype === "f16" ? roundF16(a) : a;
        const x = r16(randn(rng, c.T * c.nIn)), w = r16(randn(rng, c.nOut * c.nIn));
        const g = r16(randn(rng, c.T * c.nOut));
        const tx = rt.tensor(x, [c.T, c.nIn], c.dtype), tw = rt.tensor(w, [c.nOut, c.nIn], c.dtype);
        assert.ok(tx.byteLength > c.limit && tw.byteLength <= c.limit, "the case must need splitting");
        tx.requiresGrad = tw.requiresGrad = true;
        const y = linear(tx, tw, { maxBindingBytes: c.limit });
        rt.backward(y, rt.tensor(g, y.shape, c.dtype));
        // the generic matmul with A transposed (stored [K, M]) splits along K in its forward
        const xt = rt.tensor(x, [c.T, c.nIn], c.dtype);
        const z = matmul(xt, rt.tensor(g, [c.T, c.nOut], c.dtype), {
          transA: true,
          maxBindingBytes: c.limit,
        });
        return { c, x, w, g, reads: Promise.all([y.read(), tx.grad!.read(), tw.grad!.read(), z.read()]) };
      });
      for (const p of pending) {
        const { T, nIn, nOut } = p.c;
        const [y, dx, dw, z] = await p.reads;
        const tol = p.c.dtype === "f16" ? F16_TOL : tolF32(Math.max(nIn, T));
        const name = `${p.c.dtype} ${T}x${nIn}->${nOut} limit ${p.c.limit}`;
        const wT = { data: p.w, batched: false, trans: true };
        assertClose(
          y,
          refMatmul({ data: p.x, batched: false, trans: false }, wT, 1, T, nOut, nIn),
          tol,
          `${name} y`,
        );
        const gOp = { data: p.g, batched: false, trans: false };
        const wOp = { data: p.w, batched: false, trans: false };
        assertClose(dx, refMatmul(gOp, wOp, 1, T, nIn, nOut), tol, `${name} dX`);
        const gT = { data: p.g, batched: false, trans: true };
        const xOp = { data: p.x, batched: false, trans: false };
        // f16 dW accumulates its K blocks through f16 storage: each of the 9 blocks rounds the running sum
        // (|dW| up to ~25, half an ulp there is 0.008), so the absolute floor is a few ulps
        const dwTol = p.c.dtype === "f16" ? { rtol: 1e-2, atol: 4e-2 } : tol;
        assertClose(dw, refMatmul(gT, xOp, 1, nOut, nIn, T), dwTol, `${name} dW`);
        const xT = { data: p.x, batched: false, trans: true };
        assertClose(z, refMatmul(xT, gOp, 1, nIn, nOut, T), dwTol, `${name} x^T g`);
      }
    });
  },
);

Deno.test(
  "matmul beyond the binding limit: unsplittable layouts name the limit",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    rt.scope(() => {
      // B (the weight) alone exceeds the limit: it is always bound whole
      const x = rt.zeros([8, 64]), w = rt.zeros([64, 64]);
      assert.throws(() => linear(x, w, { maxBindingBytes: 4096 }), /4096-byte storage binding limit/);
    });
  },
);

Deno.test("splitKSlices cuts K only for few output blocks, long K and room for the partials", () => {
  const big = 1 << 30;
  assert.equal(splitKSlices(20, 12, 1301, MATMUL_SMALL, big), 5, "1 block, K 1301: 5 slices of >= 256");
  assert.equal(splitKSlices(20, 12, 8192, MATMUL_SMALL, big), 32, "1 block, K 8192: 32 slices");
  assert.equal(splitKSlices(64, 172, 8192, MATMUL_SMALL, big), 22, "12 blocks: ceil(256 / 12) slices");
  assert.equal(splitKSlices(20, 12, 400, MATMUL_SMALL, big), 1, "K too short for two slices");
  assert.equal(splitKSlices(2048, 2048, 8192, MATMUL_SMALL, big), 1, "the output alone fills the GPU");
  assert.equal(splitKSlices(20, 12, 8192, MATMUL_SMALL, 3 * 20 * 12 * 4), 3, "partials capped by memory");
});

Deno.test(
  "matmul split-K (A^T B with few output blocks and long K): forward, alpha, accumulate, and a linear weight grad",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const limit = rt.dev.limits.maxStorageBufferBindingSize;
    // K = 1301 is not a multiple of the slice count: the leftover row goes into the first partial
    assert.ok(splitKSlices(20, 12, 1301, MATMUL_SMALL, limit) > 1, "this case must take the split-K path");
    await checkCase(
      {
        name: "splitk_20x12x1301",
        batch: 0,
        aBatched: false,
        bBatched: false,
        m: 20,
        n: 12,
        k: 1301,
        transA: true,
        transB: false,
        alpha: 0.5,
      },
      false,
    );
    const rng = testRng("matmul-splitk");
    const [m, n, k] = [20, 12, 1301];
    const a = randn(rng, k * m), b = randn(rng, k * n), c0 = randn(rng, m * n);
    const atb = refMatmul(
      { data: a, batched: false, trans: true },
      { data: b, batched: false, trans: false },
      1,
      m,
      n,
      k,
    );
    await rt.scope(async () => {
      const tc = rt.tensor(c0, [m, n]);
      matmulInto(tc, rt.tensor(a, [k, m]), rt.tensor(b, [k, n]), {
        transA: true,
        accumulate: true,
        alpha: -1.5,
      });
      assertClose(await tc.read(), c0.map((v, i) => v - 1.5 * atb[i]), tolF32(k), "C += -1.5 A^T B");
    });
    // linear: y = x W^T over 1100 tokens; dW = dY^T X (K = 1100 tokens) accumulates into W.grad twice
    const tokens = 1100, din = 12, dout = 20;
    assert.ok(splitKSlices(dout, din, tokens, MATMUL_SMALL, limit) > 1, "the weight grad must split");
    const x = randn(rng, tokens * din), wt = randn(rng, dout * din), gy = randn(rng, tokens * dout);
    const dW = refMatmul(
      { data: gy, batched: false, trans: true },
      { data: x, batched: false, trans: false },
      1,
      dout,
      din,
      tokens,
    );
    await rt.scope(async () => {
      const tw = rt.tensor(wt, [dout, din]);
      tw.requiresGrad = true;
      for (let i = 0; i < 2; i++) {
        rt.scope(() => rt.backward(linear(rt.tensor(x, [tokens, din]), tw), rt.tensor(gy, [tokens, dout])));
      }
      assertClose(await tw.grad!.read(), dW.map((v) => 2 * v), tolF32(tokens), "W.grad after two passes");
      tw.grad!.dispose();
    });
  },
);
