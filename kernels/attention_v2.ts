/**
 * Causal GQA attention, second generation ("v2"): the FlashAttention-2 forward, dQ and dK/dV kernels written so
 * that every per-thread value lives in a register whatever the driver's loop unroller decides.
 *
 * Why a second version: the first kernels (`attention.ts`, kept as variant "v1" for comparison and for
 * decoding's key-split partials) index private arrays (`acc[i][c]`, `dka[i][c]`) inside loops of 8 iterations
 * that hold a branch, and pick half of a vec4 by a thread-dependent component (`x[(ty * TM) % 4 + e]`) when the
 * micro-tile is 2 rows. Both are fine on llvmpipe but, when the GPU compiler does not fully unroll such a loop,
 * the arrays go to local (stack) memory and every FMA becomes a load/store pair: on the H200 the v1 backward
 * (2-row micro-tiles) ran 17x slower than the v1 forward (4-row). Here every per-thread array index and vector
 * component is a literal produced by the TypeScript generator (straight-line code), the only runtime loops index
 * shared memory, and the GQA ratio G is a compile-time constant so the packed-row divisions (`R / G`, `R % G`)
 * are multiplications.
 *
 * Layout and semantics follow `attention.ts` (q, o, do, dq `[B, T, H, hd]`; k, v, dk, dv `[B, Tk, Hkv, hd]`; lse
 * and delta `[B, T, H]` f32; packed rows `R = t * G + g` so one workgroup serves all query heads of a kv head).
 * Every contraction over the head dimension is a 4 x 4 vec4 outer product per thread (2 shared vec4 loads per
 * 16 FMAs), and every tile read down a column is stored transposed with the XOR swizzle of `attention.ts`, so
 * both the column reads and the per-dimension reads are free of bank conflicts.
 *
 * Forward (`BR * BC / 16` threads): thread (ry, kx) scores rows 4ry.. against keys 4kx.. of each key tile, posts
 * its 4 row maxima to shared memory, and after a barrier every thread of a row group forms the same new row max,
 * so P = exp(S - m) needs no second pass; the same thread then owns the output of rows 4ry.. at dimensions
 * kx + BC/4 * c (its running max and sum are exactly the statistics its outputs need). Four barriers per tile.
 *
 * Backward (`BR * BC / 8` threads): the workgroup is two halves. In phase 1 half 0 computes the scores S of a
 * 4 x 4 micro-tile per thread and half 1 the matching dP = dO V^T. Half 0 stores P = exp(S - lse) (masked); after
 * a barrier, the half-1 thread with the same micro-tile reads it back and stores dS = P * (dP - delta). Phase 2
 * of the dK/dV kernel gives dV (= P^T dO) to half 0 and dK (= dS^T Q) to half 1, each thread owning 4 keys x
 * hd/(BR/4) dims in registers for the whole row loop (the row loop covers every query head of the kv head's
 * group); phase 2 of the dQ kernel spreads dQ (= dS K) over all threads (4 rows x hd/(BC/2) dims each). Four
 * barriers per tile.
 *
 * @module
 */
import { ceilDiv, type DType, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";
import type { AttentionShape } from "./attention.ts";

/** Tiles of the v2 backward kernels: BR packed query rows x BC keys per tile, `BR * BC / 8` threads. */
export interface BackwardTiles {
  /** Query rows per tile (multiple of 4; BR/4 a power of 2 or a multiple of 8). */
  br: number;
  /** Keys per tile (multiple of 4; BC/4 a power of 2 or a multiple of 8). */
  bc: number;
}

const XYZW = ["x", "y", "z", "w"];

function pad4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

function swizzleMask(n4: number): number {
  return Math.min(8, n4) - 1;
}

function checkTiles(t: BackwardTiles): void {
  const ok = (n: number) => {
    if (n < 4 || n % 4) return false;
    const sw = Math.min(8, n / 4);
    return (sw & (sw - 1)) === 0 && (n / 4) % sw === 0;
  };
  if (!ok(t.br) || !ok(t.bc) || (t.br * t.bc) / 8 > 256 || (t.br * t.bc) % 8) {
    throw new Error(`attention backward v2: invalid tiles ${JSON.stringify(t)}`);
  }
}

/** Bytes of workgroup memory the v2 dK/dV kernel needs (the dQ kernel needs BR * BC * 4 less). */
export function backwardSharedBytes(hd: number, t: BackwardTiles): number {
  const hdp = pad4(hd);
  return 4 * (2 * hdp * t.br + 2 * hdp * t.bc + 2 * t.br * t.bc + 2 * t.br);
}

/** Threads per workgroup of the v2 kernels. */
export function backwardThreads(t: BackwardTiles): number {
  return (t.br * t.bc) / 8;
}

// best first: 128 threads where the workgroup memory allows (hd <= 64 on a 48 KiB device), else 64, else 32
const TILES: BackwardTiles[] = [
  { br: 32, bc: 32 },
  { br: 16, bc: 32 },
  { br: 32, bc: 16 },
  { br: 16, bc: 16 },
  { br: 8, bc: 16 },
  { br: 8, bc: 8 },
  { br: 4, bc: 8 },
];

/** The largest v2 tiles whose workgroup memory fits `limitBytes`. */
export function chooseBackwardTiles(hd: number, limitBytes: number): BackwardTiles {
  return TILES.find((t) => backwardSharedBytes(hd, t) <= limitBytes) ?? TILES[TILES.length - 1];
}

const UNIFORM_BYTES = 48;
const UNIFORM_STRUCT = `struct P {
  T: u32, H: u32, Hkv: u32, qoff: u32,
  kv_len: u32, window: u32, row_blocks: u32, scale: f32,
  kv_bstride: u32, kv_pstride: u32, _a: u32, _b: u32,
}`;

function packUniforms(s: AttentionShape, rowBlocks: number): ArrayBuffer {
  return new Uniforms(UNIFORM_BYTES)
    .u32(s.T).u32(s.H).u32(s.Hkv).u32(s.qoff)
    .u32(s.kvLen).u32(s.window).u32(rowBlocks).f32(s.scale)
    .u32(s.kvBatchStride).u32(s.Hkv * s.hd).u32(0).u32(0).buffer;
}

function validate(s: AttentionShape): void {
  if (s.H % s.Hkv !== 0) throw new Error(`attention: H=${s.H} is not a multiple of Hkv=${s.Hkv}`);
  if (s.T < 1 || s.hd < 1 || s.B < 1) throw new Error(`attention: empty shape ${JSON.stringify(s)}`);
  if (s.kvLen < s.qoff + s.T) throw new Error(`attention: kvLen ${s.kvLen} < qoff + T = ${s.qoff + s.T}`);
}

/** Repeats `f(i)` for i in 0..n-1 as straight-line WGSL. */
function unroll(n: number, f: (i: number) => string): string {
  let s = "";
  for (let i = 0; i < n; i++) s += f(i);
  return s;
}

// WGSL shared by both kernels: addressing with the compile-time G and the swizzled transposed index.
function helpers(hd: number, G: number, br4: number, bc4: number): string {
  return `
const HD: u32 = ${hd}u;
const HDP: u32 = ${pad4(hd)}u;
const G: u32 = ${G}u;
// first element of packed row R (token R / G, head hk * G + R % G) of a [B, T, H, hd] tensor
fn row_stat(b: u32, hk: u32, R: u32) -> u32 {
  return (b * p.T + R / G) * p.H + hk * G + R % G;
}
fn row_addr(b: u32, hk: u32, R: u32) -> u32 {
  return row_stat(b, hk, R) * HD;
}
fn kv_addr(b: u32, hk: u32, j: u32) -> u32 {
  return b * p.kv_bstride + j * p.kv_pstride + hk * HD;
}
// element (d, n4) of a transposed [HDP][N4] vec4 tile, XOR-swizzled (see the module comment of attention.ts)
fn qix(d: u32, n4: u32) -> u32 { return d * ${br4}u + (n4 ^ (d & ${swizzleMask(br4)}u)); }
fn kix(d: u32, n4: u32) -> u32 { return d * ${bc4}u + (n4 ^ (d & ${swizzleMask(bc4)}u)); }
`;
}

/**
 * Straight-line WGSL of the phase-1 contraction over the head dimension: `s{e} += vec4(a[d].e) * bvec[d]` for
 * e = 0..3, where `a` and `b` are transposed swizzled tiles read at (d, aN4) and (d, bN4). The loop runs over
 * blocks of 8 dimensions so that the swizzle term `d & mask` is a literal inside the block.
 */
function contraction(
  hd: number,
  a: { arr: string; off: string; ix: string; n4: string; mask: number },
  b: { arr: string; off: string; ix: string; n4: string; mask: number },
): string {
  const hd8 = Math.floor(hd / 8) * 8;
  const step = (dExpr: string, u: number | null) => {
    // with d = d0 + u and d0 a multiple of 8, (d & mask) == (u & mask): the XOR term is loop-invariant
    const aIdx = u === null
      ? `${a.ix}(${dExpr}, ${a.n4})`
      : `(${dExpr}) * ${a.arr === "kvt" ? "BC4" : "BR4"} + (${a.n4} ^ ${u & a.mask}u)`;
    const bIdx = u === null
      ? `${b.ix}(${dExpr}, ${b.n4})`
      : `(${dExpr}) * ${b.arr === "kvt" ? "BC4" : "BR4"} + (${b.n4} ^ ${u & b.mask}u)`;
    return `
      {
        let av = ${a.arr}[${a.off} + ${aIdx}];
        let bv = ${b.arr}[${b.off} + ${bIdx}];
${unroll(4, (e) => `        s${e} = fma(vec4<f32>(av.${XYZW[e]}), bv, s${e});\n`)}      }`;
  };
  let code = "";
  if (hd8 > 0) {
    code += `
    for (var d0 = 0u; d0 < ${hd8}u; d0 += 8u) {${unroll(8, (u) => step(`d0 + ${u}u`, u))}
    }`;
  }
  if (hd8 < hd) {
    code += `
    for (var d = ${hd8}u; d < HD; d++) {${step("d", null)}
    }`;
  }
  return code;
}

// Loads of transposed [HDP][N4] tiles from global memory, one vec4 (4 rows or keys at one dimension) per index;
// consecutive threads take consecutive dimensions, so each scalar load of a warp is one 128-byte line.

// Q^T * scale into qdt[0..QT) and, for the backward, dO^T into qdt[QT..2QT) and lse/delta into stat
function loadRowsFn(backward: boolean): string {
  return `
fn load_rows(b: u32, hk: u32, r0: u32, r_end: u32, lid: u32) {
  for (var idx = lid; idx < QT; idx += NT) {
    let d = idx % HDP;
    let r4 = idx / HDP;
    var x = vec4<f32>(0.0);
${backward ? "    var y = vec4<f32>(0.0);\n" : ""}${
    unroll(4, (e) =>
      `    {
      let R = r0 + r4 * 4u + ${e}u;
      if (R < r_end && d < HD) {
        let a = row_addr(b, hk, R) + d;
        x.${XYZW[e]} = f32(q[a]) * p.scale;
${backward ? `        y.${XYZW[e]} = f32(go[a]);\n` : ""}      }
    }
`)
  }    qdt[qix(d, r4)] = x;
${backward ? "    qdt[QT + qix(d, r4)] = y;\n" : ""}  }
${
    backward
      ? `  for (var r4 = lid; r4 < BR4; r4 += NT) {
    var l = vec4<f32>(0.0);
    var dl = vec4<f32>(0.0);
${
        unroll(4, (e) =>
          `    {
      let R = r0 + r4 * 4u + ${e}u;
      if (R < r_end) {
        let i = row_stat(b, hk, R);
        l.${XYZW[e]} = lse[i];
        dl.${XYZW[e]} = delta[i];
      }
    }
`)
      }    stat[r4] = l;
    stat[BR4 + r4] = dl;
  }
`
      : ""
  }}
`;
}

// K^T into kvt[0..KT), V^T into kvt[KT..2KT): keys k0..k_end-1 (zeros past k_end)
function loadKeysFn(): string {
  return `
fn load_keys(b: u32, hk: u32, k0: u32, k_end: u32, lid: u32) {
  for (var idx = lid; idx < KT; idx += NT) {
    let d = idx % HDP;
    let c4 = idx / HDP;
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
${
    unroll(4, (e) =>
      `    {
      let j = k0 + c4 * 4u + ${e}u;
      if (j < k_end && d < HD) {
        let a = kv_addr(b, hk, j) + d;
        x.${XYZW[e]} = f32(k[a]);
        y.${XYZW[e]} = f32(v[a]);
      }
    }
`)
  }    kvt[kix(d, c4)] = x;
    kvt[KT + kix(d, c4)] = y;
  }
}
`;
}

function commonDecls(hd: number, G: number, t: BackwardTiles, pdTiles: number): string {
  const hdp = pad4(hd), br4 = t.br / 4, bc4 = t.bc / 4, nt = backwardThreads(t);
  return `${helpers(hd, G, br4, bc4)}
const BR: u32 = ${t.br}u;
const BR4: u32 = ${br4}u;
const BC: u32 = ${t.bc}u;
const BC4: u32 = ${bc4}u;
const NT: u32 = ${nt}u;
const NH: u32 = ${nt / 2}u;
const QT: u32 = ${hdp * br4}u;
const KT: u32 = ${hdp * bc4}u;
const PT: u32 = ${t.br * bc4}u;
var<workgroup> qdt: array<vec4<f32>, ${2 * hdp * br4}>;  // Q^T * scale, then dO^T: [HDP][BR4] swizzled
var<workgroup> kvt: array<vec4<f32>, ${2 * hdp * bc4}>;  // K^T, then V^T: [HDP][BC4] swizzled
var<workgroup> pd: array<vec4<f32>, ${pdTiles * t.br * bc4}>;  // P, dS (layout per kernel)
var<workgroup> stat: array<vec4<f32>, ${2 * br4}>;      // lse, then delta, of the tile's rows
${loadRowsFn(true)}${loadKeysFn()}`;
}

// ---- forward ------------------------------------------------------------------------------------------------

/** Tiles of the v2 forward: BR packed query rows x BC keys per tile, `BR * BC / 16` threads. */
export interface ForwardTilesV2 {
  /** Query rows per workgroup (multiple of 4; BR/4 a power of 2 or a multiple of 8). */
  br: number;
  /** Keys per tile (multiple of 4; BC/4 a power of 2 or a multiple of 8). */
  bc: number;
}

/** Bytes of workgroup memory the v2 forward needs: Q^T, K^T, V^T, P and the row-max partials. */
export function forwardSharedBytesV2(hd: number, t: ForwardTilesV2): number {
  const hdp = pad4(hd);
  return 4 * (hdp * t.br + 2 * hdp * t.bc + t.br * t.bc + (t.br * t.bc) / 4);
}

// best first: 64 rows x 32 keys with 128 threads fits 48 KiB at hd 64
const FWD_TILES: ForwardTilesV2[] = [
  { br: 64, bc: 32 },
  { br: 32, bc: 32 },
  { br: 32, bc: 16 },
  { br: 16, bc: 16 },
  { br: 8, bc: 16 },
  { br: 8, bc: 8 },
];

/** The largest v2 forward tiles whose workgroup memory fits `limitBytes`. */
export function chooseForwardTilesV2(hd: number, limitBytes: number): ForwardTilesV2 {
  return FWD_TILES.find((t) => forwardSharedBytesV2(hd, t) <= limitBytes) ?? FWD_TILES[FWD_TILES.length - 1];
}

const fwdSpecs = new Map<string, KernelSpec>();

function forwardSpec(dtype: DType, hd: number, G: number, t: ForwardTilesV2): KernelSpec {
  const key = `attn2_fwd_${dtype}_hd${hd}_g${G}_${t.br}x${t.bc}`;
  let spec = fwdSpecs.get(key);
  if (spec) return spec;
  checkTiles(t);
  const T = wgslType(dtype);
  const hdp = pad4(hd), br4 = t.br / 4, bc4 = t.bc / 4, nt = br4 * bc4;
  if (nt > 256) throw new Error(`attention forward v2: ${nt} threads for tiles ${JSON.stringify(t)}`);
  const NDO = Math.ceil(hd / bc4); // output dimensions per thread (dx + BC4 * c)
  const dGuard = hd % bc4 !== 0;
  spec = {
    key,
    bindings: ["read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read_write> o: array<${T}>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> p: P;
${helpers(hd, G, br4, bc4)}
const NEG: f32 = -1.0e30;
const BR: u32 = ${t.br}u;
const BR4: u32 = ${br4}u;
const BC: u32 = ${t.bc}u;
const BC4: u32 = ${bc4}u;
const NT: u32 = ${nt}u;
const QT: u32 = ${hdp * br4}u;
const KT: u32 = ${hdp * bc4}u;
var<workgroup> qdt: array<vec4<f32>, ${hdp * br4}>;      // Q^T * scale: [HDP][BR4] swizzled
var<workgroup> kvt: array<vec4<f32>, ${2 * hdp * bc4}>;  // K^T, then V^T: [HDP][BC4] swizzled
var<workgroup> pt: array<vec4<f32>, ${t.br * bc4}>;      // P [BR][BC4] (vec4 over 4 keys of one row)
var<workgroup> pmax: array<vec4<f32>, ${
      bc4 * br4
    }>;     // [BC4][BR4]: each thread's max over its 4 keys, 4 rows
${loadRowsFn(false)}${loadKeysFn()}
@compute @workgroup_size(${nt})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  // heavy (late) row blocks first: they have the most keys
  let blk = p.row_blocks - 1u - wid.x;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let nrows = p.T * G;
  let r0 = blk * BR;
  let r_last = min(r0 + BR, nrows) - 1u;
  let p_lo = p.qoff + r0 / G;
  let p_hi = p.qoff + r_last / G;
  var k_begin = 0u;
  if (p.window > 0u && p_lo + 1u > p.window) { k_begin = p_lo + 1u - p.window; }
  let k_end = min(p_hi + 1u, p.kv_len);

  // thread (ry, kx): scores of rows 4ry..4ry+3 x keys 4kx..4kx+3 of each tile, and the output of the same rows
  // at dimensions kx + BC4 * c (so the row statistics it computes are the ones its outputs need)
  let ry = lid / BC4;
  let kx = lid % BC4;
  let rows = vec4<u32>(r0 + 4u * ry) + vec4<u32>(0u, 1u, 2u, 3u);
  let pos = vec4<u32>(p.qoff) + rows / vec4<u32>(G);
  let rv = rows < vec4<u32>(nrows);
  var m = vec4<f32>(NEG);   // running max of each row
  var l = vec4<f32>(0.0);   // running sum of exp(score - m)
${unroll(NDO, (c) => `  var acc${c} = vec4<f32>(0.0);  // dimension kx + ${bc4 * c}, component = row\n`)}
  load_rows(b, hk, r0, nrows, lid);
  for (var kt = k_begin; kt < k_end; kt += BC) {
    load_keys(b, hk, kt, k_end, lid);
    workgroupBarrier();

    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
${
      contraction(hd, { arr: "qdt", off: "0u", ix: "qix", n4: "ry", mask: swizzleMask(br4) }, {
        arr: "kvt",
        off: "0u",
        ix: "kix",
        n4: "kx",
        mask: swizzleMask(bc4),
      })
    }
    // s{e}: row 4ry + e against keys 4kx..4kx+3; invisible keys get NEG
    let keys = vec4<u32>(kt + 4u * kx) + vec4<u32>(0u, 1u, 2u, 3u);
${
      unroll(4, (e) =>
        `    {
      let ps = pos.${XYZW[e]};
      let vis = vec4<bool>(rv.${XYZW[e]}) & (keys < vec4<u32>(k_end)) & (keys <= vec4<u32>(ps)) &
        (vec4<bool>(p.window == 0u) | (keys + vec4<u32>(p.window) > vec4<u32>(ps)));
      s${e} = select(vec4<f32>(NEG), s${e}, vis);
    }
`)
    }    pmax[kx * BR4 + ry] = vec4<f32>(
${unroll(4, (e) => `      max(max(s${e}.x, s${e}.y), max(s${e}.z, s${e}.w)),\n`)}    );
    workgroupBarrier();
    var mt = m;
    for (var c = 0u; c < BC4; c++) { mt = max(mt, pmax[c * BR4 + ry]); }
    // rows with no visible key so far keep m = NEG: their scores are NEG too, and the select below zeroes them
    let alpha = exp(m - mt);
    m = mt;
${
      unroll(4, (e) =>
        `    pt[(4u * ry + ${e}u) * BC4 + kx] = select(vec4<f32>(0.0), exp(s${e} - vec4<f32>(m.${
          XYZW[e]
        })), s${e} > vec4<f32>(-1.0e29));\n`)
    }    workgroupBarrier();

    l *= alpha;
${unroll(NDO, (c) => `    acc${c} *= alpha;\n`)}    for (var c4 = 0u; c4 < BC4; c4++) {
${
      unroll(4, (e) =>
        `      let p${e} = pt[(4u * ry + ${e}u) * BC4 + c4];\n`)
    }      l += vec4<f32>(dot(p0, vec4<f32>(1.0)), dot(p1, vec4<f32>(1.0)), dot(p2, vec4<f32>(1.0)), dot(p3, vec4<f32>(1.0)));
${
      unroll(NDO, (c) => {
        const body = `
        let vv = kvt[KT + kix(kx + ${bc4 * c}u, c4)];
        acc${c} += vec4<f32>(dot(p0, vv), dot(p1, vv), dot(p2, vv), dot(p3, vv));`;
        return dGuard ? `      if (kx + ${bc4 * c}u < HD) {${body}\n      }\n` : `      {${body}\n      }\n`;
      })
    }    }
    workgroupBarrier();
  }

  let inv = select(vec4<f32>(0.0), vec4<f32>(1.0) / l, l > vec4<f32>(0.0));
${
      unroll(4, (e) =>
        `  {
    let R = r0 + 4u * ry + ${e}u;
    if (R < nrows) {
      let base = row_addr(b, hk, R);
${
          unroll(NDO, (c) =>
            `      ${dGuard ? `if (kx + ${bc4 * c}u < HD) { ` : ""}o[base + kx + ${
              bc4 * c
            }u] = ${T}(acc${c}.${XYZW[e]} * inv.${XYZW[e]});${dGuard ? " }" : ""}\n`)
        }      if (kx == 0u) {
        lse[row_stat(b, hk, R)] = select(NEG, m.${XYZW[e]} + log(l.${XYZW[e]}), l.${XYZW[e]} > 0.0);
      }
    }
  }
`)
    }}
`,
  };
  fwdSpecs.set(key, spec);
  return spec;
}

/** Forward attention (v2). Bindings: q, k, v (read), o (rw), lse (rw, f32 `[B, T, H]`). */
export function attentionForwardV2(dtype: DType, s: AttentionShape, tiles: ForwardTilesV2): Launch {
  validate(s);
  const spec = forwardSpec(dtype, s.hd, s.H / s.Hkv, tiles);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), tiles.br);
  return { spec, uniforms: packUniforms(s, rowBlocks), workgroups: [rowBlocks, s.B * s.Hkv, 1] };
}

// ---- dK / dV ------------------------------------------------------------------------------------------------

const dkvSpecs = new Map<string, KernelSpec>();

function dkvSpec(dtype: DType, hd: number, G: number, t: BackwardTiles): KernelSpec {
  const key = `attn2_dkv_${dtype}_hd${hd}_g${G}_${t.br}x${t.bc}`;
  let spec = dkvSpecs.get(key);
  if (spec) return spec;
  checkTiles(t);
  const T = wgslType(dtype);
  const br4 = t.br / 4, bc4 = t.bc / 4;
  const DX = br4; // phase 2: threads across dimensions per key quad
  const NDC = Math.ceil(hd / DX);
  const dGuard = hd % DX !== 0;
  spec = {
    key,
    bindings: ["read", "read", "read", "read", "read", "read", "rw", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read> go: array<${T}>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> dk: array<${T}>;
@group(0) @binding(7) var<storage, read_write> dv: array<${T}>;
@group(0) @binding(8) var<uniform> p: P;
${commonDecls(hd, G, t, 2)}
// pd here: P^T then dS^T, [BC][BR4] (vec4 over 4 rows of one key)

@compute @workgroup_size(${backwardThreads(t)})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let k0 = wid.x * BC;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let k_last = min(k0 + BC, p.kv_len) - 1u;
  // query tokens that can see keys k0..k_last: positions k0 .. k_last + W - 1
  var t_lo = 0u;
  if (k0 > p.qoff) { t_lo = k0 - p.qoff; }
  var t_end = p.T;
  if (p.window > 0u) { t_end = min(p.T, k_last + p.window - p.qoff); }
  let r_begin = t_lo * G;
  let r_end = t_end * G;

  // half 0: S, P and dV; half 1: dP, dP - delta and dK. Thread s owns keys 4ky..4ky+3 and, in phase 1, rows
  // 4rx..4rx+3 of each tile; in phase 2 dimensions rx + BR4 * c.
  let g = lid / NH;
  let sl = lid % NH;
  let ky = sl / BR4;
  let rx = sl % BR4;
  let j0 = k0 + 4u * ky;
  let kvo = g * KT;        // phase 1 reads K^T (half 0) or V^T (half 1)
  let qdo = g * QT;        // ... against Q^T or dO^T
  let qdo2 = (1u - g) * QT; // phase 2: dV = P^T dO (half 0), dK = dS^T Q (half 1)
  let pdo = g * PT;        // ... from P^T or dS^T

  load_keys(b, hk, k0, p.kv_len, lid);
${unroll(NDC, (c) => `  var acc${c} = vec4<f32>(0.0);\n`)}
  for (var rt = r_begin; rt < r_end; rt += BR) {
    load_rows(b, hk, rt, r_end, lid);
    workgroupBarrier();

    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
${
      contraction(hd, { arr: "kvt", off: "kvo", ix: "kix", n4: "ky", mask: swizzleMask(bc4) }, {
        arr: "qdt",
        off: "qdo",
        ix: "qix",
        n4: "rx",
        mask: swizzleMask(br4),
      })
    }
    // s{i}: key j0 + i against rows 4rx..4rx+3
    let st = stat[g * BR4 + rx];
    let R0 = rt + 4u * rx;
    let rows = vec4<u32>(R0) + vec4<u32>(0u, 1u, 2u, 3u);
    if (g == 0u) {
      let pos = vec4<u32>(p.qoff) + rows / vec4<u32>(G);
      let rv = rows < vec4<u32>(r_end);
${
      unroll(4, (i) =>
        `      {
        let j = j0 + ${i}u;
        let vis = rv & (vec4<u32>(j) <= pos) & (vec4<bool>(p.window == 0u) | (vec4<u32>(j + p.window) > pos)) &
          vec4<bool>(j < p.kv_len);
        pd[(4u * ky + ${i}u) * BR4 + rx] = select(vec4<f32>(0.0), exp(s${i} - st), vis);
      }
`)
    }    }
    workgroupBarrier();
    // dS^T = P^T * (dP - delta)^T, each half-1 thread on the elements its half-0 twin wrote
    if (g == 1u) {
${
      unroll(4, (i) =>
        `      pd[PT + (4u * ky + ${i}u) * BR4 + rx] = pd[(4u * ky + ${i}u) * BR4 + rx] * (s${i} - st);\n`)
    }    }
    workgroupBarrier();

    // phase 2: half 0 accumulates dV = P^T dO, half 1 dK = dS^T (Q * scale)
    for (var r4 = 0u; r4 < BR4; r4++) {
${unroll(4, (i) => `      let a${i} = pd[pdo + (4u * ky + ${i}u) * BR4 + r4];\n`)}${
      unroll(NDC, (c) => {
        const body = `
        let x = qdt[qdo2 + qix(rx + ${DX * c}u, r4)];
        acc${c} += vec4<f32>(dot(a0, x), dot(a1, x), dot(a2, x), dot(a3, x));`;
        return dGuard ? `      if (rx + ${DX * c}u < HD) {${body}\n      }\n` : `      {${body}\n      }\n`;
      })
    }    }
    workgroupBarrier();
  }

${
      unroll(NDC, (c) =>
        unroll(4, (i) =>
          `  {
    let d = rx + ${DX * c}u;
    let j = j0 + ${i}u;
    if (d < HD && j < p.kv_len) {
      let a = kv_addr(b, hk, j) + d;
      if (g == 0u) { dv[a] = ${T}(acc${c}.${XYZW[i]}); } else { dk[a] = ${T}(acc${c}.${XYZW[i]}); }
    }
  }
`))
    }}
`,
  };
  dkvSpecs.set(key, spec);
  return spec;
}

/**
 * dK and dV (v2). Bindings: q, k, v, do (read), lse, delta (read, f32), dk, dv (rw). dk/dv have k's layout with
 * `kvBatchStride`; every key < kvLen is written (zero where no query sees it).
 */
export function attentionBackwardDkvV2(dtype: DType, s: AttentionShape, tiles: BackwardTiles): Launch {
  validate(s);
  const spec = dkvSpec(dtype, s.hd, s.H / s.Hkv, tiles);
  return {
    spec,
    uniforms: packUniforms(s, 0),
    workgroups: [ceilDiv(s.kvLen, tiles.bc), s.B * s.Hkv, 1],
  };
}

// ---- dQ -----------------------------------------------------------------------------------------------------

const dqSpecs = new Map<string, KernelSpec>();

function dqSpec(dtype: DType, hd: number, G: number, t: BackwardTiles): KernelSpec {
  const key = `attn2_dq_${dtype}_hd${hd}_g${G}_${t.br}x${t.bc}`;
  let spec = dqSpecs.get(key);
  if (spec) return spec;
  checkTiles(t);
  const T = wgslType(dtype);
  const br4 = t.br / 4, bc4 = t.bc / 4;
  const DXQ = 2 * bc4; // phase 2: threads across dimensions per row quad
  const NDQ = Math.ceil(hd / DXQ);
  const dGuard = hd % DXQ !== 0;
  spec = {
    key,
    bindings: ["read", "read", "read", "read", "read", "read", "rw"],
    uniformBytes: UNIFORM_BYTES,
    code: `${wgslHeader(dtype)}
${UNIFORM_STRUCT}
@group(0) @binding(0) var<storage, read> q: array<${T}>;
@group(0) @binding(1) var<storage, read> k: array<${T}>;
@group(0) @binding(2) var<storage, read> v: array<${T}>;
@group(0) @binding(3) var<storage, read> go: array<${T}>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<${T}>;
@group(0) @binding(7) var<uniform> p: P;
${commonDecls(hd, G, t, 1)}
// pd here: P, overwritten by dS, [BR][BC4] (vec4 over 4 keys of one row)
const DXQ: u32 = ${DXQ}u;

@compute @workgroup_size(${backwardThreads(t)})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  // heavy (late) row blocks first: they have the most keys
  let blk = p.row_blocks - 1u - wid.x;
  let b = wid.y / p.Hkv;
  let hk = wid.y % p.Hkv;
  let nrows = p.T * G;
  let r0 = blk * BR;
  let r_last = min(r0 + BR, nrows) - 1u;
  let p_lo = p.qoff + r0 / G;
  let p_hi = p.qoff + r_last / G;
  var k_begin = 0u;
  if (p.window > 0u && p_lo + 1u > p.window) { k_begin = p_lo + 1u - p.window; }
  let k_end = min(p_hi + 1u, p.kv_len);

  // phase 1: half g, thread sl owns rows 4ry..4ry+3 x keys 4kx..4kx+3 of each key tile
  let g = lid / NH;
  let sl = lid % NH;
  let ry = sl / BC4;
  let kx = sl % BC4;
  let kvo = g * KT;
  let qdo = g * QT;
  // phase 2: thread owns rows 4ry2..4ry2+3 x dimensions dx + DXQ * c
  let ry2 = lid / DXQ;
  let dx = lid % DXQ;

  load_rows(b, hk, r0, nrows, lid);
  workgroupBarrier();
  let st = stat[g * BR4 + ry];
  let rows = vec4<u32>(r0 + 4u * ry) + vec4<u32>(0u, 1u, 2u, 3u);
  let pos = vec4<u32>(p.qoff) + rows / vec4<u32>(G);
  let rv = rows < vec4<u32>(nrows);
${unroll(NDQ, (c) => `  var acc${c} = vec4<f32>(0.0);\n`)}
  for (var kt = k_begin; kt < k_end; kt += BC) {
    load_keys(b, hk, kt, k_end, lid);
    workgroupBarrier();

    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
${
      contraction(hd, { arr: "qdt", off: "qdo", ix: "qix", n4: "ry", mask: swizzleMask(br4) }, {
        arr: "kvt",
        off: "kvo",
        ix: "kix",
        n4: "kx",
        mask: swizzleMask(bc4),
      })
    }
    // s{e}: row 4ry + e against keys 4kx..4kx+3
    if (g == 0u) {
      let keys = vec4<u32>(kt + 4u * kx) + vec4<u32>(0u, 1u, 2u, 3u);
${
      unroll(4, (e) =>
        `      {
        let ps = pos.${XYZW[e]};
        let vis = vec4<bool>(rv.${XYZW[e]}) & (keys < vec4<u32>(k_end)) & (keys <= vec4<u32>(ps)) &
          (vec4<bool>(p.window == 0u) | (keys + vec4<u32>(p.window) > vec4<u32>(ps)));
        pd[(4u * ry + ${e}u) * BC4 + kx] = select(vec4<f32>(0.0), exp(s${e} - vec4<f32>(st.${XYZW[e]})), vis);
      }
`)
    }    }
    workgroupBarrier();
    // dS = P * (dP - delta), written over P by the half-1 twin of the thread that wrote it
    if (g == 1u) {
${
      unroll(4, (e) =>
        `      pd[(4u * ry + ${e}u) * BC4 + kx] = pd[(4u * ry + ${e}u) * BC4 + kx] * (s${e} - vec4<f32>(st.${
          XYZW[e]
        }));\n`)
    }    }
    workgroupBarrier();

    // phase 2: dQ += dS K
    for (var c4 = 0u; c4 < BC4; c4++) {
${unroll(4, (e) => `      let ds${e} = pd[(4u * ry2 + ${e}u) * BC4 + c4];\n`)}${
      unroll(NDQ, (c) => {
        const body = `
        let kk = kvt[kix(dx + ${DXQ * c}u, c4)];
        acc${c} += vec4<f32>(dot(ds0, kk), dot(ds1, kk), dot(ds2, kk), dot(ds3, kk));`;
        return dGuard ? `      if (dx + ${DXQ * c}u < HD) {${body}\n      }\n` : `      {${body}\n      }\n`;
      })
    }    }
    workgroupBarrier();
  }

${
      unroll(NDQ, (c) =>
        unroll(4, (e) =>
          `  {
    let d = dx + ${DXQ * c}u;
    let R = r0 + 4u * ry2 + ${e}u;
    if (d < HD && R < nrows) { dq[row_addr(b, hk, R) + d] = ${T}(acc${c}.${XYZW[e]} * p.scale); }
  }
`))
    }}
`,
  };
  dqSpecs.set(key, spec);
  return spec;
}

/** dQ (v2). Bindings: q, k, v, do (read), lse, delta (read, f32), dq (rw). */
export function attentionBackwardDqV2(dtype: DType, s: AttentionShape, tiles: BackwardTiles): Launch {
  validate(s);
  const spec = dqSpec(dtype, s.hd, s.H / s.Hkv, tiles);
  const rowBlocks = ceilDiv(s.T * (s.H / s.Hkv), tiles.br);
  return {
    spec,
    uniforms: packUniforms(s, rowBlocks),
    workgroups: [rowBlocks, s.B * s.Hkv, 1],
  };
}
