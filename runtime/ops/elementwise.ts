/**
 * Differentiable elementwise ops on tensors of equal shape: the pattern every op module follows.
 * Forward: allocate the output, dispatch the kernel, record a backward on the tape when gradients are needed.
 *
 * @module
 */
import {
  binaryBackward,
  binaryForward,
  type BinaryOpName,
  unaryBackward,
  unaryForward,
  type UnaryOpName,
} from "../../kernels/elementwise.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Applies a unary op (`scalar` is the factor for `scale`). */
export function unary(op: UnaryOpName, x: Tensor, scalar = 0): Tensor {
  const rt = x.rt;
  const out = rt.empty(x.shape, x.dtype);
  const f = unaryForward(op, x.dtype, x.size, scalar);
  rt.dev.dispatch(f.spec, [x.binding, out.binding], f.workgroups, f.uniforms);
  rt.record(op, [x], [out], ([g]) => {
    const gx = rt.empty(x.shape, x.dtype);
    const b = unaryBackward(op, x.dtype, x.size, scalar);
    rt.dev.dispatch(b.spec, [x.binding, g!.binding, gx.binding], b.workgroups, b.uniforms);
    return [gx];
  });
  return out;
}

/** Applies a binary op to two tensors of the same shape. */
export function binary(op: BinaryOpName, a: Tensor, b: Tensor): Tensor {
  if (a.size !== b.size || a.dtype !== b.dtype) {
    throw new Error(
      `${op}: shapes/dtypes differ: ${shapeStr(a.shape)} ${a.dtype} vs ${shapeStr(b.shape)} ${b.dtype}`,
    );
  }
  const rt = a.rt;
  const out = rt.empty(a.shape, a.dtype);
  const f = binaryForward(op, a.dtype, a.size);
  rt.dev.dispatch(f.spec, [a.binding, b.binding, out.binding], f.workgroups, f.uniforms);
  rt.record(op, [a, b], [out], ([g]) => {
    const ga = rt.empty(a.shape, a.dtype);
    const gb = rt.empty(b.shape, b.dtype);
    const k = binaryBackward(op, a.dtype, a.size);
    rt.dev.dispatch(
      k.spec,
      [a.binding, b.binding, g!.binding, ga.binding, gb.binding],
      k.workgroups,
      k.uniforms,
    );
    return [ga, gb];
  });
  return out;
}

/** `a + b`. */
export const add = (a: Tensor, b: Tensor): Tensor => binary("add", a, b);
/** `a - b`. */
export const sub = (a: Tensor, b: Tensor): Tensor => binary("sub", a, b);
/** `a * b` elementwise. */
export const mul = (a: Tensor, b: Tensor): Tensor => binary("mul", a, b);
/** `silu(gate) * up`, the SwiGLU combination of a Llama MLP. */
export const swiglu = (gate: Tensor, up: Tensor): Tensor => binary("swiglu", gate, up);
/** `s * x`. */
export const scale = (x: Tensor, s: number): Tensor => unary("scale", x, s);
/** `x * sigmoid(x)`. */
export const silu = (x: Tensor): Tensor => unary("silu", x);
/** `log(1 + exp(x))`. */
export const softplus = (x: Tensor): Tensor => unary("softplus", x);
/** `exp(x)`. */
export const exp = (x: Tensor): Tensor => unary("exp", x);
