/**
 * RMSNorm as differentiable ops (HF Llama semantics; see `kernels/rmsnorm.ts`): {@linkcode rmsNorm}, and
 * {@linkcode addRmsNorm}, the residual add fused with the norm that follows it in a pre-norm decoder layer.
 *
 * @module
 */
import {
  addRmsNormForward,
  rmsNormBackwardInput,
  rmsNormBackwardWeightPartial,
  rmsNormBackwardWeightSum,
  rmsNormForward,
  rmsNormPartials,
} from "../../kernels/rmsnorm.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

function checkWeight(what: string, x: Tensor, w: Tensor): void {
  const d = x.dim(-1);
  if (w.shape.length !== 1 || w.shape[0] !== d || w.dtype !== x.dtype) {
    throw new Error(`${what}: weight ${w} does not match input ${x} (expected [${d}], ${x.dtype})`);
  }
}

/**
 * Records the backward of `y = rmsNorm(x, w)` given `g` = dL/dy and the saved `rstd`: returns dL/dx (plus
 * `gAdd` when given, fused into the same kernel) if `wantX`, and writes dL/dw into `w.grad` (or returns it when
 * w is not a leaf).
 */
function rmsNormBackward(
  x: Tensor,
  w: Tensor,
  g: Tensor,
  rstd: Tensor,
  wantX: boolean,
  gAdd: Tensor | null,
): [Tensor | null, Tensor | null] {
  const rt = x.rt;
  const d = x.dim(-1), rows = x.size / d;
  let gx: Tensor | null = null, gw: Tensor | null = null;
  if (wantX) {
    gx = rt.empty(x.shape, x.dtype);
    const k = rmsNormBackwardInput(x.dtype, rows, d, gAdd !== null);
    const b = gAdd
      ? [x.binding, w.binding, g.binding, rstd.binding, gAdd.binding, gx.binding]
      : [x.binding, w.binding, g.binding, rstd.binding, gx.binding];
    rt.dev.dispatch(k.spec, b, k.workgroups, k.uniforms);
  }
  if (w.requiresGrad) {
    const parts = rt.empty([rmsNormPartials(rows), d], "f32");
    const k1 = rmsNormBackwardWeightPartial(x.dtype, rows, d);
    rt.dev.dispatch(k1.spec, [x.binding, g.binding, rstd.binding, parts.binding], k1.workgroups, k1.uniforms);
    const leaf = rt.leafGradTarget(w);
    const out = leaf ? leaf.grad : rt.empty(w.shape, w.dtype);
    const k2 = rmsNormBackwardWeightSum(w.dtype, rmsNormPartials(rows), d, leaf?.accumulate ?? false);
    rt.dev.dispatch(k2.spec, [parts.binding, out.binding], k2.workgroups, k2.uniforms);
    parts.dispose();
    gw = leaf ? null : out;
  }
  return [gx, gw];
}

/**
 * `y = w * x / sqrt(mean(x^2, last dim) + eps)`, computed in f32 whatever the storage type. x [..., d], w [d],
 * same dtype. Gradients for x and w; w's gradient is summed over rows without atomics and written straight into
 * `w.grad` when w is a parameter.
 */
export function rmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  const rt = x.rt;
  checkWeight("rmsNorm", x, w);
  const d = x.dim(-1), rows = x.size / d;
  const y = rt.empty(x.shape, x.dtype);
  const rstd = rt.empty([rows], "f32");
  const f = rmsNormForward(x.dtype, rows, d, eps);
  rt.dev.dispatch(f.spec, [x.binding, w.binding, y.binding, rstd.binding], f.workgroups, f.uniforms);
  if (!rt.needsGrad(x, w)) {
    rstd.dispose();
    return y;
  }
  rt.record("rmsNorm", [x, w], [y], ([g]) => {
    const grads = rmsNormBackward(x, w, g!, rstd, x.requiresGrad, null);
    rstd.dispose();
    return grads;
  });
  return y;
}

/**
 * The residual add fused with the following norm: `h = x + r` (rounded to the storage type) and
 * `y = rmsNorm(h, w, eps)` in one pass. Returns both: h continues the residual stream, y feeds the next block.
 * Gradients for x, r (both receive dL/dh plus the norm's input gradient, summed in the same kernel) and w.
 */
export function addRmsNorm(x: Tensor, r: Tensor, w: Tensor, eps: number): { h: Tensor; y: Tensor } {
  const rt = x.rt;
  if (r.size !== x.size || r.dtype !== x.dtype) {
    throw new Error(`addRmsNorm: residual ${r} does not match input ${x} (${shapeStr(x.shape)}, ${x.dtype})`);
  }
  checkWeight("addRmsNorm", x, w);
  const d = x.dim(-1), rows = x.size / d;
  const h = rt.empty(x.shape, x.dtype), y = rt.empty(x.shape, x.dtype);
  const rstd = rt.empty([rows], "f32");
  const f = addRmsNormForward(x.dtype, rows, d, eps);
  rt.dev.dispatch(
    f.spec,
    [x.binding, r.binding, w.binding, h.binding, y.binding, rstd.binding],
    f.workgroups,
    f.uniforms,
  );
  if (!rt.needsGrad(x, r, w)) {
    rstd.dispose();
    return { h, y };
  }
  rt.record("addRmsNorm", [x, r, w], [h, y], ([gh, gy]) => {
    const wantX = x.requiresGrad || r.requiresGrad;
    let gIn: Tensor | null, gw: Tensor | null = null;
    if (gy) {
      [gIn, gw] = rmsNormBackward(h, w, gy, rstd, wantX, gh);
    } else {
      gIn = gh; // only the residual path carries gradient
    }
    rstd.dispose();
    // x and r receive the same gradient; the tape counts the shared tensor once per input
    return [x.requiresGrad ? gIn : null, r.requiresGrad ? gIn : null, gw];
  });
  return { h, y };
}
