import assert from "node:assert/strict";
import { attention, type AttentionOptions, attentionWithLse } from "../../runtime/ops/attention.ts";
import {
  chooseDkvTiles,
  chooseDqTiles,
  chooseForwardTiles,
  dkvSharedBytes,
  dqSharedBytes,
  forwardSharedBytes,
} from "../../kernels/attention.ts";
import {
  backwardSharedBytes,
  type BackwardTiles,
  chooseBackwardTiles,
  chooseForwardTilesV2,
  forwardSharedBytesV2,
  type ForwardTilesV2,
} from "../../kernels/attention_v2.ts";
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
} from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";
import { refAttention, refAttentionBackward, type RefAttentionShape } from "../reference/attention.ts";

interface Case extends Pick<RefAttentionShape, "B" | "T" | "H" | "Hkv" | "hd"> {
  window?: number;
  scale?: number;
  opts?: AttentionOptions;
  unbatched?: boolean;
}

// f32 sums over up to 128 dims and 100 keys: rounding stays near 1e-6 relative; 2e-5 leaves room for the
// online-softmax rescaling (exp of differences) without hiding indexing errors, which are O(1).
const FWD_TOL = { rtol: 2e-5, atol: 2e-6 };
// gradients sum over keys and query heads twice (dS then dK), with cancellation in dP - delta
const BWD_TOL = { rtol: 1e-4, atol: 2e-5 };

function refShape(c: Case): RefAttentionShape {
  return {
    B: c.B,
    T: c.T,
    H: c.H,
    Hkv: c.Hkv,
    hd: c.hd,
    S: c.T,
    qoff: 0,
    window: c.window ?? 0,
    scale: c.scale ?? 1 / Math.sqrt(c.hd),
  };
}

function label(c: Case): string {
  return `B${c.B} T${c.T} H${c.H}/${c.Hkv} hd${c.hd}${c.window ? ` W${c.window}` : ""}${
    c.opts?.tiles ? " " + JSON.stringify(c.opts.tiles) : ""
  }`;
}

/** Runs forward (and backward with random dO) for several cases with one batch of reads. */
async function checkCases(name: string, cases: Case[], backward: boolean): Promise<void> {
  const rt = await testRuntime();
  const rng = testRng(name);
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const pending = cases.map((c) => {
        const s = refShape(c);
        const qShape = c.unbatched ? [c.T, c.H, c.hd] : [c.B, c.T, c.H, c.hd];
        const kShape = c.unbatched ? [c.T, c.Hkv, c.hd] : [c.B, c.T, c.Hkv, c.hd];
        const q = randn(rng, c.B * c.T * c.H * c.hd);
        const k = randn(rng, c.B * c.T * c.Hkv * c.hd);
        const v = randn(rng, c.B * c.T * c.Hkv * c.hd);
        const g = randn(rng, q.length);
        const tq = rt.tensor(q, qShape), tk = rt.tensor(k, kShape), tv = rt.tensor(v, kShape);
        tq.requiresGrad = tk.requiresGrad = tv.requiresGrad = backward;
        const { out, lse } = attentionWithLse(tq, tk, tv, { window: c.window, scale: c.scale, ...c.opts });
        if (backward) rt.backward(out, rt.tensor(g, qShape));
        const reads = [out.read(), lse.read()];
        if (backward) reads.push(tq.grad!.read(), tk.grad!.read(), tv.grad!.read());
        return { c, s, q, k, v, g, reads: Promise.all(reads), grads: [tq, tk, tv] };
      });
      for (const p of pending) {
        const [out, lse, dq, dk, dv] = await p.reads;
        const ref = refAttention(p.s, p.q, p.k, p.v);
        assertClose(out, ref.out, FWD_TOL, `out ${label(p.c)}`);
        assertClose(lse, ref.lse, FWD_TOL, `lse ${label(p.c)}`);
        if (!backward) continue;
        const rb = refAttentionBackward(p.s, p.q, p.k, p.v, p.g);
        assertClose(dq, rb.dq, BWD_TOL, `dq ${label(p.c)}`);
        assertClose(dk, rb.dk, BWD_TOL, `dk ${label(p.c)}`);
        assertClose(dv, rb.dv, BWD_TOL, `dv ${label(p.c)}`);
        for (const t of p.grads) t.grad!.dispose();
      }
    }));
}

Deno.test(
  "attention forward: sizes off the tiles, GQA ratios 1/2/4, batch 2, vs float64",
  gpuTestOptions,
  async () => {
    const cases: Case[] = [];
    for (const T of [1, 7, 33, 100]) {
      for (const [H, Hkv] of [[2, 2], [4, 2], [8, 2]]) cases.push({ B: T === 33 ? 2 : 1, T, H, Hkv, hd: 16 });
    }
    cases.push({ B: 2, T: 20, H: 4, Hkv: 1, hd: 16, unbatched: false });
    cases.push({ B: 1, T: 9, H: 2, Hkv: 1, hd: 16, unbatched: true });
    cases.push({ B: 1, T: 37, H: 4, Hkv: 2, hd: 64 });
    cases.push({ B: 1, T: 19, H: 2, Hkv: 1, hd: 128 });
    cases.push({ B: 1, T: 13, H: 3, Hkv: 1, hd: 6, scale: 0.7 }); // hd not a multiple of 4, custom scale
    await checkCases("attn-fwd", cases, false);
  },
);

Deno.test("attention forward: sliding window (HF convention i - W < j <= i)", gpuTestOptions, async () => {
  await checkCases("attn-window", [
    { B: 2, T: 33, H: 4, Hkv: 2, hd: 16, window: 5 },
    { B: 1, T: 100, H: 2, Hkv: 1, hd: 16, window: 1 }, // each query sees only itself
    { B: 1, T: 70, H: 4, Hkv: 1, hd: 16, window: 40 },
    { B: 1, T: 7, H: 2, Hkv: 2, hd: 16, window: 64 }, // window longer than the sequence
  ], false);
});

Deno.test("attention backward: dq, dk, dv vs float64 analytic gradients", gpuTestOptions, async () => {
  await checkCases("attn-bwd", [
    { B: 1, T: 1, H: 2, Hkv: 1, hd: 16 },
    { B: 1, T: 7, H: 4, Hkv: 4, hd: 16 },
    { B: 2, T: 33, H: 4, Hkv: 2, hd: 16 },
    { B: 1, T: 100, H: 4, Hkv: 1, hd: 16 },
    { B: 1, T: 45, H: 8, Hkv: 2, hd: 16, window: 9 },
    { B: 1, T: 21, H: 2, Hkv: 1, hd: 64 },
    { B: 1, T: 11, H: 2, Hkv: 1, hd: 128 },
    { B: 1, T: 13, H: 3, Hkv: 1, hd: 6 },
  ], true);
});

Deno.test(
  "attention backward v1 kernels (kept for benchmarks): dq, dk, dv vs float64",
  gpuTestOptions,
  async () => {
    const v1 = { backwardKernels: "v1" as const };
    await checkCases("attn-bwd-v1", [
      { B: 2, T: 33, H: 4, Hkv: 2, hd: 16, opts: v1 },
      { B: 1, T: 45, H: 8, Hkv: 2, hd: 16, window: 9, opts: v1 },
      { B: 1, T: 21, H: 2, Hkv: 1, hd: 64, opts: v1 },
      { B: 1, T: 13, H: 3, Hkv: 1, hd: 6, opts: v1 },
    ], true);
  },
);

Deno.test("attention: every tile configuration gives the same answer", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const limit = rt.dev.limits.maxComputeWorkgroupStorageSize;
  // v1 backward kernels (kept for comparison benchmarks) with their own tiles
  const v1: AttentionOptions["tiles"][] = [
    {
      forward: { br: 8, bc: 8, tm: 1, tn: 4 },
      dq: { br: 8, bc: 8, tm: 1, tn: 4 },
      dkv: { bc: 8, br: 8, tk: 1, tr: 4 },
    },
    {
      forward: { br: 32, bc: 32, tm: 8, tn: 4 },
      dq: { br: 32, bc: 16, tm: 8, tn: 4 },
      dkv: { bc: 16, br: 16, tk: 4, tr: 4 },
    },
    {
      forward: { br: 64, bc: 64, tm: 4, tn: 8 },
      dq: { br: 16, bc: 16, tm: 2, tn: 8 },
      dkv: { bc: 32, br: 16, tk: 8, tr: 8 },
    },
  ];
  // v2 backward tiles: the smallest, both rectangles and 32x32 (the H200's choice at hd 64); each is two
  // compiled kernels per GQA ratio, and llvmpipe compiles the unrolled code slowly, so not every table entry
  const v2: BackwardTiles[] = [
    { br: 4, bc: 8 },
    { br: 16, bc: 16 },
    { br: 32, bc: 16 },
    { br: 16, bc: 32 },
    { br: 32, bc: 32 },
  ];
  // the default choices fit this device's workgroup memory, and the H200's 48 KiB gets the large tiles
  for (const hd of [8, 16, 64, 128]) {
    assert.ok(forwardSharedBytes(hd, chooseForwardTiles(hd, limit)) <= limit, `forward tiles for hd ${hd}`);
    assert.ok(dqSharedBytes(hd, chooseDqTiles(hd, limit)) <= limit, `dq tiles for hd ${hd}`);
    assert.ok(dkvSharedBytes(hd, chooseDkvTiles(hd, limit)) <= limit, `dkv tiles for hd ${hd}`);
    assert.ok(backwardSharedBytes(hd, chooseBackwardTiles(hd, limit)) <= limit, `v2 tiles for hd ${hd}`);
    assert.ok(
      forwardSharedBytesV2(hd, chooseForwardTilesV2(hd, limit)) <= limit,
      `v2 fwd tiles for hd ${hd}`,
    );
  }
  assert.deepEqual(chooseForwardTiles(64, 49152), { br: 64, bc: 64, tm: 4, tn: 8 });
  assert.deepEqual(chooseBackwardTiles(64, 49152), { br: 32, bc: 32 });
  assert.deepEqual(chooseForwardTilesV2(64, 49152), { br: 64, bc: 32 });
  // (the remaining defaults of the tables are exercised by the hd 16/64/128 cases above on this adapter)
  const cases: Case[] = v1.map((tiles, i) => ({
    B: 1,
    T: 29 + 6 * i,
    H: 4,
    Hkv: 2,
    hd: 16,
    window: i === 0 ? 11 : 0,
    opts: { tiles, forwardKernels: "v1" as const, backwardKernels: "v1" as const },
  }));
  // v2 forward tiles, each with the v2 backward (64x32 is the H200's choice at hd 64)
  const v2f: ForwardTilesV2[] = [{ br: 8, bc: 8 }, { br: 32, bc: 16 }, { br: 64, bc: 32 }];
  v2f.forEach((forwardV2, i) => {
    cases.push({
      B: 1,
      T: 19 + 11 * i,
      H: 2 * [4, 1, 2][i],
      Hkv: 2,
      hd: i === 1 ? 20 : 16,
      window: i === 0 ? 6 : 0,
      opts: { tiles: { forwardV2 }, forwardKernels: "v2" },
    });
  });
  v2.forEach((backward, i) => {
    // GQA ratios 1, 2 and 4, lengths that leave partial row and key tiles, one window, hd off the dim split
    const G = [1, 2, 4][i % 3];
    cases.push({
      B: i === 4 ? 2 : 1,
      T: 23 + 7 * i,
      H: 2 * G,
      Hkv: 2,
      hd: i === 1 ? 12 : 16,
      window: i === 2 ? 13 : 0,
      opts: { tiles: { backward }, backwardKernels: "v2" },
    });
  });
  await checkCases("attn-tiles", cases, true);
});

Deno.test("attention backward: finite differences of the float64 forward", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("attn-fd");
  const c = { B: 2, T: 10, H: 4, Hkv: 2, hd: 16, window: 6 };
  const s = refShape(c);
  const q = randn(rng, c.B * c.T * c.H * c.hd);
  const k = randn(rng, c.B * c.T * c.Hkv * c.hd);
  const v = randn(rng, c.B * c.T * c.Hkv * c.hd);
  const w = randn(rng, q.length);
  await rt.scope(async () => {
    const tq = rt.tensor(q, [c.B, c.T, c.H, c.hd]);
    const tk = rt.tensor(k, [c.B, c.T, c.Hkv, c.hd]);
    const tv = rt.tensor(v, [c.B, c.T, c.Hkv, c.hd]);
    tq.requiresGrad = tk.requiresGrad = tv.requiresGrad = true;
    const out = attention(tq, tk, tv, { window: c.window });
    rt.backward(out, rt.tensor(w, out.shape));
    const [gq, gk, gv] = await Promise.all([tq.grad!.read(), tk.grad!.read(), tv.grad!.read()]);
    const f = () => dot(refAttention(s, q, k, v).out, w);
    for (const [name, x, gpu] of [["q", q, gq], ["k", k, gk], ["v", v, gv]] as const) {
      const idx = sampleIndices(rng, x.length, 12);
      const fd = finiteDifference(f, x, idx);
      assertClose(idx.map((i) => gpu[i]), fd, { rtol: 1e-4, atol: 1e-5 }, `d${name} vs finite differences`);
    }
    for (const t of [tq, tk, tv]) t.grad!.dispose();
  });
});

/**
 * f16 attention forward and backward against float64 on f16-rounded inputs. hd a multiple of 16 and no window
 * take the matrix-unit forward (`kernels/attention_sgm.ts`) where the device has subgroup matrices (the H200
 * under Dawn), the FMA kernels elsewhere; either must meet the same f16 tolerance.
 */
async function checkF16Attention(c: Case, seed: string): Promise<void> {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) {
    console.warn("attention f16: adapter has no shader-f16");
    return;
  }
  const rng = testRng(seed);
  const s = refShape(c);
  const nq = c.B * c.T * c.H * c.hd, nk = c.B * c.T * c.Hkv * c.hd;
  const q = roundF16(randn(rng, nq)), k = roundF16(randn(rng, nk));
  const v = roundF16(randn(rng, nk)), g = roundF16(randn(rng, nq));
  await rt.scope(async () => {
    const tq = rt.tensor(q, [c.B, c.T, c.H, c.hd], "f16");
    const tk = rt.tensor(k, [c.B, c.T, c.Hkv, c.hd], "f16");
    const tv = rt.tensor(v, [c.B, c.T, c.Hkv, c.hd], "f16");
    tq.requiresGrad = tk.requiresGrad = tv.requiresGrad = true;
    const { out, lse } = attentionWithLse(tq, tk, tv, { window: c.window });
    rt.backward(out, rt.tensor(g, out.shape, "f16"));
    const [o, l, dq, dk, dv] = await Promise.all([
      out.read(),
      lse.read(),
      tq.grad!.read(),
      tk.grad!.read(),
      tv.grad!.read(),
    ]);
    const ref = refAttention(s, q, k, v);
    const rb = refAttentionBackward(s, q, k, v, g);
    // outputs are f16 (half an ulp 5e-4 relative) and the matrix units multiply P rounded to f16
    const tol = { rtol: 1e-2, atol: 5e-3 };
    assertClose(o, ref.out, tol, `f16 out ${label(c)}`);
    // lse is f32 from f32 sums of exp: only the f16 inputs' rounding, already in the reference
    assertClose(l, ref.lse, { rtol: 1e-4, atol: 1e-4 }, `f16 lse ${label(c)}`);
    assertClose(dq, rb.dq, { rtol: 2e-2, atol: 2e-2 }, `f16 dq ${label(c)}`);
    assertClose(dk, rb.dk, { rtol: 2e-2, atol: 2e-2 }, `f16 dk ${label(c)}`);
    assertClose(dv, rb.dv, { rtol: 2e-2, atol: 2e-2 }, `f16 dv ${label(c)}`);
    for (const t of [tq, tk, tv]) t.grad!.dispose();
  });
}

Deno.test("attention on f16 storage (f32 math) stays within f16 tolerance", gpuTestOptions, async () => {
  await checkF16Attention({ B: 1, T: 19, H: 4, Hkv: 2, hd: 16 }, "attn-f16");
});

Deno.test(
  "attention on f16 storage: several key tiles, GQA 4 and 1, hd 64 and 128, a partial last row block",
  gpuTestOptions,
  async () => {
    await checkF16Attention({ B: 2, T: 130, H: 4, Hkv: 1, hd: 64 }, "attn-f16-hd64");
    await checkF16Attention({ B: 1, T: 70, H: 8, Hkv: 2, hd: 64 }, "attn-f16-gqa4");
    await checkF16Attention({ B: 1, T: 70, H: 2, Hkv: 2, hd: 128 }, "attn-f16-hd128");
    await checkF16Attention({ B: 1, T: 45, H: 3, Hkv: 1, hd: 32, window: 9 }, "attn-f16-window");
  },
);

Deno.test("attention: shape errors name what was expected", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    const q = rt.zeros([1, 4, 3, 8]);
    const k = rt.zeros([1, 4, 2, 8]);
    assert.throws(() => attention(q, k, k), /H % Hkv == 0/);
    assert.throws(() => attention(rt.zeros([4, 8]), k, k), /\[B, T, H, hd\]/);
  });
});

Deno.test("attention backward: a frozen q gets no gradient, k and v still do", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("attn-frozen");
  const c = { B: 1, T: 12, H: 4, Hkv: 2, hd: 16 };
  const s = refShape(c);
  const q = randn(rng, c.T * c.H * c.hd), k = randn(rng, c.T * c.Hkv * c.hd), v = randn(rng, k.length);
  const g = randn(rng, q.length);
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const tq = rt.tensor(q, [1, c.T, c.H, c.hd]);
      const tk = rt.tensor(k, [1, c.T, c.Hkv, c.hd]);
      const tv = rt.tensor(v, [1, c.T, c.Hkv, c.hd]);
      tk.requiresGrad = tv.requiresGrad = true;
      rt.backward(attention(tq, tk, tv), rt.tensor(g, [1, c.T, c.H, c.hd]));
      assert.equal(tq.grad, null);
      const rb = refAttentionBackward(s, q, k, v, g);
      const [dk, dv] = await Promise.all([tk.grad!.read(), tv.grad!.read()]);
      assertClose(dk, rb.dk, BWD_TOL, "dk with frozen q");
      assertClose(dv, rb.dv, BWD_TOL, "dv with frozen q");
      tk.grad!.dispose();
      tv.grad!.dispose();
    }));
});
