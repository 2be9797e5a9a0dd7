/**
 * Differentiable gated grouped RMSNorm (Mamba2's `norm(y, z)`); the math is in `kernels/gated_rmsnorm.ts`.
 *
 * @module
 */
import {
  GATED_RMSNORM_EPS,
  gatedRmsNormBackward,
  gatedRmsNormForward,
  gatedRmsNormWeightPartial,
  gatedRmsNormWeightReduce,
} from "../../kernels/gated_rmsnorm.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Options of {@linkcode gatedRmsNorm}. */
export interface GatedRmsNormOptions {
  /** Channels per normalised group (Mamba2: head_dim). Default: the whole row. */
  group?: number;
  /** Epsilon inside the square root (default 1e-5, the reference's hard-coded value). */
  eps?: number;
}

/**
 * `g = y * SiLU(z)`, then per group of `group` channels `g / sqrt(mean(g^2) + eps) * weight`.
 * `y` and `z` are `[..., D]` of one shape, `weight` `[D]`, all of one dtype (f32 or f16; math in f32).
 * Gradients for y, z and weight.
 */
export function gatedRmsNorm(y: Tensor, z: Tensor, weight: Tensor, opts: GatedRmsNormOptions = {}): Tensor {
  const dim = y.shape[y.shape.length - 1];
  const group = opts.group ?? dim;
  const eps = opts.eps ?? GATED_RMSNORM_EPS;
  if (z.shape.length !== y.shape.length || z.shape.some((d, i) => d !== y.shape[i])) {
    throw new Error(`gatedRmsNorm: z ${shapeStr(z.shape)} must have the shape of y ${shapeStr(y.shape)}`);
  }
  if (weight.size !== dim) {
    throw new Error(`gatedRmsNorm: weight must be [${dim}], got ${shapeStr(weight.shape)}`);
  }
  if (!(group > 0 && Number.isInteger(group) && dim % group === 0)) {
    throw new Error(`gatedRmsNorm: group ${group} must divide the row size ${dim}`);
  }
  if (z.dtype !== y.dtype || weight.dtype !== y.dtype) {
    throw new Error(`gatedRmsNorm: dtypes differ: y ${y.dtype}, z ${z.dtype}, weight ${weight.dtype}`);
  }
  const rt = y.rt;
  const dev = rt.dev;
  const shape = { rows: y.size / dim, dim, group };
  const out = rt.empty(y.shape, y.dtype);
  const f = gatedRmsNormForward(y.dtype, shape, eps);
  dev.dispatch(f.spec, [y.binding, z.binding, weight.binding, out.binding], f.workgroups, f.uniforms);
  rt.record("gatedRmsNorm", [y, z, weight], [out], ([g]) => {
    const gy = rt.empty(y.shape, y.dtype);
    const gz = rt.empty(z.shape, z.dtype);
    const gw = rt.empty(weight.shape, weight.dtype);
    const rstd = rt.empty([shape.rows * (dim / group)], "f32");
    const b = gatedRmsNormBackward(y.dtype, shape, eps);
    dev.dispatch(
      b.spec,
      [y.binding, z.binding, weight.binding, g!.binding, gy.binding, gz.binding, rstd.binding],
      b.workgroups,
      b.uniforms,
    );
    const wp = gatedRmsNormWeightPartial(y.dtype, shape);
    const part = rt.empty([wp.blocks, dim], "f32");
    dev.dispatch(
      wp.spec,
      [y.binding, z.binding, g!.binding, rstd.binding, part.binding],
      wp.workgroups,
      wp.uniforms,
    );
    const wr = gatedRmsNormWeightReduce(y.dtype, wp.blocks, dim);
    dev.dispatch(wr.spec, [part.binding, gw.binding], wr.workgroups, wr.uniforms);
    part.dispose();
    rstd.dispose();
    return [gy, gz, gw];
  });
  return out;
}
