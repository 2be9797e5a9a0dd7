/**
 * Fill and axpy: the two in-place primitives the runtime itself needs (constant tensors, gradient accumulation).
 *
 * @module
 */
import {
  type DType,
  type KernelSpec,
  linearKernelSpec,
  linearLanes,
  linearWorkgroups,
  Uniforms,
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
    spec = linearKernelSpec(
      `fill_${dtype}`,
      dtype,
      [["out", "rw", T]],
      "n: u32, value_bits: u32, _a: u32, _b: u32",
      `if (i >= p.n) { return; }
  out[i] = ${isInt ? `${T}(bitcast<${T}>(p.value_bits))` : `${T}(bitcast<f32>(p.value_bits))`};`,
    );
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

const axpySpecs = new Map<string, KernelSpec>();

/**
 * `y[i] += alpha * x[i]` for i < n. Bindings: x (read), y (rw). Accumulates in f32; four elements a thread when
 * `n` is a multiple of 4.
 */
export function axpyKernel(dtype: DType, n: number, alpha: number): Launch {
  const vec = linearLanes(n) === 4;
  const key = `axpy_${dtype}${vec ? "_v4" : ""}`;
  let spec = axpySpecs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    const el = vec ? `vec4<${T}>` : T, f = vec ? "vec4<f32>" : "f32";
    spec = linearKernelSpec(
      key,
      dtype,
      [["x", "read", el], ["y", "rw", el]],
      "n: u32, alpha: f32, _a: u32, _b: u32",
      `if (i >= p.n) { return; }
  y[i] = ${el}(${f}(y[i]) + p.alpha * ${f}(x[i]));`,
    );
    axpySpecs.set(key, spec);
  }
  const threads = n / linearLanes(n);
  return {
    spec,
    uniforms: new Uniforms(16).u32(threads).f32(alpha).buffer,
    workgroups: linearWorkgroups(threads),
  };
}
