/**
 * The matrix-unit attention kernels (`kernels/attention_sgm.ts`: forward, dQ, dK/dV), their generated WGSL run by
 * the CPU interpreter (tests/helpers/wgsl_interp.ts) against the float64 reference of causal GQA attention, so
 * their numbers are checked on machines without subgroup matrices (CI's software adapter only compiles them).
 *
 * The pipeline is the runtime's (runtime/ops/attention.ts): the backward kernels read the forward kernels' f16 o
 * and natural-log lse, and delta = rowsum(dO * o) in f32 (`attentionBackwardDelta`).
 *
 * Every case runs both forms of the kernels (`constOffsets` false and true: one copy of the fragment code over the
 * runtime subgroup id, or one per subgroup with literal offsets), each against float64, and the two must agree
 * bit for bit: they do the same arithmetic in the same order, only the addresses are written differently.
 *
 * @module
 */
import assert from "node:assert/strict";
import {
  attentionBackwardDkvSgm,
  attentionBackwardDqSgm,
  attentionForwardSgm,
} from "../../kernels/attention_sgm.ts";
import type { AttentionShape } from "../../kernels/attention.ts";
import type { Launch } from "../../kernels/fill.ts";
import { packF16, parseWgsl, runWgsl } from "../helpers/wgsl_interp.ts";
import { normwise, testRng } from "../helpers/gpu.ts";
import { refAttention, refAttentionBackward, type RefAttentionShape } from "../reference/attention.ts";
import type { Rng } from "../../util/rng.ts";

interface Case extends Pick<RefAttentionShape, "B" | "T" | "H" | "Hkv" | "hd"> {
  /** Key tile of the forward and dQ kernels. */
  bc: 32 | 64;
  /** Row tile of the dK/dV kernel. */
  br: 32 | 64;
}

// Normwise errors max|got - ref| / max|ref|. o, dq, dk, dv leave as f16 (half an ulp: 2^-11 = 4.9e-4 relative)
// and the kernels multiply P and dS rounded to f16 in workgroup memory, with f32 accumulation; the backward also
// starts from the f16 o (through delta) and differences dP - delta. Observed over five seeds of the cases below
// (ATTN_INTERP_VERBOSE=1 prints them): o up to 4.5e-4, gradients up to 7.5e-4. The numeric mutations tried when
// this test was written (a causal mask off by one, the scale or delta misapplied, no online rescaling, the wrong
// shuffle partner, the running max unscaled) gave 5e-2 or more, or NaN; a dropped barrier is a data race that
// the interpreter reports.
const OUT_TOL = 1.5e-3;
const GRAD_TOL = 2.5e-3;
// lse is f32 (an ulp is 4.8e-7 near 4) from f32 sums of exp over f32 scores of f16 inputs: observed up to 6.2e-7;
// absolute, as it is a log
const LSE_TOL = 5e-6;

/** f16-representable normal values, none zero (a zero would hide a missing load or store). */
function f16Normal(rng: Rng, n: number): Float64Array {
  const out = new Float64Array(n);
  const h = new Float16Array(1);
  for (let i = 0; i < n; i++) {
    do h[0] = rng.normal(); while (h[0] === 0);
    out[i] = h[0];
  }
  return out;
}

/** An output array of f16 halves in `vec4<u32>` words, every half NaN until written. */
function f16Output(n: number): Uint32Array {
  return new Uint32Array(n / 2).fill(0x7e007e00);
}

function unpackF16(words: Uint32Array): Float64Array {
  return Float64Array.from(new Float16Array(words.buffer, words.byteOffset, words.length * 2));
}

/** Runs a launch's generated WGSL over `buffers` (one per storage binding), uniforms as the launch packed them. */
function runLaunch(launch: Launch, buffers: (Float64Array | Uint32Array)[]): void {
  const prog = parseWgsl(launch.spec.code);
  const u = new DataView(launch.uniforms);
  const uniforms: Record<string, number> = {};
  prog.uniformFields.forEach((f, i) => {
    uniforms[f] = prog.uniformTypes[f] === "f32" ? u.getFloat32(4 * i, true) : u.getUint32(4 * i, true);
  });
  const [gx, gy = 1, gz = 1] = launch.workgroups;
  const stats = runWgsl(prog, buffers, uniforms, [gx, gy, gz]);
  assert.ok(stats.mmas > 0, `${launch.spec.key}: no matrix products ran`);
}

/** max|got - ref|, failing on any non-finite value. */
function maxAbsErr(got: Float64Array, ref: Float64Array, what: string): number {
  assert.equal(got.length, ref.length, `${what}: length`);
  let err = 0;
  for (let i = 0; i < got.length; i++) {
    if (!Number.isFinite(got[i])) throw new Error(`${what}[${i}] = ${got[i]}`);
    err = Math.max(err, Math.abs(got[i] - ref[i]));
  }
  return err;
}

function label(c: Case): string {
  return `B${c.B} T${c.T} H${c.H}/${c.Hkv} hd${c.hd} bc${c.bc} br${c.br}`;
}

/** The kernels' outputs of one case and form. */
interface Outputs {
  o: Float64Array;
  lse: Float64Array;
  dq: Float64Array;
  dk: Float64Array;
  dv: Float64Array;
}

/**
 * Forward, then the backward with random dO, through the interpreter, in the form `constOffsets`; errors against
 * float64 and the outputs.
 */
function checkCase(c: Case, rng: Rng, constOffsets: boolean): { errs: Record<string, number>; out: Outputs } {
  const scale = 1 / Math.sqrt(c.hd);
  const s: AttentionShape = {
    B: c.B,
    T: c.T,
    H: c.H,
    Hkv: c.Hkv,
    hd: c.hd,
    qoff: 0,
    kvLen: c.T,
    kvBatchStride: c.T * c.Hkv * c.hd,
    window: 0,
    scale,
  };
  const rs: RefAttentionShape = { ...s, S: c.T, qoff: 0, window: 0 };
  const nq = c.B * c.T * c.H * c.hd, nk = c.B * c.T * c.Hkv * c.hd, rows = c.B * c.T * c.H;
  const q = f16Normal(rng, nq), k = f16Normal(rng, nk), v = f16Normal(rng, nk), g = f16Normal(rng, nq);
  const [Q, K, V, G] = [q, k, v, g].map(packF16);

  const O = f16Output(nq), LSE = new Float64Array(rows).fill(NaN);
  runLaunch(attentionForwardSgm(s, c.bc, constOffsets), [Q, K, V, O, LSE]);
  const o = unpackF16(O);
  const ref = refAttention(rs, q, k, v);

  // delta = rowsum(dO * o) over the kernel's f16 o, rounded to f32 (attentionBackwardDelta sums in f32)
  const delta = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let acc = 0;
    for (let d = 0; d < c.hd; d++) acc += o[r * c.hd + d] * g[r * c.hd + d];
    delta[r] = Math.fround(acc);
  }
  const DQ = f16Output(nq), DK = f16Output(nk), DV = f16Output(nk);
  runLaunch(attentionBackwardDqSgm(s, c.bc, constOffsets), [Q, K, V, G, LSE, delta, DQ]);
  runLaunch(attentionBackwardDkvSgm(s, c.br, constOffsets), [Q, K, V, G, LSE, delta, DK, DV]);
  const rb = refAttentionBackward(rs, q, k, v, g);
  const out = { o, lse: LSE, dq: unpackF16(DQ), dk: unpackF16(DK), dv: unpackF16(DV) };
  const errs = {
    o: normwise(o, ref.out, "o"),
    lse: maxAbsErr(LSE, ref.lse, "lse"),
    dq: normwise(out.dq, rb.dq, "dq"),
    dk: normwise(out.dk, rb.dk, "dk"),
    dv: normwise(out.dv, rb.dv, "dv"),
  };
  return { errs, out };
}

/** Both forms of the kernels on one case (the same inputs from `seed`): each within tolerance, the two identical. */
function check(c: Case, seed: string): void {
  const outs: Outputs[] = [];
  for (const constOffsets of [false, true]) {
    const name = `${label(c)}${constOffsets ? " constOffsets" : ""}`;
    const t0 = performance.now();
    const { errs: e, out } = checkCase(c, testRng(seed), constOffsets);
    if (Deno.env.get("ATTN_INTERP_VERBOSE")) {
      const errs = Object.entries(e).map(([n, x]) => `${n} ${x.toExponential(2)}`).join(", ");
      console.log(`${name}: ${errs} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    }
    assert.ok(e.o <= OUT_TOL, `${name}: o normwise error ${e.o}`);
    assert.ok(e.lse <= LSE_TOL, `${name}: lse max error ${e.lse}`);
    for (const n of ["dq", "dk", "dv"]) assert.ok(e[n] <= GRAD_TOL, `${name}: ${n} normwise error ${e[n]}`);
    outs.push(out);
  }
  for (const n of ["o", "lse", "dq", "dk", "dv"] as const) {
    assert.deepEqual(outs[1][n], outs[0][n], `${label(c)}: ${n} differs between the two forms`);
  }
}

Deno.test("subgroup-matrix attention through the CPU interpreter: 32-key tiles, GQA 2, batch 2, hd 16", () => {
  // 140 packed rows: blocks of 64, 64, 12; 3 key tiles of 32 (the last partial)
  check({ B: 2, T: 70, H: 4, Hkv: 2, hd: 16, bc: 32, br: 32 }, "attn-sgm-interp-hd16");
});

Deno.test("subgroup-matrix attention through the CPU interpreter: GQA 4 and 1, hd 32 and 64, 64-tiles", () => {
  // 400 packed rows (the last block 16 rows), 2 key tiles
  check({ B: 1, T: 100, H: 4, Hkv: 1, hd: 32, bc: 64, br: 64 }, "attn-sgm-interp-hd32");
  // the H200's tiles at hd 64 (chooseSgmAttentionBackwardTiles), batch 2, 3 key tiles
  check({ B: 2, T: 130, H: 4, Hkv: 1, hd: 64, bc: 64, br: 64 }, "attn-sgm-interp-hd64");
  // 64-key tiles with 32-row dK/dV tiles, no grouping
  check({ B: 1, T: 67, H: 2, Hkv: 2, hd: 64, bc: 64, br: 32 }, "attn-sgm-interp-hd64-br32");
  // one partial block of 9 rows, one partial key tile
  check({ B: 1, T: 9, H: 2, Hkv: 2, hd: 16, bc: 64, br: 64 }, "attn-sgm-interp-short");
});

Deno.test("subgroup-matrix attention through the CPU interpreter: hd 128 (two P V column chunks)", () => {
  // the H200's tiles at hd 128 (32, 32)
  check({ B: 1, T: 40, H: 2, Hkv: 1, hd: 128, bc: 32, br: 32 }, "attn-sgm-interp-hd128");
});

Deno.test("subgroup-matrix attention through the CPU interpreter: GQA 3 (packed rows a stride apart need G | 16)", () => {
  // G = 3 does not divide the 16 rows between a thread's staged rows: the per-row addresses path
  check({ B: 1, T: 30, H: 3, Hkv: 1, hd: 64, bc: 64, br: 64 }, "attn-sgm-interp-gqa3");
});

// ---- the interpreter's subgroup shuffles and race checks -----------------------------------------------------

const SNIPPET_HEAD = `enable subgroups;
struct P { n: u32, _a: u32 }
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<uniform> p: P;
var<workgroup> S: array<f32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {`;

function runSnippet(body: string): Float64Array {
  const out = new Float64Array(64).fill(NaN);
  runWgsl(parseWgsl(`${SNIPPET_HEAD}\n${body}\n}`), [out], {}, [1, 1, 1]);
  return out;
}

Deno.test("wgsl_interp: subgroupShuffleXor exchanges within subgroups; non-uniform use throws", () => {
  // two shuffles in one statement, one in a loop, across two subgroups
  const out = runSnippet(`var x = f32(lid);
  for (var i = 0u; i < 2u; i++) { x = x + 0.0 * subgroupShuffleXor(x, 2u); }
  out[lid] = subgroupShuffleXor(x, 1u) * 1000.0 + subgroupShuffleXor(x, 31u);`);
  for (let i = 0; i < 64; i++) assert.equal(out[i], (i ^ 1) * 1000 + (i ^ 31), `lane ${i}`);
  // a shuffle that half the subgroup skips, a lane-dependent mask, a shuffle in a condition, a divergent barrier
  assert.throws(
    () => runSnippet(`var x = 1.0; if (lane < 16u) { x = subgroupShuffleXor(x, 1u); } out[lid] = x;`),
    /lanes of subgroup 0 diverge/,
  );
  assert.throws(
    () => runSnippet(`out[lid] = subgroupShuffleXor(1.0, lane & 1u);`),
    /mask is not subgroup-uniform/,
  );
  assert.throws(
    () => runSnippet(`if (subgroupShuffleXor(lid, 1u) > 3u) { out[lid] = 1.0; }`),
    /only in a let, var, assignment/,
  );
  assert.throws(() => runSnippet(`if (lid < 32u) { workgroupBarrier(); } out[lid] = 1.0;`), /diverge/);
});

Deno.test("wgsl_interp: workgroup memory shared without a barrier between is a data race", () => {
  const out = runSnippet(`S[lid] = f32(lid); workgroupBarrier(); out[lid] = S[63u - lid];`);
  for (let i = 0; i < 64; i++) assert.equal(out[i], 63 - i);
  // read after another invocation's write (the reader runs after the writer: not caught by NaN poisoning)
  assert.throws(
    () => runSnippet(`if (lid == 0u) { S[5] = 1.0; } if (lid == 40u) { out[0] = S[5]; }`),
    /data race on S\[5\]: invocation 40 reads what was written by invocation 0/,
  );
  // overwrite of what another invocation read, and of what another wrote
  assert.throws(
    () => runSnippet(`S[lid] = 1.0; workgroupBarrier(); out[lid] = S[(lid + 1u) % 64u]; S[lid] = 2.0;`),
    /invocation 1 overwrites what was read by invocation 0/,
  );
  assert.throws(() => runSnippet(`S[lid / 2u] = 1.0;`), /overwrites what was written by invocation 0/);
});
