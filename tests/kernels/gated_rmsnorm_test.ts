import assert from "node:assert/strict";
import { gatedRmsNorm } from "../../runtime/ops/gated_norm.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import { hostArray, type Tensor } from "../../runtime/tensor.ts";
import {
  assertClose,
  F16_TOL,
  F32_TOL,
  finiteDifference,
  gpuTestOptions,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";

const sig = (v: number) => 1 / (1 + Math.exp(-v));

/** float64 reference: g = y silu(z), normalised per group of G, times weight. */
function refGatedNorm(y: Float64Array, z: Float64Array, w: Float64Array, D: number, G: number, eps: number) {
  const out = new Float64Array(y.length);
  for (let base = 0; base < y.length; base += G) {
    let ss = 0;
    for (let e = 0; e < G; e++) {
      const g = y[base + e] * z[base + e] * sig(z[base + e]);
      ss += g * g;
    }
    const r = 1 / Math.sqrt(ss / G + eps);
    for (let e = 0; e < G; e++) {
      out[base + e] = y[base + e] * z[base + e] * sig(z[base + e]) * r * w[(base + e) % D];
    }
  }
  return out;
}

async function readAll(rt: Runtime, ts: Tensor[]): Promise<Float64Array[]> {
  const bufs = await rt.dev.readMany(ts.map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })));
  return bufs.map((b, i) => Float64Array.from(hostArray(ts[i].dtype, b)));
}

// [rows, D, G]: power-of-two groups (Mamba2 head_dim 8 as in the fixtures, 64), a group that is not a power of
// two (20), a group wider than the 64 lanes (130, also scalar loads), more units than one workgroup holds,
// a group of 6 (scalar loads: not a multiple of 4)
const SHAPES = [[37, 64, 8], [5, 40, 20], [3, 260, 130], [300, 8, 8], [2, 128, 64], [7, 18, 6]] as const;

Deno.test(
  "gated RMSNorm forward vs float64 (several group sizes, eps 1e-5 and 1e-3)",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("gated-norm-fwd");
    for (const [rows, D, G] of SHAPES) {
      for (const eps of [1e-5, 1e-3]) {
        const y = randn(rng, rows * D), z = randn(rng, rows * D, 2), w = randn(rng, D);
        await rt.scope(async () => {
          const out = gatedRmsNorm(rt.tensor(y, [rows, D]), rt.tensor(z, [rows, D]), rt.tensor(w, [D]), {
            group: G,
            eps,
          });
          const [got] = await readAll(rt, [out]);
          assertClose(
            got,
            refGatedNorm(y, z, w, D, G, eps),
            F32_TOL,
            `[${rows}, ${D}] group ${G} eps ${eps}`,
          );
        });
      }
    }
  },
);

Deno.test("gated RMSNorm backward: y, z, weight vs finite differences", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("gated-norm-bwd");
  for (const [rows, D, G] of SHAPES) {
    const y = randn(rng, rows * D), z = randn(rng, rows * D, 2), w = randn(rng, D), wo = randn(rng, rows * D);
    const loss = () => {
      const o = refGatedNorm(y, z, w, D, G, 1e-5);
      let s = 0;
      for (let i = 0; i < o.length; i++) s += o[i] * wo[i];
      return s;
    };
    await rt.scope(async () => {
      const ty = rt.tensor(y, [rows, D]), tz = rt.tensor(z, [rows, D]), tw = rt.tensor(w, [D]);
      for (const t of [ty, tz, tw]) t.requiresGrad = true;
      const out = gatedRmsNorm(ty, tz, tw, { group: G });
      rt.backward(out, rt.tensor(wo, out.shape));
      const [gy, gz, gw] = await readAll(rt, [ty.grad!, tz.grad!, tw.grad!]);
      const iy = sampleIndices(rng, y.length, 30);
      // the y/z grads subtract a projection onto g: relative error is larger where the two terms cancel
      const tol = { rtol: 1e-4, atol: 3e-5 };
      assertClose(iy.map((i) => gy[i]), finiteDifference(loss, y, iy), tol, `grad y [${rows},${D}]/${G}`);
      assertClose(iy.map((i) => gz[i]), finiteDifference(loss, z, iy), tol, `grad z [${rows},${D}]/${G}`);
      const iw = sampleIndices(rng, w.length, 30);
      // the weight grad sums over all rows (up to 300)
      assertClose(
        iw.map((i) => gw[i]),
        finiteDifference(loss, w, iw),
        { rtol: 1e-4, atol: 1e-4 },
        "grad weight",
      );
      for (const t of [ty, tz, tw]) t.grad!.dispose();
    });
  }
});

Deno.test("gated RMSNorm rejects a group that does not divide the row", gpuTestOptions, async () => {
  const rt = await testRuntime();
  await rt.scope(() => {
    const y = rt.zeros([2, 12]);
    assert.throws(() => gatedRmsNorm(y, y, rt.zeros([12]), { group: 5 }), /group 5 must divide/);
    assert.throws(() => gatedRmsNorm(y, rt.zeros([2, 11]), rt.zeros([12]), { group: 4 }), /shape of y/);
  });
});

Deno.test("gated RMSNorm on f16 storage stays within f16 tolerance", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) {
    console.warn("gated RMSNorm f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)");
    return;
  }
  const rng = testRng("gated-norm-f16");
  const [rows, D, G] = [9, 48, 16];
  const f16 = (a: Float64Array) => a.map((v) => Math.f16round(v));
  const y = f16(randn(rng, rows * D)), z = f16(randn(rng, rows * D)), w = f16(randn(rng, D));
  const wo = f16(randn(rng, rows * D));
  await rt.scope(async () => {
    const ty = rt.tensor(y, [rows, D], "f16"),
      tz = rt.tensor(z, [rows, D], "f16"),
      tw = rt.tensor(w, [D], "f16");
    ty.requiresGrad = true;
    const out = gatedRmsNorm(ty, tz, tw, { group: G });
    rt.backward(out, rt.tensor(wo, out.shape, "f16"));
    const [o, gy] = await readAll(rt, [out, ty.grad!]);
    assertClose(o, refGatedNorm(y, z, w, D, G, 1e-5), F16_TOL, "f16 forward");
    const loss = () => {
      const r = refGatedNorm(y, z, w, D, G, 1e-5);
      let s = 0;
      for (let i = 0; i < r.length; i++) s += r[i] * wo[i];
      return s;
    };
    const iy = sampleIndices(rng, y.length, 20);
    assertClose(
      iy.map((i) => gy[i]),
      finiteDifference(loss, y, iy),
      { rtol: 2e-2, atol: 1e-2 },
      "f16 grad y",
    );
    ty.grad!.dispose();
  });
});
