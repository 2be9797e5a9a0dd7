import assert from "node:assert/strict";
import {
  type SsdDims,
  ssdHeadParams,
  ssdScan,
  ssdStep,
  ssdVerify,
  ssdVerifyCache,
} from "../../runtime/ops/ssd.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import {
  assertClose,
  gpuTestOptions,
  maxAbsDiff,
  randn,
  randu,
  roundF16,
  testRng,
  testRuntime,
  type Tolerance,
} from "../helpers/gpu.ts";
import { softplusRef, ssdForwardRef } from "../reference/ssd.ts";

// f32 state updated step by step vs float64: errors relative to the output's scale (sums over N per step, decays
// compounding over the steps), about 1e-5.
const REL = 1e-5;
function scaled(expected: ArrayLike<number>, rel = REL): Tolerance {
  let m = 0;
  for (let i = 0; i < expected.length; i++) m = Math.max(m, Math.abs(expected[i]));
  return { rtol: rel, atol: rel * m };
}

async function readAll(rt: Runtime, ts: Tensor[]): Promise<Float32Array[]> {
  const bufs = await rt.dev.readMany(ts.map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })));
  return bufs.map((b) => new Float32Array(b));
}

const HEADS = 4;
const DIMS: SsdDims = { headsX: 2, headsB: 1, headsC: 4, dimP: 6, dimN: 21 }; // N > 16: two registers per lane
const W = DIMS.headsX * DIMS.dimP + (DIMS.headsB + DIMS.headsC) * DIMS.dimN;

/** Per-head A (negative: decays), D and dt bias. */
function headScalars(rng: ReturnType<typeof testRng>) {
  return { A: randu(rng, HEADS, -2, -0.5), D: randu(rng, HEADS, 0.5, 1.5), bias: randu(rng, HEADS, -1, 0.5) };
}

/** Per-token float64 inputs in the packed layout, plus the unpacked views the reference wants. */
function tokens(rng: ReturnType<typeof testRng>, batch: number, T: number) {
  const xbc = randn(rng, batch * T * W);
  const dtRaw = randu(rng, batch * T * HEADS, -3, 1);
  return { xbc, dtRaw, T, batch };
}

function unpack(t: ReturnType<typeof tokens>, bias: Float64Array) {
  const { batch, T } = t;
  const wx = DIMS.headsX * DIMS.dimP, wb = DIMS.headsB * DIMS.dimN;
  const x = new Float64Array(batch * T * wx), Bm = new Float64Array(batch * T * wb);
  const C = new Float64Array(batch * T * DIMS.headsC * DIMS.dimN);
  for (let i = 0; i < batch * T; i++) {
    x.set(t.xbc.subarray(i * W, i * W + wx), i * wx);
    Bm.set(t.xbc.subarray(i * W + wx, i * W + wx + wb), i * wb);
    C.set(t.xbc.subarray(i * W + wx + wb, (i + 1) * W), i * (W - wx - wb));
  }
  const delta = t.dtRaw.map((v, i) => softplusRef(v + bias[i % HEADS]));
  return { x, Bm, C, delta };
}

/** Slices batch row b, tokens [t0, t1) of a [B, T, ...] array with `w` values per token. */
function rows(a: Float64Array, T: number, w: number, b: number, t0: number, t1: number): Float64Array {
  return a.slice((b * T + t0) * w, (b * T + t1) * w);
}

/** float64: run batch row b from state S over tokens [t0, t1): returns y and the state after. */
function refRun(
  u: ReturnType<typeof unpack>,
  T: number,
  b: number,
  t0: number,
  t1: number,
  S: Float64Array,
  A: Float64Array,
  D: Float64Array,
) {
  const s = { batch: 1, seqlen: t1 - t0, heads: HEADS, ...DIMS };
  return ssdForwardRef(s, {
    x: rows(u.x, T, DIMS.headsX * DIMS.dimP, b, t0, t1),
    Bm: rows(u.Bm, T, DIMS.headsB * DIMS.dimN, b, t0, t1),
    C: rows(u.C, T, DIMS.headsC * DIMS.dimN, b, t0, t1),
    delta: rows(u.delta, T, HEADS, b, t0, t1),
    A,
    D,
    init: S,
  });
}

Deno.test(
  "ssd decode: prefill with the chunked scan, then single steps, equals the sequential recurrence",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("ssd-step-decode");
    const batch = 2, L = 13, L0 = 6;
    const { A, D, bias } = headScalars(rng);
    const t = tokens(rng, batch, L);
    const u = unpack(t, bias);
    const ref = ssdForwardRef({ batch, seqlen: L, heads: HEADS, ...DIMS }, { ...u, A, D });
    await rt.scope(async () => {
      const tA = rt.tensor(A, [HEADS]), tD = rt.tensor(D, [HEADS]), tBias = rt.tensor(bias, [HEADS]);
      const xbc = rt.tensor(t.xbc, [batch, L, W]), dt = rt.tensor(t.dtRaw, [batch, L, HEADS]);
      // prefill: the first L0 tokens through the chunked scan (chunk 4: two full chunks and a partial one)
      const pre = ssdScan({
        xBC: rt.tensor(prefix(t.xbc, L, W, L0, batch), [batch, L0, W]),
        dims: DIMS,
        dt: rt.tensor(prefix(t.dtRaw, L, HEADS, L0, batch), [batch, L0, HEADS]),
        A: tA,
        D: tD,
        dtBias: tBias,
      }, { chunkSize: 4 });
      const state = pre.finalState;
      const heads = ssdHeadParams(tA, tD, tBias);
      // decode the rest one token at a time, reading token j of the [B, L, W] block in place
      const ys: Tensor[] = [];
      for (let j = L0; j < L; j++) ys.push(ssdStep({ state, xBC: xbc, dt, heads, dims: DIMS, token: j }));
      const got = await readAll(rt, [pre.y, state, ...ys]);
      const yPre = new Float64Array(batch * L0 * HEADS * DIMS.dimP);
      for (let b = 0; b < batch; b++) {
        yPre.set(rows(ref.y, L, HEADS * DIMS.dimP, b, 0, L0), b * L0 * HEADS * DIMS.dimP);
      }
      assertClose(got[0], yPre, scaled(yPre), "prefill y");
      assertClose(got[1], ref.final, scaled(ref.final), "state after decoding");
      for (let j = L0; j < L; j++) {
        const want = new Float64Array(batch * HEADS * DIMS.dimP);
        for (let b = 0; b < batch; b++) {
          want.set(rows(ref.y, L, HEADS * DIMS.dimP, b, j, j + 1), b * HEADS * DIMS.dimP);
        }
        assertClose(got[2 + j - L0], want, scaled(want), `decoded y at position ${j}`);
      }
    });
  },
);

function prefix(a: Float64Array, T: number, w: number, n: number, batch: number): Float64Array {
  const out = new Float64Array(batch * n * w);
  for (let b = 0; b < batch; b++) out.set(rows(a, T, w, b, 0, n), b * n * w);
  return out;
}

Deno.test(
  "ssd verify: the fused kernel equals unfused single steps and float64, for K in 1..8 and every accepted count",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("ssd-verify");
    const batch = 2;
    const { A, D, bias } = headScalars(rng);
    const S0 = randn(rng, batch * HEADS * DIMS.dimP * DIMS.dimN);
    const perState = HEADS * DIMS.dimP * DIMS.dimN;
    await rt.scope(async () => {
      const tA = rt.tensor(A, [HEADS]), tD = rt.tensor(D, [HEADS]), tBias = rt.tensor(bias, [HEADS]);
      const heads = ssdHeadParams(tA, tD, tBias);
      const checks: { label: string; got: Tensor; want: Float64Array; unfused?: Tensor }[] = [];
      for (let K = 1; K <= 8; K++) {
        const K1 = K + 1;
        const old = tokens(rng, batch, K1), cur = tokens(rng, batch, K1);
        const uOld = unpack(old, bias), uCur = unpack(cur, bias);
        const oldX = rt.tensor(old.xbc, [batch, K1, W]), oldDt = rt.tensor(old.dtRaw, [batch, K1, HEADS]);
        const curX = rt.tensor(cur.xbc, [batch, K1, W]), curDt = rt.tensor(cur.dtRaw, [batch, K1, HEADS]);
        for (let acc = 0; acc <= K1; acc++) {
          const accepted = [acc, K1 - acc]; // the two batch rows accept different counts
          // fused: a first pass over the old tokens fills the cache (and must not move the snapshot), then the pass
          // under test re-applies the accepted old steps and runs the new tokens
          const state = rt.tensor(S0, [batch, HEADS, DIMS.dimP, DIMS.dimN]);
          const cache = ssdVerifyCache(rt, batch, HEADS, K1, DIMS);
          const yOld = ssdVerify({
            state,
            cache,
            parity: 0,
            accepted: rt.tensor([0, 0], [batch], "u32"),
            xBC: oldX,
            dt: oldDt,
            heads,
            dims: DIMS,
          });
          const yNew = ssdVerify({
            state,
            cache,
            parity: 1,
            accepted: rt.tensor(accepted, [batch], "u32"),
            xBC: curX,
            dt: curDt,
            heads,
            dims: DIMS,
          });
          // unfused: single steps from the snapshot over the accepted old tokens, then the new ones
          const states = [0, 1].map((b) =>
            rt.tensor(S0.subarray(b * perState, (b + 1) * perState), [1, HEADS, DIMS.dimP, DIMS.dimN])
          );
          const stepY: Tensor[][] = [[], []];
          for (let b = 0; b < batch; b++) {
            const ox = rt.tensor(rows(old.xbc, K1, W, b, 0, K1), [1, K1, W]);
            const od = rt.tensor(rows(old.dtRaw, K1, HEADS, b, 0, K1), [1, K1, HEADS]);
            const cx = rt.tensor(rows(cur.xbc, K1, W, b, 0, K1), [1, K1, W]);
            const cd = rt.tensor(rows(cur.dtRaw, K1, HEADS, b, 0, K1), [1, K1, HEADS]);
            for (let j = 0; j < accepted[b]; j++) {
              ssdStep({ state: states[b], xBC: ox, dt: od, heads, dims: DIMS, token: j });
            }
            for (let j = 0; j < K1; j++) {
              stepY[b].push(ssdStep({ state: states[b], xBC: cx, dt: cd, heads, dims: DIMS, token: j }));
            }
          }
          // float64
          const wantY = new Float64Array(batch * K1 * HEADS * DIMS.dimP);
          const wantSnap = new Float64Array(S0.length);
          const wantOld = new Float64Array(wantY.length);
          for (let b = 0; b < batch; b++) {
            const s0 = S0.slice(b * perState, (b + 1) * perState);
            const snap = accepted[b] > 0 ? refRun(uOld, K1, b, 0, accepted[b], s0, A, D).final : s0;
            wantSnap.set(snap, b * perState);
            wantY.set(refRun(uCur, K1, b, 0, K1, snap, A, D).y, b * K1 * HEADS * DIMS.dimP);
            wantOld.set(refRun(uOld, K1, b, 0, K1, s0, A, D).y, b * K1 * HEADS * DIMS.dimP);
          }
          const label = `K=${K} accepted=${accepted}`;
          checks.push({ label: `${label} y`, got: yNew, want: wantY });
          checks.push({ label: `${label} new snapshot`, got: state, want: wantSnap });
          if (acc === 0) checks.push({ label: `${label} y of the first pass`, got: yOld, want: wantOld });
          // the unfused outputs, rearranged to [B, K1, H, P] on the CPU after reading
          for (let b = 0; b < batch; b++) {
            for (let j = 0; j < K1; j++) {
              const want = wantY.slice(
                (b * K1 + j) * HEADS * DIMS.dimP,
                (b * K1 + j + 1) * HEADS * DIMS.dimP,
              );
              checks.push({
                label: `${label} unfused y[b=${b}, j=${j}]`,
                got: stepY[b][j],
                want,
                unfused: yNew,
              });
            }
          }
          if (K === 8 && acc === 3) {
            // the cache half written by the second pass holds the new tokens' x, B and delta
            checks.push({
              label: "cache after K=8",
              got: cache,
              want: expectedCache([cur, old], [uCur, uOld], batch, K1),
            });
          }
        }
      }
      const got = await readAll(rt, checks.map((c) => c.got));
      let worstFusedVsUnfused = 0;
      const fusedByTensor = new Map<Tensor, Float32Array>();
      checks.forEach((c, i) => {
        if (!c.label.startsWith("cache")) fusedByTensor.set(c.got, got[i]);
      });
      checks.forEach((c, i) => {
        if (c.label.startsWith("cache")) {
          assertClose(got[i], c.want, { rtol: 1e-6, atol: 1e-7 }, c.label);
          return;
        }
        assertClose(got[i], c.want, scaled(c.want), c.label);
        if (c.unfused) {
          // same arithmetic in the same order: fused and unfused agree to rounding
          const m = c.label.match(/b=(\d+), j=(\d+)/)!;
          const b = Number(m[1]), j = Number(m[2]);
          const K1 = c.unfused.shape[1];
          const fused = fusedByTensor.get(c.unfused)!.subarray(
            (b * K1 + j) * HEADS * DIMS.dimP,
            (b * K1 + j + 1) * HEADS * DIMS.dimP,
          );
          worstFusedVsUnfused = Math.max(worstFusedVsUnfused, maxAbsDiff(fused, got[i]));
          assertClose(fused, got[i], scaled(c.want, 1e-6), `${c.label}: fused vs unfused`);
        }
      });
      console.log(`ssd verify: max |fused - unfused| = ${worstFusedVsUnfused}`);
    });
  },
);

/** The cache expected after the two passes: half 0 holds the second pass's tokens, half 1 the first's. */
function expectedCache(
  ts: ReturnType<typeof tokens>[],
  us: ReturnType<typeof unpack>[],
  batch: number,
  K1: number,
): Float64Array {
  const wx = DIMS.headsX * DIMS.dimP, wb = DIMS.headsB * DIMS.dimN, wc = wx + wb + HEADS;
  const out = new Float64Array(2 * batch * K1 * wc);
  for (let half = 0; half < 2; half++) {
    for (let b = 0; b < batch; b++) {
      for (let j = 0; j < K1; j++) {
        const o = ((half * batch + b) * K1 + j) * wc;
        const i = b * K1 + j;
        out.set(ts[half].xbc.subarray(i * W, i * W + wx + wb), o);
        out.set(us[half].delta.subarray(i * HEADS, (i + 1) * HEADS), o + wx + wb);
      }
    }
  }
  return out;
}

Deno.test(
  "ssd decode on f16 storage: f16 xBC and dt read as they are, f32 state, f16 y, against float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn("ssd decode f16: adapter has no shader-f16");
      return;
    }
    const rng = testRng("ssd-step-f16");
    const batch = 2, L = 5;
    const { A, D, bias } = headScalars(rng);
    const raw = tokens(rng, batch, L);
    const t = { ...raw, xbc: roundF16(raw.xbc), dtRaw: roundF16(raw.dtRaw) }; // the reference sees the f16 values
    const u = unpack(t, bias);
    const S0 = randn(rng, batch * HEADS * DIMS.dimP * DIMS.dimN);
    const perState = HEADS * DIMS.dimP * DIMS.dimN;
    await rt.scope(async () => {
      const heads = ssdHeadParams(rt.tensor(A, [HEADS]), rt.tensor(D, [HEADS]), rt.tensor(bias, [HEADS]));
      const xbc = rt.tensor(t.xbc, [batch, L, W], "f16"), dt = rt.tensor(t.dtRaw, [batch, L, HEADS], "f16");
      const state = rt.tensor(S0, [batch, HEADS, DIMS.dimP, DIMS.dimN]);
      const ys: Tensor[] = [];
      for (let j = 0; j < L; j++) ys.push(ssdStep({ state, xBC: xbc, dt, heads, dims: DIMS, token: j }));
      for (const y of ys) assert.equal(y.dtype, "f16");
      const [s32, ...y16] = await rt.dev.readMany(
        [state, ...ys].map((x) => ({ buffer: x.buffer, offset: 0, size: x.paddedByteLength })),
      );
      const gotS = new Float32Array(s32);
      for (let b = 0; b < batch; b++) {
        const ref = refRun(u, L, b, 0, L, S0.slice(b * perState, (b + 1) * perState), A, D);
        assertClose(
          gotS.subarray(b * perState, (b + 1) * perState),
          ref.final,
          scaled(ref.final),
          `state ${b}`,
        );
        const py = HEADS * DIMS.dimP;
        for (let j = 0; j < L; j++) {
          const got = new Float16Array(y16[j], b * py * 2, py);
          const want = ref.y.subarray(j * py, (j + 1) * py);
          // y is stored in f16: half an ulp is 2^-11 relative
          assertClose(got, want, scaled(want, 2e-3), `y ${b} step ${j}`);
        }
      }
    });
  },
);

Deno.test(
  "ssd verify on f16 storage: reads f16 as it is; state and cache as with f32 inputs, y their f16 rounding",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn("ssd verify f16: adapter has no shader-f16");
      return;
    }
    const rng = testRng("ssd-verify-f16");
    const batch = 2, K1 = 4;
    const { A, D, bias } = headScalars(rng);
    const old = tokens(rng, batch, K1), cur = tokens(rng, batch, K1);
    const S0 = randn(rng, batch * HEADS * DIMS.dimP * DIMS.dimN);
    await rt.scope(async () => {
      const heads = ssdHeadParams(rt.tensor(A, [HEADS]), rt.tensor(D, [HEADS]), rt.tensor(bias, [HEADS]));
      // the same f16-representable values as f32 and as f16 tensors: the kernel's f32 math sees equal inputs
      const run = (dtype: "f32" | "f16") => {
        const state = rt.tensor(S0, [batch, HEADS, DIMS.dimP, DIMS.dimN]);
        const cache = ssdVerifyCache(rt, batch, HEADS, K1, DIMS);
        const pass = (t: ReturnType<typeof tokens>, parity: 0 | 1, accepted: number[]) =>
          ssdVerify({
            state,
            cache,
            parity,
            accepted: rt.tensor(accepted, [batch], "u32"),
            xBC: rt.tensor(roundF16(t.xbc), [batch, K1, W], dtype),
            dt: rt.tensor(roundF16(t.dtRaw), [batch, K1, HEADS], dtype),
            heads,
            dims: DIMS,
          });
        pass(old, 0, [0, 0]);
        const y = pass(cur, 1, [3, 1]);
        return { y, state, cache };
      };
      const a = run("f32"), b = run("f16");
      assert.equal(b.y.dtype, "f16");
      const [y32, s32, c32, y16, s16, c16] = await rt.dev.readMany(
        [a.y, a.state, a.cache, b.y, b.state, b.cache].map((t) => ({
          buffer: t.buffer,
          offset: 0,
          size: t.paddedByteLength,
        })),
      );
      assert.deepEqual(new Float32Array(s16), new Float32Array(s32), "new snapshot");
      assert.deepEqual(new Float32Array(c16), new Float32Array(c32), "cache");
      const want = Float16Array.from(new Float32Array(y32));
      assert.deepEqual(new Float16Array(y16, 0, want.length), want, "y: the f32 result rounded to f16");
    });
  },
);
