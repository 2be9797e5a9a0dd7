/**
 * Differentiable causal depthwise conv1d (width 4, channels-last) and its decode-time state ops. The math and
 * layouts are documented in `kernels/conv1d.ts`.
 *
 * - {@linkcode causalConv1d}: a whole sequence `[B, L, C]`, optional fused SiLU, optional initial state (chunked
 *   prefill), optional final state; gradients for x, weight, bias, the initial state, and through the final state.
 * - {@linkcode causalConv1dStep}: one decode token on a `[B, C, 3]` state, updated in place (inference only).
 *   Batch-1 decoding runs it inside Mamba2's in_proj GEMV instead (runtime/ops/linear_fused.ts), reading the
 *   weight and bias packed by {@linkcode convStepTaps}.
 * - {@linkcode causalConv1dRing} + {@linkcode advanceConvRing}: several tokens on a circular `[B, C, 3 + K]`
 *   state, for speculative verification: rejecting drafts is moving an index (inference only).
 *
 * @module
 */
import {
  conv1dBackward,
  conv1dFinalState,
  conv1dForward,
  conv1dReduceParams,
  conv1dRing,
  conv1dRingAdvance,
  conv1dRingConvert,
  conv1dStep,
  CONV_STATE,
  CONV_WIDTH,
} from "../../kernels/conv1d.ts";
import type { BufferSlice } from "../device.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import { concatLastDim } from "./columns.ts";

/** Options of {@linkcode causalConv1d}. */
export interface CausalConv1dOptions {
  /** Apply SiLU after the bias (default false). */
  silu?: boolean;
  /** Inputs before time 0, `[B, C, 3]` oldest first (default: zeros). Differentiable. */
  initialState?: Tensor | null;
  /** Also return the state after the sequence, `[B, C, 3]` (default false). Differentiable. */
  finalState?: boolean;
  /** Time-segment length of the kernels (tests use it to exercise segment boundaries; default: automatic). */
  segmentLength?: number;
}

/** Result of {@linkcode causalConv1d}. */
export interface CausalConv1dResult {
  /** `[B, L, C]` (the input's shape). */
  out: Tensor;
  /** `[B, C, 3]`: pre-conv inputs of the last three times, oldest first; null unless requested. */
  finalState: Tensor | null;
}

function checkParams(op: string, weight: Tensor, bias: Tensor, channels: number, dtype: string): void {
  const wOk = (weight.shape.length === 2 || (weight.shape.length === 3 && weight.shape[1] === 1)) &&
    weight.shape[0] === channels && weight.shape[weight.shape.length - 1] === CONV_WIDTH;
  if (!wOk) {
    throw new Error(
      `${op}: weight must be [${channels}, ${CONV_WIDTH}] or [${channels}, 1, ${CONV_WIDTH}], got ${
        shapeStr(weight.shape)
      }`,
    );
  }
  if (bias.size !== channels) {
    throw new Error(`${op}: bias must be [${channels}], got ${shapeStr(bias.shape)}`);
  }
  if (weight.dtype !== dtype || bias.dtype !== dtype) {
    throw new Error(
      `${op}: weight ${weight.dtype} and bias ${bias.dtype} must match the input dtype ${dtype}`,
    );
  }
}

/**
 * Causal depthwise conv1d over a sequence: `out[b, t, c] = act(bias[c] + sum_k w[c, k] x[b, t - 3 + k, c])`.
 * `x` is `[B, L, C]` or `[L, C]`; `weight` `[C, 4]` or `[C, 1, 4]`; `bias` `[C]`; all of one dtype (f32 or f16;
 * math in f32).
 */
export function causalConv1d(
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  opts: CausalConv1dOptions = {},
): CausalConv1dResult {
  if (x.shape.length !== 2 && x.shape.length !== 3) {
    throw new Error(`causalConv1d: x must be [B, L, C] or [L, C], got ${shapeStr(x.shape)}`);
  }
  const [batch, length, channels] = x.shape.length === 3 ? x.shape : [1, x.shape[0], x.shape[1]];
  checkParams("causalConv1d", weight, bias, channels, x.dtype);
  const init = opts.initialState ?? null;
  if (init && (init.size !== batch * channels * CONV_STATE || init.dtype !== x.dtype)) {
    throw new Error(
      `causalConv1d: initialState must be [${batch}, ${channels}, ${CONV_STATE}] ${x.dtype}, got ${
        shapeStr(init.shape)
      } ${init.dtype}`,
    );
  }
  const rt = x.rt;
  const dev = rt.dev;
  const shape = { batch, length, channels };
  const flags = { silu: opts.silu ?? false, initialState: init !== null };
  const out = rt.empty(x.shape, x.dtype);
  const f = conv1dForward(x.dtype, shape, flags, opts.segmentLength);
  const fb: BufferSlice[] = [x.binding, weight.binding, bias.binding];
  if (init) fb.push(init.binding);
  fb.push(out.binding);
  dev.dispatch(f.spec, fb, f.workgroups, f.uniforms);
  let fin: Tensor | null = null;
  if (opts.finalState) {
    fin = rt.empty([batch, channels, CONV_STATE], x.dtype);
    const k = conv1dFinalState(x.dtype, shape, init !== null);
    dev.dispatch(
      k.spec,
      init ? [x.binding, init.binding, fin.binding] : [x.binding, fin.binding],
      k.workgroups,
      k.uniforms,
    );
  }
  const inputs = init ? [x, weight, bias, init] : [x, weight, bias];
  rt.record("causalConv1d", inputs, fin ? [out, fin] : [out], ([gOut, gFin]) => {
    const g = gOut ?? rt.zeros(out.shape, out.dtype);
    const gx = rt.empty(x.shape, x.dtype);
    const gw = rt.empty(weight.shape, weight.dtype);
    const gb = rt.empty(bias.shape, bias.dtype);
    const gInit = init ? rt.empty(init.shape, init.dtype) : null;
    const bflags = { ...flags, finalStateGrad: Boolean(gFin) };
    const k = conv1dBackward(x.dtype, shape, bflags, opts.segmentLength);
    const part = rt.empty([k.partialRows, 5, channels], "f32");
    const bb: BufferSlice[] = [x.binding, weight.binding, bias.binding, g.binding];
    if (init) bb.push(init.binding);
    if (gFin) bb.push(gFin.binding);
    bb.push(gx.binding, part.binding);
    if (gInit) bb.push(gInit.binding);
    dev.dispatch(k.spec, bb, k.workgroups, k.uniforms);
    const r = conv1dReduceParams(x.dtype, k.partialRows, channels);
    dev.dispatch(r.spec, [part.binding, gw.binding, gb.binding], r.workgroups, r.uniforms);
    part.dispose();
    if (!gOut) g.dispose();
    return init ? [gx, gw, gb, gInit] : [gx, gw, gb];
  });
  return { out, finalState: fin };
}

/**
 * One decode token: `x [B, C]` -> `[B, C]`, reading and updating `state [B, C, 3]` in place (oldest first; the
 * new input becomes slot 2). Inference only (not recorded for autograd).
 */
export function causalConv1dStep(
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  state: Tensor,
  opts: { silu?: boolean } = {},
): Tensor {
  const channels = x.shape[x.shape.length - 1];
  const batch = x.size / channels;
  checkParams("causalConv1dStep", weight, bias, channels, x.dtype);
  if (state.size !== batch * channels * CONV_STATE || state.dtype !== x.dtype) {
    throw new Error(
      `causalConv1dStep: state must be [${batch}, ${channels}, ${CONV_STATE}] ${x.dtype}, got ${
        shapeStr(state.shape)
      } ${state.dtype}`,
    );
  }
  const rt = x.rt;
  const out = rt.empty(x.shape, x.dtype);
  const k = conv1dStep(x.dtype, batch, channels, opts.silu ?? false);
  rt.dev.dispatch(
    k.spec,
    [x.binding, weight.binding, bias.binding, state.binding, out.binding],
    k.workgroups,
    k.uniforms,
  );
  return out;
}

/**
 * The conv's weight `[C, 4]` (or `[C, 1, 4]`) and bias `[C]` packed as one tensor `[C, 5]` (each channel's four
 * weights, then its bias): the in_proj GEMV that runs the decode step binds them as one buffer, to stay within
 * WebGPU's default eight storage buffers per stage (kernels/gemv.ts `gemvSplit3Kernel`). A copy: build it once
 * per decoding state, not per token. Inference only.
 */
export function convStepTaps(weight: Tensor, bias: Tensor): Tensor {
  const channels = bias.size;
  checkParams("convStepTaps", weight, bias, channels, bias.dtype);
  return bias.rt.noGrad(() => concatLastDim([weight.view([channels, CONV_WIDTH]), bias.view([channels, 1])]));
}

/** A circular conv state for speculative decoding: `ring [B, C, S]` and per-row write positions `pos [B]` u32. */
export interface ConvRing {
  /** `[B, C, S]` past inputs; slots pos-3..pos-1 (mod S) are the current window, oldest first. */
  ring: Tensor;
  /** `[B]` u32: the slot the next input goes to. */
  pos: Tensor;
}

/**
 * A circular state of `slots` slots (3 + K for K drafts) initialised from a `[B, C, 3]` state (e.g. a prefill's
 * final state). The returned tensors are kept (not scope-owned): dispose them when decoding ends.
 */
export function convRingFromState(state: Tensor, slots: number): ConvRing {
  if (state.shape.length !== 3 || state.shape[2] !== CONV_STATE) {
    throw new Error(`convRingFromState: state must be [B, C, 3], got ${shapeStr(state.shape)}`);
  }
  if (slots < CONV_STATE) throw new Error(`convRingFromState: need at least 3 slots, got ${slots}`);
  const [batch, channels] = state.shape;
  const rt = state.rt;
  const ring = rt.empty([batch, channels, slots], state.dtype).keep();
  const pos = rt.empty([batch], "u32").keep();
  const k = conv1dRingConvert(state.dtype, batch, channels, slots, "toRing");
  rt.dev.dispatch(k.spec, [state.binding, ring.binding, pos.binding], k.workgroups, k.uniforms);
  return { ring, pos };
}

/** The current window of a circular state as a `[B, C, 3]` state (oldest first). */
export function convStateFromRing(r: ConvRing): Tensor {
  const [batch, channels, slots] = r.ring.shape;
  const rt = r.ring.rt;
  const state = rt.empty([batch, channels, CONV_STATE], r.ring.dtype);
  const k = conv1dRingConvert(r.ring.dtype, batch, channels, slots, "fromRing");
  rt.dev.dispatch(k.spec, [r.ring.binding, r.pos.binding, state.binding], k.workgroups, k.uniforms);
  return state;
}

/**
 * Convolves T new tokens `x [B, T, C]` against a circular state, writing their inputs into slots pos..pos+T-1
 * without moving `pos` (T <= S - 2). Then call {@linkcode advanceConvRing} with the number of tokens kept per row
 * (1..T). Inference only.
 */
export function causalConv1dRing(
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  r: ConvRing,
  opts: { silu?: boolean } = {},
): Tensor {
  if (x.shape.length !== 3) {
    throw new Error(`causalConv1dRing: x must be [B, T, C], got ${shapeStr(x.shape)}`);
  }
  const [batch, tokens, channels] = x.shape;
  checkParams("causalConv1dRing", weight, bias, channels, x.dtype);
  const [rb, rc, slots] = r.ring.shape;
  if (rb !== batch || rc !== channels || r.ring.dtype !== x.dtype || r.pos.size !== batch) {
    throw new Error(
      `causalConv1dRing: ring ${shapeStr(r.ring.shape)} ${r.ring.dtype} / pos ${
        shapeStr(r.pos.shape)
      } do not match x ${shapeStr(x.shape)} ${x.dtype}`,
    );
  }
  if (tokens > slots - 2) {
    throw new Error(
      `causalConv1dRing: ${tokens} tokens need at least ${
        tokens + 2
      } slots (3 + K for K drafts), ring has ${slots}`,
    );
  }
  const rt = x.rt;
  const out = rt.empty(x.shape, x.dtype);
  const k = conv1dRing(x.dtype, { batch, tokens, channels, slots }, opts.silu ?? false);
  rt.dev.dispatch(
    k.spec,
    [x.binding, weight.binding, bias.binding, r.ring.binding, r.pos.binding, out.binding],
    k.workgroups,
    k.uniforms,
  );
  return out;
}

/**
 * Advances the positions of a circular state by the number of tokens kept: a constant, or a u32 `[B]` tensor
 * computed on the GPU (accepted drafts + 1 per row). Tokens written past the new position are thereby dropped.
 */
export function advanceConvRing(r: ConvRing, kept: number | Tensor): void {
  const [batch, , slots] = r.ring.shape;
  const rt = r.ring.rt;
  if (typeof kept === "number") {
    const k = conv1dRingAdvance(batch, slots, kept);
    rt.dev.dispatch(k.spec, [r.pos.binding], k.workgroups, k.uniforms);
  } else {
    if (kept.size !== batch || kept.dtype !== "u32") {
      throw new Error(
        `advanceConvRing: kept must be [${batch}] u32, got ${shapeStr(kept.shape)} ${kept.dtype}`,
      );
    }
    const k = conv1dRingAdvance(batch, slots, "counts");
    rt.dev.dispatch(k.spec, [r.pos.binding, kept.binding], k.workgroups, k.uniforms);
  }
}
