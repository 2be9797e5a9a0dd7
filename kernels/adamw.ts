/**
 * Optimizer kernels: the fused AdamW update (one dispatch per parameter) and the global gradient-norm
 * finalisation that produces the clipping factor on the GPU.
 *
 * The update follows PyTorch's `torch.optim.AdamW` (single-tensor path) operation by operation, in f32:
 *   p = p * (1 - lr wd)                      decoupled weight decay
 *   g = grad * clip                           clip: the global-norm factor read from a buffer (1 without clipping)
 *   m = m + (1 - b1) (g - m)                  (`lerp_`)
 *   v = b2 v + (1 - b2) g^2
 *   p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - b_i^step
 * Step-dependent scalars (lr, bias corrections) travel in the uniforms, so a schedule never recompiles anything.
 *
 * An f16 parameter can keep an f32 master copy (mixed-precision training's master weights): the update then reads
 * and writes the master, and the parameter receives the master rounded to f16. Without it an update smaller than
 * half an f16 step of the weight (2^-11 relative) rounds away, every step, however many steps agree on it.
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the optimizer kernels. */
export const ADAMW_WORKGROUP = 256;

/** Per-step scalars of one AdamW update. */
export interface AdamWStep {
  /** Learning rate of this step (after the schedule and any group scale). */
  lr: number;
  /** First-moment decay. */
  beta1: number;
  /** Second-moment decay. */
  beta2: number;
  /** Denominator epsilon. */
  eps: number;
  /** Decoupled weight decay. */
  weightDecay: number;
  /** 1-based step count of this parameter (for bias correction). */
  step: number;
}

/**
 * The fused update of one parameter of `n` elements. Bindings: param (rw), grad (read, param dtype),
 * m (rw, f32), v (rw, f32), clip (read, f32 [2]: global norm, factor; element 1 is used), and with `master`
 * the parameter's f32 master copy (rw), which the update reads and writes instead of the parameter.
 */
export function adamwKernel(dtype: DType, n: number, s: AdamWStep, master = false): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`adamw_${dtype}${master ? "_master" : ""}`, () => ({
    bindings: master ? ["rw", "read", "rw", "rw", "read", "rw"] : ["rw", "read", "rw", "rw", "read"],
    uniformBytes: 32,
    code: `${wgslHeader(dtype)}
struct P { n: u32, decay: f32, beta1: f32, beta2: f32, eps: f32, stepSize: f32, bc2Sqrt: f32, _a: u32 }
@group(0) @binding(0) var<storage, read_write> PARAM: array<${T}>;
@group(0) @binding(1) var<storage, read> GRAD: array<${T}>;
@group(0) @binding(2) var<storage, read_write> M: array<f32>;
@group(0) @binding(3) var<storage, read_write> V: array<f32>;
@group(0) @binding(4) var<storage, read> CLIP: array<f32>;
${master ? "@group(0) @binding(5) var<storage, read_write> MASTER: array<f32>;\n" : ""}@group(0) @binding(${
      master ? 6 : 5
    }) var<uniform> p: P;

@compute @workgroup_size(${ADAMW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * ${ADAMW_WORKGROUP}u + lid;
  if (i >= p.n) { return; }
  let g = f32(GRAD[i]) * CLIP[1];
  let m = M[i] + (1.0 - p.beta1) * (g - M[i]);
  let v = p.beta2 * V[i] + (1.0 - p.beta2) * g * g;
  M[i] = m;
  V[i] = v;
  let x = ${master ? "MASTER[i]" : "f32(PARAM[i])"} * p.decay;
  let updated = x - p.stepSize * m / (sqrt(v) / p.bc2Sqrt + p.eps);${master ? "\n  MASTER[i] = updated;" : ""}
  PARAM[i] = ${T}(updated);
}
`,
  }));
  // bias corrections and the decay factor in float64, then rounded once to f32 (PyTorch computes them as Python
  // floats, i.e. float64, and the kernels see them rounded to the parameter's f32 as well)
  const bc1 = 1 - s.beta1 ** s.step, bc2 = 1 - s.beta2 ** s.step;
  return {
    spec,
    uniforms: new Uniforms(32).u32(n).f32(1 - s.lr * s.weightDecay).f32(s.beta1).f32(s.beta2).f32(s.eps)
      .f32(s.lr / bc1).f32(Math.sqrt(bc2)).buffer,
    workgroups: grid2d(ceilDiv(n, ADAMW_WORKGROUP)),
  };
}

/**
 * Global gradient norm from per-parameter sums of squares: `out[0] = sqrt(sum(sumsq))`, `out[1] = clip factor
 * = min(1, maxNorm / (norm + 1e-6))` (PyTorch's `clip_grad_norm_`), or 1 when `maxNorm` <= 0. The sum runs in
 * a fixed order. Bindings: sumsq (read, f32 [count]), out (rw, f32 [2]).
 */
export function gradNormKernel(count: number, maxNorm: number): Launch {
  const spec = cachedSpec("grad_norm_finalize", () => ({
    bindings: ["read", "rw"],
    uniformBytes: 16,
    code: `
struct P { count: u32, maxNorm: f32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> SUMSQ: array<f32>;
@group(0) @binding(1) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${ADAMW_WORKGROUP}>;

@compute @workgroup_size(${ADAMW_WORKGROUP})
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var i = lid; i < p.count; i += ${ADAMW_WORKGROUP}u) { acc += SUMSQ[i]; }
  red[lid] = acc;
  for (var s = ${ADAMW_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
    workgroupBarrier();
    if (lid < s) { red[lid] += red[lid + s]; }
  }
  if (lid == 0u) {
    let norm = sqrt(red[0]);
    OUT[0] = norm;
    OUT[1] = select(1.0, min(1.0, p.maxNorm / (norm + 1e-6)), p.maxNorm > 0.0);
  }
}
`,
  }));
  return { spec, uniforms: new Uniforms(16).u32(count).f32(maxNorm).buffer, workgroups: [1] };
}
