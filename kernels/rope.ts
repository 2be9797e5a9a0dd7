/**
 * Rotary position embedding with HF's `rotate_half` convention on q/k laid out [tokens, heads, head_dim]: the
 * pair (i, i + hd/2) of every head rotates by `angle = position * inv_freq[i]`,
 *   y_i        = x_i cos - x_{i+hd/2} sin
 *   y_{i+hd/2} = x_{i+hd/2} cos + x_i sin.
 * The backward pass is the rotation by the negative angle (the same kernel with `sign = -1`).
 *
 * Precision, matched to HF: HF forms `freqs = inv_freq (f32) x position (f32)` in f32 and takes cos/sin of that
 * f32 value with the framework's accurate f32 routines. The angle here is the same f32 product. Its cos/sin,
 * however, cannot come from WGSL's `cos`/`sin`: WGSL only promises an absolute error of 2^-11 on [-pi, pi] and
 * nothing outside, and angles reach thousands of radians (position 8191 at inv_freq 1). So the kernel reduces
 * the angle itself: k = round(angle * 2/pi), r = angle - k pi/2 with pi/2 split into four parts of at most 12
 * significant bits and k split into two 12-bit halves, so every product is exact in f32 and the first
 * subtractions are exact (Cody-Waite); then single-precision minimax polynomials on [-pi/4, pi/4] (Cephes
 * sinf/cosf) and the quadrant. The result is within about 1e-7 of cos/sin of the f32 angle for positions up to
 * 2^24 / (2/pi) (the test checks positions up to 10^6). The rotation itself is computed in f32 and rounded to
 * the storage type once (HF rounds cos/sin to the storage type first; for f16 the two differ by about 2^-11).
 *
 * @module
 */
import { ceilDiv, type DType, grid2d, type KernelSpec, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the RoPE kernel. */
export const ROPE_WORKGROUP = 256;

/** Where positions come from: an i32 tensor (one per token, or per sequence step) or a start offset. */
export type RopePositions = "tensor" | "offset";

/** pi/2 as four float32 parts of at most 12 significant bits each, summing to float64 pi/2. */
export const HALF_PI_PARTS: readonly number[] = (() => {
  const parts: number[] = [];
  let r = Math.PI / 2;
  for (let i = 0; i < 4; i++) {
    const q = 2 ** (Math.floor(Math.log2(Math.abs(r))) - 11);
    const p = Math.round(r / q) * q;
    parts.push(p);
    r -= p;
  }
  return parts;
})();

const lit = (v: number) => {
  const s = v.toString();
  return /[.e]/.test(s) ? s : `${s}.0`;
};

/** WGSL `sincos_accurate(a) -> vec2<f32>(sin a, cos a)` for any f32 angle up to about 1e7 (see module doc). */
export const WGSL_SINCOS = `
fn sincos_accurate(a: f32) -> vec2<f32> {
  let kf = round(a * 0.63661977236758134);
  // k = kh + kl with kh a multiple of 4096 and |kl| < 4096: each has at most 12 significant bits, as does each
  // part of pi/2, so each product below is exact in f32
  let kh = floor(kf * (1.0 / 4096.0)) * 4096.0;
  let kl = kf - kh;
  var r = a - kh * ${lit(HALF_PI_PARTS[0])};
  r = r - kl * ${lit(HALF_PI_PARTS[0])};
  r = r - kh * ${lit(HALF_PI_PARTS[1])};
  r = r - kl * ${lit(HALF_PI_PARTS[1])};
  r = r - kh * ${lit(HALF_PI_PARTS[2])};
  r = r - kl * ${lit(HALF_PI_PARTS[2])};
  r = r - kf * ${lit(HALF_PI_PARTS[3])};
  let z = r * r;
  let s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
  let c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0;
  // quadrant: angle = k pi/2 + r (two's complement & 3 is k mod 4 for negative k too)
  switch (u32(i32(kf)) & 3u) {
    case 0u: { return vec2<f32>(s, c); }
    case 1u: { return vec2<f32>(c, -s); }
    case 2u: { return vec2<f32>(-s, -c); }
    default: { return vec2<f32>(-c, s); }
  }
}
`;

const specs = new Map<string, KernelSpec>();

/**
 * One rotation of x [tokens, heads, hd] into y. Position of token t: `positions[t % posLen]` ("tensor") or
 * `start + t % seqLen` ("offset"). `sign` -1 rotates backwards (the gradient); `scaling` multiplies cos and sin
 * (HF's `attention_scaling`).
 * Bindings: x (read), [positions (read, i32),] invFreq (read, f32 [hd/2]), y (rw).
 */
export function ropeKernel(
  dtype: DType,
  source: RopePositions,
  tokens: number,
  heads: number,
  headDim: number,
  opts: { sign?: 1 | -1; start?: number; seqLen?: number; posLen?: number; scaling?: number } = {},
): Launch {
  if (headDim % 2 !== 0) throw new Error(`rope: head_dim must be even, got ${headDim}`);
  const T = wgslType(dtype);
  const key = `rope_${dtype}_${source}`;
  let spec = specs.get(key);
  if (!spec) {
    const posBinding = source === "tensor"
      ? `@group(0) @binding(1) var<storage, read> POS: array<i32>;\n`
      : "";
    const b = source === "tensor" ? 2 : 1;
    spec = {
      key,
      bindings: source === "tensor" ? ["read", "read", "read", "rw"] : ["read", "read", "rw"],
      uniformBytes: 32,
      code: `${wgslHeader(dtype)}
struct P { pairs: u32, heads: u32, half: u32, period: u32, start: i32, sign: f32, scaling: f32, _b: u32 }
@group(0) @binding(0) var<storage, read> X: array<${T}>;
${posBinding}@group(0) @binding(${b}) var<storage, read> INV_FREQ: array<f32>;
@group(0) @binding(${b + 1}) var<storage, read_write> Y: array<${T}>;
@group(0) @binding(${b + 2}) var<uniform> p: P;
${WGSL_SINCOS}
@compute @workgroup_size(${ROPE_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let q = (wid.y * nwg.x + wid.x) * ${ROPE_WORKGROUP}u + lid;  // one pair per thread
  if (q >= p.pairs) { return; }
  let i = q % p.half;
  let th = q / p.half;              // token * heads + head
  let t = th / p.heads;
  let pos = ${source === "tensor" ? "POS[t % p.period]" : "p.start + i32(t % p.period)"};
  let angle = f32(pos) * INV_FREQ[i]; // one f32 rounding, as HF's f32 product
  let sc = sincos_accurate(angle);
  let cs = p.scaling * sc.y;        // HF scales cos and sin by attention_scaling (1 for default and llama3)
  let sn = p.sign * p.scaling * sc.x;
  let base = th * 2u * p.half;
  let x1 = f32(X[base + i]);
  let x2 = f32(X[base + i + p.half]);
  Y[base + i] = ${T}(x1 * cs - x2 * sn);
  Y[base + i + p.half] = ${T}(x2 * cs + x1 * sn);
}
`,
    };
    specs.set(key, spec);
  }
  const half = headDim / 2;
  const pairs = tokens * heads * half;
  const period = source === "tensor" ? (opts.posLen ?? tokens) : (opts.seqLen ?? tokens);
  return {
    spec,
    uniforms: new Uniforms(32).u32(pairs).u32(heads).u32(half).u32(Math.max(period, 1)).i32(opts.start ?? 0)
      .f32(opts.sign ?? 1).f32(opts.scaling ?? 1).buffer,
    workgroups: grid2d(ceilDiv(pairs, ROPE_WORKGROUP)),
  };
}
