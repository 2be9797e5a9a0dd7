/**
 * The GPU models: a Llama/Mistral decoder stack whose layers are attention or Mamba mixers (method.md section 1),
 * with the three entry points every stage needs:
 *
 * - {@linkcode CausalLM.forward}: full sequences [B, T] for training and scoring (differentiable);
 * - {@linkcode CausalLM.prefill} and {@linkcode CausalLM.step}: incremental decoding with a
 *   {@linkcode DecodeState} (KV caches for attention layers; conv and SSM states for Mamba layers), where one step
 *   may carry several tokens (speculative verification scores K+1 positions at once).
 *
 * A decoder layer is `h = x + Mixer(RMSNorm_in(x)); y = h + MLP(RMSNorm_post(h))`, identical for both mixer kinds;
 * Mamba layers use no RoPE. Parameters keep their Hugging Face state-dict names, so checkpoints, optimizer state
 * and exports all speak the same names.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";
import type { DType } from "../kernels/kernel.ts";
import { embedding } from "../runtime/ops/embedding.ts";
import { linear } from "../runtime/ops/matmul.ts";
import { addRmsNorm, rmsNorm } from "../runtime/ops/norm.ts";
import { rope } from "../runtime/ops/rope.ts";
import { attention, KvCache, ropeAppendDecodeAttention } from "../runtime/ops/attention.ts";
import { add, exp, scale } from "../runtime/ops/elementwise.ts";
import { takeRows } from "../runtime/ops/columns.ts";
import { causalConv1d, convStepTaps } from "../runtime/ops/conv1d.ts";
import type { SplitConvStep } from "../runtime/ops/linear_fused.ts";
import { CONV_WIDTH } from "../kernels/conv1d.ts";
import { widen } from "../runtime/ops/cast.ts";
import { SSD_DEFAULT_CHUNK, type SsdDims, ssdHeadParams, ssdScan, ssdStep } from "../runtime/ops/ssd.ts";
import {
  acceptLayerTokens,
  beginLayerVerification,
  disposeLayer,
  mamba1VerifyScan,
  mamba2VerifyScan,
  type MambaVerifyLayer,
  type VerifyMode,
  type VerifyState,
} from "./verify_state.ts";
import { type MambaConfig, ropeInverseFrequencies, type TransformerConfig } from "./config.ts";
import {
  EMBED,
  FINAL_NORM,
  type HostTensor,
  hybridWeightShapes,
  layerPrefix,
  LM_HEAD,
  type Model,
  transformerWeightShapes,
  type WeightMap,
} from "./weights.ts";
import {
  type BlockInput,
  normalisedInput,
  type OutProjection,
  projectOut,
  ResidualStream,
} from "./residual_stream.ts";
import { uniformFill } from "../kernels/random.ts";
import { selectiveScan } from "../runtime/ops/selective_scan.ts";
import { addBias, repeatGroupsLastDim } from "../runtime/ops/columns.ts";
import { mul, silu, softplus } from "../runtime/ops/elementwise.ts";

/** The scan chunk length of a model built with `opts` (see {@linkcode CausalLMOptions.chunkSize}). */
function scanChunk(opts: CausalLMOptions): number {
  return Math.min(opts.chunkSize ?? SSD_DEFAULT_CHUNK, 256);
}

/** Options for {@linkcode CausalLM.fromModel}. */
export interface CausalLMOptions {
  /** Storage dtype of weights and activations (default f32; f16 keeps f32 accumulation in every kernel). */
  dtype?: DType;
  /** Which parameters get gradients (default: none, i.e. inference). Receives the HF state-dict name. */
  trainable?: (name: string) => boolean;
  /**
   * Mamba2 scan chunk length (default {@linkcode SSD_DEFAULT_CHUNK}, 64, whatever the checkpoint's `chunk_size`:
   * the chunk changes rounding only, and 64 is the fastest on the H200: a 1B-shape layer's scan forward and
   * backward took 7.6 ms at 64 against 10.5 at 256, BENCHMARKS.md). At most 256.
   */
  chunkSize?: number;
  /** Frozen parameters to borrow from another model instead of uploading copies (see {@linkcode ShareFrom}). */
  share?: ShareFrom;
}

/**
 * Another model whose frozen GPU tensors a new model may borrow (a distillation student and its teacher: with
 * only the Mamba mixers training, the student's embeddings, lm_head, norms, MLPs and kept attention are the
 * teacher's, bit for bit, for the whole run).
 *
 * A parameter is borrowed only when the new model does not train it, the owner holds a frozen tensor of that
 * name (an untied `lm_head.weight` may borrow a tied owner's embedding) with the same shape and storage dtype,
 * and - for {@linkcode CausalLM.fromModel} - its CPU values give the same bytes in that dtype as the owner's
 * CPU values under that name. The caller vouches for one thing only: `ownerWeights` are what the owner was
 * uploaded from and the owner has not written its frozen tensors since.
 *
 * Lifetime: a borrowed parameter is a view of the owner's tensor, so it holds a reference to the owner's GPU
 * storage; disposing the borrower drops that reference and never frees the owner's tensor, and the storage goes
 * back to the pool once both models are disposed, whichever goes first. Borrowed tensors never require
 * gradients, so no optimizer or checkpoint of the borrower sees them. While a borrower lives the owner must not
 * write the shared tensors (train them, load weights into them): the borrower would see the writes.
 */
export interface ShareFrom {
  /** The model that owns the tensors, on the same runtime. */
  owner: CausalLM;
  /**
   * The CPU weights `owner` was uploaded from, by Hugging Face name: {@linkcode CausalLM.fromModel} borrows a
   * tensor only when the new model's CPU values give the same bytes as these (required there).
   * {@linkcode CausalLM.random} ignores them: a borrowed tensor replaces its random initialisation.
   */
  ownerWeights?: WeightMap;
}

/** Decoding state of one batch of sequences: per-layer caches and the number of tokens consumed. */
export interface DecodeState {
  /** Sequences in the batch. */
  batch: number;
  /** Tokens consumed so far (the position of the next token). */
  length: number;
  /** Capacity in tokens. */
  maxLength: number;
  /** KV cache per attention layer. */
  kv: Map<number, KvCache>;
  /**
   * Mamba per-layer state: the SSM state (Mamba2 [B, H, P, N], Mamba1 [B, d_inner, N], f32) and the conv
   * state [B, C, 3] (pre-conv inputs, oldest first).
   */
  ssm: Map<number, MambaState>;
}

/** The recurrent state of one Mamba layer. */
export interface MambaState {
  /** SSM state, f32. */
  state: Tensor;
  /** Conv inputs of the last three positions. */
  conv: Tensor;
  /**
   * Mamba2 per-head scalars [3, H] (A = -exp(A_log), D, dt_bias) for the one-token step kernel, built at the
   * first single-token step and kept: weights do not change while a decoding state lives.
   */
  heads?: Tensor;
  /**
   * Mamba2 conv weight and bias packed [C, 5] (`convStepTaps`) for the conv step inside in_proj's GEMV, built and
   * kept like `heads`.
   */
  convTaps?: Tensor;
}

/** Outputs of {@linkcode CausalLM.forward}. */
export interface ForwardOutput {
  /** Logits [B*T, V]. */
  logits: Tensor;
  /** Each decoder layer's output [B*T, D] when requested. */
  layerOut?: Tensor[];
}

/** Ids given as CPU values (validated, and needed for embedding gradients) or as a GPU tensor. */
export type TokenIds = Int32Array | Tensor;

/** A decoder-only language model on the GPU: a teacher (all attention) or a hybrid (some Mamba layers). */
export class CausalLM {
  /** The runtime holding the parameters. */
  readonly rt: Runtime;
  /** The teacher configuration (embeddings, attention, MLP, RoPE). */
  readonly config: TransformerConfig;
  /** Mamba layer configuration, or null for a pure Transformer. */
  readonly mamba: MambaConfig | null;
  /** Parameters by Hugging Face name (`lm_head.weight` is absent when tied to the embedding). */
  readonly params: Map<string, Tensor>;
  /** Storage dtype. */
  readonly dtype: DType;
  /** RoPE inverse frequencies [hd/2], f32. */
  readonly invFreq: Tensor;
  /** Names of the parameters borrowed from another model (see {@linkcode ShareFrom}); empty for most models. */
  readonly borrowed: ReadonlySet<string>;
  readonly #attn: Set<number>;
  readonly #chunkSize: number;

  private constructor(
    rt: Runtime,
    config: TransformerConfig,
    mamba: MambaConfig | null,
    params: Map<string, Tensor>,
    dtype: DType,
    chunkSize: number,
    borrowed: ReadonlySet<string>,
  ) {
    this.rt = rt;
    this.config = config;
    this.mamba = mamba;
    this.params = params;
    this.dtype = dtype;
    this.#chunkSize = chunkSize;
    this.borrowed = borrowed;
    this.invFreq = rt.tensor(ropeInverseFrequencies(config), [config.headDim / 2]).keep();
    const n = config.numLayers;
    this.#attn = new Set(mamba ? mamba.attnLayers : Array.from({ length: n }, (_, i) => i));
  }

  /**
   * Uploads a model (CPU weights) to the GPU. Tied embeddings share one tensor. With `opts.share`, frozen
   * parameters whose values match the owner's are borrowed from it instead of uploaded ({@linkcode ShareFrom}).
   */
  static fromModel(rt: Runtime, model: Model, opts: CausalLMOptions = {}): CausalLM {
    const dtype = opts.dtype ?? "f32";
    const trainable = opts.trainable ?? (() => false);
    const share = opts.share ?? null;
    if (share) checkShareOwner(rt, share, dtype, true);
    const params = new Map<string, Tensor>();
    const borrowed = new Set<string>();
    const tied = model.weights.get(LM_HEAD) === model.weights.get(EMBED) || !model.weights.has(LM_HEAD);
    for (const [name, t] of model.weights) {
      if (name === LM_HEAD && tied) continue;
      const train = trainable(name);
      const src = share && !train ? shareableTensor(share, name, t.shape, dtype) : null;
      if (src && sameStoredValues(t, ownerHostTensor(share!.ownerWeights!, name), dtype)) {
        params.set(name, borrowTensor(src, name));
        borrowed.add(name);
      } else {
        params.set(name, uploadParam(rt, name, t, dtype, train));
      }
    }
    const mamba = model.kind === "hybrid" ? model.mamba : null;
    return new CausalLM(rt, model.config, mamba, params, dtype, scanChunk(opts), borrowed);
  }

  /**
   * A randomly initialised model built on the GPU (no host copy of the weights), for benchmarks of large shapes:
   * linear weights U(+-1/sqrt(fan_in)), embeddings U(+-0.05), norms and D ones, Mamba2 A_log U(0, ln 16),
   * dt_bias U(ln(expm1(1e-3)), ln(expm1(0.1))), conv U(+-0.5). Shapes come from models/weights.ts. With
   * `opts.share`, every frozen parameter the owner holds frozen with the same shape and dtype is borrowed
   * instead (a hybrid of a random teacher, as the attention-initialising mapping builds it); the others get the
   * values they would get without sharing.
   */
  static random(
    rt: Runtime,
    config: TransformerConfig,
    mamba: MambaConfig | null,
    opts: CausalLMOptions & { seed?: number } = {},
  ): CausalLM {
    const dtype = opts.dtype ?? "f32";
    const trainable = opts.trainable ?? (() => false);
    const share = opts.share ?? null;
    if (share) checkShareOwner(rt, share, dtype, false);
    const shapes = mamba ? hybridWeightShapes({ teacher: config, mamba }) : transformerWeightShapes(config);
    const params = new Map<string, Tensor>();
    const borrowed = new Set<string>();
    let seed = opts.seed ?? 1;
    for (const [name, shape] of shapes) {
      if (name === LM_HEAD && config.tieWordEmbeddings) continue;
      const train = trainable(name);
      const src = share && !train ? shareableTensor(share, name, shape, dtype) : null;
      if (src) {
        seed++; // the other tensors get the values they get without sharing
        params.set(name, borrowTensor(src, name));
        borrowed.add(name);
        continue;
      }
      const t = rt.empty(shape, dtype).keep();
      t.name = name;
      t.requiresGrad = train;
      const [lo, hi] = randomRange(name, shape);
      const f = uniformFill(dtype, t.size, lo, hi, (seed++ * 0x9e3779b9) >>> 0);
      rt.dev.dispatch(f.spec, [t.binding], f.workgroups, f.uniforms);
      params.set(name, t);
    }
    return new CausalLM(rt, config, mamba, params, dtype, scanChunk(opts), borrowed);
  }

  /** True when layer i keeps attention. */
  isAttentionLayer(i: number): boolean {
    return this.#attn.has(i);
  }

  /** The parameter of a name; throws naming it when absent. */
  param(name: string): Tensor {
    const t = this.params.get(name) ?? (name === LM_HEAD ? this.params.get(EMBED) : undefined);
    if (!t) throw new Error(`model has no parameter ${name}`);
    return t;
  }

  /** Parameters that require gradients. */
  trainableParams(): Tensor[] {
    return [...this.params.values()].filter((t) => t.requiresGrad);
  }

  /** Token embeddings [n, D] of ids. */
  #embed(ids: TokenIds, hostIds?: Int32Array): Tensor {
    return embedding(this.param(EMBED), ids, { hostIds });
  }

  /** Final norm and lm_head: [n, D] -> [n, V]. */
  #head(x: Tensor): Tensor {
    return this.#lmHead(rmsNorm(x, this.param(FINAL_NORM), this.config.rmsNormEps));
  }

  /** lm_head alone, on states that already went through the final norm: [n, D] -> [n, V]. */
  #lmHead(normed: Tensor): Tensor {
    return linear(normed, this.param(LM_HEAD));
  }

  /** The SwiGLU MLP on a block input; its down projection is returned unapplied. */
  #mlp(p: string, u: BlockInput): OutProjection {
    // decoding fuses gate, up and the SiLU product into one GEMV; training takes the differentiable composite
    const act = u.projectSwiglu(this.param(`${p}mlp.gate_proj.weight`), this.param(`${p}mlp.up_proj.weight`));
    return { input: act, weight: this.param(`${p}mlp.down_proj.weight`) };
  }

  /** q, k, v projections with RoPE applied to q and k, shaped [B, T, heads, hd]. */
  #qkv(p: string, u: BlockInput, B: number, T: number, start: number): { q: Tensor; k: Tensor; v: Tensor } {
    const { q, k, v } = this.#qkvProjections(p, u, B, T);
    return { q: rope(q, this.invFreq, { start }), k: rope(k, this.invFreq, { start }), v };
  }

  /** q, k, v projections before RoPE, shaped [B, T, heads, hd] (one GEMV dispatch when decoding). */
  #qkvProjections(p: string, u: BlockInput, B: number, T: number): { q: Tensor; k: Tensor; v: Tensor } {
    const c = this.config;
    const a = `${p}self_attn.`;
    const proj = u.projectQkv(
      this.param(`${a}q_proj.weight`),
      this.param(`${a}k_proj.weight`),
      this.param(`${a}v_proj.weight`),
    );
    return {
      q: proj.q.view([B, T, c.numHeads, c.headDim]),
      k: proj.k.view([B, T, c.numKvHeads, c.headDim]),
      v: proj.v.view([B, T, c.numKvHeads, c.headDim]),
    };
  }

  #attentionFull(p: string, u: BlockInput, B: number, T: number): OutProjection {
    const c = this.config;
    const { q, k, v } = this.#qkv(p, u, B, T, 0);
    const o = attention(q, k, v, { window: c.slidingWindow ?? 0 });
    return {
      input: o.view([B * T, c.numHeads * c.headDim]),
      weight: this.param(`${p}self_attn.o_proj.weight`),
    };
  }

  /** Attention over a KV cache for `n` new tokens per sequence at position `start`, appending their keys. */
  #attentionDecode(
    p: string,
    u: BlockInput,
    B: number,
    n: number,
    cache: KvCache,
    start: number,
  ): OutProjection {
    const c = this.config;
    const { q, k, v } = this.#qkvProjections(p, u, B, n);
    // RoPE on q and k, the cache append and the attention: one dispatch for one new token, else two
    const o = ropeAppendDecodeAttention(q, k, v, this.invFreq, cache, start, {
      window: c.slidingWindow ?? 0,
    });
    return {
      input: o.view([B * n, c.numHeads * c.headDim]),
      weight: this.param(`${p}self_attn.o_proj.weight`),
    };
  }

  #ssdDims(): SsdDims {
    const m = this.mamba!;
    const hd = m.headDim;
    return { headsX: m.dXb / hd, headsB: m.dXb / hd, headsC: m.nHeads, dimP: hd, dimN: m.dState };
  }

  /**
   * Mamba2's input projection split into z [rows, d_inner], the conv input xBC and dt [rows, H]; with `conv`, xBC
   * after the one-token conv step (decoding).
   */
  #mamba2InProj(p: string, u: BlockInput, conv?: SplitConvStep): Tensor[] {
    const m = this.mamba!;
    return u.projectSplit(
      this.param(`${p}mamba.in_proj.weight`),
      [m.dInner, 2 * m.dXb + m.dInner, m.nHeads],
      conv,
    );
  }

  /**
   * Mamba2's output: the z-gated grouped RMSNorm of the scan output y [rows, d_inner], then out_proj. The norm is
   * left to whoever applies the projection (decoding runs it inside out_proj's GEMV).
   */
  #mamba2Out(p: string, y: Tensor, z: Tensor): OutProjection {
    return {
      input: y,
      weight: this.param(`${p}mamba.out_proj.weight`),
      gatedNorm: { z, weight: this.param(`${p}mamba.norm.weight`), group: this.mamba!.headDim, eps: 1e-5 },
    };
  }

  /**
   * The Mamba2 mixer on a normalised input u [B*T, D] (method.md 1.1). With `state`, the conv and SSM states
   * continue from it and are replaced by the states after these tokens. A single decoding token (no gradients)
   * runs the conv inside in_proj's GEMV (shifting the conv state in place, with the state's cached packed conv
   * weights) and advances the SSM state in place with the one-kernel `ssdStep` and the state's cached head scalars
   * instead of the chunked scan's four kernels and a fresh -exp(A_log).
   */
  #mamba2(p: string, u: BlockInput, B: number, T: number, state?: MambaState): OutProjection {
    const m = this.mamba!;
    const convC = 2 * m.dXb + m.dInner;
    const convWeight = this.param(`${p}mamba.conv1d.weight`).view([convC, m.dConv]);
    const convBias = this.param(`${p}mamba.conv1d.bias`);
    // (states are only advanced by `step`, which records no gradients)
    const decoding = state !== undefined && T === 1 && !this.rt.gradEnabled;
    // one token: the conv runs in in_proj's GEMV and shifts the conv state in place, instead of a conv dispatch
    // and a new state tensor
    const convStep = decoding && m.dConv === CONV_WIDTH;
    const [z, xBCout, dt] = this.#mamba2InProj(
      p,
      u,
      convStep
        ? {
          weight: convWeight,
          bias: convBias,
          taps: state.convTaps ??= convStepTaps(convWeight, convBias).keep(),
          state: state.conv,
          silu: true,
        }
        : undefined,
    );
    let xBC: Tensor, convFinal: Tensor | null = null;
    if (convStep) {
      xBC = xBCout.view([B, 1, convC]);
    } else {
      const conv = causalConv1d(xBCout.view([B, T, convC]), convWeight, convBias, {
        silu: true,
        initialState: state?.conv ?? null,
        finalState: state !== undefined,
      });
      xBC = conv.out;
      convFinal = conv.finalState;
    }
    let y: Tensor;
    if (decoding) {
      state.heads ??= this.#mamba2Heads(p).keep();
      y = ssdStep({
        state: state.state,
        xBC,
        dt: dt.view([B, 1, m.nHeads]),
        heads: state.heads,
        dims: this.#ssdDims(),
      });
    } else {
      // A = -exp(A_log), recomputed per call so A_log trains; in f32 whatever the storage (the scan is f32)
      const A = scale(exp(widen(this.param(`${p}mamba.A_log`))), -1);
      const scan = ssdScan(
        {
          xBC,
          dims: this.#ssdDims(),
          dt: dt.view([B, T, m.nHeads]),
          dtBias: this.param(`${p}mamba.dt_bias`),
          A,
          D: this.param(`${p}mamba.D`),
          initialState: state?.state,
        },
        { chunkSize: this.#chunkSize },
      );
      if (state) {
        state.state.dispose();
        state.state = scan.finalState.keep();
      }
      y = scan.y;
    }
    if (state && convFinal) {
      state.conv.dispose();
      state.conv = convFinal.keep();
    }
    return this.#mamba2Out(p, y.view([B * T, m.dInner]), z);
  }

  /** A Mamba2 layer's per-head scalars [3, H] for the step and verify kernels: A = -exp(A_log), D, dt_bias. */
  #mamba2Heads(p: string): Tensor {
    const A = scale(exp(widen(this.param(`${p}mamba.A_log`))), -1);
    return ssdHeadParams(A, this.param(`${p}mamba.D`), this.param(`${p}mamba.dt_bias`));
  }

  /**
   * The Mamba1 mixer of method.md 1.2: separate x/B/C/z projections, x and B in 16-wide groups repeated to
   * d_inner (x before the conv), delta = softplus(dt_proj(dt_proj_down(u)) + 2 dt_proj.bias) (the official code
   * adds the bias twice), a diagonal selective scan with d_state 16, and the z gate before out_proj.
   */
  #mamba1(p: string, inp: BlockInput, B: number, T: number, state?: MambaState): OutProjection {
    const m = this.mamba!;
    const w = (n: string) => this.param(`${p}mamba.${n}`);
    const { u, x, delta, Bm, Cm } = this.#mamba1InProj(p, inp, B, T);
    const conv = causalConv1d(
      x,
      w("conv1d.weight").view([m.dInner, m.dConv]),
      w("conv1d.bias"),
      { silu: true, initialState: state?.conv ?? null, finalState: state !== undefined },
    );
    const scan = selectiveScan(conv.out, delta, this.#mamba1A(p), Bm, Cm, w("D"), {
      initialState: state?.state ?? null,
      finalState: state !== undefined,
    });
    if (state) {
      state.conv.dispose();
      state.state.dispose();
      state.conv = conv.finalState!.keep();
      state.state = scan.finalState!.keep();
    }
    return this.#mamba1Out(p, u, scan.y.view([B * T, m.dInner]));
  }

  /**
   * Mamba1's projections of a block input, shaped for the conv and the scan: the normalised input u [B*T, D] (for
   * the z gate), x [B, T, d_inner] (repeated, before the conv), delta [B, T, d_inner], B [B, T, d_xb/N, N] and
   * C [B, T, d_inner/N, N].
   */
  #mamba1InProj(
    p: string,
    inp: BlockInput,
    B: number,
    T: number,
  ): { u: Tensor; x: Tensor; delta: Tensor; Bm: Tensor; Cm: Tensor } {
    const m = this.mamba!;
    // five projections of the normalised input: one norm dispatch, then plain GEMVs
    const u = inp.normalised();
    const N = m.dState, rep = m.dInner / m.dXb;
    const w = (n: string) => this.param(`${p}mamba.${n}`);
    const x = repeatGroupsLastDim(linear(u, w("in_proj_x.weight")), N, rep);
    const dt = linear(linear(u, w("dt_proj_down.weight")), w("dt_proj.weight"));
    const delta = softplus(addBias(dt, w("dt_proj.bias"), 2));
    return {
      u,
      x: x.view([B, T, m.dInner]),
      delta: delta.view([B, T, m.dInner]),
      Bm: linear(u, w("B_proj.weight")).view([B, T, m.dXb / N, N]),
      Cm: linear(u, w("C_proj.weight")).view([B, T, m.dInner / N, N]),
    };
  }

  /** Mamba1's output: the scan output y [rows, d_inner] gated by SiLU(z) of the normalised input, then out_proj. */
  #mamba1Out(p: string, u: Tensor, y: Tensor): OutProjection {
    const gated = mul(y, silu(linear(u, this.param(`${p}mamba.in_proj_z.weight`))));
    return { input: gated, weight: this.param(`${p}mamba.out_proj.weight`) };
  }

  /** A Mamba1 layer's A = -exp(A_log) [d_inner, N], in the storage dtype like the scan's other inputs. */
  #mamba1A(p: string): Tensor {
    return scale(exp(this.param(`${p}mamba.A_log`)), -1);
  }

  #mixer(p: string, u: BlockInput, B: number, T: number, state?: MambaState): OutProjection {
    return this.mamba!.mixer === "mamba1" ? this.#mamba1(p, u, B, T, state) : this.#mamba2(p, u, B, T, state);
  }

  /**
   * Full-sequence forward of `batch` sequences of `seqLen` tokens (ids row-major [B, T]). Differentiable in every
   * trainable parameter. Pass ids as an Int32Array when embeddings train (their gradient needs the ids on the CPU).
   */
  forward(
    ids: TokenIds,
    batch: number,
    seqLen: number,
    opts: { layerOutputs?: boolean } = {},
  ): ForwardOutput {
    const layerOut: Tensor[] = [];
    const x = this.#decoderStack("forward", ids, batch, seqLen, opts.layerOutputs ? layerOut : null);
    const logits = this.#head(x);
    return opts.layerOutputs ? { logits, layerOut } : { logits };
  }

  /**
   * The final-normed hidden states `[B*T, D]` of a full-sequence forward, without the lm_head: the input of a
   * fused head + loss (`runtime/ops/head_loss.ts`), which never materialises the `[B*T, V]` logits. Pair with
   * `param("lm_head.weight")` (the embedding when tied). Differentiable like {@linkcode CausalLM.forward}.
   */
  hidden(ids: TokenIds, batch: number, seqLen: number): Tensor {
    const x = this.#decoderStack("hidden", ids, batch, seqLen, null);
    return rmsNorm(x, this.param(FINAL_NORM), this.config.rmsNormEps);
  }

  /** Embedding and decoder layers of a full-sequence forward (the residual stream before the final norm). */
  #decoderStack(
    what: string,
    ids: TokenIds,
    batch: number,
    seqLen: number,
    layerOut: Tensor[] | null,
  ): Tensor {
    const c = this.config;
    const n = batch * seqLen;
    if ((ids instanceof Int32Array ? ids.length : ids.size) !== n) {
      throw new Error(`${what}: ${batch} x ${seqLen} ids expected`);
    }
    let x = this.#embed(ids);
    for (let l = 0; l < c.numLayers; l++) {
      const p = layerPrefix(l);
      const u = normalisedInput(rmsNorm(x, this.param(`${p}input_layernorm.weight`), c.rmsNormEps));
      const out = this.isAttentionLayer(l)
        ? this.#attentionFull(p, u, batch, seqLen)
        : this.#mixer(p, u, batch, seqLen);
      const mix = projectOut(out);
      const { h, y } = addRmsNorm(x, mix, this.param(`${p}post_attention_layernorm.weight`), c.rmsNormEps);
      const mlp = this.#mlp(p, normalisedInput(y));
      x = add(h, projectOut(mlp));
      layerOut?.push(x);
    }
    return x;
  }

  /** A decoding state for `batch` sequences of up to `maxLength` tokens. Dispose it with {@linkcode disposeState}. */
  newDecodeState(batch: number, maxLength: number): DecodeState {
    const rt = this.rt, c = this.config;
    const s: DecodeState = { batch, length: 0, maxLength, kv: new Map(), ssm: new Map() };
    for (let l = 0; l < c.numLayers; l++) {
      if (this.isAttentionLayer(l)) {
        s.kv.set(l, new KvCache(rt, batch, maxLength, c.numKvHeads, c.headDim, this.dtype));
      } else {
        const m = this.mamba!;
        const mamba2 = m.mixer === "mamba2";
        const convC = mamba2 ? 2 * m.dXb + m.dInner : m.dInner;
        s.ssm.set(l, {
          state: rt.zeros(mamba2 ? [batch, m.nHeads, m.headDim, m.dState] : [batch, m.dInner, m.dState])
            .keep(),
          conv: rt.zeros([batch, convC, m.dConv - 1], this.dtype).keep(),
        });
      }
    }
    return s;
  }

  /** Releases a decoding state's buffers. */
  disposeState(s: DecodeState): void {
    for (const kv of s.kv.values()) kv.dispose();
    for (const m of s.ssm.values()) {
      m.state.dispose();
      m.conv.dispose();
      m.heads?.dispose();
      m.convTaps?.dispose();
    }
  }

  /**
   * The decoder stack for `n` new tokens per sequence at position `start`: attention layers append to their KV
   * caches and attend over them; Mamba layers run `mamba(layer, prefix, input)` (a recurrent step, or the
   * speculative verification kernels). Returns the residual stream after the last layer, normalised with the
   * final norm for the lm_head ({@linkcode ResidualStream.project}). For a few tokens every norm runs inside the
   * projection after it and every residual add inside the projection before it (see {@linkcode ResidualStream}).
   */
  #decodeLayers(
    ids: TokenIds,
    B: number,
    n: number,
    kv: Map<number, KvCache>,
    start: number,
    mamba: (l: number, p: string, u: BlockInput) => OutProjection,
  ): ResidualStream {
    const c = this.config;
    const s = new ResidualStream(
      this.#embed(ids),
      this.param(`${layerPrefix(0)}input_layernorm.weight`),
      c.rmsNormEps,
    );
    for (let l = 0; l < c.numLayers; l++) {
      const p = layerPrefix(l);
      const mix = this.isAttentionLayer(l)
        ? this.#attentionDecode(p, s, B, n, kv.get(l)!, start)
        : mamba(l, p, s);
      s.close(mix, this.param(`${p}post_attention_layernorm.weight`));
      // the MLP's residual add meets the norm that follows it: the next layer's input norm, or the final norm
      const next = l + 1 < c.numLayers
        ? this.param(`${layerPrefix(l + 1)}input_layernorm.weight`)
        : this.param(FINAL_NORM);
      s.close(this.#mlp(p, s), next);
    }
    return s;
  }

  /**
   * Consumes `n` new tokens per sequence (ids [B, n]) from the state's position and returns their logits
   * [B*n, V] (or only each sequence's last position with `lastOnly`). Prefill is a step with the whole prompt.
   * Not differentiable.
   */
  step(s: DecodeState, ids: TokenIds, n: number, opts: { lastOnly?: boolean } = {}): Tensor {
    const rt = this.rt, c = this.config;
    const B = s.batch;
    if (s.length + n > s.maxLength) {
      throw new Error(`decode: ${s.length} + ${n} tokens exceed the state's capacity ${s.maxLength}`);
    }
    return rt.noGrad(() => {
      const stream = this.#decodeLayers(
        ids,
        B,
        n,
        s.kv,
        s.length,
        (l, p, u) => this.#mixer(p, u, B, n, s.ssm.get(l)!),
      );
      s.length += n;
      if (opts.lastOnly && n > 1) {
        const D = c.hiddenSize;
        stream.keepRows((t) => B === 1 ? takeRows(t, n - 1, 1, D) : lastRows(t, B, n, D));
      }
      // the final norm and lm_head (one GEMV for a few rows)
      return stream.project(this.param(LM_HEAD));
    });
  }

  // ---- speculative verification (models/verify_state.ts) ------------------------------------------------

  /**
   * A verification state for speculative decoding with up to `draftTokens` (K) drafts per pass: each
   * {@linkcode verifyStep} takes up to K+1 tokens and {@linkcode verifyAccept} drops the rejected ones. `mode`
   * picks the fused verification kernel of the Mamba layers (default; Mamba2 and Mamba1 alike) or the unfused
   * one-kernel-per-step baseline. Batch 1.
   */
  newVerifyState(maxLength: number, draftTokens: number, opts: { mode?: VerifyMode } = {}): VerifyState {
    const rt = this.rt;
    if (!(Number.isInteger(draftTokens) && draftTokens >= 1)) {
      throw new Error(`newVerifyState: draftTokens must be an integer >= 1, got ${draftTokens}`);
    }
    const mixer = this.mamba?.mixer;
    // a mixer added to MambaMixer later gets no verification kernels by default: refuse it by name
    if (mixer !== undefined && mixer !== "mamba2" && mixer !== "mamba1") {
      throw new Error(`speculative verification supports Mamba2 and Mamba1 layers, not ${String(mixer)}`);
    }
    const base = this.newDecodeState(1, maxLength);
    const maxTokens = draftTokens + 1;
    const mamba = new Map<number, MambaVerifyLayer>();
    rt.noGrad(() =>
      rt.scope(() => {
        for (const [l, m] of base.ssm) {
          const p = layerPrefix(l);
          const heads = (mixer === "mamba1" ? this.#mamba1A(p) : this.#mamba2Heads(p)).keep();
          mamba.set(l, {
            mixer: mixer!,
            state: m.state,
            conv: m.conv,
            ring: null,
            heads,
            cache: null,
            steps: null,
            parity: 0,
            replay: 0,
            history: null,
          });
        }
      })
    );
    const counts = Array.from({ length: maxTokens + 1 }, (_, i) => rt.tensor([i], [1], "u32").keep());
    return {
      batch: 1,
      maxTokens,
      maxLength,
      mode: opts.mode ?? "fused",
      length: 0,
      pending: 0,
      kv: base.kv,
      mamba,
      counts,
      verifying: false,
    };
  }

  /**
   * Consumes a prompt (ids [n]) into a fresh verification state with the ordinary chunked path and returns its
   * logits [n, V] (or the last row with `lastOnly`). Only before the first {@linkcode verifyStep}.
   */
  verifyPrefill(s: VerifyState, ids: TokenIds, n: number, opts: { lastOnly?: boolean } = {}): Tensor {
    if (s.verifying) throw new Error("verifyPrefill: the state already verified tokens");
    // the layers themselves, so that the step's new state and conv tensors land in them
    const ssm = new Map<number, MambaState>();
    for (const [l, m] of s.mamba) ssm.set(l, m as MambaState);
    const ds: DecodeState = { batch: 1, length: s.length, maxLength: s.maxLength, kv: s.kv, ssm };
    const out = this.step(ds, ids, n, opts);
    // a one-token prompt packed the conv weights for the decode step's GEMV: verification never reads them
    for (const m of ssm.values()) {
      m.convTaps?.dispose();
      delete m.convTaps;
    }
    s.length = ds.length;
    return out;
  }

  /**
   * One verification pass: consumes `n` (<= K+1) tokens after the kept ones and returns their logits [n, V]: row
   * i is the distribution after token i. Call {@linkcode verifyAccept} before the next pass.
   */
  verifyStep(s: VerifyState, ids: TokenIds, n: number): Tensor {
    const rt = this.rt;
    if (s.pending !== 0) throw new Error("verifyStep: call verifyAccept for the previous pass first");
    if (!(n >= 1 && n <= s.maxTokens)) {
      throw new Error(`verifyStep: ${n} tokens, the state takes 1..${s.maxTokens} per pass`);
    }
    if (s.length + n > s.maxLength) {
      throw new Error(`verifyStep: ${s.length} + ${n} tokens exceed the state's capacity ${s.maxLength}`);
    }
    s.verifying = true;
    const B = 1;
    const out = rt.noGrad(() =>
      this.#decodeLayers(
        ids,
        B,
        n,
        s.kv,
        s.length,
        (l, p, u) => {
          const layer = s.mamba.get(l)!;
          return layer.mixer === "mamba1"
            ? this.#mamba1Verify(p, u, n, s, layer)
            : this.#mamba2Verify(p, u, n, s, layer);
        },
      )
        .project(this.param(LM_HEAD))
    );
    s.pending = n;
    return out;
  }

  /**
   * Keeps the first `keep` tokens (0..n) of the last {@linkcode verifyStep}'s n and drops the rest: KV caches are
   * truncated, conv rings rewound, and Mamba states rolled back (fused: by replaying the kept cached steps inside
   * the next pass's kernel; unfused: by restoring the saved state; no recomputation either way).
   */
  verifyAccept(s: VerifyState, keep: number): void {
    if (s.pending === 0) throw new Error("verifyAccept: no verification pass is pending");
    if (!(Number.isInteger(keep) && keep >= 0 && keep <= s.pending)) {
      throw new Error(`verifyAccept: keep must be in 0..${s.pending}, got ${keep}`);
    }
    for (const kv of s.kv.values()) kv.truncate(s.length + keep);
    for (const layer of s.mamba.values()) acceptLayerTokens(layer, s, keep);
    s.length += keep;
    s.pending = 0;
  }

  /** Releases a verification state's buffers. */
  disposeVerifyState(s: VerifyState): void {
    for (const kv of s.kv.values()) kv.dispose();
    for (const layer of s.mamba.values()) disposeLayer(layer);
    for (const t of s.counts) t.dispose();
  }

  /** The Mamba2 mixer of one verification pass (see {@linkcode mamba2VerifyScan}). */
  #mamba2Verify(p: string, u: BlockInput, n: number, s: VerifyState, layer: MambaVerifyLayer): OutProjection {
    const m = this.mamba!;
    const convC = 2 * m.dXb + m.dInner;
    const dims = this.#ssdDims();
    beginLayerVerification(this.rt, layer, s, dims);
    const [z, xBCraw, dt] = this.#mamba2InProj(p, u);
    const y = mamba2VerifyScan(
      layer,
      s,
      xBCraw.view([1, n, convC]),
      dt.view([1, n, m.nHeads]),
      this.param(`${p}mamba.conv1d.weight`).view([convC, m.dConv]),
      this.param(`${p}mamba.conv1d.bias`),
      dims,
    );
    return this.#mamba2Out(p, y.view([n, m.dInner]), z);
  }

  /** The Mamba1 mixer of one verification pass (see {@linkcode mamba1VerifyScan}). */
  #mamba1Verify(
    p: string,
    inp: BlockInput,
    n: number,
    s: VerifyState,
    layer: MambaVerifyLayer,
  ): OutProjection {
    const m = this.mamba!;
    beginLayerVerification(this.rt, layer, s, null);
    const { u, x, delta, Bm, Cm } = this.#mamba1InProj(p, inp, 1, n);
    const y = mamba1VerifyScan(
      layer,
      s,
      { x, delta, B: Bm, C: Cm },
      this.param(`${p}mamba.conv1d.weight`).view([m.dInner, m.dConv]),
      this.param(`${p}mamba.conv1d.bias`),
      this.param(`${p}mamba.D`),
    );
    return this.#mamba1Out(p, u, y.view([n, m.dInner]));
  }

  /** Downloads the parameters into a CPU weight map (HF names; the tied lm_head aliases the embedding). */
  async toWeightMap(): Promise<WeightMap> {
    const names = [...this.params.keys()];
    const bufs = await this.rt.dev.readMany(
      names.map((n) => ({
        buffer: this.params.get(n)!.buffer,
        offset: 0,
        size: this.params.get(n)!.byteLength,
      })),
    );
    const out: WeightMap = new Map();
    names.forEach((n, i) => {
      const t = this.params.get(n)!;
      const data = t.dtype === "f16"
        ? Float32Array.from(new Float16Array(bufs[i]))
        : new Float32Array(bufs[i]);
      out.set(n, { shape: [...t.shape], data });
    });
    if (!this.params.has(LM_HEAD)) out.set(LM_HEAD, out.get(EMBED)!);
    return out;
  }

  /**
   * Releases every parameter. A borrowed one is a view: disposing it drops this model's reference to the
   * owner's storage and leaves the owner's tensor valid.
   */
  dispose(): void {
    for (const t of this.params.values()) {
      t.grad?.dispose();
      t.dispose();
    }
    this.invFreq.dispose();
  }
}

/** Throws when `share.owner` cannot lend to a model on `rt` in `dtype` (programming errors, not user input). */
function checkShareOwner(rt: Runtime, share: ShareFrom, dtype: DType, needWeights: boolean): void {
  if (share.owner.rt !== rt) throw new Error("share: the owner lives on another runtime");
  if (needWeights && !share.ownerWeights) {
    throw new Error("share: fromModel needs ownerWeights, the CPU weights the owner was uploaded from");
  }
  // an owner in another dtype could lend nothing; say so instead of silently sharing nothing
  if (share.owner.dtype !== dtype) {
    throw new Error(`share: the owner stores ${share.owner.dtype}, the new model ${dtype}`);
  }
}

/** The owner's tensor a parameter may borrow: frozen there, same shape and dtype; else null. */
function shareableTensor(
  share: ShareFrom,
  name: string,
  shape: readonly number[],
  dtype: DType,
): Tensor | null {
  const o = share.owner.params;
  const t = o.get(name) ?? (name === LM_HEAD ? o.get(EMBED) : undefined);
  if (!t || t.requiresGrad || t.dtype !== dtype || t.disposed) return null;
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) return null;
  return t;
}

/** The owner's CPU tensor of a name (a tied `lm_head.weight` is the embedding). */
function ownerHostTensor(w: WeightMap, name: string): HostTensor | undefined {
  return w.get(name) ?? (name === LM_HEAD ? w.get(EMBED) : undefined);
}

/**
 * True when `a` and `b` upload to the same bytes in `dtype`: the same object or array, or equal bits (f32) or
 * equal bits after the upload's own f16 rounding (so a model read back from f16 storage still matches the f32
 * values it was uploaded from). NaN payloads and signed zeros count as they are stored.
 */
export function sameStoredValues(a: HostTensor, b: HostTensor | undefined, dtype: DType): boolean {
  if (!b) return false;
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i])) return false;
  if (a === b || a.data === b.data) return true;
  const n = a.data.length;
  if (b.data.length !== n) return false;
  if (dtype === "f16") {
    const chunk = 1 << 16;
    for (let s = 0; s < n; s += chunk) {
      const e = Math.min(n, s + chunk);
      const x = new Uint16Array(Float16Array.from(a.data.subarray(s, e)).buffer);
      const y = new Uint16Array(Float16Array.from(b.data.subarray(s, e)).buffer);
      for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
    }
    return true;
  }
  const x = new Uint32Array(a.data.buffer, a.data.byteOffset, n);
  const y = new Uint32Array(b.data.buffer, b.data.byteOffset, n);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return false;
  return true;
}

/** A borrowed parameter: a kept, frozen view of the owner's tensor under this model's name. */
function borrowTensor(src: Tensor, name: string): Tensor {
  const v = src.view(src.shape).keep();
  v.name = name;
  v.requiresGrad = false;
  return v;
}

function randomRange(name: string, shape: readonly number[]): [number, number] {
  if (name.endsWith("norm.weight") || name.endsWith("layernorm.weight") || name.endsWith(".D")) return [1, 1];
  if (name.endsWith("A_log")) return [0, Math.log(16)];
  if (name.endsWith("dt_bias") || name.endsWith("dt_proj.bias")) {
    return [Math.log(Math.expm1(1e-3)), Math.log(Math.expm1(0.1))];
  }
  if (name.includes("conv1d")) return [-0.5, 0.5];
  if (name === EMBED || name === LM_HEAD) return [-0.05, 0.05];
  const fanIn = shape[shape.length - 1];
  return [-1 / Math.sqrt(fanIn), 1 / Math.sqrt(fanIn)];
}

function uploadParam(rt: Runtime, name: string, t: HostTensor, dtype: DType, trainable: boolean): Tensor {
  return rt.parameter(t.data, t.shape, name, trainable, dtype);
}

/** Rows (b * n + n - 1) of x [B*n, D]: each sequence's last position. */
function lastRows(x: Tensor, B: number, n: number, D: number): Tensor {
  const rt = x.rt;
  const out = rt.empty([B, D], x.dtype);
  const rowBytes = D * (x.dtype === "f16" ? 2 : 4);
  for (let b = 0; b < B; b++) {
    rt.dev.copyBuffer(x.buffer, (b * n + n - 1) * rowBytes, out.buffer, b * rowBytes, rowBytes);
  }
  return out;
}
