/**
 * Decoding's projections fused with their neighbours in a pre-norm decoder block (kernels/gemv.ts): the RMSNorm
 * before a projection ({@linkcode linearNormed}, {@linkcode linearQkvNormed}, {@linkcode linearSwigluNormed},
 * {@linkcode linearSplitNormed}), Mamba2's one-token conv after its in_proj ({@linkcode linearSplitNormed} with a
 * {@linkcode SplitConvStep}), the residual add after a projection ({@linkcode linearAddResidual}), and Mamba2's
 * gated norm before its out_proj with the residual add after it ({@linkcode linearGatedNormed}). A batch-1 decode
 * step is bound by its number of dispatches, and each of these saves one.
 *
 * They are inference ops: no gradients (an input that needs one is an error, not a silent detach). A few rows
 * (up to the GEMV kernels' row limits, with every operand within one storage binding) take one fused GEMV;
 * otherwise they compute the same values with the unfused ops (`rmsNorm` then the projection; the projection
 * then `add`), so callers need not know the limits. A caller that can fuse the add with the next norm instead
 * (`addRmsNorm`, one pass for many rows) should do so above {@linkcode FUSED_LINEAR_MAX_TOKENS}.
 *
 * @module
 */
import {
  GEMV_GATED_MAX_GROUPS,
  GEMV_MAX_ROWS,
  GEMV_SWIGLU_MAX_ROWS,
  type GemvConvStep,
  gemvKernel,
  gemvQkvKernel,
  gemvSplit3Kernel,
  gemvSwigluKernel,
} from "../../kernels/gemv.ts";
import { dtypeBytes } from "../../kernels/kernel.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import {
  gemvDeviceOptions,
  linear,
  LINEAR_GEMV_MAX_TOKENS,
  linearQkv,
  linearSwiglu,
  takesGemv,
} from "./matmul.ts";
import { rmsNorm } from "./norm.ts";
import { add } from "./elementwise.ts";
import { gatedRmsNorm } from "./gated_norm.ts";
import { splitLastDim } from "./columns.ts";
import { causalConv1dStep } from "./conv1d.ts";
import { CONV_STATE, CONV_WIDTH } from "../../kernels/conv1d.ts";

/**
 * Most rows (tokens) for which these ops fuse: the GEMV limit of `linear`. The SwiGLU pair fuses up to
 * `GEMV_SWIGLU_MAX_ROWS` (8) and runs its norm as a separate dispatch above that.
 */
export const FUSED_LINEAR_MAX_TOKENS: number = LINEAR_GEMV_MAX_TOKENS;

function decodingOnly(what: string, inputs: Tensor[]): void {
  const rt = inputs[0].rt;
  if (rt.needsGrad(...inputs)) {
    const which = inputs.filter((t) => t.requiresGrad).map((t) => t.name ?? String(t)).join(", ");
    throw new Error(
      `${what} is a decoding op without gradients, but ${which} requires them; use the differentiable rmsNorm, ` +
        `linear and add (or call it inside rt.noGrad)`,
    );
  }
}

/** Checks x [..., D] against a norm weight [D] and projection weights [*, D] of x's dtype; returns D. */
function checkNormed(what: string, x: Tensor, normWeight: Tensor, eps: number, weights: Tensor[]): number {
  const d = x.dim(-1);
  if (normWeight.shape.length !== 1 || normWeight.shape[0] !== d || normWeight.dtype !== x.dtype) {
    throw new Error(
      `${what}: norm weight ${normWeight} does not match input ${x} (expected [${d}], ${x.dtype})`,
    );
  }
  if (!(eps >= 0)) throw new Error(`${what}: eps must be >= 0, got ${eps}`);
  for (const w of weights) {
    if (w.shape.length !== 2 || w.shape[1] !== d || w.dtype !== x.dtype) {
      throw new Error(
        `${what}: input ${x} does not match weight ${w} (expected [..., ${w.shape[1]}], ${w.dtype})`,
      );
    }
  }
  return d;
}

/**
 * `rmsNorm(x, normWeight, eps) W^T` (x [..., D], normWeight [D], W [out, D]; result [..., out]) with the norm
 * inside the GEMV for a few rows. Decoding only (no gradients).
 */
export function linearNormed(x: Tensor, normWeight: Tensor, eps: number, w: Tensor): Tensor {
  const rt = x.rt;
  decodingOnly("linearNormed", [x, normWeight, w]);
  const d = checkNormed("linearNormed", x, normWeight, eps, [w]);
  const nOut = w.shape[0], tokens = x.size / d;
  const outBytes = tokens * nOut * dtypeBytes(x.dtype);
  if (!takesGemv(rt, tokens, GEMV_MAX_ROWS, [w.byteLength, x.byteLength, outBytes])) {
    return linear(rmsNorm(x, normWeight, eps), w);
  }
  const y = rt.empty([...x.shape.slice(0, -1), nOut], x.dtype);
  const l = gemvKernel(x.dtype, tokens, nOut, d, { ...gemvDeviceOptions(rt), normIn: { eps } });
  rt.dev.dispatch(l.spec, [x.binding, normWeight.binding, w.binding, y.binding], l.workgroups, l.uniforms);
  return y;
}

/**
 * Mamba2's one-token causal conv (runtime/ops/conv1d.ts {@linkcode causalConv1dStep}) on the middle part of a
 * split projection (xBC), advancing the conv state in place: what a decode step does right after its in_proj.
 */
export interface SplitConvStep {
  /** Conv weight [C, 4] (or [C, 1, 4]), for the unfused path. */
  weight: Tensor;
  /** Conv bias [C], for the unfused path. */
  bias: Tensor;
  /** The same weight and bias as one [C, 5] tensor (`convStepTaps`), which the fused GEMV reads. */
  taps: Tensor;
  /** Conv state [rows, C, 3]: the pre-conv inputs of the last three positions, oldest first; updated in place. */
  state: Tensor;
  /** SiLU after the bias (Mamba2: true). */
  silu: boolean;
}

/**
 * The unfused conv step on the middle part of a split projection: `parts` (z, xBC, dt) with xBC replaced by its
 * conv, or `parts` as they are without `conv`.
 */
export function splitConvStep(parts: Tensor[], conv?: SplitConvStep): Tensor[] {
  if (!conv) return parts;
  const [a, b, c] = parts;
  return [a, causalConv1dStep(b, conv.weight, conv.bias, conv.state, { silu: conv.silu }), c];
}

/**
 * `rmsNorm(x, normWeight, eps) W^T` split along its last dimension into `widths` (three parts), with the norm and
 * the split inside one GEMV for a few rows: Mamba2's in_proj output z | xBC | dt without a split dispatch. With
 * `conv`, the middle part comes out after Mamba2's one-token conv, which runs in the same GEMV and advances the
 * conv state in place (one dispatch instead of the GEMV and `causalConv1dStep`). Decoding only (no gradients).
 */
export function linearSplitNormed(
  x: Tensor,
  normWeight: Tensor,
  eps: number,
  w: Tensor,
  widths: readonly [number, number, number],
  conv?: SplitConvStep,
): Tensor[] {
  const rt = x.rt;
  const what = "linearSplitNormed";
  decodingOnly(what, [x, normWeight, w, ...(conv ? [conv.weight, conv.bias, conv.taps] : [])]);
  const d = checkNormed(what, x, normWeight, eps, [w]);
  const nOut = w.shape[0], tokens = x.size / d;
  if (widths[0] + widths[1] + widths[2] !== nOut) {
    throw new Error(`${what}: widths ${widths.join("+")} do not sum to the weight's ${nOut} rows`);
  }
  if (conv) checkSplitConv(what, conv, tokens, widths[1], x.dtype);
  const outBytes = tokens * nOut * dtypeBytes(x.dtype);
  // with the conv: x, the norm weight, W, the taps, the three outputs and the state, eight storage buffers
  const bindable = !conv || rt.dev.limits.maxStorageBuffersPerShaderStage >= 8;
  if (!bindable || !takesGemv(rt, tokens, GEMV_MAX_ROWS, [w.byteLength, x.byteLength, outBytes])) {
    return splitConvStep(splitLastDim(linear(rmsNorm(x, normWeight, eps), w), widths), conv);
  }
  const lead = x.shape.slice(0, -1);
  const outs = widths.map((n) => rt.empty([...lead, n], x.dtype));
  const convStep: GemvConvStep | undefined = conv ? { width: CONV_WIDTH, silu: conv.silu } : undefined;
  const l = gemvSplit3Kernel(x.dtype, tokens, widths, d, {
    ...gemvDeviceOptions(rt),
    normIn: { eps },
    conv: convStep,
  });
  rt.dev.dispatch(
    l.spec,
    [
      x.binding,
      normWeight.binding,
      w.binding,
      ...(conv ? [conv.taps.binding] : []),
      ...outs.map((t) => t.binding),
      ...(conv ? [conv.state.binding] : []),
    ],
    l.workgroups,
    l.uniforms,
  );
  return outs;
}

/** Checks a conv step's operands against `rows` rows of C channels of `dtype`. */
function checkSplitConv(
  what: string,
  conv: SplitConvStep,
  rows: number,
  channels: number,
  dtype: string,
): void {
  const { taps, state } = conv, perChannel = CONV_WIDTH + 1;
  if (taps.size !== channels * perChannel || taps.dtype !== dtype) {
    throw new Error(
      `${what}: conv taps ${taps} must be [${channels}, ${perChannel}] ${dtype} (weights, then bias)`,
    );
  }
  if (state.size !== rows * channels * CONV_STATE || state.dtype !== dtype) {
    throw new Error(`${what}: conv state ${state} must be [${rows}, ${channels}, ${CONV_STATE}] ${dtype}`);
  }
}

/**
 * The attention input projections of `u = rmsNorm(x, normWeight, eps)`: `u Wq^T`, `u Wk^T`, `u Wv^T` (Wk and Wv of
 * one shape), in one GEMV dispatch with the norm for a few rows. Decoding only (no gradients).
 */
export function linearQkvNormed(
  x: Tensor,
  normWeight: Tensor,
  eps: number,
  wq: Tensor,
  wk: Tensor,
  wv: Tensor,
): { q: Tensor; k: Tensor; v: Tensor } {
  const rt = x.rt;
  decodingOnly("linearQkvNormed", [x, normWeight, wq, wk, wv]);
  const d = checkNormed("linearQkvNormed", x, normWeight, eps, [wq, wk, wv]);
  const [nq, nkv] = [wq.shape[0], wk.shape[0]];
  if (wv.shape[0] !== nkv) throw new Error(`linearQkvNormed: k weight ${wk} and v weight ${wv} differ`);
  const tokens = x.size / d;
  const bytes = [wq.byteLength, wk.byteLength, x.byteLength, tokens * nq * dtypeBytes(x.dtype)];
  // x, the norm weight, three weights and three outputs: eight storage buffers
  if (rt.dev.limits.maxStorageBuffersPerShaderStage < 8 || !takesGemv(rt, tokens, GEMV_MAX_ROWS, bytes)) {
    return linearQkv(rmsNorm(x, normWeight, eps), wq, wk, wv);
  }
  const lead = x.shape.slice(0, -1);
  const q = rt.empty([...lead, nq], x.dtype), k = rt.empty([...lead, nkv], x.dtype);
  const v = rt.empty([...lead, nkv], x.dtype);
  const l = gemvQkvKernel(x.dtype, tokens, nq, nkv, d, { ...gemvDeviceOptions(rt), normIn: { eps } });
  rt.dev.dispatch(
    l.spec,
    [x.binding, normWeight.binding, wq.binding, wk.binding, wv.binding, q.binding, k.binding, v.binding],
    l.workgroups,
    l.uniforms,
  );
  return { q, k, v };
}

/**
 * The SwiGLU MLP's first half on `u = rmsNorm(x, normWeight, eps)`: `silu(u Wg^T) * (u Wu^T)`, in one GEMV
 * dispatch with the norm for up to `GEMV_SWIGLU_MAX_ROWS` rows. Decoding only (no gradients).
 */
export function linearSwigluNormed(
  x: Tensor,
  normWeight: Tensor,
  eps: number,
  wGate: Tensor,
  wUp: Tensor,
): Tensor {
  const rt = x.rt;
  decodingOnly("linearSwigluNormed", [x, normWeight, wGate, wUp]);
  const d = checkNormed("linearSwigluNormed", x, normWeight, eps, [wGate, wUp]);
  if (wGate.shape[0] !== wUp.shape[0]) {
    throw new Error(`linearSwigluNormed: gate ${wGate} and up ${wUp} weights differ`);
  }
  const nOut = wGate.shape[0], tokens = x.size / d;
  const bytes = [wGate.byteLength, x.byteLength, tokens * nOut * dtypeBytes(x.dtype)];
  if (!takesGemv(rt, tokens, GEMV_SWIGLU_MAX_ROWS, bytes)) {
    return linearSwiglu(rmsNorm(x, normWeight, eps), wGate, wUp);
  }
  const y = rt.empty([...x.shape.slice(0, -1), nOut], x.dtype);
  const l = gemvSwigluKernel(x.dtype, tokens, nOut, d, { ...gemvDeviceOptions(rt), normIn: { eps } });
  rt.dev.dispatch(
    l.spec,
    [x.binding, normWeight.binding, wGate.binding, wUp.binding, y.binding],
    l.workgroups,
    l.uniforms,
  );
  return y;
}

/**
 * `residual + x W^T` (x [..., in], W [out, in], residual of `x`'s rows times `out` elements; the result takes the
 * residual's shape), the product rounded to the storage type before the add as `add(residual, linear(x, W))`
 * rounds it. One GEMV dispatch for a few rows; a new tensor (the residual is not written). Decoding only (no
 * gradients).
 */
export function linearAddResidual(x: Tensor, w: Tensor, residual: Tensor): Tensor {
  const rt = x.rt;
  decodingOnly("linearAddResidual", [x, w, residual]);
  if (w.shape.length !== 2 || x.dim(-1) !== w.shape[1] || x.dtype !== w.dtype) {
    throw new Error(
      `linearAddResidual: input ${x} does not match weight ${w} (expected [..., ${w.shape[1]}])`,
    );
  }
  const [nOut, nIn] = w.shape;
  const tokens = x.size / nIn;
  if (residual.size !== tokens * nOut || residual.dtype !== x.dtype) {
    throw new Error(
      `linearAddResidual: residual ${residual} does not hold ${tokens} rows of ${nOut} ${x.dtype} values ` +
        `(${shapeStr(x.shape)} x ${shapeStr(w.shape)}^T)`,
    );
  }
  if (!takesGemv(rt, tokens, GEMV_MAX_ROWS, [w.byteLength, x.byteLength, residual.byteLength])) {
    return add(residual, linear(x, w).view(residual.shape));
  }
  const y = rt.empty(residual.shape, x.dtype);
  const l = gemvKernel(x.dtype, tokens, nOut, nIn, { ...gemvDeviceOptions(rt), residual: true });
  rt.dev.dispatch(l.spec, [x.binding, w.binding, residual.binding, y.binding], l.workgroups, l.uniforms);
  return y;
}

/**
 * `gatedRmsNorm(y, z, normWeight, { group, eps }) W^T` (y and z [..., D], normWeight [D], W [out, D]; result
 * [..., out]), plus `residual` when given (rows times `out` elements; the result then takes its shape, and the
 * product is rounded to the storage type before the add as `add(residual, linear(...))` rounds it): Mamba2's
 * output norm, out_proj and the block's residual add in one GEMV dispatch for a few rows. Decoding only (no
 * gradients).
 */
export function linearGatedNormed(
  y: Tensor,
  z: Tensor,
  normWeight: Tensor,
  group: number,
  eps: number,
  w: Tensor,
  residual?: Tensor,
): Tensor {
  const rt = y.rt;
  const what = "linearGatedNormed";
  decodingOnly(what, [y, z, normWeight, w, ...(residual ? [residual] : [])]);
  const d = checkNormed(what, y, normWeight, eps, [w]);
  if (z.dtype !== y.dtype || z.shape.length !== y.shape.length || z.shape.some((n, i) => n !== y.shape[i])) {
    throw new Error(`${what}: gate ${z} does not match input ${y} (expected the same shape and dtype)`);
  }
  if (!(Number.isInteger(group) && group > 0 && d % group === 0)) {
    throw new Error(`${what}: group ${group} must divide the row size ${d}`);
  }
  const nOut = w.shape[0], tokens = y.size / d;
  if (residual && (residual.size !== tokens * nOut || residual.dtype !== y.dtype)) {
    throw new Error(
      `${what}: residual ${residual} does not hold ${tokens} rows of ${nOut} ${y.dtype} values ` +
        `(${shapeStr(y.shape)} x ${shapeStr(w.shape)}^T)`,
    );
  }
  const outBytes = tokens * nOut * dtypeBytes(y.dtype);
  // y, z, the norm weight, W, the residual and the output: six storage buffers, within the default eight
  if (
    d / group > GEMV_GATED_MAX_GROUPS ||
    !takesGemv(rt, tokens, GEMV_MAX_ROWS, [w.byteLength, y.byteLength, outBytes])
  ) {
    const p = linear(gatedRmsNorm(y, z, normWeight, { group, eps }), w);
    return residual ? add(residual, p.view(residual.shape)) : p;
  }
  const out = rt.empty(residual ? residual.shape : [...y.shape.slice(0, -1), nOut], y.dtype);
  const l = gemvKernel(y.dtype, tokens, nOut, d, {
    ...gemvDeviceOptions(rt),
    gatedNormIn: { group, eps },
    residual: residual !== undefined,
  });
  rt.dev.dispatch(
    l.spec,
    [
      y.binding,
      z.binding,
      normWeight.binding,
      w.binding,
      ...(residual ? [residual.binding] : []),
      out.binding,
    ],
    l.workgroups,
    l.uniforms,
  );
  return out;
}
