/**
 * Fill and axpy: the two in-place primitives the runtime itself needs (constant tensors, gradient accumulation).
 *
 * @module
 */
import {
  type DType,
  type KernelSpec,
  LINEAR_WORKGROUP,
  linearWorkgroups,
  Uniforms,
  WGSL_LINEAR_INDEX,
  wgslHeader,
  wgslType,
} from "./kernel.ts";

/** A prepared dispatch: spec, uniforms and workgroup counts. */
export interface Launch {
  /** Kernel variant. */
  spec: KernelSpec;
  /** Packed uniforms. */
  uniforms: ArrayBuffer;
  /** Workgroup counts. */
  workgroups: [number, number?, number?];
}

const fillSpecs = new Map<DType, KernelSpec>();

/** `out[i] = value` for i < n. */
export function fillKernel(dtype: DType, n: number, value: number): Launch {
  let spec = fillSpecs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    const isInt = dtype === "i32" || dtype === "u32";
    spec = {
      key: `fill_${dtype}`,
      bindings: ["rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { n: u32, value_bits: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read_write> out: array<${T}>;
@group(0) @binding(1) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);
  if (i >= p.n) { return; }
  out[i] = ${isInt ? `${T}(bitcast<${T}>(p.value_bits))` : `${T}(bitcast<f32>(p.value_bits))`};
}
`,
    };
    fillSpecs.set(dtype, spec);
  }
  const bits = new DataView(new ArrayBuffer(4));
  if (dtype === "i32") bits.setInt32(0, value, true);
  else if (dtype === "u32") bits.setUint32(0, value, true);
  else bits.setFloat32(0, value, true);
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(bits.getUint32(0, true)).buffer,
    workgroups: linearWorkgroups(n),
  };
}

const axpySpecs = new Map<DType, KernelSpec>();

/** `y[i] += alpha * x[i]` for i < n. Bindings: x (read), y (rw). Accumulates in f32. */
export function axpyKernel(dtype: DType, n: number, alpha: number): Launch {
  let spec = axpySpecs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key: `axpy_${dtype}`,
      bindings: ["read", "rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { n: u32, alpha: f32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> x: array<${T}>;
@group(0) @binding(1) var<storage, read_write> y: array<${T}>;
@group(0) @binding(2) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);
  if (i >= p.n) { return; }
  y[i] = ${T}(f32(y[i]) + p.alpha * f32(x[i]));
}
`,
    };
    axpySpecs.set(dtype, spec);
  }
  return { spec, uniforms: new Uniforms(16).u32(n).f32(alpha).buffer, workgroups: linearWorkgroups(n) };
}
