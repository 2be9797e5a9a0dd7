import assert from "node:assert/strict";
import {
  SSD_SGM_ALL,
  SSD_SGM_ENV_VAR,
  SSD_SGM_VARIANTS,
  ssdRowsTilingFor,
  ssdRowTilings,
  ssdScan,
  type SsdScanArgs,
  ssdScanVjp,
  ssdSgmRowVariants,
} from "../../runtime/ops/ssd.ts";
import { ssdChunkRows, ssdRowsSharedBytes, type SsdRowsTiling } from "../../kernels/ssd.ts";
import type { SgmDeviceInfo } from "../../kernels/matmul_subgroup_matrix.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import type { Rng } from "../../util/rng.ts";
import {
  assertClose,
  dot,
  finiteDifference,
  gpuTestOptions,
  randn,
  randu,
  sampleIndices,
  testRng,
  testRuntime,
  type Tolerance,
} from "../helpers/gpu.ts";
import {
  softplusRef,
  ssdBackwardRef,
  ssdForwardRef,
  type SsdRefInputs,
  type SsdRefShape,
} from "../reference/ssd.ts";

// Tolerances. The kernels accumulate in f32 over a chunk's positions and the state dims (and the A gradient over
// every step of every batch row), with cancellation between terms, so elementwise errors are judged against the
// tensor's scale: |got - want| <= rel * (|want| + max|want|).
const REL = 1e-5;
const REL_SUMMED = 1e-4; // dA and d dt_bias: sums over B x L terms of both signs

function scaled(expected: ArrayLike<number>, rel: number): Tolerance {
  let m = 0;
  for (let i = 0; i < expected.length; i++) m = Math.max(m, Math.abs(expected[i]));
  return { rtol: rel, atol: rel * m };
}

async function readAll(rt: Runtime, ts: Tensor[]): Promise<Float32Array[]> {
  const bufs = await rt.dev.readMany(ts.map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })));
  return bufs.map((b) => new Float32Array(b));
}

interface Problem {
  s: SsdRefShape;
  inp: SsdRefInputs;
  /** Raw dt when the softplus is fused (delta = softplus(dtRaw + bias)). */
  dtRaw?: Float64Array;
  bias?: Float64Array;
}

/**
 * Runs `f` with the device reporting `limit` bytes of workgroup memory (null: its own), and returns the keys of
 * the SSD row-product kernels it dispatched, so a test sees which tiling the op chose.
 */
async function onDevice<T>(
  rt: Runtime,
  limit: number | null,
  f: () => Promise<T>,
): Promise<{ result: T; rowKernels: string[] }> {
  const dev = rt.dev as { limits: GPUSupportedLimits; dispatch: Runtime["dev"]["dispatch"] };
  const limits = dev.limits, dispatch = dev.dispatch;
  const keys = new Set<string>();
  if (limit !== null) {
    dev.limits = new Proxy(limits, {
      get: (t, k) => k === "maxComputeWorkgroupStorageSize" ? limit : t[k as keyof GPUSupportedLimits],
    });
  }
  dev.dispatch = (spec, ...rest) => {
    if (spec.key.startsWith("ssd_rows_")) keys.add(spec.key);
    return dispatch.call(rt.dev, spec, ...rest);
  };
  try {
    return { result: await f(), rowKernels: [...keys].sort() };
  } finally {
    dev.limits = limits;
    dev.dispatch = dispatch;
  }
}

function makeProblem(rng: Rng, s: SsdRefShape, opts: { init?: boolean; fused?: boolean } = {}): Problem {
  const { batch: Bn, seqlen: L, heads: H } = s;
  const x = randn(rng, Bn * L * s.headsX * s.dimP);
  const Bm = randn(rng, Bn * L * s.headsB * s.dimN);
  const C = randn(rng, Bn * L * s.headsC * s.dimN);
  const A = randu(rng, H, -2, -0.5);
  const D = randu(rng, H, 0.5, 1.5);
  const init = opts.init ? randn(rng, Bn * H * s.dimP * s.dimN) : undefined;
  if (opts.fused) {
    const dtRaw = randu(rng, Bn * L * H, -3, 1);
    const bias = randu(rng, H, -1.5, 0.5);
    const delta = dtRaw.map((v, i) => softplusRef(v + bias[i % H]));
    return { s, inp: { x, delta, A, Bm, C, D, init }, dtRaw, bias };
  }
  // delta rounded to f32: the GPU sees exactly these values
  const delta = randu(rng, Bn * L * H, -4, 1).map((v) => Math.fround(softplusRef(v)));
  return { s, inp: { x, delta, A, Bm, C, D, init } };
}

function uploadSeparate(rt: Runtime, p: Problem): SsdScanArgs {
  const { s, inp } = p;
  return {
    x: rt.tensor(inp.x, [s.batch, s.seqlen, s.headsX, s.dimP]),
    B: rt.tensor(inp.Bm, [s.batch, s.seqlen, s.headsB, s.dimN]),
    C: rt.tensor(inp.C, [s.batch, s.seqlen, s.headsC, s.dimN]),
    dt: rt.tensor(p.dtRaw ?? inp.delta, [s.batch, s.seqlen, s.heads]),
    A: rt.tensor(inp.A, [s.heads]),
    D: rt.tensor(inp.D, [s.heads]),
    dtBias: p.bias ? rt.tensor(p.bias, [s.heads]) : undefined,
    initialState: inp.init ? rt.tensor(inp.init, [s.batch, s.heads, s.dimP, s.dimN]) : undefined,
  };
}

/** Packs x, B, C per token as [x | B | C] (the mixer's conv output layout). */
function packXBC(p: Problem): Float64Array {
  const { s, inp } = p;
  const wx = s.headsX * s.dimP, wb = s.headsB * s.dimN, wc = s.headsC * s.dimN;
  const out = new Float64Array(s.batch * s.seqlen * (wx + wb + wc));
  for (let bt = 0; bt < s.batch * s.seqlen; bt++) {
    const o = bt * (wx + wb + wc);
    out.set(inp.x.subarray(bt * wx, (bt + 1) * wx), o);
    out.set(inp.Bm.subarray(bt * wb, (bt + 1) * wb), o + wx);
    out.set(inp.C.subarray(bt * wc, (bt + 1) * wc), o + wx + wb);
  }
  return out;
}

const GQA: Omit<SsdRefShape, "seqlen"> = {
  batch: 2,
  heads: 4,
  headsX: 2,
  headsB: 1,
  headsC: 4,
  dimP: 6,
  dimN: 10,
};

Deno.test("ssd reference: hand-derived backward matches float64 finite differences", () => {
  const rng = testRng("ssd-ref-fd");
  const p = makeProblem(rng, { ...GQA, seqlen: 7 }, { init: true });
  const { s, inp } = p;
  const fwd = ssdForwardRef(s, inp);
  const wy = randn(rng, fwd.y.length), wf = randn(rng, fwd.final.length);
  const g = ssdBackwardRef(s, inp, fwd, wy, wf);
  const loss = () => {
    const f = ssdForwardRef(s, inp);
    return dot(f.y, wy) + dot(f.final, wf);
  };
  const tol = { rtol: 1e-6, atol: 1e-7 };
  for (
    const [name, arr, grad] of [
      ["x", inp.x, g.x],
      ["B", inp.Bm, g.Bm],
      ["C", inp.C, g.C],
      ["delta", inp.delta, g.delta],
      ["A", inp.A, g.A],
      ["D", inp.D, g.D],
      ["init", inp.init!, g.init],
    ] as const
  ) {
    const idx = sampleIndices(rng, arr.length, 12);
    assertClose(idx.map((i) => grad[i]), finiteDifference(loss, arr, idx), tol, `reference d${name}`);
  }
});

Deno.test(
  "ssd chunked scan equals the sequential recurrence for many chunk sizes and lengths",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("ssd-chunk-sizes");
    // [L, chunk]: L = 1; L < chunk; L a multiple of the chunk; L not a multiple; chunks of one and of several
    // 64-row tiles (100, 128) with a partial last chunk; a chunk of 1.
    const cases: [number, number][] = [[1, 16], [5, 16], [32, 8], [37, 4], [37, 16], [37, 64], [150, 100], [
      150,
      128,
    ], [
      9,
      1,
    ]];
    const problems = cases.map(([L], i) => makeProblem(rng, { ...GQA, seqlen: L }, { init: i % 2 === 0 }));
    await rt.scope(async () => {
      const outs = cases.map(([, chunk], i) =>
        ssdScan(uploadSeparate(rt, problems[i]), { chunkSize: chunk })
      );
      const got = await readAll(rt, outs.flatMap((o) => [o.y, o.finalState]));
      cases.forEach(([L, chunk], i) => {
        const ref = ssdForwardRef(problems[i].s, problems[i].inp);
        assertClose(got[2 * i], ref.y, scaled(ref.y, REL), `y (L=${L}, chunk=${chunk})`);
        assertClose(
          got[2 * i + 1],
          ref.final,
          scaled(ref.final, REL),
          `final state (L=${L}, chunk=${chunk})`,
        );
      });
    });
  },
);

Deno.test(
  "ssd scan with head and state dims above one 64-wide tile, every head its own group",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("ssd-wide");
    const p = makeProblem(rng, {
      batch: 1,
      seqlen: 21,
      heads: 2,
      headsX: 2,
      headsB: 2,
      headsC: 2,
      dimP: 70,
      dimN: 66,
    }, {
      init: true,
    });
    await rt.scope(async () => {
      const out = ssdScan(uploadSeparate(rt, p), { chunkSize: 16 });
      const [y, f] = await readAll(rt, [out.y, out.finalState]);
      const ref = ssdForwardRef(p.s, p.inp);
      assertClose(y, ref.y, scaled(ref.y, REL), "y");
      assertClose(f, ref.final, scaled(ref.final, REL), "final state");
    });
  },
);

interface GradCase {
  name: string;
  s: SsdRefShape;
  chunk: number;
  init: boolean;
}

const GRAD_CASES: GradCase[] = [
  {
    name: "GQA groups, initial state, L not a multiple of the chunk",
    s: { ...GQA, seqlen: 37 },
    chunk: 16,
    init: true,
  },
  {
    name: "every head its own group, no initial state",
    s: { batch: 2, seqlen: 20, heads: 3, headsX: 3, headsB: 3, headsC: 3, dimP: 5, dimN: 7 },
    chunk: 8,
    init: false,
  },
  {
    name: "dims above a 64-wide tile",
    s: { batch: 1, seqlen: 19, heads: 2, headsX: 1, headsB: 2, headsC: 1, dimP: 70, dimN: 66 },
    chunk: 16,
    init: true,
  },
  {
    name: "chunk of two 64-row tiles, partial last chunk",
    s: { batch: 1, seqlen: 150, heads: 2, headsX: 1, headsB: 1, headsC: 2, dimP: 3, dimN: 4 },
    chunk: 100,
    init: true,
  },
  { name: "L = 1", s: { ...GQA, seqlen: 1 }, chunk: 16, init: true },
  {
    name: "more heads than one 16-head scan block",
    s: { batch: 1, seqlen: 20, heads: 18, headsX: 6, headsB: 3, headsC: 18, dimP: 3, dimN: 5 },
    chunk: 8,
    init: false,
  },
  {
    // 45 is a multiple of neither tiling's block (64, 32) nor k slice (16, 8); 70 and 66 span two column tiles
    name: "chunk of 45 with a partial last chunk, dims above a 64-wide tile",
    s: { batch: 1, seqlen: 100, heads: 2, headsX: 1, headsB: 2, headsC: 1, dimP: 70, dimN: 66 },
    chunk: 45,
    init: true,
  },
  {
    // the dims of the 1B model: one full 64-deep k slice of the wide tiling, U reused from the inter-chunk term
    name: "head and state dims of 64, chunks of two 64-position blocks, a short last chunk",
    s: { batch: 1, seqlen: 300, heads: 2, headsX: 1, headsB: 1, headsC: 2, dimP: 64, dimN: 64 },
    chunk: 128,
    init: true,
  },
  {
    // dB and dC reduce over a head dim of exactly two 64-deep slices; y and dx have two full column tiles
    name: "head dim of 128, state dim of 64",
    s: { batch: 1, seqlen: 100, heads: 2, headsX: 2, headsB: 1, headsC: 1, dimP: 128, dimN: 64 },
    chunk: 64,
    init: false,
  },
];

/** The row-product kernels a scan with this tiling dispatches (forward only, or forward and backward). */
function rowKernels(tiling: SsdRowsTiling, backward: boolean): string[] {
  const suffix = tiling === "wide" ? "" : `_${tiling}`;
  return (backward ? ["dB", "dC", "dx", "y"] : ["y"]).map((v) => `ssd_rows_${v}${suffix}`).sort();
}

// Each case with the tiling the device picks (wide on llvmpipe and the H200) and with the narrow row products
// forced, on fresh inputs each; same tolerances for both.
for (const forced of [undefined, "narrow"] as const) {
  for (const gc of GRAD_CASES) {
    const label = forced ? `, ${forced} row products` : "";
    Deno.test(
      `ssd backward (${gc.name}${label}): float64 reverse mode and finite differences`,
      gpuTestOptions,
      async () => {
        const rt = await testRuntime();
        const rng = testRng(forced ? `ssd-bwd-${forced}-${gc.name}` : `ssd-bwd-${gc.name}`);
        const p = makeProblem(rng, gc.s, { init: gc.init });
        const { s, inp } = p;
        const fwd = ssdForwardRef(s, inp);
        const wy = randn(rng, fwd.y.length), wf = randn(rng, fwd.final.length);
        const ref = ssdBackwardRef(s, inp, fwd, wy, wf);
        const { rowKernels: used } = await onDevice(rt, null, () =>
          rt.scope(async () => {
            const args = uploadSeparate(rt, p);
            const out = ssdScanVjp(
              args,
              rt.tensor(wy, [s.batch, s.seqlen, s.heads, s.dimP]),
              rt.tensor(wf, [s.batch, s.heads, s.dimP, s.dimN]),
              { chunkSize: gc.chunk, rowsTiling: forced },
            );
            const g = out.grads;
            const names = ["x", "B", "C", "delta", "A", "D", ...(gc.init ? ["init"] : [])];
            const tensors = [g.x!, g.B!, g.C!, g.dt, g.A, g.D, ...(gc.init ? [g.initialState!] : [])];
            const got = await readAll(rt, [out.y, out.finalState, ...tensors]);
            assertClose(got[0], fwd.y, scaled(fwd.y, REL), "y");
            assertClose(got[1], fwd.final, scaled(fwd.final, REL), "final state");
            const refs = [ref.x, ref.Bm, ref.C, ref.delta, ref.A, ref.D, ref.init];
            const inputs = [inp.x, inp.Bm, inp.C, inp.delta, inp.A, inp.D, inp.init];
            const loss = () => {
              const f = ssdForwardRef(s, inp);
              return dot(f.y, wy) + dot(f.final, wf);
            };
            names.forEach((name, k) => {
              const rel = name === "A" ? REL_SUMMED : REL;
              assertClose(got[2 + k], refs[k], scaled(refs[k], rel), `d${name} vs float64 reverse mode`);
              const idx = sampleIndices(rng, inputs[k]!.length, 6);
              const fd = finiteDifference(loss, inputs[k]!, idx);
              assertClose(
                idx.map((i) => got[2 + k][i]),
                fd,
                scaled(refs[k], 10 * rel),
                `d${name} vs finite differences`,
              );
            });
          }));
        assert.deepEqual(used, rowKernels(forced ?? ssdRowsTilingFor(rt.dev.limits), true));
      },
    );
  }
}

// Also on a device that reports WebGPU's default 16 KiB of workgroup memory: the op must pick the narrow row
// products by itself, forward and backward.
for (const limit of [null, 16384] as const) {
  Deno.test(
    `ssd through autograd: packed xBC, fused softplus(dt + dt_bias), gradients of y and of the final state alone${
      limit ? `, on a device with ${limit} bytes of workgroup memory` : ""
    }`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      const expected = rowKernels(limit ? "narrow" : ssdRowsTilingFor(rt.dev.limits), true);
      const rng = testRng(limit ? `ssd-autograd-packed-${limit}` : "ssd-autograd-packed");
      const p = makeProblem(rng, { ...GQA, seqlen: 23 }, { init: true, fused: true });
      const { s, inp } = p;
      const xbc = packXBC(p);
      const width = s.headsX * s.dimP + (s.headsB + s.headsC) * s.dimN;
      const fwd = ssdForwardRef(s, inp);
      const wy = randn(rng, fwd.y.length), wf = randn(rng, fwd.final.length);
      // each seed alone: y's gradient without a final-state gradient, and the reverse
      const { rowKernels: used } = await onDevice(rt, limit, async () => {
        for (const which of ["y", "final"] as const) {
          const ref = ssdBackwardRef(
            s,
            inp,
            fwd,
            which === "y" ? wy : undefined,
            which === "final" ? wf : undefined,
          );
          await rt.scope(async () => {
            const leaves = {
              xBC: rt.tensor(xbc, [s.batch, s.seqlen, width]),
              dt: rt.tensor(p.dtRaw!, [s.batch, s.seqlen, s.heads]),
              A: rt.tensor(inp.A, [s.heads]),
              D: rt.tensor(inp.D, [s.heads]),
              dtBias: rt.tensor(p.bias!, [s.heads]),
              initialState: rt.tensor(inp.init!, [s.batch, s.heads, s.dimP, s.dimN]),
            };
            for (const t of Object.values(leaves)) t.requiresGrad = true;
            const out = ssdScan({ ...leaves, dims: s }, { chunkSize: 8 });
            if (which === "y") rt.backward(out.y, rt.tensor(wy, out.y.shape));
            else rt.backward(out.finalState, rt.tensor(wf, out.finalState.shape));
            const got = await readAll(rt, [
              out.y,
              leaves.xBC.grad!,
              leaves.dt.grad!,
              leaves.A.grad!,
              leaves.D.grad!,
              leaves.dtBias.grad!,
              leaves.initialState.grad!,
            ]);
            assertClose(got[0], fwd.y, scaled(fwd.y, REL), "y with fused softplus");
            const refPacked = packXBC({ s, inp: { ...inp, x: ref.x, Bm: ref.Bm, C: ref.C } });
            assertClose(got[1], refPacked, scaled(refPacked, REL), `${which}: dxBC`);
            // chain rule through delta = softplus(dt + bias): d dt = d delta * sigmoid(dt + bias)
            const ddt = ref.delta.map((g, i) => g / (1 + Math.exp(-(p.dtRaw![i] + p.bias![i % s.heads]))));
            const dBias = new Float64Array(s.heads);
            ddt.forEach((g, i) => dBias[i % s.heads] += g);
            assertClose(got[2], ddt, scaled(ddt, REL), `${which}: d dt (raw)`);
            assertClose(got[3], ref.A, scaled(ref.A, REL_SUMMED), `${which}: dA`);
            assertClose(got[4], ref.D, scaled(ref.D, REL), `${which}: dD`);
            assertClose(got[5], dBias, scaled(dBias, REL_SUMMED), `${which}: d dt_bias`);
            assertClose(got[6], ref.init, scaled(ref.init, REL), `${which}: d initial state`);
            // finite differences through the softplus, on the raw dt and the bias
            const loss = () => {
              const delta = p.dtRaw!.map((v, i) => softplusRef(v + p.bias![i % s.heads]));
              const f = ssdForwardRef(s, { ...inp, delta });
              return which === "y" ? dot(f.y, wy) : dot(f.final, wf);
            };
            const idx = sampleIndices(rng, p.dtRaw!.length, 6);
            assertClose(
              idx.map((i) => got[2][i]),
              finiteDifference(loss, p.dtRaw!, idx),
              scaled(ddt, 1e-4),
              `${which}: d dt vs finite differences`,
            );
            assertClose(
              got[5],
              finiteDifference(loss, p.bias!),
              scaled(dBias, 1e-3),
              `${which}: d dt_bias vs FD`,
            );
            for (const t of Object.values(leaves)) t.grad!.dispose();
          });
        }
      });
      assert.deepEqual(used, expected);
    },
  );
}

// ---- the row-product tilings -------------------------------------------------------------------------------

Deno.test("ssd row products: the tiling follows the device's workgroup memory, one kernel key per tiling", () => {
  // two 64 x 64 f32 tiles: the most llvmpipe (the test device) allows, so the wide kernels are tested there
  assert.equal(ssdRowsSharedBytes("wide"), 32768);
  assert.ok(ssdRowsSharedBytes("narrow") <= 16384, `narrow: ${ssdRowsSharedBytes("narrow")} bytes`);
  const pick = (bytes: number) => ssdRowsTilingFor({ maxComputeWorkgroupStorageSize: bytes });
  assert.equal(pick(16384), "narrow");
  assert.equal(pick(32768), "wide");
  assert.equal(pick(32767), "narrow");
  assert.throws(() => pick(8192), /need 15136 bytes of workgroup memory, the device allows 8192/);
  const s = { batch: 1, seqlen: 8, heads: 1, dimP: 4, dimN: 4, chunk: 8 };
  const op = { offset: 0, stride: 4, heads: 1, dim: 4 };
  const keys = (["wide", "narrow"] as const).flatMap((t) =>
    (["y", "dx", "dB", "dC"] as const).map((v) =>
      ssdChunkRows(v, s, op, op, op, v === "y" ? null : op, { offset: 0, stride: 4 }, t).spec.key
    )
  );
  assert.equal(new Set(keys).size, 8);
  assert.deepEqual(keys.slice(4).sort(), rowKernels("narrow", true));
});

Deno.test("ssd row products: the sgm tiling for f16 scans where the device has subgroup matrices and P, N fit 64", () => {
  const h200: SgmDeviceInfo = {
    features: { f16: true, subgroupMatrix: true },
    subgroupMatrixConfigs: [{ componentType: "f16", resultComponentType: "f32", M: 16, N: 16, K: 16 }],
    subgroupMinSize: 32,
    subgroupMaxSize: 32,
    limits: { maxComputeWorkgroupStorageSize: 49152, maxComputeInvocationsPerWorkgroup: 1024 },
  };
  const saved = Deno.env.get(SSD_SGM_ENV_VAR);
  // DISTILLERY_SGM=0 keeps every matrix-unit kernel off, these too
  const on = Deno.env.get("DISTILLERY_SGM") !== "0";
  const expect = (vs: readonly string[]) => on ? vs : [];
  try {
    Deno.env.delete(SSD_SGM_ENV_VAR);
    const dims = { dimP: 64, dimN: 64 };
    // off by default (the f16 decay gradients, see SSD_SGM_VARIANTS); the tests below opt in to all four
    assert.deepEqual(SSD_SGM_VARIANTS, []);
    assert.deepEqual(ssdSgmRowVariants(h200, dims), []);
    Deno.env.set(SSD_SGM_ENV_VAR, SSD_SGM_ALL.join(","));
    assert.deepEqual(ssdSgmRowVariants(h200, dims), expect(SSD_SGM_ALL));
    assert.deepEqual(ssdSgmRowVariants(h200, { dimP: 20, dimN: 10 }), expect(SSD_SGM_ALL));
    // dims above one k slice, too little workgroup memory, no subgroup matrices, subgroups of 64: none
    assert.deepEqual(ssdSgmRowVariants(h200, { dimP: 128, dimN: 64 }), []);
    assert.deepEqual(ssdSgmRowVariants(h200, { dimP: 64, dimN: 80 }), []);
    const small = { ...h200.limits, maxComputeWorkgroupStorageSize: 32768 };
    assert.deepEqual(ssdSgmRowVariants({ ...h200, limits: small }, dims), []);
    assert.deepEqual(
      ssdSgmRowVariants({ ...h200, features: { f16: true, subgroupMatrix: false } }, dims),
      [],
    );
    assert.deepEqual(ssdSgmRowVariants({ ...h200, subgroupMinSize: 64, subgroupMaxSize: 64 }, dims), []);
    // only scans of f16 x, B, C take them by default; a forced tiling holds for all four
    const tilings = (f16Operands: boolean, forced?: SsdRowsTiling) =>
      Object.values(ssdRowTilings(h200, dims, { f16Operands, forced }));
    assert.deepEqual(tilings(true), on ? ["sgm", "sgm", "sgm", "sgm"] : ["wide", "wide", "wide", "wide"]);
    assert.deepEqual(tilings(false), ["wide", "wide", "wide", "wide"]);
    assert.deepEqual(tilings(true, "narrow"), ["narrow", "narrow", "narrow", "narrow"]);
    assert.deepEqual(tilings(false, "sgm"), ["sgm", "sgm", "sgm", "sgm"]);
    // the A/B switch: 0 keeps them all off, a list picks variants, anything else is refused
    Deno.env.set(SSD_SGM_ENV_VAR, "0");
    assert.deepEqual(ssdSgmRowVariants(h200, dims), []);
    Deno.env.set(SSD_SGM_ENV_VAR, "dC, y");
    assert.deepEqual(ssdSgmRowVariants(h200, dims), expect(["y", "dC"]));
    const y = ssdRowTilings(h200, dims, { f16Operands: true });
    assert.deepEqual(
      [y.y, y.dx, y.dB, y.dC],
      on ? ["sgm", "wide", "wide", "sgm"] : ["wide", "wide", "wide", "wide"],
    );
    Deno.env.set(SSD_SGM_ENV_VAR, "y,dz");
    assert.throws(() => ssdSgmRowVariants(h200, dims), /DISTILLERY_SSD_SGM: unknown row product 'dz'/);
  } finally {
    if (saved === undefined) Deno.env.delete(SSD_SGM_ENV_VAR);
    else Deno.env.set(SSD_SGM_ENV_VAR, saved);
  }
  // one kernel per U dim class; U dims above one k slice are refused
  const s = { batch: 1, seqlen: 8, heads: 1, dimP: 64, dimN: 64, chunk: 8 };
  const op = (dim: number) => ({ offset: 0, stride: dim, heads: 1, dim });
  const key = (dim: number) =>
    ssdChunkRows("y", s, op(dim), op(dim), op(64), null, { offset: 0, stride: 64 }, "sgm");
  assert.deepEqual([1, 16, 17, 64].map((d) => key(d).spec.key), [
    "ssd_rows_y_sgm_k16",
    "ssd_rows_y_sgm_k16",
    "ssd_rows_y_sgm_k32",
    "ssd_rows_y_sgm_k64",
  ]);
  assert.throws(() => key(65), /the sgm tiling takes U dims up to 64, found 65/);
  assert.equal(ssdRowsSharedBytes("sgm"), 36864);
});

/**
 * Runs `f` on the test device dressed up as one with subgroup matrices (the H200's configuration and 48 KiB of
 * workgroup memory), recording the keys of the SSD row-product kernels dispatched; the matrix-unit kernels
 * themselves are not dispatched (the software adapter cannot compile them), so only the choice is observed.
 */
async function withMatrixUnits(rt: Runtime, f: () => Promise<void>): Promise<string[]> {
  const dev = rt.dev as unknown as { -readonly [K in keyof SgmDeviceInfo]: SgmDeviceInfo[K] } & {
    dispatch: Runtime["dev"]["dispatch"];
  };
  const saved = { ...dev, dispatch: dev.dispatch };
  const limits = dev.limits;
  const keys = new Set<string>();
  dev.features = { ...dev.features, f16: true, subgroupMatrix: true };
  dev.subgroupMatrixConfigs = [{ componentType: "f16", resultComponentType: "f32", M: 16, N: 16, K: 16 }];
  dev.subgroupMinSize = dev.subgroupMaxSize = 32;
  dev.limits = new Proxy(limits, {
    get: (t, k) => k === "maxComputeWorkgroupStorageSize" ? 49152 : t[k as keyof typeof t],
  });
  dev.dispatch = (spec, ...rest) => {
    if (spec.key.startsWith("ssd_rows_")) keys.add(spec.key);
    if (!spec.key.includes("_sgm_")) saved.dispatch.call(rt.dev, spec, ...rest);
  };
  try {
    await f();
  } finally {
    Object.assign(dev, {
      features: saved.features,
      subgroupMatrixConfigs: saved.subgroupMatrixConfigs,
      subgroupMinSize: saved.subgroupMinSize,
      subgroupMaxSize: saved.subgroupMaxSize,
      limits,
      dispatch: saved.dispatch,
    });
  }
  return [...keys].sort();
}

Deno.test(
  "ssd scan through autograd: f16 x, B, C take the sgm row products on a device with matrix units, f32 ones not",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16 || Deno.env.get("DISTILLERY_SGM") === "0") return;
    const rng = testRng("ssd-sgm-choice");
    const p = makeProblem(rng, { ...GQA, seqlen: 23 }, { fused: true });
    const { s, inp } = p;
    const width = s.headsX * s.dimP + (s.headsB + s.headsC) * s.dimN;
    const xbc = packXBC(p);
    const saved = Deno.env.get(SSD_SGM_ENV_VAR);
    Deno.env.set(SSD_SGM_ENV_VAR, SSD_SGM_ALL.join(","));
    try {
      for (const dtype of ["f16", "f32"] as const) {
        const used = await withMatrixUnits(rt, () =>
          rt.scope(async () => {
            const xBC = rt.tensor(xbc, [s.batch, s.seqlen, width], dtype);
            xBC.requiresGrad = true;
            const out = ssdScan({
              xBC,
              dims: s,
              dt: rt.tensor(p.dtRaw!, [s.batch, s.seqlen, s.heads]),
              A: rt.tensor(inp.A, [s.heads]),
              D: rt.tensor(inp.D, [s.heads]),
              dtBias: rt.tensor(p.bias!, [s.heads]),
            }, { chunkSize: 8 });
            rt.backward(out.y, rt.tensor(randn(rng, out.y.size), out.y.shape, dtype));
            await rt.dev.sync();
          }));
        // P = 6 and N = 10 are one 16-wide fragment along k
        const expected = dtype === "f16"
          ? SSD_SGM_ALL.map((v) => `ssd_rows_${v}_sgm_k16`).sort()
          : rowKernels("wide", true);
        assert.deepEqual(used, expected, dtype);
      }
    } finally {
      if (saved === undefined) Deno.env.delete(SSD_SGM_ENV_VAR);
      else Deno.env.set(SSD_SGM_ENV_VAR, saved);
    }
  },
);

Deno.test(
  "ssd forward with the narrow row products matches float64 and the wide ones, chunks and dims off the tiles",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("ssd-narrow-forward");
    // [L, chunk, dims]: chunks below, at, between and above the 32-position block and the 64-row tile, none a
    // multiple of the 8-deep k slice but 16, 32, 64; head and state dims below and above one 64-wide tile
    const wideDims = { batch: 1, heads: 2, headsX: 1, headsB: 2, headsC: 1, dimP: 70, dimN: 66 };
    const cases: [number, number, Omit<SsdRefShape, "seqlen">][] = [
      [37, 16, GQA],
      [70, 32, GQA],
      [75, 37, GQA],
      [150, 100, GQA],
      [130, 64, wideDims],
      [61, 45, wideDims],
      [9, 1, GQA],
    ];
    const problems = cases.map(([L, , dims], i) =>
      makeProblem(rng, { ...dims, seqlen: L }, { init: i % 2 === 0 })
    );
    for (const limit of [16384, 32768]) {
      const { result: got, rowKernels: used } = await onDevice(rt, limit, () =>
        rt.scope(() => {
          const outs = cases.map(([, chunk], i) =>
            ssdScan(uploadSeparate(rt, problems[i]), { chunkSize: chunk })
          );
          // the narrow kernels forced on the 32 KiB device too, to compare the two tilings on the same inputs
          const narrow = cases.map(([, chunk], i) =>
            ssdScan(uploadSeparate(rt, problems[i]), { chunkSize: chunk, rowsTiling: "narrow" })
          );
          return readAll(rt, [...outs, ...narrow].flatMap((o) => [o.y, o.finalState]));
        }));
      assert.deepEqual(
        used,
        limit === 16384
          ? rowKernels("narrow", false)
          : [...rowKernels("narrow", false), ...rowKernels("wide", false)].sort(),
      );
      const n = 2 * cases.length;
      cases.forEach(([L, chunk], i) => {
        const ref = ssdForwardRef(problems[i].s, problems[i].inp);
        const at = `L=${L}, chunk=${chunk}, P=${problems[i].s.dimP}, limit=${limit}`;
        for (const [k, which] of [[2 * i, "chosen"], [n + 2 * i, "narrow"]] as const) {
          assertClose(got[k], ref.y, scaled(ref.y, REL), `y (${which}, ${at})`);
          assertClose(got[k + 1], ref.final, scaled(ref.final, REL), `final state (${which}, ${at})`);
        }
        // the two tilings differ only in the order of f32 sums
        assertClose(got[2 * i], got[n + 2 * i], scaled(ref.y, REL), `y chosen vs narrow (${at})`);
      });
    }
  },
);

Deno.test("ssd scan rejects mismatched shapes with a message naming the input", gpuTestOptions, async () => {
  const rt = await testRuntime();
  rt.scope(() => {
    const x = rt.zeros([1, 4, 3, 2]);
    const B = rt.zeros([1, 4, 1, 5]);
    const C = rt.zeros([1, 4, 4, 5]);
    const dt = rt.zeros([1, 4, 4]);
    const A = rt.zeros([4]), D = rt.zeros([4]);
    assert.throws(() => ssdScan({ x, B, C, dt, A, D }), /x has 3 groups, which does not divide 4 heads/);
    assert.throws(
      () => ssdScan({ x: rt.zeros([1, 4, 2, 2]), B, C: rt.zeros([1, 4, 4, 6]), dt, A, D }),
      /C has shape \[1, 4, 4, 6\], expected \[1, 4, 4, 5\]/,
    );
  });
});
