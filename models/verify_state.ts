/**
 * The decoding state of a speculative-decoding target (method.md section 3): caches that can take K+1 tokens in
 * one verification pass and drop the rejected ones afterwards, without recomputing anything.
 *
 * - Attention layers append the K+1 keys and values to their {@linkcode KvCache} and truncate it on rejection.
 * - Mamba layers (Mamba2 and Mamba1) keep their conv state as a circular buffer of 3 + K slots
 *   ({@linkcode ConvRing}; Mamba2 convolves xBC, Mamba1 the repeated x over d_inner channels), rolled back by
 *   moving an index, and their SSM state in one of two modes:
 *   - `fused`: one snapshot plus the per-step inputs (x, B, delta) of the last verified chunk. The next pass runs
 *     one kernel ({@linkcode ssdVerify} for Mamba2, {@linkcode selectiveScanVerify} for Mamba1) that re-applies
 *     the accepted cached steps to the snapshot, stores the new snapshot, then advances through the new tokens; no
 *     intermediate state ever goes to memory. Mamba2's kernel copies the inputs into a ping-pong cache; Mamba1's
 *     reads them from the previous pass's own tensors, which the layer keeps alive until the next pass.
 *   - `unfused`: the multi-kernel baseline the paper compares against: one step kernel per token
 *     ({@linkcode ssdStep}, {@linkcode selectiveScanStep}), with the state copied after every step so that a
 *     rejection can restore the state after the last kept one.
 *
 * The lifecycle is {@linkcode CausalLM.newVerifyState}, one {@linkcode CausalLM.verifyPrefill} (the prompt, with
 * the ordinary chunked scan), then alternating {@linkcode CausalLM.verifyStep} (up to K+1 tokens) and
 * {@linkcode CausalLM.verifyAccept} (how many of those tokens the caller keeps).
 *
 * @module
 */
import type { Tensor } from "../runtime/tensor.ts";
import type { Runtime } from "../runtime/runtime.ts";
import type { KvCache } from "../runtime/ops/attention.ts";
import {
  advanceConvRing,
  causalConv1dRing,
  type ConvRing,
  convRingFromState,
} from "../runtime/ops/conv1d.ts";
import { type SsdDims, ssdStep, ssdVerify, ssdVerifyCache } from "../runtime/ops/ssd.ts";
import { cast, type FloatDType, widen } from "../runtime/ops/cast.ts";
import {
  type ScanVerifyCache,
  selectiveScanStep,
  selectiveScanVerify,
} from "../runtime/ops/selective_scan.ts";
import { takeRows } from "../runtime/ops/columns.ts";
import type { MambaMixer } from "./config.ts";

/** How Mamba layers verify: the fused multi-step kernel, or one kernel per step with state copies. */
export type VerifyMode = "fused" | "unfused";

/** The verification state of one Mamba layer. */
export interface MambaVerifyLayer {
  /** The layer's mixer: it decides which scan kernels and which of the fields below the layer uses. */
  mixer: MambaMixer;
  /**
   * SSM state, f32: Mamba2 [B, H, P, N], Mamba1 [B, d_inner, N]. Fused: the snapshot, i.e. the state before the
   * `replay` cached steps. Unfused: the state after the last token consumed (after {@linkcode verifyAccept}: the
   * last token kept).
   */
  state: Tensor;
  /** The conv state [B, C, 3] as the prefill left it; replaced by `ring` at the first verification pass. */
  conv: Tensor | null;
  /** Circular conv state of 3 + K slots, from the first verification pass on. */
  ring: ConvRing | null;
  /**
   * The decode kernels' per-layer constants, built once (weights do not change while a verification state lives):
   * Mamba2 the per-head scalars [3, H] (A, D, dt_bias); Mamba1 A = -exp(A_log) [d_inner, N] in the storage dtype,
   * as the full forward computes it.
   */
  heads: Tensor;
  /** Fused Mamba2: the ping-pong cache of per-step inputs [2, B, K+1, Wc]. */
  cache: Tensor | null;
  /**
   * Fused Mamba1: the last pass's per-step inputs (x after the conv, delta, B), kept alive (not scope-owned) until
   * the next pass has re-applied the accepted ones; null before the first pass.
   */
  steps: ScanVerifyCache | null;
  /** Fused: which half of `cache` holds the last pass's steps. */
  parity: 0 | 1;
  /** Fused: cached steps the next pass re-applies to the snapshot (the tokens kept from the last pass). */
  replay: number;
  /** Unfused: the state before and after each step of the last pass, [K+2, ...state.shape]. */
  history: Tensor | null;
}

/** Decoding state of a verification target (batch 1). Dispose it with {@linkcode CausalLM.disposeVerifyState}. */
export interface VerifyState {
  /** Sequences (1: speculative decoding runs batch 1). */
  readonly batch: number;
  /** Most tokens one verification pass may carry (K + 1). */
  readonly maxTokens: number;
  /** Capacity in tokens. */
  readonly maxLength: number;
  /** How Mamba layers verify. */
  readonly mode: VerifyMode;
  /** Tokens consumed and kept (the position of the next token). */
  length: number;
  /** Tokens of the last verification pass awaiting {@linkcode CausalLM.verifyAccept} (0 when none). */
  pending: number;
  /** KV cache per attention layer. */
  kv: Map<number, KvCache>;
  /** State per Mamba layer. */
  mamba: Map<number, MambaVerifyLayer>;
  /** u32 [1] tensors holding 0..maxTokens: the fused kernel's replay count without a CPU write per pass. */
  counts: Tensor[];
  /** True once a verification pass ran (no more prefill after that). */
  verifying: boolean;
}

/**
 * Switches a layer from the prefill's conv state to the circular buffer and allocates its verification caches.
 * `dims` sizes the fused Mamba2 input cache (Mamba1 layers need none: see {@linkcode MambaVerifyLayer.steps}).
 */
export function beginLayerVerification(
  rt: Runtime,
  layer: MambaVerifyLayer,
  s: VerifyState,
  dims: SsdDims | null,
): void {
  if (layer.ring) return;
  layer.ring = convRingFromState(layer.conv!, s.maxTokens + 2);
  layer.conv!.dispose();
  layer.conv = null;
  if (s.mode === "unfused") {
    layer.history = rt.empty([s.maxTokens + 1, ...layer.state.shape]).keep();
  } else if (layer.mixer === "mamba2") {
    const [B, H] = layer.state.shape;
    layer.cache = ssdVerifyCache(rt, B, H, s.maxTokens, dims!).keep();
  }
}

/**
 * The conv and SSM part of a Mamba2 layer over `n` new tokens in verification mode: xBCraw [B, n, C] (before the
 * conv) and raw dt [B, n, H] in, y [B, n, H, P] out. The new tokens' conv inputs are written past the ring's
 * index and their SSM steps computed from the state after the kept tokens of the previous pass.
 */
export function mamba2VerifyScan(
  layer: MambaVerifyLayer,
  s: VerifyState,
  xBCraw: Tensor,
  dt: Tensor,
  convWeight: Tensor,
  convBias: Tensor,
  dims: SsdDims,
): Tensor {
  const rt = xBCraw.rt;
  const [B, n] = xBCraw.shape;
  const xBC = causalConv1dRing(xBCraw, convWeight, convBias, layer.ring!, { silu: true });
  if (s.mode === "fused") {
    const y = ssdVerify({
      state: layer.state,
      cache: layer.cache!,
      parity: layer.parity,
      accepted: s.counts[layer.replay],
      xBC,
      dt,
      heads: layer.heads,
      dims,
    });
    layer.parity = layer.parity === 0 ? 1 : 0;
    layer.replay = 0;
    return y;
  }
  // Unfused: one step kernel per token; the state is saved before the first and after every step. An f16 model's
  // inputs are widened once here (not once per step) and y narrowed once at the end.
  if (B !== 1) throw new Error("unfused verification runs batch 1 only");
  const [, H, P] = layer.state.shape;
  const y = rt.empty([B, n, H, P]);
  const xBC32 = widen(xBC), dt32 = widen(dt);
  stepsWithHistory(
    layer,
    y,
    n,
    (j) => ssdStep({ state: layer.state, xBC: xBC32, dt: dt32, heads: layer.heads, dims, token: j }),
  );
  return cast(y, xBC.dtype as FloatDType);
}

/** The new tokens' inputs of a Mamba1 layer in verification mode (all [B, n, ...], the storage dtype). */
export interface Mamba1VerifyInputs {
  /** x [B, n, d_inner] after the group repeat, before the conv. */
  x: Tensor;
  /** delta [B, n, d_inner] (after the softplus). */
  delta: Tensor;
  /** B [B, n, d_xb / N, N]. */
  B: Tensor;
  /** C [B, n, d_inner / N, N]. */
  C: Tensor;
}

/**
 * The conv and SSM part of a Mamba1 layer over `n` new tokens in verification mode: y [B, n, d_inner] out. The
 * new tokens' conv inputs are written past the ring's index and their SSM steps computed from the state after the
 * kept tokens of the previous pass. `A` is the layer's `heads` (A = -exp(A_log)), `D` its skip weights.
 */
export function mamba1VerifyScan(
  layer: MambaVerifyLayer,
  s: VerifyState,
  inputs: Mamba1VerifyInputs,
  convWeight: Tensor,
  convBias: Tensor,
  D: Tensor,
): Tensor {
  const rt = inputs.x.rt;
  const [batch, n, Dn] = inputs.x.shape;
  const x = causalConv1dRing(inputs.x, convWeight, convBias, layer.ring!, { silu: true });
  const A = layer.heads;
  if (s.mode === "fused") {
    const previous = layer.steps ? { cache: layer.steps, kept: s.counts[layer.replay] } : null;
    const y = selectiveScanVerify(A, D, layer.state, previous, {
      x,
      delta: inputs.delta,
      B: inputs.B,
      C: inputs.C,
    })!;
    // the previous pass's inputs are consumed (a pooled buffer may be reused: the queue runs in order); this
    // pass's must outlive the caller's scope, since the next pass replays its accepted steps from them
    disposeSteps(layer);
    layer.steps = { x: x.keep(), delta: inputs.delta.keep(), B: inputs.B.keep() };
    layer.replay = 0;
    return y;
  }
  // Unfused: one step kernel per token on that token's rows; the state is saved before the first and after every
  // step. The step kernel runs in the storage dtype (f32 state), so f16 needs no widening here.
  if (batch !== 1) throw new Error("unfused verification runs batch 1 only");
  const N = A.shape[1];
  const gB = inputs.B.size / (n * N), gC = inputs.C.size / (n * N);
  const y = rt.empty([batch, n, Dn], x.dtype);
  stepsWithHistory(layer, y, n, (j) =>
    selectiveScanStep(
      takeRows(x, j, 1, Dn),
      takeRows(inputs.delta, j, 1, Dn),
      A,
      takeRows(inputs.B, j, 1, gB * N).view([1, gB, N]),
      takeRows(inputs.C, j, 1, gC * N).view([1, gC, N]),
      D,
      layer.state,
    ));
  return y;
}

/**
 * The unfused verification loop of either mixer: `n` single-token steps (`step(j)` advances `layer.state` by
 * token j and returns its output row), each row copied into row j of `y` ([1, n, ...]), and the state saved into
 * `layer.history` before the first step and after every step, so that a rejection can restore the state after
 * the last kept token.
 */
function stepsWithHistory(layer: MambaVerifyLayer, y: Tensor, n: number, step: (j: number) => Tensor): void {
  const rt = layer.state.rt;
  const stateBytes = layer.state.byteLength, rowBytes = y.byteLength / n;
  const hist = layer.history!;
  rt.dev.copyBuffer(layer.state.buffer, 0, hist.buffer, 0, stateBytes);
  for (let j = 0; j < n; j++) {
    const yj = step(j);
    rt.dev.copyBuffer(yj.buffer, 0, y.buffer, j * rowBytes, rowBytes);
    yj.dispose();
    rt.dev.copyBuffer(layer.state.buffer, 0, hist.buffer, (j + 1) * stateBytes, stateBytes);
  }
}

/** Releases a fused Mamba1 layer's cached inputs of the last pass. */
function disposeSteps(layer: MambaVerifyLayer): void {
  if (!layer.steps) return;
  layer.steps.x.dispose();
  layer.steps.delta.dispose();
  layer.steps.B.dispose();
  layer.steps = null;
}

/**
 * Keeps the first `keep` tokens of the last pass (`pending` of them) in a Mamba layer (either mixer): the ring
 * index moves by `keep`; the fused mode replays `keep` cached steps at the next pass; the unfused mode restores the
 * saved state.
 */
export function acceptLayerTokens(layer: MambaVerifyLayer, s: VerifyState, keep: number): void {
  advanceConvRing(layer.ring!, keep);
  if (s.mode === "fused") {
    layer.replay = keep;
  } else if (keep < s.pending) {
    const rt = layer.state.rt;
    const bytes = layer.state.byteLength;
    rt.dev.copyBuffer(layer.history!.buffer, keep * bytes, layer.state.buffer, 0, bytes);
  }
}

/** Releases a layer's buffers. */
export function disposeLayer(layer: MambaVerifyLayer): void {
  layer.state.dispose();
  layer.conv?.dispose();
  layer.ring?.ring.dispose();
  layer.ring?.pos.dispose();
  layer.heads.dispose();
  layer.cache?.dispose();
  disposeSteps(layer);
  layer.history?.dispose();
}
