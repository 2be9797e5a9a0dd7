import assert from "node:assert/strict";
import { rope, ropeInverseFrequencies } from "../../runtime/ops/rope.ts";
import {
  assertClose,
  dot,
  F32_TOL,
  finiteDifference,
  gpuTestOptions,
  maxAbsDiff,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";
import { refRope } from "../reference/dense.ts";

// HF's angle: the f32 product of the f32 position and the f32 inverse frequency
const f32Angle = (pos: number, invFreq: number) => Math.fround(Math.fround(pos) * invFreq);

Deno.test(
  "rope forward: positions tensor with large positions, vs float64 cos/sin of HF's f32 angle",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rope-fwd");
    const [t, h, hd] = [6, 3, 10];
    const invFreq = ropeInverseFrequencies(hd, 500000);
    const positions = [0, 1, 7, 4095, 131071, 1000003];
    const x = randn(rng, t * h * hd);
    await rt.scope(async () => {
      const y = rope(rt.tensor(x, [t, h, hd]), invFreq, { positions: rt.tensor(positions, [t], "i32") });
      const ref = refRope(x, t, h, hd, (tok, i) => f32Angle(positions[tok], invFreq[i]));
      // cos/sin within ~1e-7 of exact (see kernels/rope.ts), then one f32 rotation
      assertClose(await y.read(), ref, { rtol: 1e-5, atol: 1e-6 }, "rope positions");
    });
  },
);

Deno.test(
  "rope cos/sin accuracy: unit vectors at angles up to 1e6 rad stay within 3e-7",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rope-accuracy");
    const n = 4096, hd = 2;
    const positions = Array.from({ length: n }, (_, i) => (i < 64 ? i : rng.int(1_000_000)));
    const invFreq = new Float32Array([1]);
    const x = new Float64Array(n * hd);
    for (let i = 0; i < n; i++) x[i * 2] = 1; // (1, 0) rotates to (cos a, sin a)
    await rt.scope(async () => {
      const y = await rope(rt.tensor(x, [n, 1, hd]), invFreq, { positions: rt.tensor(positions, [n], "i32") })
        .read();
      const cos = positions.map((p) => Math.cos(f32Angle(p, 1)));
      const sin = positions.map((p) => Math.sin(f32Angle(p, 1)));
      const errCos = maxAbsDiff(Array.from({ length: n }, (_, i) => y[2 * i]), cos);
      const errSin = maxAbsDiff(Array.from({ length: n }, (_, i) => y[2 * i + 1]), sin);
      assert.ok(errCos < 3e-7 && errSin < 3e-7, `max |cos err| ${errCos}, max |sin err| ${errSin}`);
    });
  },
);

Deno.test(
  "rope start offset over a batch [B, T, H, hd]; positions per sequence step broadcast",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rope-offset");
    const [b, t, h, hd] = [2, 5, 2, 6];
    const invFreq = ropeInverseFrequencies(hd, 10000);
    const x = randn(rng, b * t * h * hd);
    const start = 123;
    await rt.scope(async () => {
      const tx = rt.tensor(x, [b, t, h, hd]);
      const y1 = rope(tx, invFreq, { start });
      const y2 = rope(tx, invFreq, { positions: rt.tensor([123, 124, 125, 126, 127], [t], "i32") });
      const ref = refRope(x, b * t, h, hd, (tok, i) => f32Angle(start + (tok % t), invFreq[i]));
      const [g1, g2] = await Promise.all([y1.read(), y2.read()]);
      assertClose(g1, ref, F32_TOL, "offset");
      assertClose(g2, g1, { rtol: 0, atol: 0 }, "broadcast positions equal the offset");
    });
  },
);

Deno.test(
  "rope backward (rotation by the negative angle) vs finite differences",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rope-bwd");
    const [t, h, hd] = [4, 3, 8];
    const invFreq = ropeInverseFrequencies(hd, 10000);
    const positions = [3, 50, 900, 17];
    const x = randn(rng, t * h * hd), w = randn(rng, t * h * hd);
    await rt.scope(async () => {
      const tx = rt.tensor(x, [t, h, hd]);
      tx.requiresGrad = true;
      const y = rope(tx, rt.tensor(invFreq, [hd / 2]), {
        positions: rt.tensor(positions, [t], "i32"),
        attentionScaling: 0.7,
      });
      rt.backward(y, rt.tensor(w, [t, h, hd]));
      const g = await tx.grad!.read();
      const angle = (tok: number, i: number) => f32Angle(positions[tok], invFreq[i]);
      const idx = sampleIndices(rng, x.length, 10);
      const fd = finiteDifference(() => 0.7 * dot(refRope(x, t, h, hd, angle), w), x, idx);
      assertClose(idx.map((i) => g[i]), fd, { rtol: 1e-4, atol: 1e-5 }, "rope dx");
      tx.grad!.dispose();
    });
  },
);

Deno.test("rope f16 storage within f16 tolerance", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) return console.warn("rope f16: adapter has no shader-f16");
  const [t, h, hd] = [7, 2, 16];
  const invFreq = ropeInverseFrequencies(hd, 10000);
  const x = Float64Array.from(new Float16Array(randn(testRng("rope-f16"), t * h * hd)));
  await rt.scope(async () => {
    const y = rope(rt.tensor(x, [t, h, hd], "f16"), invFreq, { start: 2000 });
    const ref = refRope(x, t, h, hd, (tok, i) => f32Angle(2000 + tok, invFreq[i]));
    assertClose(await y.read(), ref, { rtol: 1e-2, atol: 1e-3 }, "rope f16");
  });
});

Deno.test("rope rejects odd head_dim, wrong inv_freq length and position count", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    const x = rt.empty([4, 2, 8]);
    assert.throws(() => rope(x, new Float32Array(3)), /inv_freq must be f32 \[4\]/);
    assert.throws(
      () => rope(x, new Float32Array(4), { positions: rt.empty([3], "i32") }),
      /positions must be i32/,
    );
  });
});
