import assert from "node:assert/strict";
import { cast } from "../../runtime/ops/cast.ts";
import { mul } from "../../runtime/ops/elementwise.ts";
import { gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";

// 1001: odd (the f16 buffer's padded tail) and not a multiple of the 256-thread workgroup (the bounds check);
// 1000 runs four elements a thread.
const SIZES = [1001, 1000];

/** Checks that every `got[i]` is a binary16 value nearest to `x[i]` (float64): no farther than the CPU's rounding. */
function assertNearestHalf(got: ArrayLike<number>, x: ArrayLike<number>, label: string): void {
  const ref = Float16Array.from(x);
  for (let i = 0; i < x.length; i++) {
    // a representable half (the round trip through Float16Array is exact) and as close as the correctly rounded one
    assert.equal(Math.fround(got[i]), got[i], `${label}[${i}]`);
    assert.equal(new Float16Array([got[i]])[0], got[i], `${label}[${i}]: ${got[i]} is not a binary16 value`);
    const err = Math.abs(got[i] - x[i]), best = Math.abs(ref[i] - x[i]);
    assert.ok(err <= best, `${label}[${i}]: ${got[i]} for ${x[i]}, nearest half ${ref[i]}`);
  }
}

for (const N of SIZES) {
  Deno.test(
    `cast f32 -> f16 -> f32: nearest rounding, exact widening, gradients cast back (${N} elements)`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      if (!rt.dev.features.f16) return console.warn("cast: adapter has no shader-f16");
      const rng = testRng("cast");
      // normal halves of several magnitudes, and a few values past f16's largest finite (65504) that round to Inf
      const x = randn(rng, N, 40);
      x[7] = 70000;
      x[8] = -1e6;
      const w = randn(rng, N);
      await rt.scope(async () => {
        const x32 = rt.tensor(x, [N]);
        x32.requiresGrad = true;
        const h = cast(x32, "f16");
        assert.equal(h.dtype, "f16");
        const back = cast(h, "f32");
        assert.equal(cast(back, "f32"), back, "a cast to the same dtype is the tensor itself");
        // loss = sum(w * widen(narrow(x))): dL/dx = w, through both casts (f32 -> f16 -> f32)
        rt.backward(mul(back, rt.tensor(w, [N])), rt.full([N], 1));
        const [hv, bv, g] = await Promise.all([h.read(), back.read(), x32.grad!.read()]);
        assertNearestHalf(hv, x, "narrow");
        assert.equal(hv[7], Infinity);
        assert.equal(hv[8], -Infinity);
        // widening is exact: the f32 tensor holds the half values themselves
        assert.deepEqual(Array.from(bv), Array.from(hv));
        // the gradient passed through f16 on its way back: w rounded to a nearest half, then widened exactly
        assertNearestHalf(g, w, "grad");
        x32.grad!.dispose();
      });
    },
  );
}
