/**
 * Small kernels of the fused lm_head + distillation loss (`runtime/ops/head_loss.ts`); the heavy lifting is the
 * matmul and the loss kernels of `cross_entropy.ts`.
 *
 * - {@linkcode tokenWeightTotal}: `sum_t w_t` with `w_t = mask_t * [label_t != -100]`, computed from the labels
 *   and mask alone, before any logits exist. The chunked op needs the global normaliser while it turns each
 *   chunk's logits into gradients, long before the last chunk's loss is known.
 * - {@linkcode scaleByScalar}: `y = g[0] * x` or `y += g[0] * x` with the scalar read from a GPU buffer (the
 *   upstream gradient of the loss, never read back to the CPU).
 *
 * @module
 */
import { IGNORE_INDEX, ROW_WORKGROUP } from "./cross_entropy.ts";
import { type DType, type KernelSpec, linearWorkgroups, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

let weightSpec: KernelSpec | null = null;

/**
 * `out = [0, 0, 0, sum_t w_t]` (the layout of the loss kernels' `totals`, whose backward reads `totals[3]`).
 * Bindings: labels (read, i32 [N]; ignored unless `hasLabels`), mask (read, f32 [N]; ignored unless `hasMask`),
 * out (rw, f32 [4]). One workgroup.
 */
export function tokenWeightTotal(N: number, hasLabels: boolean, hasMask: boolean): Launch {
  weightSpec ??= {
    key: "head_loss_weight_total",
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `
struct P { n: u32, has_labels: u32, has_mask: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> labels: array<i32>;
@group(0) @binding(1) var<storage, read> mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
const WG: u32 = ${ROW_WORKGROUP}u;
var<workgroup> red: array<f32, WG>;
@compute @workgroup_size(${ROW_WORKGROUP})
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var t = lid; t < p.n; t += WG) {
    var w = 1.0;
    if (p.has_labels != 0u && labels[t] == ${IGNORE_INDEX}) { w = 0.0; }
    if (p.has_mask != 0u) { w *= mask[t]; }
    acc += w;
  }
  red[lid] = acc;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) { red[lid] += red[lid + stride]; }
    workgroupBarrier();
  }
  if (lid == 0u) {
    out[0] = 0.0;
    out[1] = 0.0;
    out[2] = 0.0;
    out[3] = red[0];
  }
}
`,
  };
  return {
    spec: weightSpec,
    uniforms: new Uniforms(16).u32(N).u32(hasLabels ? 1 : 0).u32(hasMask ? 1 : 0).u32(0).buffer,
    workgroups: [1],
  };
}

const scaleSpecs = new Map<string, KernelSpec>();

/**
 * `y = g[0] * x` (or `y += g[0] * x` with `accumulate`) over `n` elements. Bindings: g (read, f32 [1]),
 * x (read), y (rw), x and y of `dtype`.
 */
export function scaleByScalar(dtype: DType, n: number, accumulate: boolean): Launch {
  const key = `head_loss_scale_${dtype}${accumulate ? "_acc" : ""}`;
  let spec = scaleSpecs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key,
      bindings: ["read", "read", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { n: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<${T}>;
@group(0) @binding(2) var<storage, read_write> y: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * 256u + lid;
  if (i >= p.n) { return; }
  ${accumulate ? `y[i] = ${T}(f32(y[i]) + g[0] * f32(x[i]));` : `y[i] = ${T}(g[0] * f32(x[i]));`}
}
`,
    };
    scaleSpecs.set(key, spec);
  }
  return { spec, uniforms: new Uniforms(16).u32(n).buffer, workgroups: linearWorkgroups(n, 256) };
}
