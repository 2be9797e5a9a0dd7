// The GPU sampler (kernels/sample_token.ts through runtime/ops/sampling.ts) against the float64 CPU reference
// models/sampling.ts samplingDistribution: the kept set and its renormalised probabilities, the frequencies of
// its draws, and the independence of a draw from the batch it is in.
import assert from "node:assert/strict";
import { philoxKernel } from "../../kernels/sample_token.ts";
import { samplingDistribution, type SamplingOptions } from "../../models/sampling.ts";
import { sampleTokens, samplingProbs } from "../../runtime/ops/sampling.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Rng } from "../../util/rng.ts";
import {
  assertClose,
  gpuTestOptions,
  roundF16,
  testRng,
  testRuntime,
  withKernelKeys,
} from "../helpers/gpu.ts";
import { ARGMAX_MAX_SLICES, ARGMAX_SLICE, argmaxSlices } from "../../kernels/argmax_split.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";

// Probabilities: f32 weights exp((x - m) / T) (WGSL's exp is good to 3 + 2|x| ULP, |x| <= ~30 here) divided by
// an f32 sum of up to 128256 terms: 1e-4 relative covers both with a wide margin; the absolute floor is for
// the smallest probabilities of the unfiltered 128256-token rows (about 1e-9 there).
const PROB_TOL = { rtol: 1e-4, atol: 1e-9 };
// A top-p decision closer than this to top_p could fall either way between the GPU's f32 sums (about 1e-6
// off) and float64: rows where the running mass just before or at the boundary token is that close to top_p
// are redrawn, so the kept sets must then agree exactly.
const TOP_P_MARGIN = 1e-5;

/**
 * Random f32 logits (normal, scale 2) with no two equal values in a row: a repeated value is redrawn (a
 * 128256-value row has a few hundred repeats in f32).
 */
function untiedRow(rng: Rng, V: number): Float32Array {
  const row = new Float32Array(V);
  const seen = new Set<number>();
  for (let i = 0; i < V; i++) {
    do row[i] = 2 * rng.normal(); while (seen.has(row[i]));
    seen.add(row[i]);
  }
  return row;
}

/** Whether the top-p decision of `opts` on `row` is at least TOP_P_MARGIN away from top_p (float64). */
function clearOfTopPBoundary(row: ArrayLike<number>, opts: SamplingOptions): boolean {
  if (opts.topP === undefined || opts.topP >= 1) return true;
  const k = samplingDistribution(row, { ...opts, topP: 1 });
  const sorted = [...k].filter((v) => v > 0).sort((a, b) => b - a);
  let cum = 0;
  for (const v of sorted) {
    const before = cum;
    cum += v;
    if (cum >= opts.topP) return opts.topP - before > TOP_P_MARGIN && cum - opts.topP > TOP_P_MARGIN;
  }
  return true;
}

function streams(rt: Runtime, ids: readonly number[]) {
  return rt.tensor(Uint32Array.from(ids), [ids.length], "u32");
}

/** Philox4x32-10 on the CPU (Random123's definition), for the tests' own expectations. */
function philoxCpu(ctr: readonly number[], key: readonly number[]): number[] {
  const mulhilo = (a: number, b: number): [number, number] => {
    const p = BigInt(a) * BigInt(b);
    return [Number(p >> 32n), Number(p & 0xffffffffn)];
  };
  let c = [...ctr], k0 = key[0], k1 = key[1];
  for (let r = 0; r < 10; r++) {
    const [hi0, lo0] = mulhilo(0xd2511f53, c[0]);
    const [hi1, lo1] = mulhilo(0xcd9e8d57, c[2]);
    c = [(hi1 ^ c[1] ^ k0) >>> 0, lo1, (hi0 ^ c[3] ^ k1) >>> 0, lo0];
    k0 = (k0 + 0x9e3779b9) >>> 0;
    k1 = (k1 + 0xbb67ae85) >>> 0;
  }
  return c;
}

// Random123's kat_vectors, the three "philox4x32 10" lines: counter, key, expected block
const PHILOX_KAT: [number[], number[], number[]][] = [
  [[0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
  [
    [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
    [0xffffffff, 0xffffffff],
    [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
  ],
  [
    [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
    [0xa4093822, 0x299f31d0],
    [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
  ],
];

Deno.test("sample_token: the GPU Philox4x32-10 gives Random123's known answers", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("philox");
  // the known answers, then random counters and keys checked against the CPU definition
  const cases = [...PHILOX_KAT.map(([c, k]) => [...c, ...k])];
  for (let i = 0; i < 61; i++) cases.push(Array.from({ length: 6 }, () => rng.nextU32()));
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const input = rt.tensor(Uint32Array.from(cases.flat()), [cases.length * 6], "u32");
      const out = rt.empty([cases.length * 4], "u32");
      const k = philoxKernel(cases.length);
      rt.dev.dispatch(k.spec, [input.binding, out.binding], k.workgroups, k.uniforms);
      const got = await out.read();
      PHILOX_KAT.forEach(([, , want], i) => assert.deepEqual([...got.subarray(4 * i, 4 * i + 4)], want));
      PHILOX_KAT.forEach(([c, k, want]) => assert.deepEqual(philoxCpu(c, k), want));
      cases.forEach((c, i) =>
        assert.deepEqual(
          [...got.subarray(4 * i, 4 * i + 4)],
          philoxCpu(c.slice(0, 4), c.slice(4)),
          `case ${i}`,
        )
      );
    }));
});

const SETTINGS: SamplingOptions[] = [
  { temperature: 1 },
  { temperature: 0.7, topK: 1 },
  { temperature: 0.7, topK: 5 },
  { temperature: 1.3, topK: 50 },
  { temperature: 1, topP: 0.5 },
  { temperature: 0.8, topP: 0.9 },
  { temperature: 1.2, topK: 20, topP: 0.7 },
  { temperature: 0.6, topK: 50, topP: 0.95 },
];

/**
 * Checks the GPU's distribution of one row against float64: tokens kept on one side only must sit at the top-p
 * boundary (the float64 mass ranked above them within TOP_P_MARGIN of top_p; a 128256-token nucleus has tokens
 * of 1e-7 there, which no f32 sum resolves), and the probabilities must equal the float64 ones renormalised
 * over the tokens the GPU kept.
 */
function checkRow(got: ArrayLike<number>, row: ArrayLike<number>, opts: SamplingOptions, what: string): void {
  const V = row.length;
  const ref = samplingDistribution(row, opts);
  const pk = samplingDistribution(row, { ...opts, topP: 1 }); // after top-k only
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => pk[b] - pk[a] || a - b);
  const massAbove = new Float64Array(V);
  let cum = 0;
  for (const i of order) {
    massAbove[i] = cum;
    cum += pk[i];
  }
  let z = 0, moved = 0, keptRef = 0;
  for (let i = 0; i < V; i++) {
    if (ref[i] > 0) keptRef++;
    if (got[i] > 0) z += pk[i];
    if ((ref[i] > 0) === (got[i] > 0)) continue;
    moved++;
    const atBoundary = opts.topP !== undefined && opts.topP < 1 && pk[i] > 0 &&
      Math.abs(massAbove[i] - opts.topP) <= TOP_P_MARGIN;
    if (!atBoundary) {
      assert.fail(
        `${what}: token ${i} kept ${got[i] > 0} on the GPU, ${ref[i] > 0} in the reference ` +
          `(mass ranked above it ${massAbove[i]})`,
      );
    }
  }
  assert.ok(moved <= Math.max(1, keptRef / 100), `${what}: ${moved} of ${keptRef} kept tokens differ`);
  assertClose(got, Array.from(pk, (v, i) => (got[i] > 0 ? v / z : 0)), PROB_TOL, what);
}

Deno.test(
  "sample_token: kept set and renormalised probabilities equal the float64 reference (V 37 to 128256)",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("sample-probs");
    // [V, rows]: a vocabulary below one workgroup's stride, a power of two, two odd sizes, and Llama 3's
    const shapes: [number, number][] = [[37, 3], [512, 3], [3001, 3], [128256, 1]];
    for (const [V, N] of shapes) {
      const rows = Array.from({ length: N }, () => untiedRow(rng, V));
      const x = new Float32Array(N * V);
      rows.forEach((r, i) => x.set(r, i * V));
      for (const opts of SETTINGS) {
        await noGpuErrors(rt, () =>
          rt.scope(async () => {
            const { ids, probs } = samplingProbs(rt.tensor(x, [N, V]), opts, {
              seed: 11,
              streams: streams(rt, Array.from({ length: N }, (_, i) => i)),
              step: 3,
            });
            const [gi, gp] = await Promise.all([ids.read(), probs.read()]);
            for (let r = 0; r < N; r++) {
              const what = `V ${V} ${JSON.stringify(opts)} row ${r}`;
              checkRow(gp.subarray(r * V, (r + 1) * V), rows[r], opts, what);
              assert.ok(gp[r * V + gi[r]] > 0, `${what}: drew token ${gi[r]} outside the kept set`);
            }
          }));
      }
    }
  },
);

Deno.test(
  "sample_token: ties at the top-k and top-p boundaries keep the lower index",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const V = 300;
    const row = Float32Array.from({ length: V }, (_, i) => -3 - (i % 7) * 0.25);
    // four equal logits (at 60, 7, 200, 299: lower indices first) below two distinct ones
    for (const i of [60, 7, 200, 299]) row[i] = 1;
    row[150] = 3;
    row[42] = 2;
    const cases: SamplingOptions[] = [
      { temperature: 1, topK: 3 }, // 150, 42, then the lowest index of the tie: 7
      { temperature: 1, topK: 5 }, // 150, 42, 7, 60, 200
      // top-p whose nucleus ends inside the tie: p(150) + p(42) + 2 tied ones reach 0.85
      { temperature: 1, topK: 6, topP: 0.85 },
      // over the whole vocabulary at another temperature: the nucleus takes three of the four tied tokens
      { temperature: 0.5, topP: 0.975 },
    ];
    for (const opts of cases) {
      assert.ok(clearOfTopPBoundary(row, opts), JSON.stringify(opts));
      await rt.scope(async () => {
        const { probs } = samplingProbs(rt.tensor(row, [1, V]), opts, {
          seed: 1,
          streams: streams(rt, [0]),
          step: 0,
        });
        const got = await probs.read();
        const ref = samplingDistribution(row, opts);
        const kept = (p: Iterable<number>) => [...p].flatMap((v, i) => (v > 0 ? [i] : []));
        assert.deepEqual(kept(got), kept(ref), JSON.stringify(opts));
        assertClose(got, ref, PROB_TOL, JSON.stringify(opts));
      });
    }
    // random rows where every value repeats about five times (most boundaries fall inside a tie), every setting
    const rng = testRng("sample-ties");
    for (const V of [37, 300, 3001]) {
      const levels = Math.ceil(V / 5);
      for (const opts of SETTINGS) {
        let tied: Float32Array;
        do tied = Float32Array.from({ length: V }, () => rng.int(levels) * (8 / levels)); while (
          !clearOfTopPBoundary(tied, opts)
        );
        await rt.scope(async () => {
          const { probs } = samplingProbs(rt.tensor(tied, [1, V]), opts, {
            seed: 1,
            streams: streams(rt, [0]),
            step: 0,
          });
          checkRow(await probs.read(), tied, opts, `tied V ${V} ${JSON.stringify(opts)}`);
        });
      }
    }
    // greedy: the lowest index among equal maxima, as torch.argmax
    const flat = new Float32Array(2 * V).fill(0.5);
    flat[V + 9] = 4;
    flat[V + 4] = 4;
    await rt.scope(async () => {
      const ids = sampleTokens(rt.tensor(flat, [2, V]), { temperature: 0 }, {
        seed: 0,
        streams: streams(rt, [0, 1]),
        step: 0,
      });
      assert.deepEqual([...await ids.read()], [0, 4]);
    });
  },
);

/** Chi-square statistic of counts against probabilities, bins with an expected count below 5 pooled. */
function chiSquare(counts: number[], p: ArrayLike<number>, n: number): { chi2: number; dof: number } {
  let chi2 = 0, bins = 0, poolC = 0, poolE = 0;
  for (let i = 0; i < counts.length; i++) {
    const e = n * p[i];
    if (e === 0) continue;
    if (e < 5) {
      poolC += counts[i];
      poolE += e;
      continue;
    }
    chi2 += (counts[i] - e) ** 2 / e;
    bins++;
  }
  if (poolE > 0) {
    chi2 += (poolC - poolE) ** 2 / poolE;
    bins++;
  }
  return { chi2, dof: bins - 1 };
}

/** The 99.9% quantile of chi-square with `dof` degrees of freedom (Wilson-Hilferty, within 1% for dof >= 3). */
function chiSquare999(dof: number): number {
  const z = 3.0902, a = 2 / (9 * dof);
  return dof * (1 - a + z * Math.sqrt(a)) ** 3;
}

/** Draws `n` tokens from one row of logits repeated n times, each row its own stream. */
async function drawCounts(rt: Runtime, row: Float32Array, opts: SamplingOptions, n: number, seed: number) {
  const V = row.length;
  const x = new Float32Array(n * V);
  for (let r = 0; r < n; r++) x.set(row, r * V);
  return await rt.scope(async () => {
    const ids = await sampleTokens(rt.tensor(x, [n, V]), opts, {
      seed,
      streams: streams(rt, Array.from({ length: n }, (_, i) => 1000 + 7 * i)),
      step: 5,
    }).read();
    const counts = new Array(V).fill(0);
    for (const t of ids) counts[t]++;
    return counts;
  });
}

Deno.test(
  "sample_token: draw frequencies match the filtered distribution (chi-square, 99.9%); filtered tokens never drawn",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("sample-freq");
    const n = 6000;
    const cases: [number, SamplingOptions][] = [
      [37, { temperature: 1.3 }],
      [37, { temperature: 1.3, topK: 6 }],
      [37, { temperature: 1.5, topP: 0.8 }],
      [301, { temperature: 2, topK: 12, topP: 0.9 }],
    ];
    for (const [V, opts] of cases) {
      let row: Float32Array;
      do row = untiedRow(rng, V); while (!clearOfTopPBoundary(row, opts));
      const p = samplingDistribution(row, opts);
      const counts = await drawCounts(rt, row, opts, n, 21);
      const what = `V ${V} ${JSON.stringify(opts)}`;
      const outside = counts.reduce((s, c, i) => s + (p[i] === 0 ? c : 0), 0);
      assert.equal(outside, 0, `${what}: ${outside} draws of filtered tokens`);
      const { chi2, dof } = chiSquare(counts, p, n);
      assert.ok(dof >= 2, `${what}: only ${dof} degrees of freedom`);
      assert.ok(chi2 < chiSquare999(dof), `${what}: chi2 ${chi2.toFixed(1)} with ${dof} dof`);
      // and the unfiltered distribution is rejected whenever a filter removes mass (the filter is in force)
      if (opts.topK || opts.topP) {
        const full = samplingDistribution(row, { temperature: opts.temperature });
        const all = chiSquare(counts, full, n);
        assert.ok(
          all.chi2 > chiSquare999(all.dof),
          `${what}: the draws also fit the unfiltered distribution`,
        );
      }
    }
  },
);

Deno.test(
  "sample_token: a draw depends on (seed, stream, step) only, not on the batch around it",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("sample-determinism");
    const V = 200, opts = { temperature: 1.5, topK: 100, topP: 0.98 };
    const rows = Array.from({ length: 6 }, () => untiedRow(rng, V));
    const sample = async (order: number[], seed: number, step: number) => {
      const x = new Float32Array(order.length * V);
      order.forEach((r, i) => x.set(rows[r], i * V));
      return await rt.scope(async () => {
        const ids = await sampleTokens(rt.tensor(x, [order.length, V]), opts, {
          seed,
          streams: streams(rt, order.map((r) => 40 + r)),
          step,
        }).read();
        return new Map(order.map((r, i) => [r, ids[i]]));
      });
    };
    for (const step of [0, 1, 17]) {
      const all = await sample([0, 1, 2, 3, 4, 5], 8, step);
      const shuffled = await sample([4, 2, 5, 0, 3, 1], 8, step);
      const alone = await sample([3], 8, step);
      const pair = await sample([5, 1], 8, step);
      for (const [r, t] of shuffled) {
        assert.equal(t, all.get(r), `step ${step} row ${r}: order changed the draw`);
      }
      assert.equal(alone.get(3), all.get(3), `step ${step}: row 3 alone`);
      assert.equal(pair.get(5), all.get(5));
      assert.equal(pair.get(1), all.get(1));
    }
    // another seed, or another step, draws differently: with about 20 likely tokens per row, 6 rows x 3
    // comparisons all equal by chance is below 1e-20
    const base = await sample([0, 1, 2, 3, 4, 5], 8, 0);
    const seeded = await sample([0, 1, 2, 3, 4, 5], 9, 0);
    const later = await sample([0, 1, 2, 3, 4, 5], 8, 1);
    const farSeed = await sample([0, 1, 2, 3, 4, 5], 8 + 2 ** 32, 0); // the key's high word counts too
    for (const other of [seeded, later, farSeed]) {
      assert.ok(
        [...base].some(([r, t]) => other.get(r) !== t),
        "different random numbers gave identical draws",
      );
    }
  },
);

Deno.test(
  "sample_token: f16 logits and row blocks give the f32 path's distribution",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("sample-f16");
    const [N, V] = [5, 1024];
    const x = Float32Array.from({ length: N * V }, () => 2 * rng.normal());
    const opts = { temperature: 0.9, topK: 40 };
    const s = () => streams(rt, [0, 1, 2, 3, 4]);
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const whole = samplingProbs(rt.tensor(x, [N, V]), opts, { seed: 2, streams: s(), step: 0 });
        // 2-row blocks (4 KiB rows: any row count is aligned)
        const blocks = samplingProbs(rt.tensor(x, [N, V]), opts, { seed: 2, streams: s(), step: 0 }, {
          maxBindingBytes: 2 * V * 4,
        });
        const [wi, wp, bi, bp] = await Promise.all([
          whole.ids.read(),
          whole.probs.read(),
          blocks.ids.read(),
          blocks.probs.read(),
        ]);
        assert.deepEqual([...bi], [...wi]);
        assert.deepEqual([...bp], [...wp]);
        if (!rt.dev.features.f16) return;
        const h = x.map((v) => Float16Array.of(v)[0]);
        const half = samplingProbs(rt.tensor(h, [N, V], "f16"), opts, { seed: 2, streams: s(), step: 0 });
        const hp = await half.probs.read();
        for (let r = 0; r < N; r++) {
          // the reference of the f16-rounded logits (ties are possible in f16: the reference breaks them alike)
          assertClose(
            hp.subarray(r * V, (r + 1) * V),
            samplingDistribution(h, opts, r * V, V),
            PROB_TOL,
            `f16 row ${r}`,
          );
        }
      }));
  },
);

Deno.test(
  "greedy over long rows: the split argmax (many workgroups) picks what the one-workgroup sampler and float64 pick",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("argmax-split");
    for (const dtype of (rt.dev.features.f16 ? ["f32", "f16"] : ["f32"]) as ("f32" | "f16")[]) {
      // 9000: nine slices of 1024, the last partial; 128256: the Llama-3 vocabulary (126 slices)
      for (const V of [9000, 128256]) {
        const rows = V === 9000 ? 4 : 1;
        const data = new Float32Array(rows * V);
        for (let i = 0; i < data.length; i++) data[i] = 3 * rng.normal();
        if (V === 9000) {
          // ties of the maximum: in two slices (row 0), in one slice on two threads (row 1); a row of -inf
          // (row 2: index 0); row 3 untouched
          data[1500] = data[7000] = 40;
          data[V + 2049] = data[V + 2049 + 256 + 3] = 40;
          data.fill(-Infinity, 2 * V, 3 * V);
        }
        const logits = dtype === "f16" ? Float32Array.from(roundF16(Float64Array.from(data))) : data;
        const expected = Array.from({ length: rows }, (_, r) => {
          let best = 0;
          for (let i = 1; i < V; i++) if (logits[r * V + i] > logits[r * V + best]) best = i;
          return best;
        });
        await rt.scope(async () => {
          const t = rt.tensor(logits, [rows, V], dtype);
          const streams = rt.tensor(new Uint32Array(rows), [rows], "u32");
          const draw = { seed: 1, streams, step: 0 };
          const { out: ids, keys } = await withKernelKeys(
            rt,
            () => sampleTokens(t, { temperature: 0 }, draw),
          );
          assert.ok(keys.includes("argmax_slices_" + dtype) && keys.includes("argmax_merge"), keys.join(" "));
          // samplingProbs keeps the sampler's one-workgroup path (it also writes the distribution)
          const one = samplingProbs(t, { temperature: 0 }, draw).ids;
          const [got, ref] = [Array.from(await ids.read()), Array.from(await one.read())];
          assert.deepEqual(got, expected, `${dtype} V=${V}: split argmax`);
          assert.deepEqual(ref, expected, `${dtype} V=${V}: the sampler`);
        });
      }
    }
  },
);

Deno.test("argmax slices refuse rows beyond their merge", () => {
  assert.throws(() => argmaxSlices("f32", 1, ARGMAX_MAX_SLICES * ARGMAX_SLICE + 1), /argmaxSlices/);
  assert.equal(argmaxSlices("f32", 2, 2048).workgroups.join(), "2,2");
});
