import { add, binary, mul, scale, silu, softplus, swiglu, unary } from "../../runtime/ops/elementwise.ts";
import {
  assertClose,
  dot,
  F32_TOL,
  finiteDifference,
  gpuTestOptions,
  randn,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import type { Tensor } from "../../runtime/tensor.ts";

// float64 references, one line each
const sig = (x: number) => 1 / (1 + Math.exp(-x));
const REF_UNARY: Record<string, (x: number, s: number) => number> = {
  scale: (x, s) => s * x,
  silu: (x) => x * sig(x),
  softplus: (x) => (x > 20 ? x : Math.log1p(Math.exp(x))),
};
const REF_BINARY: Record<string, (a: number, b: number) => number> = {
  add: (a, b) => a + b,
  mul: (a, b) => a * b,
  swiglu: (a, b) => a * sig(a) * b,
};

// 1000 is not a multiple of the 256-thread workgroup, so the bounds check is exercised; it is a multiple of 4, so
// the maps run four elements to a thread (vec4), and 1001 runs them one to a thread.
const N = 1000;

for (const [op, ref] of Object.entries(REF_UNARY)) {
  for (const N of [1000, 1001]) {
    Deno.test(
      `elementwise ${op}: forward vs float64, backward vs finite differences (${N} elements)`,
      gpuTestOptions,
      async () => {
        const rt = await testRuntime();
        const rng = testRng(`unary-${op}`);
        const x = randn(rng, N, 3);
        const w = randn(rng, N);
        const s = 0.37;
        await rt.scope(async () => {
          const tx = rt.tensor(x, [N]);
          tx.requiresGrad = true;
          const y = unary(op as "scale", tx, s);
          const yw = mul(y, rt.tensor(w, [N]));
          rt.backward(yw, rt.full([N], 1));
          const [gy, gx] = await Promise.all([y.read(), tx.grad!.read()]);
          assertClose(gy, x.map((v) => ref(v, s)), F32_TOL, `${op} forward`);
          const fd = finiteDifference(() => dot(x.map((v) => ref(v, s)), w), x, [0, 1, 17, 502, 999]);
          // f32 backward vs float64 finite differences of the float64 reference
          assertClose(
            [0, 1, 17, 502, 999].map((i) => gx[i]),
            fd,
            { rtol: 1e-4, atol: 1e-5 },
            `${op} backward`,
          );
          tx.grad!.dispose();
        });
      },
    );
  }
}

for (const [op, ref] of Object.entries(REF_BINARY)) {
  for (const N of [1000, 1001]) {
    Deno.test(
      `elementwise ${op}: forward vs float64, both gradients vs finite differences (${N} elements)`,
      gpuTestOptions,
      async () => {
        const rt = await testRuntime();
        const rng = testRng(`binary-${op}`);
        const a = randn(rng, N, 2), b = randn(rng, N, 2), w = randn(rng, N);
        await rt.scope(async () => {
          const ta = rt.tensor(a, [N]), tb = rt.tensor(b, [N]);
          ta.requiresGrad = tb.requiresGrad = true;
          const y = binary(op as "add", ta, tb);
          rt.backward(y, rt.tensor(w, [N]));
          const [gy, ga, gb] = await Promise.all([y.read(), ta.grad!.read(), tb.grad!.read()]);
          assertClose(gy, a.map((v, i) => ref(v, b[i])), F32_TOL, `${op} forward`);
          const idx = [0, 3, 254, 256, 997, 999]; // every lane of a vec4
          const f = () => dot(a.map((v, i) => ref(v, b[i])), w);
          assertClose(
            idx.map((i) => ga[i]),
            finiteDifference(f, a, idx),
            { rtol: 1e-4, atol: 1e-5 },
            `${op} grad a`,
          );
          assertClose(
            idx.map((i) => gb[i]),
            finiteDifference(f, b, idx),
            { rtol: 1e-4, atol: 1e-5 },
            `${op} grad b`,
          );
          ta.grad!.dispose();
          tb.grad!.dispose();
        });
      },
    );
  }
}

Deno.test(
  "autograd: a reused input accumulates both paths; frozen inputs get no grad",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("autograd-reuse");
    const x = randn(rng, 300), c = randn(rng, 300);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [300]);
      tx.requiresGrad = true;
      const tc = rt.tensor(c, [300]); // frozen
      // y = silu(x) * x + 2 x + c  ->  dy/dx = silu'(x) x + silu(x) + 2
      const y = add(add(mul(silu(tx), tx), scale(tx, 2)), tc);
      rt.backward(y);
      const g = await tx.grad!.read();
      const ref = x.map((v) => {
        const s = sig(v);
        return s * (1 + v * (1 - s)) * v + v * s + 2;
      });
      assertClose(g, ref, { rtol: 1e-5, atol: 1e-5 }, "accumulated grad");
      if (tc.grad !== null) throw new Error("frozen tensor got a gradient");
      if (rt.tapeLength !== 0) throw new Error("tape not cleared");
      tx.grad!.dispose();
    });
  },
);

Deno.test("autograd: grads accumulate across backward passes until cleared", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const x = randn(testRng("accum"), 10);
  const tx: Tensor = rt.tensor(x, [10]).keep();
  tx.requiresGrad = true;
  for (let i = 0; i < 3; i++) rt.scope(() => rt.backward(softplus(tx)));
  const g = await tx.grad!.read();
  assertClose(g, x.map((v) => 3 * sig(v)), { rtol: 1e-5, atol: 1e-6 }, "3x accumulated");
  tx.grad!.dispose();
  tx.dispose();
});

Deno.test("elementwise swiglu on f16 storage stays within f16 tolerance", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) {
    console.warn("elementwise f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)");
    return;
  }
  const rng = testRng("swiglu-f16");
  const a = randn(rng, N).map(Math.fround), b = randn(rng, N);
  await rt.scope(async () => {
    const y = swiglu(rt.tensor(a, [N], "f16"), rt.tensor(b, [N], "f16"));
    assertClose(await y.read(), a.map((v, i) => v * sig(v) * b[i]), { rtol: 1e-2, atol: 1e-2 }, "f16 swiglu");
  });
});
