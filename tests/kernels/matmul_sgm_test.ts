// The subgroup-matrix matmul cannot run here: the CI adapter (llvmpipe under Deno's WebGPU) has no subgroup
// matrices, and Dawn's null backend compiles but executes nothing. So this file checks what can be checked on a
// CPU, and bench/matmul_sgm.ts checks the rest on the GPU before timing anything:
// - every variant compiles under Tint (sgm_tint_check.ts, in a subprocess);
// - the kernel's index maps, run by a float64 emulation of the whole kernel (staging by threads or by fragment
//   copies, fragment loads with their majorness and strides, the swizzled block order, both epilogues, bounds
//   checks), reproduce a float64 matmul for every swept config, layout and shape class;
// - the op falls back to the register-tiled kernel without the feature (and stays correct), and takes the
//   subgroup-matrix kernel exactly when a device has it and the shape qualifies.
import assert from "node:assert/strict";
import {
  pickSgmConfig,
  SGM_FRAG,
  SGM_LARGE,
  SGM_SMALL,
  SGM_SWEEP,
  sgmBlockOf,
  sgmComputeThreads,
  type SgmConfig,
  sgmConfigName,
  sgmCopySlot,
  sgmCopySlots,
  type SgmDeviceInfo,
  sgmEpilogueElement,
  sgmEpiloguePasses,
  sgmExact,
  sgmFragmentOrigin,
  sgmLaunch,
  type SgmLayout,
  type SgmOperandPlan,
  sgmOperandPlan,
  sgmStagingThreads,
  sgmSubgroupTile,
  sgmSupported,
  sgmThreadSlot,
  sgmThreadSlots,
  validateSgmConfig,
} from "../../kernels/matmul_subgroup_matrix.ts";
import type { MatmulLayout, MatmulShape } from "../../kernels/matmul.ts";
import { matmul, matmulLaunch } from "../../runtime/ops/matmul.ts";
import {
  assertClose,
  F16_TOL,
  gpuTestOptions,
  testRng,
  testRuntime,
  type Tolerance,
} from "../helpers/gpu.ts";
import { refMatmul } from "../reference/dense.ts";
import type { Rng } from "../../util/rng.ts";
import { SGM_TINY } from "./sgm_tint_check.ts";
import { packF16, parseWgsl, runWgsl } from "../helpers/wgsl_interp.ts";
import { runTintCheck } from "../helpers/tint.ts";

// ---- Tint ---------------------------------------------------------------------------------------------------

Deno.test("every subgroup-matrix matmul variant compiles under Dawn's WGSL compiler (Tint, null backend)", async () => {
  const result = await runTintCheck(new URL("./sgm_tint_check.ts", import.meta.url)) as {
    skipped?: string;
    variants?: number;
    pipelines?: number;
    failures?: string[];
  };
  if (result.skipped) {
    console.warn(`subgroup-matrix Tint check skipped: ${result.skipped}`);
    return;
  }
  assert.ok(result.variants! > 200, `only ${result.variants} variants checked`);
  assert.ok(result.pipelines! > 20, `only ${result.pipelines} pipelines built`);
  assert.deepEqual(result.failures, [], `variants failing under Tint:\n${result.failures!.join("\n")}`);
});

// ---- float64 emulation of the kernel ------------------------------------------------------------------------

/** f16-representable random values in [-1, 1) (the kernel's inputs are f16). */
function f16Values(rng: Rng, n: number): Float64Array {
  const out = new Float64Array(n);
  const h = new Float16Array(1);
  for (let i = 0; i < n; i++) {
    h[0] = 2 * rng.uniform() - 1;
    out[i] = h[0];
  }
  return out;
}

/** A 16x16 fragment as `subgroupMatrixLoad` reads it: [r][c] at `off + r*stride + c` or `off + c*stride + r`. */
function loadFragment(mem: ArrayLike<number>, off: number, colMajor: boolean, stride: number): Float64Array {
  const f = new Float64Array(SGM_FRAG * SGM_FRAG);
  for (let r = 0; r < SGM_FRAG; r++) {
    for (let c = 0; c < SGM_FRAG; c++) {
      const i = off + (colMajor ? c * stride + r : r * stride + c);
      if (i >= mem.length) throw new Error(`fragment load past the end (${i} >= ${mem.length})`);
      f[r * SGM_FRAG + c] = mem[i];
    }
  }
  return f;
}

interface EmuCase {
  m: number;
  n: number;
  k: number;
  batch: number;
  alpha: number;
}

/**
 * Runs the kernel's index maps in float64: for every workgroup (in swizzled order), every K slice, every thread
 * or subgroup, exactly what the generated WGSL does; unwritten staging slots are NaN, so a fragment that reads
 * one poisons the result. Returns C (after the epilogue, with f16 rounding when `out` is f16).
 */
function emulate(
  c: SgmConfig,
  L: SgmLayout,
  e: EmuCase,
  a: Float64Array,
  b: Float64Array,
  c0: Float64Array,
  offs: { a: number; b: number; c: number },
  strides: { a: number; b: number; c: number },
): Float64Array {
  const { m, n, k } = e;
  const pa = sgmOperandPlan(c, L, "A"), pb = sgmOperandPlan(c, L, "B");
  const NSG = c.sgM * c.sgN;
  const exact = sgmExact(c, m, n, k);
  const direct = exact && L.out === "f32" && !L.accumulate;
  const C = Float64Array.from(c0);
  const round = (v: number) => (L.out === "f16" ? new Float16Array([v])[0] : Math.fround(v));
  const nx = Math.ceil(n / c.bn), ny = Math.ceil(m / c.bm);
  const ldA = L.transA ? m : k, ldB = L.transB ? k : n;
  for (let z = 0; z < e.batch; z++) {
    const seen = new Uint8Array(nx * ny);
    const base = { A: offs.a + z * strides.a, B: offs.b + z * strides.b };
    const baseC = offs.c + z * strides.c;
    for (let wy = 0; wy < ny; wy++) {
      for (let wx = 0; wx < nx; wx++) {
        const blk = sgmBlockOf(c.swizzle, nx, ny, wx, wy);
        assert.ok(blk.bm < ny && blk.bn < nx && !seen[blk.bm * nx + blk.bn]++, "block order is a bijection");
        const m0 = blk.bm * c.bm, n0 = blk.bn * c.bn;
        const acc = Array.from({ length: NSG }, () => new Float64Array(pa.frags * pb.frags * 256));
        const ops = [
          { p: pa, mem: a, base: base.A, ld: ldA, outer0: m0, outerSize: m },
          { p: pb, mem: b, base: base.B, ld: ldB, outer0: n0, outerSize: n },
        ];
        // global element of a staged-tile point (row, col) of slice k0, as the WGSL's globalOffset/inBounds
        const gIndex = (o: (typeof ops)[number], row: number, col: number, k0: number) =>
          o.p.kContiguous
            ? o.base + (o.outer0 + row) * o.ld + k0 + col
            : o.base + (k0 + row) * o.ld + o.outer0 + col;
        const gInBounds = (o: (typeof ops)[number], row: number, col: number, k0: number) =>
          o.p.kContiguous
            ? o.outer0 + row < o.outerSize && k0 + col < k
            : k0 + row < k && o.outer0 + col < o.outerSize;
        for (let k0 = 0; k0 < k; k0 += c.bk) {
          // staging: the fragments below read from `src` at `stride`, with `origin(plan, w, i, kk)`
          const staged = ops.map((o) => {
            if (c.stage === "global") return null;
            const S = new Float64Array(o.p.bufferElems).fill(NaN);
            const written = new Uint8Array(o.p.bufferElems);
            const put = (i: number, v: number) => {
              assert.ok(!written[i]++, `staging slot ${i} of ${o.p.name} written twice`);
              S[i] = v;
            };
            if (c.stage === "threads") {
              for (let lid = 0; lid < sgmStagingThreads(c); lid++) {
                for (let s = 0; s < sgmThreadSlots(c, o.p); s++) {
                  const { row, col } = sgmThreadSlot(c, o.p, lid, s);
                  assert.ok(row < o.p.rows && col + c.vec <= o.p.cols, "thread slot inside the tile");
                  // one load of vec halves, checked by its first element (the contiguous size is a multiple of vec)
                  const ok = exact || gInBounds(o, row, col, k0);
                  const g = gIndex(o, row, col, k0);
                  for (let q = 0; q < c.vec; q++) put(row * o.p.stride + col + q, ok ? o.mem[g + q] : 0);
                }
              }
            } else {
              for (let sg = 0; sg < NSG; sg++) {
                for (let s = 0; s < sgmCopySlots(c, o.p); s++) {
                  const { row, col } = sgmCopySlot(c, o.p, sg, s);
                  const blockIn = loadFragment(o.mem, gIndex(o, row, col, k0), false, o.ld);
                  for (let r = 0; r < 16; r++) {
                    for (let q = 0; q < 16; q++) put((row + r) * o.p.stride + col + q, blockIn[r * 16 + q]);
                  }
                }
              }
            }
            return S;
          });
          for (let sg = 0; sg < NSG; sg++) {
            const { wm, wn } = sgmSubgroupTile(c, sg);
            for (let kk = 0; kk < c.bk / SGM_FRAG; kk++) {
              const frag = (x: number, w: number, i: number) => {
                const o = ops[x], S = staged[x];
                const at = sgmFragmentOrigin(o.p, w, i, kk);
                return S
                  ? loadFragment(S, at.row * o.p.stride + at.col, o.p.colMajor, o.p.stride)
                  : loadFragment(o.mem, gIndex(o, at.row, at.col, k0), o.p.colMajor, o.ld);
              };
              const left = Array.from({ length: pa.frags }, (_, i) => frag(0, wm, i));
              const right = Array.from({ length: pb.frags }, (_, j) => frag(1, wn, j));
              for (let i = 0; i < pa.frags; i++) {
                for (let j = 0; j < pb.frags; j++) {
                  const out = acc[sg].subarray((i * pb.frags + j) * 256, (i * pb.frags + j + 1) * 256);
                  for (let r = 0; r < 16; r++) {
                    for (let q = 0; q < 16; q++) {
                      let s = 0;
                      for (let t = 0; t < 16; t++) s += left[i][r * 16 + t] * right[j][t * 16 + q];
                      out[r * 16 + q] += s;
                    }
                  }
                }
              }
            }
          }
        }
        // epilogue
        for (let i = 0; i < pa.frags; i++) {
          for (let j = 0; j < pb.frags; j++) {
            const frag = (sg: number) =>
              acc[sg].subarray((i * pb.frags + j) * 256, (i * pb.frags + j + 1) * 256);
            if (direct) {
              for (let sg = 0; sg < NSG; sg++) {
                const { wm, wn } = sgmSubgroupTile(c, sg);
                const off = baseC + (m0 + wm * pa.warpTile + i * 16) * n + n0 + wn * pb.warpTile + j * 16;
                for (let r = 0; r < 16; r++) {
                  for (let q = 0; q < 16; q++) C[off + r * n + q] = round(e.alpha * frag(sg)[r * 16 + q]);
                }
              }
              continue;
            }
            const SC = new Float64Array(NSG * 256);
            for (let sg = 0; sg < NSG; sg++) SC.set(frag(sg), sg * 256);
            const done = new Uint8Array(NSG * 256);
            for (let lid = 0; lid < sgmComputeThreads(c); lid++) {
              for (let p = 0; p < sgmEpiloguePasses(c); p++) {
                const el = sgmEpilogueElement(c, lid, p);
                assert.ok(!done[el.index]++, "epilogue element written once");
                const { wm, wn } = sgmSubgroupTile(c, el.slot);
                const row = m0 + wm * pa.warpTile + i * 16 + el.row;
                const col = n0 + wn * pb.warpTile + j * 16 + el.col;
                if (exact || (row < m && col < n)) {
                  const ci = baseC + row * n + col;
                  C[ci] = round(e.alpha * SC[el.index] + (L.accumulate ? C[ci] : 0));
                }
              }
            }
            assert.equal(done.reduce((x, y) => x + y, 0), NSG * 256, "every scratch element written out");
          }
        }
      }
    }
    assert.equal(seen.reduce((x, y) => x + y, 0), nx * ny, "every block computed");
  }
  return C;
}

/** Emulates one case and compares it with a float64 matmul (f32 or f16 output rounding only). */
function checkEmulation(c: SgmConfig, L: SgmLayout, e: EmuCase, rng: Rng): void {
  const { m, n, k, batch } = e;
  // batch strides and offsets that are multiples of the load width but not of the blocks
  const pad = 8;
  const sa = m * k + pad, sb = k * n + pad, sc = m * n + pad;
  const offs = { a: pad, b: 2 * pad, c: pad };
  const a = f16Values(rng, offs.a + batch * sa), b = f16Values(rng, offs.b + batch * sb);
  const c0 = f16Values(rng, offs.c + batch * sc);
  const got = emulate(c, L, e, a, b, c0, offs, { a: sa, b: sb, c: sc });
  const name = `${sgmConfigName(c)} ${L.transA ? "t" : "n"}${L.transB ? "t" : "n"} ${L.out}` +
    `${L.accumulate ? " acc" : ""} ${m}x${n}x${k}x${batch}`;
  // float64 sums of the same products: only the output rounding differs
  const tol = L.out === "f16" ? { rtol: 2 ** -10, atol: 2 ** -20 } : { rtol: 2 ** -22, atol: 1e-12 };
  assertBatches(got, a, b, c0, offs, { a: sa, b: sb, c: sc }, [m, n, k, batch], L, e.alpha, tol, name);
  // the padding between batches is never written
  for (let z = 0; z < batch; z++) {
    for (let i = offs.c + z * sc + m * n; i < offs.c + (z + 1) * sc; i++) {
      assert.equal(got[i], c0[i], `${name}: C padding at ${i} was written`);
    }
  }
}

/**
 * Checks every batch entry of a computed C (at `offs.c + z * strides.c`) against the float64 product of the same
 * f16 inputs, plus the old C when accumulating.
 */
function assertBatches(
  got: ArrayLike<number> & { subarray(a: number, b: number): ArrayLike<number> },
  a: Float64Array,
  b: Float64Array,
  c0: Float64Array,
  offs: { a: number; b: number; c: number },
  strides: { a: number; b: number; c: number },
  [m, n, k, batch]: number[],
  L: SgmLayout,
  alpha: number,
  tol: Tolerance,
  name: string,
): void {
  for (let z = 0; z < batch; z++) {
    const ref = refMatmul(
      {
        data: a.subarray(offs.a + z * strides.a, offs.a + z * strides.a + m * k),
        batched: false,
        trans: L.transA,
      },
      {
        data: b.subarray(offs.b + z * strides.b, offs.b + z * strides.b + k * n),
        batched: false,
        trans: L.transB,
      },
      1,
      m,
      n,
      k,
      alpha,
    );
    const cz = offs.c + z * strides.c;
    if (L.accumulate) { for (let i = 0; i < m * n; i++) ref[i] += c0[cz + i]; }
    assertClose(got.subarray(cz, cz + m * n), ref, tol, `${name} batch ${z}`);
  }
}

const LAYOUTS = [[false, false], [false, true], [true, false], [true, true]] as const;

Deno.test("subgroup-matrix index maps: float64 emulation of every swept config matches a float64 matmul", () => {
  const rng = testRng("sgm-emulation");
  const configs = [...SGM_SWEEP, SGM_TINY, { ...SGM_TINY, bk: 32, stage: "fragments" as const }];
  // every layout of every config on whole blocks; partial blocks for every threads-staged config in one layout,
  // and in all four for the op's configs
  const op = new Set([SGM_LARGE, SGM_SMALL].map(sgmConfigName));
  let cases = 0;
  for (const c of configs) {
    for (const [transA, transB] of LAYOUTS) {
      // a whole block, K in three slices (both staging buffers): direct f32 store, staged f16 with alpha + C
      const exact: EmuCase = { m: c.bm, n: c.bn, k: 3 * c.bk, batch: 1, alpha: 1 };
      checkEmulation(c, { transA, transB, out: "f32", accumulate: false }, exact, rng);
      checkEmulation(c, { transA, transB, out: "f16", accumulate: true }, { ...exact, alpha: 0.75 }, rng);
      cases += 2;
      if (c.stage === "threads" && (op.has(sgmConfigName(c)) || (!transA && transB))) {
        // partial blocks in M, N and K (multiples of the load width), batched with padded strides
        const ragged: EmuCase = { m: c.bm + 24, n: c.bn + 40, k: c.bk + c.vec, batch: 2, alpha: -0.5 };
        checkEmulation(c, { transA, transB, out: "f32", accumulate: true }, ragged, rng);
        checkEmulation(c, { transA, transB, out: "f16", accumulate: false }, { ...ragged, batch: 1 }, rng);
        cases += 2;
      }
    }
  }
  assert.ok(cases > 80, `${cases} cases`);
});

// ---- the generated WGSL itself, run by a CPU interpreter ----------------------------------------------------

/**
 * Runs the generated kernel of a case through tests/helpers/wgsl_interp.ts (invocations as coroutines between
 * barriers, subgroup-matrix builtins emulated, every subgroup-matrix call checked for subgroup uniformity, every
 * access bounds-checked, shared memory NaN-poisoned) and compares C with a float64 matmul.
 */
function checkGenerated(c: SgmConfig, L: SgmLayout, e: EmuCase, rng: Rng): void {
  const { m, n, k, batch } = e;
  const pad = c.stage === "threads" ? c.vec : 8;
  const sa = batch > 1 ? m * k + pad : 0, sb = batch > 1 ? k * n + pad : 0, sc = batch > 1 ? m * n + pad : 0;
  const offs = batch > 1 ? { a: pad, b: 2 * pad, c: 3 } : { a: 0, b: 0, c: 0 };
  const aLen = offs.a + Math.max(batch * sa, m * k), bLen = offs.b + Math.max(batch * sb, k * n);
  const cLen = offs.c + Math.max(batch * sc, m * n);
  const a = f16Values(rng, aLen + 8), b = f16Values(rng, bLen + 8);
  const c0 = f16Values(rng, cLen);
  const launch = sgmLaunch(
    {
      m,
      n,
      k,
      batch,
      strideA: sa,
      strideB: sb,
      strideC: sc,
      offsetA: offs.a,
      offsetB: offs.b,
      offsetC: offs.c,
      alpha: e.alpha,
    },
    L,
    c,
  );
  const prog = parseWgsl(launch.spec.code);
  const operand = (values: Float64Array, binding: number) =>
    prog.bindings[binding].type.args[0] &&
      (prog.bindings[binding].type.args[0] as { name: string }).name === "f16"
      ? values
      : packF16(values);
  const C = Float64Array.from(c0);
  // the uniforms as packed by the launch
  const u = new DataView(launch.uniforms);
  const uniforms: Record<string, number> = {};
  prog.uniformFields.forEach((
    f,
    i,
  ) => (uniforms[f] = f === "alpha" ? u.getFloat32(4 * i, true) : u.getUint32(4 * i, true)));
  const [gx, gy = 1, gz = 1] = launch.workgroups;
  const name = `${launch.spec.key} ${m}x${n}x${k}x${batch}`;
  // an f16 C written 16 bytes a thread (`vecOut`) is bound as packed halves in vec4<u32>
  const cEl = prog.bindings[2].type.args[0] as { name: string; args?: { name: string }[] };
  const cPacked = cEl.name === "vec4" && cEl.args?.[0]?.name === "u32" ? packF16(C) : null;
  let stats;
  try {
    stats = runWgsl(prog, [operand(a, 0), operand(b, 1), cPacked ?? C], uniforms, [gx, gy, gz]);
  } catch (err) {
    throw new Error(`${name}: ${err}`);
  }
  if (cPacked) C.set(new Float16Array(cPacked.buffer).subarray(0, C.length));
  assert.ok(stats.mmas > 0, `${name}: no matrix products ran`);
  // f32 accumulation rounded after every 16-deep product; then the output type
  const tol2 = L.out === "f16" ? { rtol: 2 ** -10, atol: 1e-6 } : { rtol: 1e-6, atol: 1e-6 };
  assertBatches(C, a, b, c0, offs, { a: sa, b: sb, c: sc }, [m, n, k, batch], L, e.alpha, tol2, name);
  for (let i = 0; i < C.length; i++) {
    const inside = Array.from({ length: batch }, (_, z) => offs.c + z * sc).some((cz) =>
      i >= cz && i < cz + m * n
    );
    if (!inside) assert.equal(C[i], c0[i], `${name}: C[${i}] outside the product was written`);
  }
}

Deno.test("generated subgroup-matrix WGSL, run by a CPU interpreter, matches a float64 matmul", () => {
  const rng = testRng("sgm-generated");
  const tinyFrag = { ...SGM_TINY, bk: 32, stage: "fragments" as const };
  const tinyGlobal = { ...SGM_TINY, stage: "global" as const, buffers: 1 as const, pad: 0 };
  const tinySingle = { ...SGM_TINY, buffers: 1 as const, swizzle: 1 };
  const tinyNoPrefetch = { ...tinySingle, prefetch: false };
  const tinyRotate = { ...SGM_TINY, bk: 32, vec: 8 as const, rotate: true };
  // warp specialization: one or two subgroups only stage
  const tinyProducers = { ...SGM_TINY, producers: 1 };
  const tinyProducersRotate = { ...tinyRotate, producers: 2 };
  // constant fragment offsets: one copy of the multiplies per subgroup
  const tinyConst = { ...tinyRotate, constOffsets: true };
  const tinyConstSingle = { ...tinySingle, constOffsets: true, epilogueSlots: 2 as const };
  for (const [transA, transB] of LAYOUTS) {
    const whole: EmuCase = { m: 64, n: 32, k: 48, batch: 1, alpha: 1 };
    const configs = [SGM_TINY, tinyFrag, tinyGlobal, tinySingle, tinyNoPrefetch, tinyRotate, tinyProducers];
    for (const c of [...configs, tinyProducersRotate, tinyConst, tinyConstSingle]) {
      const exact = { ...whole, k: 3 * c.bk };
      checkGenerated(c, { transA, transB, out: "f32", accumulate: false }, exact, rng); // direct epilogue
      checkGenerated(c, { transA, transB, out: "f16", accumulate: true }, { ...exact, alpha: 0.75 }, rng);
    }
    // the 16-byte epilogue (`vecOut`) for the other two outputs
    for (const c of [SGM_TINY, tinyConst, { ...tinyConst, epilogueSlots: 2 as const }]) {
      const exact = { ...whole, k: 2 * c.bk, alpha: -1.25 };
      checkGenerated(c, { transA, transB, out: "f32", accumulate: true }, exact, rng);
      checkGenerated(c, { transA, transB, out: "f16", accumulate: false }, exact, rng);
    }
    // partial blocks, batched with padded strides and offsets; 8-, 4- and 2-half loads
    for (const vec of [4, 2] as const) {
      const c = { ...SGM_TINY, vec };
      const ragged: EmuCase = { m: 40, n: 56, k: 20 + vec, batch: 2, alpha: -0.5 };
      checkGenerated(c, { transA, transB, out: "f32", accumulate: true }, ragged, rng);
      checkGenerated(c, { transA, transB, out: "f16", accumulate: false }, { ...ragged, batch: 1 }, rng);
    }
    // the 16-byte epilogue in partial blocks: an f32 C whose N (52) splits a lane's 8 columns at 4
    const vec4 = { ...SGM_TINY, vec: 4 as const };
    checkGenerated(vec4, { transA, transB, out: "f32", accumulate: true }, {
      m: 40,
      n: 52,
      k: 24,
      batch: 1,
      alpha: 0.5,
    }, rng);
    checkGenerated(vec4, { transA, transB, out: "f32", accumulate: false }, {
      m: 40,
      n: 52,
      k: 24,
      batch: 1,
      alpha: 1,
    }, rng);
    const ragged: EmuCase = { m: 40, n: 56, k: 44, batch: 2, alpha: -0.5 };
    checkGenerated(tinyNoPrefetch, { transA, transB, out: "f32", accumulate: true }, ragged, rng);
    const ragged8: EmuCase = { m: 40, n: 56, k: 72, batch: 2, alpha: 1.5 };
    checkGenerated(tinyRotate, { transA, transB, out: "f16", accumulate: true }, ragged8, rng);
    checkGenerated(tinyConst, { transA, transB, out: "f16", accumulate: true }, ragged8, rng);
    // producers with an even and an odd number of K slices, ragged
    checkGenerated(tinyProducers, { transA, transB, out: "f32", accumulate: true }, ragged, rng);
    checkGenerated(tinyProducersRotate, { transA, transB, out: "f16", accumulate: false }, {
      ...ragged8,
      k: 120,
    }, rng);
  }
  // the production config, one layout each way: the linear forward (A B^T) ragged, and dW (A^T B) whole
  checkGenerated(SGM_LARGE, { transA: false, transB: true, out: "f16", accumulate: false }, {
    m: 136,
    n: 128,
    k: 72,
    batch: 1,
    alpha: 1,
  }, rng);
  checkGenerated(SGM_LARGE, { transA: true, transB: false, out: "f32", accumulate: false }, {
    m: 128,
    n: 128,
    k: 64,
    batch: 1,
    alpha: 1,
  }, rng);
});

Deno.test("subgroup-matrix block order: every swizzle visits each block of C once", () => {
  for (const swizzle of [1, 2, 3, 8]) {
    for (const [nx, ny] of [[1, 1], [5, 3], [3, 17], [64, 64], [7, 9]]) {
      const seen = new Set<string>();
      for (let y = 0; y < ny; y++) {
        for (let x = 0; x < nx; x++) {
          const b = sgmBlockOf(swizzle, nx, ny, x, y);
          assert.ok(b.bm >= 0 && b.bm < ny && b.bn >= 0 && b.bn < nx, `block ${b.bm},${b.bn} in range`);
          seen.add(`${b.bm},${b.bn}`);
        }
      }
      assert.equal(seen.size, nx * ny, `swizzle ${swizzle} on ${nx}x${ny} blocks`);
    }
  }
});

Deno.test("subgroup-matrix configs: the sweep fits the H200's limits; malformed configs are rejected", () => {
  const h200 = { maxComputeWorkgroupStorageSize: 49152, maxComputeInvocationsPerWorkgroup: 1024 };
  for (const c of SGM_SWEEP) validateSgmConfig(c, h200);
  assert.throws(() => validateSgmConfig({ ...SGM_LARGE, bk: 24 }), /bk must be/);
  assert.throws(() => validateSgmConfig({ ...SGM_LARGE, pad: 4 }), /pad must be/);
  assert.throws(() => validateSgmConfig({ ...SGM_LARGE, bm: 80 }), /multiple of 16 \* sgM/);
  assert.throws(() => validateSgmConfig({ ...SGM_LARGE, buffers: 2 }, h200), /bytes of workgroup memory/);
  assert.throws(() => validateSgmConfig({ ...SGM_SMALL, bm: 32, bn: 32, bk: 16 }), /loads per thread/);
  // fragment origins stay 16-byte aligned (multiples of 8 halves), as Vulkan's cooperative matrix loads need
  for (const c of SGM_SWEEP) {
    for (const [transA, transB] of LAYOUTS) {
      const L: SgmLayout = { transA, transB, out: "f32", accumulate: false };
      for (const p of [sgmOperandPlan(c, L, "A"), sgmOperandPlan(c, L, "B")] as SgmOperandPlan[]) {
        assert.equal(p.stride % 8, 0);
        for (let w = 0; w < (p.name === "A" ? c.sgM : c.sgN); w++) {
          for (let i = 0; i < p.frags; i++) {
            const at = sgmFragmentOrigin(p, w, i, 1);
            assert.equal(
              (at.row * p.stride + at.col) % 8,
              0,
              `${sgmConfigName(c)} ${p.name} fragment offset`,
            );
          }
        }
      }
    }
  }
});

// ---- choosing the kernel ----------------------------------------------------------------------------------------

const H200_LIKE: SgmDeviceInfo = {
  features: { f16: true, subgroupMatrix: true },
  subgroupMatrixConfigs: [
    { componentType: "f16", resultComponentType: "f16", M: 16, N: 16, K: 16 },
    { componentType: "f16", resultComponentType: "f32", M: 16, N: 16, K: 16 },
    { componentType: "f16", resultComponentType: "f32", M: 16, N: 8, K: 16 },
  ],
  subgroupMinSize: 32,
  subgroupMaxSize: 32,
  limits: { maxComputeWorkgroupStorageSize: 49152, maxComputeInvocationsPerWorkgroup: 1024 },
};

function shape(m: number, n: number, k: number, extra: Partial<MatmulShape> = {}): MatmulShape {
  return { m, n, k, batch: 1, strideA: 0, strideB: 0, strideC: 0, ...extra };
}

Deno.test("subgroup-matrix support: the feature, f16, a 16x16x16 f16->f32 config and subgroups of exactly 32", () => {
  assert.equal(sgmSupported(H200_LIKE), true);
  assert.equal(sgmSupported({ ...H200_LIKE, features: { f16: true, subgroupMatrix: false } }), false);
  assert.equal(sgmSupported({ ...H200_LIKE, features: { f16: false, subgroupMatrix: true } }), false);
  assert.equal(sgmSupported({ ...H200_LIKE, subgroupMinSize: 16, subgroupMaxSize: 64 }), false);
  assert.equal(
    sgmSupported({ ...H200_LIKE, subgroupMatrixConfigs: H200_LIKE.subgroupMatrixConfigs.slice(2) }),
    false,
  );
});

Deno.test("matmul op: f16 products take the subgroup-matrix kernel exactly when the device and shape qualify", () => {
  const f16 = { dtype: "f16", transA: false, transB: true, accumulate: false } as const;
  const key = (dev: SgmDeviceInfo, s: MatmulShape, layout: MatmulLayout = f16) =>
    matmulLaunch(dev, s, layout).spec.key;
  // large: 128x128 blocks, 16-byte loads; few blocks: 64x64; odd widths: narrower loads
  assert.match(
    key(H200_LIKE, shape(4096, 4096, 4096)),
    new RegExp(`^sgm_nt_f16_exact_vo_${sgmConfigName(SGM_LARGE)}$`),
  );
  assert.match(key(H200_LIKE, shape(512, 512, 4096)), new RegExp(`_${sgmConfigName(SGM_SMALL)}$`));
  assert.match(
    key(H200_LIKE, shape(4096, 4096, 4100)),
    /^sgm_nt_f16_checked_vo_128x128x64_2x2_k_threads_v4_/,
  );
  assert.match(key(H200_LIKE, shape(4096, 4096, 4098)), /_threads_v2_/);
  // every transpose and accumulation (backward passes) also qualify
  assert.match(
    matmulLaunch(H200_LIKE, shape(2048, 2048, 8192), {
      ...f16,
      transA: true,
      transB: false,
      accumulate: true,
    })
      .spec.key,
    /^sgm_tn_f16_acc_exact_/,
  );
  // the register-tiled kernel: no feature, f32, odd K, tiny M, or an explicit config
  const plain = /^matmul_/;
  assert.match(
    key({ ...H200_LIKE, features: { f16: true, subgroupMatrix: false } }, shape(4096, 4096, 4096)),
    plain,
  );
  assert.match(key(H200_LIKE, shape(4096, 4096, 4096), { ...f16, dtype: "f32" }), plain);
  assert.match(key(H200_LIKE, shape(4096, 4096, 4097)), plain);
  assert.match(key(H200_LIKE, shape(8, 4096, 4096)), plain);
  assert.match(matmulLaunch(H200_LIKE, shape(4096, 4096, 4096), f16, SGM_PLAIN).spec.key, plain);
  // an offset that breaks 4-byte alignment
  assert.match(key(H200_LIKE, shape(4096, 4096, 4096, { offsetA: 1 })), plain);
});

const SGM_PLAIN = { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 };

Deno.test("subgroup-matrix launch: the grid, and shapes a staging mode cannot take are refused", () => {
  const L: SgmLayout = { transA: false, transB: true, out: "f16", accumulate: false };
  const l = sgmLaunch(
    shape(300, 200, 72, { batch: 3, strideA: 300 * 72, strideB: 0, strideC: 300 * 200 }),
    L,
    SGM_LARGE,
  );
  assert.deepEqual(l.workgroups, [2, 3, 3]);
  assert.equal(pickSgmConfig(shape(300, 200, 72), L)?.vec, 8);
  assert.throws(() => sgmLaunch(shape(256, 256, 36), L, SGM_LARGE), /multiples of 8 halves/);
  assert.throws(
    () => sgmLaunch(shape(200, 256, 64), L, { ...SGM_LARGE, stage: "fragments" }),
    /fragments staging needs/,
  );
  assert.throws(
    () => sgmLaunch(shape(256, 256, 64, { offsetB: 4 }), L, { ...SGM_LARGE, stage: "global" }),
    /global/,
  );
});

// ---- the fallback on a device without subgroup matrices -------------------------------------------------------

Deno.test(
  "matmul op without subgroup matrices (the CI adapter): f16 products run the register-tiled kernel, correctly",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    // on a GPU with subgroup matrices (DISTILLERY_GPU=dawn on the H200) the op takes them: nothing falls back
    if (sgmSupported(rt.dev)) return console.warn("sgm fallback: this adapter has subgroup matrices");
    if (!rt.dev.features.f16) return; // f16 storage itself is unavailable: nothing to fall back from
    const rng = testRng("sgm-fallback");
    // a shape the subgroup-matrix kernel would take on an H200 (aligned, M, N >= 32), every transpose
    const [m, n, k] = [64, 48, 40];
    for (const [transA, transB] of LAYOUTS) {
      const a = f16Values(rng, m * k), b = f16Values(rng, k * n);
      assert.match(
        matmulLaunch(H200_LIKE, shape(m, n, k), { dtype: "f16", transA, transB, accumulate: false }).spec.key,
        /^sgm_/,
      );
      const before = rt.dev.stats.pipelines;
      const y = await rt.scope(async () => {
        const ta = rt.tensor(a, transA ? [k, m] : [m, k], "f16");
        const tb = rt.tensor(b, transB ? [n, k] : [k, n], "f16");
        return await matmul(ta, tb, { transA, transB }).read();
      });
      const ref = refMatmul(
        { data: a, batched: false, trans: transA },
        { data: b, batched: false, trans: transB },
        1,
        m,
        n,
        k,
      );
      // f16 inputs exactly representable, f32 accumulation, f16 output: the output rounding dominates
      assertClose(y, ref, F16_TOL, `f16 ${+transA}${+transB} via the fallback`);
      assert.ok(rt.dev.stats.pipelines >= before);
    }
  },
);
