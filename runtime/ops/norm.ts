/**
 * RMSNorm as a differentiable op (HF Llama semantics; see `kernels/rmsnorm.ts`).
 *
 * @module
 */
import {
  rmsNormBackwardInput,
  rmsNormBackwardWeightPartial,
  rmsNormBackwardWeightSum,
  rmsNormForward,
  rmsNormPartials,
} from "../../kernels/rmsnorm.ts";
import type { Tensor } from "../tensor.ts";

/**
 * `y = w * x / sqrt(mean(x^2, last dim) + eps)`, computed in f32 whatever the storage type. x [..., d], w [d],
 * same dtype. Gradients for x and w; w's gradient is summed over rows without atomics and written straight into
 * `w.grad` when w is a parameter.
 */
export function rmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  const rt = x.rt;
  const d = x.dim(-1);
  if (w.shape.length !== 1 || w.shape[0] !== d || w.dtype !== x.dtype) {
    throw new Error(`rmsNorm: weight ${w} does not match input ${x} (expected [${d}], ${x.dtype})`);
  }
  const rows = x.size / d;
  const y = rt.empty(x.shape, x.dtype);
  const rstd = rt.empty([rows], "f32");
  const f = rmsNormForward(x.dtype, rows, d, eps);
  rt.dev.dispatch(f.spec, [x.binding, w.binding, y.binding, rstd.binding], f.workgroups, f.uniforms);
  if (!rt.needsGrad(x, w)) {
    rstd.dispose();
    return y;
  }
  rt.record("rmsNorm", [x, w], [y], ([g]) => {
    let gx: Tensor | null = null, gw: Tensor | null = null;
    if (x.requiresGrad) {
      gx = rt.empty(x.shape, x.dtype);
      const k = rmsNormBackwardInput(x.dtype, rows, d);
      rt.dev.dispatch(
        k.spec,
        [x.binding, w.binding, g!.binding, rstd.binding, gx.binding],
        k.workgroups,
        k.uniforms,
      );
    }
    if (w.requiresGrad) {
      const parts = rt.empty([rmsNormPartials(rows), d], "f32");
      const k1 = rmsNormBackwardWeightPartial(x.dtype, rows, d);
      rt.dev.dispatch(
        k1.spec,
        [x.binding, g!.binding, rstd.binding, parts.binding],
        k1.workgroups,
        k1.uniforms,
      );
      const leaf = rt.leafGradTarget(w);
      const out = leaf ? leaf.grad : rt.empty(w.shape, w.dtype);
      const k2 = rmsNormBackwardWeightSum(w.dtype, rmsNormPartials(rows), d, leaf?.accumulate ?? false);
      rt.dev.dispatch(k2.spec, [parts.binding, out.binding], k2.workgroups, k2.uniforms);
      parts.dispose();
      gw = leaf ? null : out;
    }
    rstd.dispose();
    return [gx, gw];
  });
  return y;
}
