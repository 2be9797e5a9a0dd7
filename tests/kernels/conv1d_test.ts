import assert from "node:assert/strict";
import {
  advanceConvRing,
  causalConv1d,
  causalConv1dRing,
  causalConv1dStep,
  convRingFromState,
  convStateFromRing,
} from "../../runtime/ops/conv1d.ts";
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

// ---- float64 reference -------------------------------------------------------------------------------------

interface Ref {
  out: Float64Array;
  fin: Float64Array;
}

const sig = (v: number) => 1 / (1 + Math.exp(-v));

/** conv1d(x, padding=3)[..., :L] per channel, x [B, L, C], init [B, C, 3] (null: zeros). */
function refConv(
  x: Float64Array,
  w: Float64Array,
  bias: Float64Array,
  init: Float64Array | null,
  B: number,
  L: number,
  C: number,
  silu: boolean,
): Ref {
  const out = new Float64Array(B * L * C);
  const fin = new Float64Array(B * C * 3);
  const at = (b: number, t: number, c: number) =>
    t >= 0 ? x[(b * L + t) * C + c] : init ? init[(b * C + c) * 3 + t + 3] : 0;
  for (let b = 0; b < B; b++) {
    for (let c = 0; c < C; c++) {
      for (let t = 0; t < L; t++) {
        let s = bias[c];
        for (let k = 0; k < 4; k++) s += w[c * 4 + k] * at(b, t - 3 + k, c);
        out[(b * L + t) * C + c] = silu ? s * sig(s) : s;
      }
      for (let j = 0; j < 3; j++) fin[(b * C + c) * 3 + j] = at(b, L - 3 + j, c);
    }
  }
  return { out, fin };
}

async function readAll(rt: Runtime, ts: Tensor[]): Promise<Float64Array[]> {
  const bufs = await rt.dev.readMany(ts.map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })));
  return bufs.map((b, i) => Float64Array.from(hostArray(ts[i].dtype, b)));
}

/** A test-only op: a scalar whose backward seeds each input with a fixed projection (sum(a_i * w_i)). */
function projection(rt: Runtime, inputs: Tensor[], weights: Float64Array[]): Tensor {
  const s = rt.zeros([1]);
  rt.record("projection", inputs, [s], () => inputs.map((t, i) => rt.tensor(weights[i], t.shape, t.dtype)));
  return s;
}

const GRAD_TOL = { rtol: 1e-4, atol: 1e-5 };

// ---- forward ---------------------------------------------------------------------------------------------------

for (const silu of [false, true]) {
  for (const withInit of [false, true]) {
    Deno.test(
      `conv1d forward (silu=${silu}, initial state=${withInit}) vs float64, several segment lengths`,
      gpuTestOptions,
      async () => {
        const rt = await testRuntime();
        const rng = testRng(`conv1d-fwd-${silu}-${withInit}`);
        // C = 19 and L = 37 are not multiples of anything the kernels use; L = 2 is shorter than the window;
        // C = 12 and 8 take the vec4 path (four channels per thread)
        for (const [B, L, C] of [[2, 37, 19], [3, 2, 5], [1, 1, 7], [2, 21, 12], [2, 2, 8]]) {
          const x = randn(rng, B * L * C), w = randn(rng, C * 4, 0.5), bias = randn(rng, C, 0.2);
          const init = withInit ? randn(rng, B * C * 3) : null;
          const ref = refConv(x, w, bias, init, B, L, C, silu);
          await rt.scope(async () => {
            const tx = rt.tensor(x, [B, L, C]), tw = rt.tensor(w, [C, 1, 4]), tb = rt.tensor(bias, [C]);
            const ti = init ? rt.tensor(init, [B, C, 3]) : null;
            const outs: Tensor[] = [];
            for (const segmentLength of [undefined, 1, 5, 16]) {
              const r = causalConv1d(tx, tw, tb, { silu, initialState: ti, finalState: true, segmentLength });
              outs.push(r.out, r.finalState!);
            }
            const got = await readAll(rt, outs);
            for (let i = 0; i < got.length; i += 2) {
              assertClose(got[i], ref.out, F32_TOL, `out [${B},${L},${C}] variant ${i / 2}`);
              assertClose(got[i + 1], ref.fin, { rtol: 0, atol: 0 }, `final state [${B},${L},${C}]`);
            }
          });
        }
      },
    );
  }
}

// ---- backward --------------------------------------------------------------------------------------------------

for (const silu of [false, true]) {
  Deno.test(
    `conv1d backward (silu=${silu}): x, weight, bias, initial state vs finite differences, incl. final-state grad`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      const rng = testRng(`conv1d-bwd-${silu}`);
      for (
        const [B, L, C, seg] of [[2, 23, 13, 6], [2, 2, 3, undefined], [2, 17, 8, 5], [
          1,
          2,
          4,
          undefined,
        ]] as const
      ) {
        const x = randn(rng, B * L * C), w = randn(rng, C * 4, 0.5), bias = randn(rng, C, 0.2);
        const init = randn(rng, B * C * 3);
        const wo = randn(rng, B * L * C), wf = randn(rng, B * C * 3);
        const loss = () => {
          const r = refConv(x, w, bias, init, B, L, C, silu);
          let s = 0;
          for (let i = 0; i < r.out.length; i++) s += r.out[i] * wo[i];
          for (let i = 0; i < r.fin.length; i++) s += r.fin[i] * wf[i];
          return s;
        };
        await rt.scope(async () => {
          const tx = rt.tensor(x, [B, L, C]), tw = rt.tensor(w, [C, 4]), tb = rt.tensor(bias, [C]);
          const ti = rt.tensor(init, [B, C, 3]);
          for (const t of [tx, tw, tb, ti]) t.requiresGrad = true;
          const r = causalConv1d(tx, tw, tb, {
            silu,
            initialState: ti,
            finalState: true,
            segmentLength: seg,
          });
          rt.backward(projection(rt, [r.out, r.finalState!], [wo, wf]));
          const [gx, gw, gb, gi] = await readAll(rt, [tx.grad!, tw.grad!, tb.grad!, ti.grad!]);
          const ix = sampleIndices(rng, x.length, 40);
          assertClose(
            ix.map((i) => gx[i]),
            finiteDifference(loss, x, ix),
            GRAD_TOL,
            `grad x [${B},${L},${C}]`,
          );
          assertClose(gw, finiteDifference(loss, w), GRAD_TOL, "grad weight");
          assertClose(gb, finiteDifference(loss, bias), GRAD_TOL, "grad bias");
          assertClose(gi, finiteDifference(loss, init), GRAD_TOL, "grad initial state");
          for (const t of [tx, tw, tb, ti]) t.grad!.dispose();
        });
      }
    },
  );
}

Deno.test(
  "conv1d backward (vec4 path) without initial state or final-state grad",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("conv1d-bwd-plain");
    const [B, L, C] = [3, 9, 72];
    const x = randn(rng, B * L * C),
      w = randn(rng, C * 4, 0.5),
      bias = randn(rng, C, 0.2),
      wo = randn(rng, B * L * C);
    const loss = () => {
      const r = refConv(x, w, bias, null, B, L, C, true);
      let s = 0;
      for (let i = 0; i < r.out.length; i++) s += r.out[i] * wo[i];
      return s;
    };
    await rt.scope(async () => {
      const tx = rt.tensor(x, [B, L, C]), tw = rt.tensor(w, [C, 4]), tb = rt.tensor(bias, [C]);
      for (const t of [tx, tw, tb]) t.requiresGrad = true;
      const { out } = causalConv1d(tx, tw, tb, { silu: true });
      rt.backward(out, rt.tensor(wo, out.shape));
      const [gx, gw, gb] = await readAll(rt, [tx.grad!, tw.grad!, tb.grad!]);
      const ix = sampleIndices(rng, x.length, 40);
      assertClose(ix.map((i) => gx[i]), finiteDifference(loss, x, ix), GRAD_TOL, "grad x");
      const iw = sampleIndices(rng, w.length, 40);
      assertClose(iw.map((i) => gw[i]), finiteDifference(loss, w, iw), GRAD_TOL, "grad weight");
      assertClose(gb, finiteDifference(loss, bias), GRAD_TOL, "grad bias");
      for (const t of [tx, tw, tb]) t.grad!.dispose();
    });
  },
);

// ---- decode ----------------------------------------------------------------------------------------------------

Deno.test(
  "conv1d: chunked prefill and step-by-step decode equal the full-sequence forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("conv1d-decode");
    const [B, L, C, split] = [2, 11, 9, 4];
    const x = randn(rng, B * L * C), w = randn(rng, C * 4, 0.5), bias = randn(rng, C, 0.2);
    const ref = refConv(x, w, bias, null, B, L, C, true);
    const slice = (t0: number, t1: number) => {
      const o = new Float64Array(B * (t1 - t0) * C);
      for (let b = 0; b < B; b++) {
        o.set(x.subarray((b * L + t0) * C, (b * L + t1) * C), b * (t1 - t0) * C);
      }
      return o;
    };
    await rt.scope(async () => {
      const tw = rt.tensor(w, [C, 4]), tb = rt.tensor(bias, [C]);
      // prefill the first `split` tokens, then the rest as a second chunk from the carried state
      const a = causalConv1d(rt.tensor(slice(0, split), [B, split, C]), tw, tb, {
        silu: true,
        finalState: true,
      });
      const bChunk = causalConv1d(rt.tensor(slice(split, L), [B, L - split, C]), tw, tb, {
        silu: true,
        initialState: a.finalState,
        finalState: true,
      });
      // and step by step from a zero state
      const state = rt.zeros([B, C, 3]);
      const steps: Tensor[] = [];
      for (let t = 0; t < L; t++) {
        steps.push(causalConv1dStep(rt.tensor(slice(t, t + 1), [B, C]), tw, tb, state, { silu: true }));
      }
      const got = await readAll(rt, [a.out, bChunk.out, bChunk.finalState!, state, ...steps]);
      const refSlice = (t0: number, t1: number) => {
        const o = new Float64Array(B * (t1 - t0) * C);
        for (let b = 0; b < B; b++) {
          o.set(ref.out.subarray((b * L + t0) * C, (b * L + t1) * C), b * (t1 - t0) * C);
        }
        return o;
      };
      assertClose(got[0], refSlice(0, split), F32_TOL, "prefill chunk 1");
      assertClose(got[1], refSlice(split, L), F32_TOL, "prefill chunk 2");
      assertClose(got[2], ref.fin, { rtol: 0, atol: 0 }, "chunked final state");
      assertClose(got[3], ref.fin, { rtol: 0, atol: 0 }, "decode state");
      for (let t = 0; t < L; t++) {
        assertClose(got[4 + t], refSlice(t, t + 1), F32_TOL, `decode step ${t}`);
      }
    });
  },
);

Deno.test(
  "conv1d circular state: verify K+1 tokens, roll back rejected drafts by moving the index",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("conv1d-ring");
    const [B, C, K, P, rounds] = [3, 10, 3, 5, 6];
    const T = K + 1;
    const w = randn(rng, C * 4, 0.5), bias = randn(rng, C, 0.2);
    const prompt = randn(rng, B * P * C);
    // history[b][c] = inputs kept so far, prompt first
    const history = Array.from(
      { length: B },
      (_, b) =>
        Array.from({ length: C }, (_, c) => Array.from({ length: P }, (_, t) => prompt[(b * P + t) * C + c])),
    );
    const expected: Float64Array[] = [];
    const outs: Tensor[] = [];
    await rt.scope(async () => {
      const tw = rt.tensor(w, [C, 4]), tb = rt.tensor(bias, [C]);
      const pre = causalConv1d(rt.tensor(prompt, [B, P, C]), tw, tb, { finalState: true, silu: true });
      const ring = convRingFromState(pre.finalState!, 3 + K);
      try {
        for (let r = 0; r < rounds; r++) {
          const xr = randn(rng, B * T * C);
          // rows keep different numbers of tokens, 1..T, as acceptance does
          const kept = Array.from({ length: B }, () => 1 + rng.int(T));
          const exp = new Float64Array(B * T * C);
          for (let b = 0; b < B; b++) {
            for (let c = 0; c < C; c++) {
              const h = history[b][c];
              const seq = [...h, ...Array.from({ length: T }, (_, t) => xr[(b * T + t) * C + c])];
              for (let t = 0; t < T; t++) {
                const n = h.length + t;
                let s = bias[c];
                for (let k = 0; k < 4; k++) s += w[c * 4 + k] * (n - 3 + k >= 0 ? seq[n - 3 + k] : 0);
                exp[(b * T + t) * C + c] = s * sig(s);
              }
              h.push(...seq.slice(h.length, h.length + kept[b]));
            }
          }
          outs.push(causalConv1dRing(rt.tensor(xr, [B, T, C]), tw, tb, ring, { silu: true }).keep());
          expected.push(exp);
          advanceConvRing(ring, rt.tensor(kept, [B], "u32"));
        }
        const state = convStateFromRing(ring);
        const got = await readAll(rt, [...outs, state]);
        for (let r = 0; r < rounds; r++) assertClose(got[r], expected[r], F32_TOL, `round ${r}`);
        const expState = new Float64Array(B * C * 3);
        for (let b = 0; b < B; b++) {
          for (let c = 0; c < C; c++) {
            const h = history[b][c];
            for (let j = 0; j < 3; j++) expState[(b * C + c) * 3 + j] = h[h.length - 3 + j];
          }
        }
        assertClose(got[rounds], expState, { rtol: 0, atol: 0 }, "window after the last round");
      } finally {
        ring.ring.dispose();
        ring.pos.dispose();
        for (const o of outs) o.dispose();
      }
    });
  },
);

Deno.test("conv1d circular state: constant advance and too few slots", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("conv1d-ring-const");
  const [B, C] = [1, 4];
  const w = randn(rng, C * 4), bias = randn(rng, C);
  await rt.scope(async () => {
    const tw = rt.tensor(w, [C, 4]), tb = rt.tensor(bias, [C]);
    const state0 = randn(rng, B * C * 3);
    const ring = convRingFromState(rt.tensor(state0, [B, C, 3]), 4);
    try {
      // plain decode through a 4-slot ring: one token, advance 1, repeated wraps around the buffer
      const xs = randn(rng, 6 * C);
      for (let t = 0; t < 6; t++) {
        causalConv1dRing(rt.tensor(xs.subarray(t * C, (t + 1) * C), [B, 1, C]), tw, tb, ring);
        advanceConvRing(ring, 1);
      }
      const got = await readAll(rt, [convStateFromRing(ring)]);
      const exp = new Float64Array(C * 3);
      for (let c = 0; c < C; c++) for (let j = 0; j < 3; j++) exp[c * 3 + j] = xs[(3 + j) * C + c];
      assertClose(got[0], exp, { rtol: 0, atol: 0 }, "window after 6 single steps");
      assert.throws(() => causalConv1dRing(rt.tensor(randn(rng, 3 * C), [B, 3, C]), tw, tb, ring), /slots/);
    } finally {
      ring.ring.dispose();
      ring.pos.dispose();
    }
  });
});

Deno.test("conv1d on f16 storage stays within f16 tolerance", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) {
    console.warn("conv1d f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)");
    return;
  }
  const rng = testRng("conv1d-f16");
  const [B, L, C] = [2, 13, 12];
  const f16 = (a: Float64Array) => a.map((v) => Math.f16round(v));
  const x = f16(randn(rng, B * L * C)), w = f16(randn(rng, C * 4, 0.5)), bias = f16(randn(rng, C, 0.2));
  const wo = f16(randn(rng, B * L * C));
  const ref = refConv(x, w, bias, null, B, L, C, true);
  await rt.scope(async () => {
    const tx = rt.tensor(x, [B, L, C], "f16"),
      tw = rt.tensor(w, [C, 4], "f16"),
      tb = rt.tensor(bias, [C], "f16");
    tx.requiresGrad = tw.requiresGrad = true;
    const { out } = causalConv1d(tx, tw, tb, { silu: true });
    rt.backward(out, rt.tensor(wo, out.shape, "f16"));
    const [o, gw] = await readAll(rt, [out, tw.grad!]);
    assertClose(o, ref.out, F16_TOL, "f16 forward");
    const loss = () => {
      const r = refConv(x, w, bias, null, B, L, C, true);
      let s = 0;
      for (let i = 0; i < r.out.length; i++) s += r.out[i] * wo[i];
      return s;
    };
    // the weight grad sums 26 terms and is rounded to f16 once
    assertClose(gw, finiteDifference(loss, w), { rtol: 1e-2, atol: 1e-2 }, "f16 grad weight");
    tx.grad!.dispose();
    tw.grad!.dispose();
  });
});
