/**
 * How a pre-norm decoder block (`h = x + Out(Mix(RMSNorm(x)))`) reads its input and writes the residual stream,
 * written once for the two ways the model runs it:
 *
 * - the training forward normalises x with a separate (differentiable) norm and gives the block the normalised
 *   tensor ({@linkcode normalisedInput});
 * - decoding keeps the residual stream in a {@linkcode ResidualStream}, which, for a few rows, folds the norm
 *   into the block's first projections and the residual add into its last (runtime/ops/linear_fused.ts), and for
 *   more rows (a long prefill) normalises once and fuses each residual add with the next norm (`addRmsNorm`).
 *
 * A block asks its {@linkcode BlockInput} for projections of the normalised input and returns its output
 * projection unapplied ({@linkcode OutProjection}), so that whoever holds the residual stream applies it; a
 * Mamba2 block leaves its gated output norm unapplied too, so that decoding runs it inside the same GEMV.
 *
 * @module
 */
import type { Tensor } from "../runtime/tensor.ts";
import { linear, linearQkv, linearSwiglu } from "../runtime/ops/matmul.ts";
import {
  FUSED_LINEAR_MAX_TOKENS,
  linearAddResidual,
  linearGatedNormed,
  linearNormed,
  linearQkvNormed,
  linearSplitNormed,
  linearSwigluNormed,
  type SplitConvStep,
  splitConvStep,
} from "../runtime/ops/linear_fused.ts";
import { splitLastDim } from "../runtime/ops/columns.ts";
import { addRmsNorm, rmsNorm } from "../runtime/ops/norm.ts";
import { gatedRmsNorm } from "../runtime/ops/gated_norm.ts";

/** The normalised input `u` of a block, as the block reads it: projections of it, or `u` itself. */
export interface BlockInput {
  /** `u W^T`. */
  project(w: Tensor): Tensor;
  /** The attention input projections `u Wq^T`, `u Wk^T`, `u Wv^T`. */
  projectQkv(wq: Tensor, wk: Tensor, wv: Tensor): { q: Tensor; k: Tensor; v: Tensor };
  /**
   * `u W^T` split along its last dimension into three `widths` (Mamba2's in_proj: z, xBC, dt); with `conv`, the
   * middle part after Mamba2's one-token conv, which advances the conv state (decoding one token).
   */
  projectSplit(w: Tensor, widths: readonly [number, number, number], conv?: SplitConvStep): Tensor[];
  /** The SwiGLU MLP's first half `silu(u Wg^T) * (u Wu^T)`. */
  projectSwiglu(wGate: Tensor, wUp: Tensor): Tensor;
  /** `u` itself, for blocks that use it beyond a few projections (Mamba1 projects it five times). */
  normalised(): Tensor;
}

/**
 * A block's output projection `input W^T`, not yet applied: the holder of the residual stream adds it. With
 * `gatedNorm`, the projection's input is `gatedRmsNorm(input, gatedNorm.z, gatedNorm.weight)` (Mamba2).
 * Apply it with {@linkcode projectOut} or {@linkcode ResidualStream.close}, never from `input` alone.
 */
export interface OutProjection {
  /** The projection's input [rows, in]; with `gatedNorm`, the input before that norm (Mamba2's scan output y). */
  input: Tensor;
  /** Its weight [D, in]. */
  weight: Tensor;
  /** Mamba2's z-gated grouped RMSNorm of `input` before the projection (runtime/ops/gated_norm.ts). */
  gatedNorm?: GatedOutNorm;
}

/** The gated grouped RMSNorm before a Mamba2 block's out_proj: `gatedRmsNorm(y, z, weight, { group, eps })`. */
export interface GatedOutNorm {
  /** The gate z [rows, in]. */
  z: Tensor;
  /** The norm weight [in]. */
  weight: Tensor;
  /** Channels per normalised group (head_dim). */
  group: number;
  /** Epsilon inside the square root. */
  eps: number;
}

/** `out`'s projection as a (differentiable) tensor [rows, D]: its input, gated-normed if it says so, times W^T. */
export function projectOut(out: OutProjection): Tensor {
  const g = out.gatedNorm;
  return linear(
    g ? gatedRmsNorm(out.input, g.z, g.weight, { group: g.group, eps: g.eps }) : out.input,
    out.weight,
  );
}

/** A block input that is an already normalised tensor: plain (differentiable) projections of it. */
export function normalisedInput(u: Tensor): BlockInput {
  return {
    project: (w) => linear(u, w),
    projectQkv: (wq, wk, wv) => linearQkv(u, wq, wk, wv),
    projectSplit: (w, widths, conv) => splitConvStep(splitLastDim(linear(u, w), widths), conv),
    projectSwiglu: (wg, wu) => linearSwiglu(u, wg, wu),
    normalised: () => u,
  };
}

/**
 * The residual stream of a decoding pass (no gradients) with the RMSNorm that the next block applies to it; it
 * is the next block's {@linkcode BlockInput}. Up to {@linkcode FUSED_LINEAR_MAX_TOKENS} rows it is fused: the
 * norm runs inside the block's first projections and {@linkcode ResidualStream.close} adds the output
 * projection inside its GEMV, so a decoder layer needs no norm or add dispatch at all. Above that it normalises
 * eagerly and closes a block with one `addRmsNorm`, the cheaper pattern for many rows.
 */
export class ResidualStream implements BlockInput {
  /** Whether the norms and residual adds run inside the projections' GEMVs. */
  readonly fused: boolean;
  readonly #eps: number;
  #x: Tensor;
  #norm: Tensor;
  /** rmsNorm(x, norm): always when unfused; when fused, only once a block asked for it. */
  #u: Tensor | null;
  /** Set by {@linkcode ResidualStream.keepRows}: the stream no longer holds every row. */
  #ended = false;

  /** Starts a stream at x [rows, D] (the embeddings), normalised with `norm` [D] for the first block. */
  constructor(x: Tensor, norm: Tensor, eps: number) {
    this.fused = x.size / x.dim(-1) <= FUSED_LINEAR_MAX_TOKENS;
    this.#eps = eps;
    this.#x = x;
    this.#norm = norm;
    this.#u = this.fused ? null : rmsNorm(x, norm, eps);
  }

  /** The residual stream x itself (not normalised). */
  get residual(): Tensor {
    this.#live("residual");
    return this.#x;
  }

  /** `rmsNorm(x) W^T`. */
  project(w: Tensor): Tensor {
    return this.#u ? linear(this.#u, w) : linearNormed(this.#x, this.#norm, this.#eps, w);
  }

  /** The attention input projections of `rmsNorm(x)`. */
  projectQkv(wq: Tensor, wk: Tensor, wv: Tensor): { q: Tensor; k: Tensor; v: Tensor } {
    return this.#u
      ? linearQkv(this.#u, wq, wk, wv)
      : linearQkvNormed(this.#x, this.#norm, this.#eps, wq, wk, wv);
  }

  /** `rmsNorm(x) W^T` in three parts along its last dimension, the middle one convolved with `conv`. */
  projectSplit(w: Tensor, widths: readonly [number, number, number], conv?: SplitConvStep): Tensor[] {
    return this.#u
      ? splitConvStep(splitLastDim(linear(this.#u, w), widths), conv)
      : linearSplitNormed(this.#x, this.#norm, this.#eps, w, widths, conv);
  }

  /** The SwiGLU MLP's first half on `rmsNorm(x)`. */
  projectSwiglu(wGate: Tensor, wUp: Tensor): Tensor {
    return this.#u
      ? linearSwiglu(this.#u, wGate, wUp)
      : linearSwigluNormed(this.#x, this.#norm, this.#eps, wGate, wUp);
  }

  /** `rmsNorm(x)` as a tensor (one norm dispatch when fused, kept for the rest of the block). */
  normalised(): Tensor {
    return this.#u ??= rmsNorm(this.#x, this.#norm, this.#eps);
  }

  /**
   * Closes a block: `x <- x + projectOut(out)` (a gated norm, if any, and the residual add inside the projection's
   * GEMV when fused); the next block normalises x with `next` [D].
   */
  close(out: OutProjection, next: Tensor): void {
    this.#live("close");
    const g = out.gatedNorm;
    if (this.fused) {
      this.#x = g
        ? linearGatedNormed(out.input, g.z, g.weight, g.group, g.eps, out.weight, this.#x)
        : linearAddResidual(out.input, out.weight, this.#x);
      this.#u = null;
    } else {
      ({ h: this.#x, y: this.#u } = addRmsNorm(this.#x, projectOut(out), next, this.#eps));
    }
    this.#norm = next;
  }

  /**
   * Keeps only the rows `pick` returns (of a [rows, D] tensor) for the projections that follow, e.g. each
   * sequence's last position before the lm_head. Ends the stream: {@linkcode ResidualStream.close} and
   * {@linkcode ResidualStream.residual} are not valid afterwards.
   */
  keepRows(pick: (t: Tensor) => Tensor): void {
    if (this.#u) this.#u = pick(this.#u);
    else this.#x = pick(this.#x);
    this.#ended = true;
  }

  #live(what: string): void {
    if (this.#ended) throw new Error(`ResidualStream.${what}: the stream was cut to some rows by keepRows`);
  }
}
