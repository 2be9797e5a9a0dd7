import {
  type ScanVerifyInputs,
  selectiveScan,
  selectiveScanStep,
  selectiveScanVerify,
} from "../../runtime/ops/selective_scan.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import { hostArray, type Tensor } from "../../runtime/tensor.ts";
import type { Rng } from "../../util/rng.ts";
import {
  assertClose,
  finiteDifference,
  gpuTestOptions,
  randn,
  randu,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";

// ---- float64 reference: the sequential recurrence of method.md 1.2 ------------------------------------------

interface Dims {
  B: number;
  L: number;
  Dn: number;
  N: number;
  GB: number;
  GC: number;
}

interface Inputs {
  x: Float64Array;
  delta: Float64Array;
  A: Float64Array;
  Bm: Float64Array;
  Cm: Float64Array;
  D: Float64Array;
  h0: Float64Array | null;
}

function refScan(d: Dims, v: Inputs): { y: Float64Array; hL: Float64Array } {
  const { B, L, Dn, N, GB, GC } = d;
  const y = new Float64Array(B * L * Dn);
  const hL = new Float64Array(B * Dn * N);
  const h = new Float64Array(N);
  for (let b = 0; b < B; b++) {
    for (let c = 0; c < Dn; c++) {
      const gb = Math.floor(c / (Dn / GB)), gc = Math.floor(c / (Dn / GC));
      for (let n = 0; n < N; n++) h[n] = v.h0 ? v.h0[(b * Dn + c) * N + n] : 0;
      for (let t = 0; t < L; t++) {
        const row = b * L + t;
        const dt = v.delta[row * Dn + c], xv = v.x[row * Dn + c];
        let s = v.D[c] * xv;
        for (let n = 0; n < N; n++) {
          h[n] = Math.exp(dt * v.A[c * N + n]) * h[n] + dt * v.Bm[(row * GB + gb) * N + n] * xv;
          s += v.Cm[(row * GC + gc) * N + n] * h[n];
        }
        y[row * Dn + c] = s;
      }
      for (let n = 0; n < N; n++) hL[(b * Dn + c) * N + n] = h[n];
    }
  }
  return { y, hL };
}

/** Fresh inputs in the ranges a Mamba1 layer sees: delta > 0 (softplus'ed), A = -exp(A_log) in [-16, -1]. */
function randomInputs(rng: Rng, d: Dims, withH0: boolean): Inputs {
  const { B, L, Dn, N, GB, GC } = d;
  return {
    x: randn(rng, B * L * Dn),
    delta: randu(rng, B * L * Dn, 0.01, 0.8),
    A: randu(rng, Dn * N, -16, -1),
    Bm: randn(rng, B * L * GB * N),
    Cm: randn(rng, B * L * GC * N),
    D: randu(rng, Dn, 0.5, 1.5),
    h0: withH0 ? randn(rng, B * Dn * N) : null,
  };
}

function upload(rt: Runtime, d: Dims, v: Inputs, dtype: "f32" | "f16" = "f32") {
  const { B, L, Dn, N, GB, GC } = d;
  return {
    x: rt.tensor(v.x, [B, L, Dn], dtype),
    delta: rt.tensor(v.delta, [B, L, Dn], dtype),
    A: rt.tensor(v.A, [Dn, N], dtype),
    Bm: rt.tensor(v.Bm, [B, L, GB, N], dtype),
    Cm: rt.tensor(v.Cm, [B, L, GC * N], dtype),
    D: rt.tensor(v.D, [Dn], dtype),
    h0: v.h0 ? rt.tensor(v.h0, [B, Dn, N]) : null,
  };
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

// Recurrences of up to 40 steps in f32 vs float64: errors grow with the length of the state's memory
const SCAN_TOL = { rtol: 2e-5, atol: 2e-5 };

// Shapes: [B, L, Dn, N, GB, GC]
// - Mamba1-like grouping, B un-repeated: one B group for 48 channels, C groups of 16, N = 16
// - odd sizes: N = 4, B groups of 5 channels, C per channel (group width 60 in the backward)
// - B groups wider than a backward workgroup (128 channels per group: partial sums)
const SHAPES: Dims[] = [
  { B: 2, L: 37, Dn: 48, N: 16, GB: 1, GC: 3 },
  { B: 3, L: 11, Dn: 10, N: 4, GB: 2, GC: 10 },
  { B: 1, L: 9, Dn: 128, N: 8, GB: 1, GC: 8 },
];

// [chunkLength, parallel]
const CHUNKINGS: [number | undefined, boolean | undefined][] = [
  [undefined, undefined],
  [undefined, false],
  [5, true],
  [5, false],
  [12, true],
  [1, true],
];

Deno.test(
  "selective scan forward vs the float64 recurrence, sequential and parallel chunks",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("scan-fwd");
    for (const d of SHAPES) {
      for (const withH0 of [false, true]) {
        const v = randomInputs(rng, d, withH0);
        const ref = refScan(d, v);
        await rt.scope(async () => {
          const t = upload(rt, d, v);
          const outs: Tensor[] = [];
          for (const [chunkLength, parallelChunks] of CHUNKINGS) {
            const r = selectiveScan(t.x, t.delta, t.A, t.Bm, t.Cm, t.D, {
              initialState: t.h0,
              finalState: true,
              chunkLength,
              parallelChunks,
            });
            outs.push(r.y, r.finalState!);
          }
          const got = await readAll(rt, outs);
          CHUNKINGS.forEach(([cl, par], i) => {
            const label = `${JSON.stringify(d)} h0=${withH0} chunk=${cl} parallel=${par}`;
            assertClose(got[2 * i], ref.y, SCAN_TOL, `y ${label}`);
            assertClose(got[2 * i + 1], ref.hL, SCAN_TOL, `final state ${label}`);
          });
        });
      }
    }
  },
);

Deno.test(
  "selective scan backward: every input and the initial state vs finite differences",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("scan-bwd");
    const shapes: Dims[] = [
      { B: 2, L: 13, Dn: 12, N: 4, GB: 1, GC: 3 },
      { B: 1, L: 10, Dn: 128, N: 2, GB: 1, GC: 8 },
    ];
    for (const d of shapes) {
      for (const [chunkLength, parallelChunks] of [[4, false], [4, true], [undefined, undefined]] as const) {
        const v = randomInputs(rng, d, true);
        const wy = randn(rng, d.B * d.L * d.Dn), wf = randn(rng, d.B * d.Dn * d.N);
        const loss = () => {
          const r = refScan(d, v);
          let s = 0;
          for (let i = 0; i < r.y.length; i++) s += r.y[i] * wy[i];
          for (let i = 0; i < r.hL.length; i++) s += r.hL[i] * wf[i];
          return s;
        };
        await rt.scope(async () => {
          const t = upload(rt, d, v);
          const leaves = [t.x, t.delta, t.A, t.Bm, t.Cm, t.D, t.h0!];
          for (const l of leaves) l.requiresGrad = true;
          const r = selectiveScan(t.x, t.delta, t.A, t.Bm, t.Cm, t.D, {
            initialState: t.h0,
            finalState: true,
            chunkLength,
            parallelChunks,
          });
          rt.backward(projection(rt, [r.y, r.finalState!], [wy, wf]));
          const got = await readAll(rt, leaves.map((l) => l.grad!));
          const names = ["x", "delta", "A", "B", "C", "D", "h0"];
          const host = [v.x, v.delta, v.A, v.Bm, v.Cm, v.D, v.h0!];
          for (let i = 0; i < names.length; i++) {
            const idx = sampleIndices(rng, host[i].length, 24);
            assertClose(
              idx.map((j) => got[i][j]),
              finiteDifference(loss, host[i], idx),
              // grads sum over up to 26 steps and 128 channels of one group, in f32
              { rtol: 2e-4, atol: 2e-4 },
              `grad ${names[i]} ${JSON.stringify(d)} chunk=${chunkLength} parallel=${parallelChunks}`,
            );
          }
          for (const l of leaves) l.grad!.dispose();
        });
      }
    }
  },
);

Deno.test(
  "selective scan: chunked prefill and step-by-step decode equal the full-sequence forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("scan-decode");
    const d: Dims = { B: 2, L: 9, Dn: 32, N: 16, GB: 1, GC: 2 };
    const v = randomInputs(rng, d, false);
    const ref = refScan(d, v);
    const { B, L, Dn, N, GB, GC } = d;
    const sliceT = (a: Float64Array, per: number, t0: number, t1: number) => {
      const o = new Float64Array(B * (t1 - t0) * per);
      for (let b = 0; b < B; b++) {
        o.set(
          a.subarray((b * L + t0) * per, (b * L + t1) * per),
          b * (t1 - t0) * per,
        );
      }
      return o;
    };
    const split = 4;
    await rt.scope(async () => {
      const A = rt.tensor(v.A, [Dn, N]), D = rt.tensor(v.D, [Dn]);
      const part = (t0: number, t1: number) => ({
        x: rt.tensor(sliceT(v.x, Dn, t0, t1), [B, t1 - t0, Dn]),
        delta: rt.tensor(sliceT(v.delta, Dn, t0, t1), [B, t1 - t0, Dn]),
        Bm: rt.tensor(sliceT(v.Bm, GB * N, t0, t1), [B, t1 - t0, GB, N]),
        Cm: rt.tensor(sliceT(v.Cm, GC * N, t0, t1), [B, t1 - t0, GC, N]),
      });
      const p1 = part(0, split), p2 = part(split, L);
      const r1 = selectiveScan(p1.x, p1.delta, A, p1.Bm, p1.Cm, D, { finalState: true });
      const r2 = selectiveScan(p2.x, p2.delta, A, p2.Bm, p2.Cm, D, {
        initialState: r1.finalState,
        finalState: true,
      });
      const state = rt.zeros([B, Dn, N]);
      const steps: Tensor[] = [];
      for (let t = 0; t < L; t++) {
        const p = part(t, t + 1);
        steps.push(selectiveScanStep(p.x.view([B, Dn]), p.delta.view([B, Dn]), A, p.Bm, p.Cm, D, state));
      }
      const got = await readAll(rt, [r1.y, r2.y, r2.finalState!, state, ...steps]);
      assertClose(got[0], sliceT(ref.y, Dn, 0, split), SCAN_TOL, "prefill chunk 1");
      assertClose(got[1], sliceT(ref.y, Dn, split, L), SCAN_TOL, "prefill chunk 2");
      assertClose(got[2], ref.hL, SCAN_TOL, "chunked final state");
      assertClose(got[3], ref.hL, SCAN_TOL, "decode state");
      for (let t = 0; t < L; t++) {
        assertClose(got[4 + t], sliceT(ref.y, Dn, t, t + 1), SCAN_TOL, `decode step ${t}`);
      }
    });
  },
);

Deno.test(
  "selective scan on f16 storage (f32 state) stays within f16 tolerance",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn(
        "selective scan f16: adapter has no shader-f16 (install mesa-vulkan-drivers for lavapipe)",
      );
      return;
    }
    const rng = testRng("scan-f16");
    const d: Dims = { B: 2, L: 17, Dn: 32, N: 16, GB: 1, GC: 2 };
    const v = randomInputs(rng, d, false);
    for (const k of ["x", "delta", "A", "Bm", "Cm", "D"] as const) v[k] = v[k].map((e) => Math.f16round(e));
    const ref = refScan(d, v);
    await rt.scope(async () => {
      const t = upload(rt, d, v, "f16");
      t.x.requiresGrad = true;
      const r = selectiveScan(t.x, t.delta, t.A, t.Bm, t.Cm, t.D, { chunkLength: 8 });
      const wy = randn(rng, d.B * d.L * d.Dn).map((e) => Math.f16round(e));
      rt.backward(r.y, rt.tensor(wy, r.y.shape, "f16"));
      const [y, gx] = await readAll(rt, [r.y, t.x.grad!]);
      // y sums 16 states of magnitude up to ~5: an f16 output rounding of about 1e-3 relative, plus the inputs'
      assertClose(y, ref.y, { rtol: 1e-2, atol: 1e-2 }, "f16 y");
      const loss = () => {
        const o = refScan(d, v).y;
        let s = 0;
        for (let i = 0; i < o.length; i++) s += o[i] * wy[i];
        return s;
      };
      const idx = sampleIndices(rng, v.x.length, 20);
      assertClose(
        idx.map((i) => gx[i]),
        finiteDifference(loss, v.x, idx),
        { rtol: 2e-2, atol: 2e-2 },
        "f16 grad x",
      );
      t.x.grad!.dispose();
    });
  },
);

Deno.test(
  "selective scan verify: snapshot + re-applied accepted steps + K+1 new tokens equal the recurrence",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("scan-verify");
    const [B, Dn, N, GB, GC, P, K, rounds] = [3, 24, 16, 1, 2, 6, 3, 5];
    const T = K + 1;
    const A = randu(rng, Dn * N, -16, -1), Dp = randu(rng, Dn, 0.5, 1.5);
    const prompt = randomInputs(rng, { B, L: P, Dn, N, GB, GC }, false);
    prompt.A = A;
    prompt.D = Dp;
    // float64 state after everything accepted so far, per row
    const hRef = refScan({ B, L: P, Dn, N, GB, GC }, prompt).hL;
    /** Advances rows' states through `steps` tokens of round inputs v [B, T, ...], returning y [B, T, Dn]. */
    const advance = (h: Float64Array, v: Inputs, steps: number[]) => {
      const y = new Float64Array(B * T * Dn);
      for (let b = 0; b < B; b++) {
        for (let c = 0; c < Dn; c++) {
          const gb = Math.floor(c / (Dn / GB)), gc = Math.floor(c / (Dn / GC));
          for (let t = 0; t < steps[b]; t++) {
            const row = b * T + t;
            const dt = v.delta[row * Dn + c], xv = v.x[row * Dn + c];
            let s = Dp[c] * xv;
            for (let n = 0; n < N; n++) {
              const i = (b * Dn + c) * N + n;
              h[i] = Math.exp(dt * A[c * N + n]) * h[i] + dt * v.Bm[(row * GB + gb) * N + n] * xv;
              s += v.Cm[(row * GC + gc) * N + n] * h[i];
            }
            y[row * Dn + c] = s;
          }
        }
      }
      return y;
    };
    await rt.scope(async () => {
      const tA = rt.tensor(A, [Dn, N]), tD = rt.tensor(Dp, [Dn]);
      const tp = upload(rt, { B, L: P, Dn, N, GB, GC }, prompt);
      const state = selectiveScan(tp.x, tp.delta, tA, tp.Bm, tp.Cm, tD, { finalState: true }).finalState!;
      let previous: { cache: ScanVerifyInputs; kept: Tensor } | null = null;
      const ys: Tensor[] = [];
      const expected: Float64Array[] = [];
      for (let r = 0; r < rounds; r++) {
        const v = randomInputs(rng, { B, L: T, Dn, N, GB, GC }, false);
        const t = upload(rt, { B, L: T, Dn, N, GB, GC }, v);
        const next = { x: t.x, delta: t.delta, B: t.Bm, C: t.Cm };
        ys.push(selectiveScanVerify(tA, tD, state, previous, next)!);
        expected.push(advance(Float64Array.from(hRef), v, Array(B).fill(T)));
        // rows accept different numbers of tokens (accepted drafts + 1, so 1..T)
        const kept = Array.from({ length: B }, () => 1 + rng.int(T));
        advance(hRef, v, kept);
        previous = { cache: next, kept: rt.tensor(kept, [B], "u32") };
      }
      // commit the last round's accepted steps without new tokens
      selectiveScanVerify(tA, tD, state, previous, null);
      const got = await readAll(rt, [...ys, state]);
      for (let r = 0; r < rounds; r++) assertClose(got[r], expected[r], SCAN_TOL, `round ${r} y`);
      assertClose(got[rounds], hRef, SCAN_TOL, "state after committing the accepted tokens");
    });
  },
);
