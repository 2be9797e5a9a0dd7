/**
 * Differentiable conversion between f32 and f16 storage. The mixed-precision paths use it to give f32-only
 * kernels (the Mamba2 scan and its decode steps) f32 islands inside an f16 model: widen the inputs, run the f32
 * kernels, narrow the outputs; gradients flow back through the casts the other way.
 *
 * @module
 */
import { castKernel, type FloatDType } from "../../kernels/cast.ts";
import type { Tensor } from "../tensor.ts";

export type { FloatDType } from "../../kernels/cast.ts";

/**
 * `x` converted to `dtype` (f32 or f16); `x` itself when it already has that dtype. Differentiable: the gradient
 * is converted back to `x`'s dtype.
 */
export function cast(x: Tensor, dtype: FloatDType): Tensor {
  if (x.dtype === dtype) return x;
  const from = x.dtype;
  if (from !== "f32" && from !== "f16") throw new Error(`cast: ${from} is not a float type`);
  const rt = x.rt;
  const out = rt.empty(x.shape, dtype);
  const k = castKernel(from, dtype, x.size);
  rt.dev.dispatch(k.spec, [x.binding, out.binding], k.workgroups, k.uniforms);
  rt.record("cast", [x], [out], ([g]) => {
    const gx = rt.empty(x.shape, from);
    const b = castKernel(dtype, from, x.size);
    rt.dev.dispatch(b.spec, [g!.binding, gx.binding], b.workgroups, b.uniforms);
    return [gx];
  });
  return out;
}

/** `x` as f32 (itself when it already is): the entry of an f32 island. */
export const widen = (x: Tensor): Tensor => cast(x, "f32");
