/**
 * The matrix-unit row products of the Mamba2 scan (`ssdChunkRows` with the `sgm` tiling, kernels/ssd.ts): their
 * generated WGSL run by the CPU interpreter (tests/helpers/wgsl_interp.ts) against the float64 row product
 * (`ssdRowsRef`), outputs and row partials, so their numbers are checked on machines without subgroup matrices
 * (CI's software adapter has none; ssd_tint_test.ts compiles them under Tint). A second test checks on the test
 * GPU that `ssdRowsRef` is the row product the `wide` kernels compute, so the two kernels are held to one
 * definition.
 *
 * @module
 */
import assert from "node:assert/strict";
import { ssdChunkRows, type SsdOperand, type SsdRowsTiling, type SsdRowsVariant } from "../../kernels/ssd.ts";
import type { Launch } from "../../kernels/fill.ts";
import { parseWgsl, runWgsl, type WgslProgram } from "../helpers/wgsl_interp.ts";
import { assertClose, gpuTestOptions, normwise, randn, randu, testRng, testRuntime } from "../helpers/gpu.ts";
import { softplusRef, ssdRowsRef, type SsdRowsRefOperand, type SsdRowsRefShape } from "../reference/ssd.ts";
import type { Rng } from "../../util/rng.ts";

// Normwise errors max|got - ref| / max|ref|. The kernels round U, V, Z, the states and the masked W to f16 (half
// an ulp: 2^-11 = 4.9e-4 relative) and accumulate in f32; the reference sees the f32 inputs. Observed over six
// seeds of the cases below (SSD_SGM_INTERP_VERBOSE=1 prints them): outputs up to 1.0e-3, row partials (dot
// products of an output with an f32 operand) up to 8.9e-4. The mutations tried when this test was written (mask
// dropped or off by one, decay or rowScale sign flipped, rowScale, delta, the D term or the reloaded inter-chunk
// term dropped, a fragment offset ignoring the subgroup's column half, a wrong shuffle partner, the dB/dC state
// untransposed) gave 8e-2 or more, or NaN; a dropped barrier is a data race that the interpreter reports.
const OUT_TOL = 2.5e-3;
const PARTIAL_TOL = 2.5e-3;

interface RowsCase {
  name: string;
  s: SsdRowsRefShape;
  /** Groups of x, B and C. */
  groups: { x: number; B: number; C: number };
  variants: SsdRowsVariant[];
}

const ALL: SsdRowsVariant[] = ["y", "dx", "dB", "dC"];

const CASES: RowsCase[] = [
  {
    // U dims of 20 and 24: fragments padded with zeros along k, Z's columns past the dim zero
    name: "GQA groups, packed xBC, a ragged last chunk, dims off the 16-grid",
    s: { batch: 1, seqlen: 100, heads: 2, chunk: 64, dimP: 20, dimN: 24 },
    groups: { x: 1, B: 1, C: 2 },
    variants: ALL,
  },
  {
    // the 1B model's dims; a chunk of two row tiles, the second of which sees two 64-position blocks
    name: "dims of 64, chunks of 128 (two row tiles, two blocks), a short last chunk",
    s: { batch: 1, seqlen: 150, heads: 1, chunk: 128, dimP: 64, dimN: 64 },
    groups: { x: 1, B: 1, C: 1 },
    variants: ALL,
  },
  {
    name: "batch 2, one chunk shorter than the tile, x grouped per head",
    s: { batch: 2, seqlen: 9, heads: 2, chunk: 64, dimP: 16, dimN: 8 },
    groups: { x: 2, B: 1, C: 1 },
    variants: ALL,
  },
  {
    // y and dx write P columns: 80 is two column tiles (their U dim, N, is within one k slice)
    name: "two column tiles",
    s: { batch: 1, seqlen: 40, heads: 1, chunk: 64, dimP: 80, dimN: 16 },
    groups: { x: 1, B: 1, C: 1 },
    variants: ["y", "dx"],
  },
];

/** Inputs of every variant of one case: packed xBC, dy, one state tensor, cs/delta per head and chunk, D. */
interface RowsProblem {
  c: RowsCase;
  xbc: Float64Array;
  dy: Float64Array;
  S: Float64Array;
  cs: Float64Array;
  delta: Float64Array;
  D: Float64Array;
  /** [cs | delta | A | D], the kernels' `csd` buffer. */
  csd: Float64Array;
}

const f32 = (a: Float64Array) => a.map(Math.fround);

function makeProblem(rng: Rng, c: RowsCase): RowsProblem {
  const { batch: Bn, seqlen: L, heads: H, chunk: Q, dimP: P, dimN: N } = c.s;
  const width = c.groups.x * P + (c.groups.B + c.groups.C) * N;
  const nc = Math.ceil(L / Q);
  const A = f32(randu(rng, H, -2, -0.5));
  const D = f32(randu(rng, H, 0.5, 1.5));
  const delta = f32(randu(rng, Bn * H * L, -4, 1).map(softplusRef));
  // cs: the within-chunk cumulative sum of delta A, in f32 as the cumsum kernel forms it
  const cs = new Float64Array(Bn * H * L);
  for (let bh = 0; bh < Bn * H; bh++) {
    let run = 0;
    for (let t = 0; t < L; t++) {
      if (t % Q === 0) run = 0;
      run = Math.fround(run + Math.fround(delta[bh * L + t] * A[bh % H]));
      cs[bh * L + t] = run;
    }
  }
  const csd = new Float64Array(2 * Bn * H * L + 2 * H);
  csd.set(cs);
  csd.set(delta, Bn * H * L);
  csd.set(A, 2 * Bn * H * L);
  csd.set(D, 2 * Bn * H * L + H);
  return {
    c,
    xbc: f32(randn(rng, Bn * L * width)),
    dy: f32(randn(rng, Bn * L * H * P)),
    S: f32(randn(rng, Bn * nc * H * P * N)),
    cs,
    delta,
    D,
    csd,
  };
}

type Operand = SsdOperand & SsdRowsRefOperand;

/** U, V, Z and E of a variant, as `runtime/ops/ssd.ts` passes them, over the problem's buffers. */
function operands(v: SsdRowsVariant, p: RowsProblem): { U: Operand; V: Operand; Z: Operand; E?: Operand } {
  const { heads: H, dimP: P, dimN: N } = p.c.s;
  const g = p.c.groups;
  const width = g.x * P + (g.B + g.C) * N;
  const x = { data: p.xbc, offset: 0, stride: width, heads: g.x, dim: P };
  const B = { data: p.xbc, offset: g.x * P, stride: width, heads: g.B, dim: N };
  const C = { data: p.xbc, offset: g.x * P + g.B * N, stride: width, heads: g.C, dim: N };
  const dy = { data: p.dy, offset: 0, stride: H * P, heads: H, dim: P };
  switch (v) {
    case "y":
      return { U: C, V: B, Z: x };
    case "dx":
      return { U: B, V: C, Z: dy, E: x };
    case "dB":
      return { U: x, V: dy, Z: C, E: B };
    case "dC":
      return { U: dy, V: x, Z: B, E: C };
  }
}

function launchOf(v: SsdRowsVariant, p: RowsProblem, tiling: SsdRowsTiling): Launch {
  const { U, V, Z, E } = operands(v, p);
  const s = p.c.s;
  return ssdChunkRows(v, s, U, V, Z, E ?? null, { offset: 0, stride: s.heads * Z.dim }, tiling);
}

const ROW_SLOTS: Record<SsdRowsVariant, number[]> = { y: [], dx: [0, 1], dB: [2], dC: [3] };

/** Sums the kernel's row partials [4, B, L, H, CT] over the column tiles. */
function sumTiles(R: ArrayLike<number>, tiles: number): Float64Array {
  const out = new Float64Array(R.length / tiles);
  for (let i = 0; i < out.length; i++) for (let t = 0; t < tiles; t++) out[i] += R[i * tiles + t];
  return out;
}

/** The partials of `slots` only (the other slots belong to the other variants). */
function pick(partials: Float64Array, slots: number[]): Float64Array {
  const n = partials.length / 4;
  return Float64Array.from(slots.flatMap((k) => Array.from(partials.subarray(k * n, (k + 1) * n))));
}

const parsed = new Map<string, WgslProgram>();

/** Runs a launch's generated WGSL over its bindings; the outputs start as NaN, so an unwritten one fails. */
function runInterpreted(v: SsdRowsVariant, p: RowsProblem): { out: Float64Array; R: Float64Array } {
  const launch = launchOf(v, p, "sgm");
  const { U, V, Z, E } = operands(v, p);
  const s = p.c.s;
  let prog = parsed.get(launch.spec.key);
  if (!prog) parsed.set(launch.spec.key, prog = parseWgsl(launch.spec.code));
  const u = new DataView(launch.uniforms);
  const uniforms: Record<string, number> = {};
  prog.uniformFields.forEach((f, i) => uniforms[f] = u.getUint32(4 * i, true));
  const out = new Float64Array(s.batch * s.seqlen * s.heads * Z.dim).fill(NaN);
  const R = new Float64Array(4 * s.batch * s.seqlen * s.heads * uniforms.col_tiles).fill(NaN);
  const buffers = [U.data, V.data, Z.data, p.S, p.csd, ...(E ? [E.data, out, R] : [out])];
  const [gx, gy = 1] = launch.workgroups;
  const stats = runWgsl(prog, buffers, uniforms, [gx, gy, 1]);
  assert.ok(stats.mmas > 0, `${launch.spec.key}: no matrix products ran`);
  return { out, R };
}

function reference(v: SsdRowsVariant, p: RowsProblem): { out: Float64Array; partials: Float64Array } {
  return ssdRowsRef(v, p.c.s, operands(v, p), p.S, p.cs, p.delta, p.D);
}

for (const c of CASES) {
  Deno.test(`ssd sgm row products through the CPU interpreter vs float64 (${c.name})`, () => {
    const p = makeProblem(testRng(`ssd-sgm-interp-${c.name}`), c);
    for (const v of c.variants) {
      const t0 = performance.now();
      const got = runInterpreted(v, p);
      const ref = reference(v, p);
      const tiles = got.R.length / ref.partials.length;
      const errOut = normwise(got.out, ref.out, `${v} out`);
      const slots = ROW_SLOTS[v];
      const errPart = slots.length
        ? normwise(pick(sumTiles(got.R, tiles), slots), pick(ref.partials, slots), `${v} row partials`)
        : 0;
      if (Deno.env.get("SSD_SGM_INTERP_VERBOSE")) {
        const ms = (performance.now() - t0).toFixed(0);
        console.log(`${v}: out ${errOut.toExponential(2)}, partials ${errPart.toExponential(2)} (${ms} ms)`);
      }
      assert.ok(errOut <= OUT_TOL, `${v}: output normwise error ${errOut}`);
      assert.ok(errPart <= PARTIAL_TOL, `${v}: row partials normwise error ${errPart}`);
    }
  });
}

Deno.test(
  "ssd row products: the float64 row product is what the wide kernels compute",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    for (const c of CASES) {
      const p = makeProblem(testRng(`ssd-rows-ref-${c.name}`), c);
      await rt.scope(async () => {
        for (const v of c.variants) {
          const launch = launchOf(v, p, "wide");
          const { Z, E } = operands(v, p);
          const s = c.s;
          const ref = reference(v, p);
          const tiles = Math.ceil(Math.max(s.dimP, s.dimN) / 64);
          const out = rt.zeros([s.batch * s.seqlen * s.heads * Z.dim]);
          const R = rt.zeros([4 * s.batch * s.seqlen * s.heads * tiles]);
          const ins = [operands(v, p).U, operands(v, p).V, Z].map((o) => rt.tensor(o.data, [o.data.length]));
          const tensors = [...ins, rt.tensor(p.S, [p.S.length]), rt.tensor(p.csd, [p.csd.length])];
          if (E) tensors.push(rt.tensor(E.data, [E.data.length]), out, R);
          else tensors.push(out);
          rt.dev.dispatch(launch.spec, tensors.map((t) => t.binding), launch.workgroups, launch.uniforms);
          const [o, r] = await rt.dev.readMany(
            [out, R].map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })),
          );
          const scaled = (ref: Float64Array) => {
            const m = ref.reduce((a, x) => Math.max(a, Math.abs(x)), 0);
            return { rtol: 1e-5, atol: 1e-5 * m };
          };
          assertClose(new Float32Array(o), ref.out, scaled(ref.out), `${c.name}: ${v} out`);
          const slots = ROW_SLOTS[v];
          if (slots.length) {
            const want = pick(ref.partials, slots);
            assertClose(
              pick(sumTiles(new Float32Array(r), tiles), slots),
              want,
              scaled(want),
              `${c.name}: ${v} partials`,
            );
          }
        }
      });
    }
  },
);
