/**
 * Building a hybrid from a teacher: attention layers outside `attn_layers` become Mamba layers whose projections
 * start from the attention weights (method.md 1.1 for Mamba2, 1.2 for Mamba1; Algorithm 1 of the paper), and the
 * progressive form that converts more layers of an existing hybrid.
 *
 * What is copied: embeddings, final norm, lm_head, every MLP and both RMSNorms of every layer, and the kept
 * attention layers come from the source model; Mamba2's in_proj rows x <- v_proj, B <- k_proj, C <- q_proj and
 * out_proj <- o_proj (Mamba1: in_proj_x, B_proj, C_proj, out_proj the same way). Copied tensors are shared with
 * the source map, not duplicated: treat {@linkcode HostTensor} data as read-only.
 *
 * What is new, drawn from the caller's {@linkcode Rng} in this fixed order so that a seed reproduces a model:
 * for every Mamba layer i (ascending), a sub-generator `rng.fork("<mixer>.layer<i>")` (the caller's generator
 * is not advanced) draws, element by element in row-major order,
 * - Mamba2: in_proj z rows U(±1/sqrt(D)), in_proj dt rows U(±1/sqrt(D)), conv1d.weight U(±1/2),
 *   conv1d.bias U(±1/2), dt0 per head = exp(U(ln 1e-3, ln 1e-1)) floored at 1e-4 with
 *   dt_bias = dt0 + log(-expm1(-dt0)) (softplus inverse), A_log = log U(1, 16); D and norm.weight are ones;
 * - Mamba1: in_proj_z U(±1/sqrt(D)), dt_proj_down U(±1/sqrt(D)), dt_proj.weight U(±1/sqrt(dt_rank)),
 *   conv1d.weight U(±1/2), conv1d.bias U(±1/2), dt_proj.bias = softplus inverse of dt0 per channel;
 *   A_log[c, n] = log(n + 1) and D = ones are fixed.
 * These are the official code's initialisations (PyTorch's default Linear/Conv1d bounds, its dt and A inits).
 * Forking by layer index makes a layer's new parameters independent of which other layers are converted, so
 * the progressive form draws the same values for a layer as a one-shot mapping with the same seed.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import type { Rng } from "../util/rng.ts";
import {
  checkAttnLayers,
  makeMamba1Config,
  makeMamba2Config,
  type MambaConfig,
  type MambaMixer,
  type TransformerConfig,
} from "./config.ts";
import {
  checkWeightShapes,
  EMBED,
  FINAL_NORM,
  getWeight,
  type HostTensor,
  type HybridModel,
  layerPrefix,
  LM_HEAD,
  mambaMixerShapes,
  mlpAndNormShapes,
  type Model,
  transformerWeightShapes,
  type WeightMap,
} from "./weights.ts";

/** A model whose weights supply the non-Mamba tensors (and the attention to convert). */
export interface WeightSource {
  /** Its config.json. */
  config: TransformerConfig;
  /** Its weights. */
  weights: WeightMap;
}

function uniform(rng: Rng, n: number, bound: number): Float32Array {
  return rng.uniformArray(n, -bound, bound);
}

/** dt_bias / dt_proj.bias init: softplus inverse of dt0 = exp(U(ln 1e-3, ln 1e-1)) floored at 1e-4. */
function dtBiasInit(rng: Rng, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const dt = Math.max(Math.exp(rng.uniformRange(Math.log(1e-3), Math.log(1e-1))), 1e-4);
    out[i] = dt + Math.log(-Math.expm1(-dt));
  }
  return out;
}

function tensor(shape: number[], data: Float32Array): HostTensor {
  return { shape, data };
}

/** The self-attention weights of layer i of a source, shape-checked. */
function attentionOf(src: WeightSource, i: number, where: string) {
  const c = src.config, p = `${layerPrefix(i)}self_attn.`, D = c.hiddenSize;
  return {
    q: getWeight(src.weights, `${p}q_proj.weight`, [c.numHeads * c.headDim, D], where),
    k: getWeight(src.weights, `${p}k_proj.weight`, [c.numKvHeads * c.headDim, D], where),
    v: getWeight(src.weights, `${p}v_proj.weight`, [c.numKvHeads * c.headDim, D], where),
    o: getWeight(src.weights, `${p}o_proj.weight`, [D, c.numHeads * c.headDim], where),
  };
}

/**
 * The mixer tensors of Mamba layer i. With `src` the x/B/C/out projections come from layer i's attention;
 * without it (random init) they are drawn too, right after the rows they sit between.
 */
function mambaMixer(
  m: MambaConfig,
  i: number,
  rng: Rng,
  src: WeightSource | null,
  where: string,
): Map<string, HostTensor> {
  const D = m.dModel, p = `${layerPrefix(i)}mamba.`;
  const shapes = mambaMixerShapes(m, i);
  const shape = (name: string) => shapes.get(`${p}${name}`)!;
  const attn = src ? attentionOf(src, i, where) : null;
  const lin = 1 / Math.sqrt(D);
  const out = new Map<string, HostTensor>();
  const put = (name: string, data: Float32Array) => out.set(`${p}${name}`, tensor(shape(name), data));
  if (m.mixer === "mamba2") {
    const r = rng.fork(`${src ? "mamba2" : "mamba2.random"}.layer${i}`);
    const rows = 2 * m.dInner + 2 * m.dXb + m.nHeads;
    const inProj = new Float32Array(rows * D);
    // Row blocks [z | x | B | C | dt].
    const zEnd = m.dInner * D, xEnd = zEnd + m.dXb * D, bEnd = xEnd + m.dXb * D, cEnd = bEnd + m.dInner * D;
    if (attn) {
      inProj.set(uniform(r, m.dInner * D, lin), 0);
      inProj.set(uniform(r, m.nHeads * D, lin), cEnd);
      inProj.set(attn.v.data, zEnd);
      inProj.set(attn.k.data, xEnd);
      inProj.set(attn.q.data, bEnd);
    } else {
      inProj.set(uniform(r, rows * D, lin), 0);
    }
    put("in_proj.weight", inProj);
    const convDim = 2 * m.dXb + m.dInner;
    put("conv1d.weight", uniform(r, convDim * m.dConv, 0.5));
    put("conv1d.bias", uniform(r, convDim, 0.5));
    put("dt_bias", dtBiasInit(r, m.nHeads));
    put("A_log", Float32Array.from({ length: m.nHeads }, () => Math.log(r.uniformRange(1, 16))));
    put("D", new Float32Array(m.nHeads).fill(1));
    put("norm.weight", new Float32Array(m.dInner).fill(1));
    put("out_proj.weight", attn ? attn.o.data : uniform(r, D * m.dInner, 1 / Math.sqrt(m.dInner)));
    return sortByName(out);
  }
  const r = rng.fork(`${src ? "mamba1" : "mamba1.random"}.layer${i}`);
  if (!attn) {
    put("in_proj_x.weight", uniform(r, m.dXb * D, lin));
    put("B_proj.weight", uniform(r, m.dXb * D, lin));
    put("C_proj.weight", uniform(r, m.dInner * D, lin));
  } else {
    put("in_proj_x.weight", attn.v.data);
    put("B_proj.weight", attn.k.data);
    put("C_proj.weight", attn.q.data);
  }
  put("in_proj_z.weight", uniform(r, m.dInner * D, lin));
  put("dt_proj_down.weight", uniform(r, m.dtRank * D, lin));
  put("dt_proj.weight", uniform(r, m.dInner * m.dtRank, 1 / Math.sqrt(m.dtRank)));
  put("conv1d.weight", uniform(r, m.dInner * m.dConv, 0.5));
  put("conv1d.bias", uniform(r, m.dInner, 0.5));
  put("dt_proj.bias", dtBiasInit(r, m.dInner));
  const aLog = new Float32Array(m.dInner * m.dState);
  for (let c = 0; c < m.dInner; c++) {
    for (let n = 0; n < m.dState; n++) aLog[c * m.dState + n] = Math.log(n + 1);
  }
  put("A_log", aLog);
  put("D", new Float32Array(m.dInner).fill(1));
  put("out_proj.weight", attn ? attn.o.data : uniform(r, D * m.dInner, 1 / Math.sqrt(m.dInner)));
  return sortByName(out);
}

function sortByName<T>(m: Map<string, T>): Map<string, T> {
  return new Map([...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

function checkTeacher(src: WeightSource, where: string): void {
  const shapes = new Map([...src.weights].map(([k, t]) => [k, t.shape]));
  checkWeightShapes(shapes, transformerWeightShapes(src.config), where, {
    optional: src.config.tieWordEmbeddings ? [LM_HEAD] : [],
  });
}

/** Copies the global tensors (embedding, final norm, lm_head with its tie) from a source into `out`. */
function copyGlobals(src: WeightSource, out: WeightMap, where: string): void {
  const c = src.config;
  const embed = getWeight(src.weights, EMBED, [c.vocabSize, c.hiddenSize], where);
  out.set(EMBED, embed);
  out.set(FINAL_NORM, getWeight(src.weights, FINAL_NORM, [c.hiddenSize], where));
  out.set(
    LM_HEAD,
    c.tieWordEmbeddings ? embed : getWeight(src.weights, LM_HEAD, [c.vocabSize, c.hiddenSize], where),
  );
}

function copyNames(src: WeightMap, names: Iterable<string>, out: WeightMap, where: string): void {
  for (const n of names) out.set(n, getWeight(src, n, undefined, where));
}

function attentionNames(i: number): string[] {
  const p = `${layerPrefix(i)}self_attn.`;
  return ["q", "k", "v", "o"].map((x) => `${p}${x}_proj.weight`);
}

/**
 * Builds the hybrid's weights: globals from `base`, each layer in `attnLayers` as `base`'s attention layer,
 * every other layer from `layerFrom(i)` when it gives one (a previous hybrid's layer), else converted from
 * `base`'s attention with `base`'s MLP and norms.
 */
function assemble(
  base: WeightSource,
  mamba: MambaConfig,
  rng: Rng,
  convert: boolean,
  layerFrom: (i: number) => WeightMap | null,
  where: string,
): WeightMap {
  const out: WeightMap = new Map();
  copyGlobals(base, out, where);
  const attn = new Set(mamba.attnLayers);
  for (let i = 0; i < base.config.numLayers; i++) {
    const mlp = [...mlpAndNormShapes(base.config, i).keys()];
    if (attn.has(i)) {
      copyNames(base.weights, [...attentionNames(i), ...mlp], out, where);
      continue;
    }
    const previous = layerFrom(i);
    if (previous) {
      for (const [k, t] of previous) out.set(k, t);
      continue;
    }
    for (const [k, t] of mambaMixer(mamba, i, rng, convert ? base : null, where)) out.set(k, t);
    copyNames(base.weights, mlp, out, where);
  }
  return out;
}

/**
 * Builds a Mamba2 hybrid from a teacher (method.md 1.1): layers in `attnLayers` keep attention, every other
 * layer becomes a Mamba2 layer initialised from its attention weights. `attnLayers` must be sorted, unique and
 * in range. New parameters come from `rng` as the module documentation describes.
 */
export function mapAttentionToMamba2(
  teacher: WeightMap,
  config: TransformerConfig,
  attnLayers: readonly number[],
  rng: Rng,
): HybridModel {
  return mapAttentionToMamba(teacher, config, attnLayers, rng, "mamba2");
}

/**
 * Builds a Mamba1 hybrid from a teacher (method.md 1.2): in_proj_x <- v_proj, B_proj <- k_proj, C_proj <- q_proj,
 * out_proj <- o_proj, the rest drawn from `rng` as the module documentation describes.
 */
export function mapAttentionToMamba1(
  teacher: WeightMap,
  config: TransformerConfig,
  attnLayers: readonly number[],
  rng: Rng,
): HybridModel {
  return mapAttentionToMamba(teacher, config, attnLayers, rng, "mamba1");
}

/** {@linkcode mapAttentionToMamba2} or {@linkcode mapAttentionToMamba1}, chosen by `mixer`. */
export function mapAttentionToMamba(
  teacher: WeightMap,
  config: TransformerConfig,
  attnLayers: readonly number[],
  rng: Rng,
  mixer: MambaMixer,
): HybridModel {
  const mamba = mixer === "mamba2"
    ? makeMamba2Config(config, attnLayers)
    : makeMamba1Config(config, attnLayers);
  const src = { config, weights: teacher };
  checkTeacher(src, "teacher");
  return { kind: "hybrid", config, mamba, weights: assemble(src, mamba, rng, true, () => null, "teacher") };
}

/**
 * The ablation without attention initialisation: like {@linkcode mapAttentionToMamba}, but every mixer tensor is
 * drawn (x/B/C rows and in_proj_x/B_proj/C_proj U(±1/sqrt(D)), out_proj U(±1/sqrt(d_inner)), PyTorch's
 * default Linear init). MLPs, norms, embeddings and kept attention layers are still the teacher's (the
 * official code's `init_with_kqvo=False` would also re-initialise the MLPs; the paper's ablation compares the
 * mixer initialisation only). Sub-generators are named `"<mixer>.random.layer<i>"`.
 */
export function randomInitMamba(
  teacher: WeightMap,
  config: TransformerConfig,
  attnLayers: readonly number[],
  rng: Rng,
  mixer: MambaMixer = "mamba2",
): HybridModel {
  const mamba = mixer === "mamba2"
    ? makeMamba2Config(config, attnLayers)
    : makeMamba1Config(config, attnLayers);
  const src = { config, weights: teacher };
  checkTeacher(src, "teacher");
  return { kind: "hybrid", config, mamba, weights: assemble(src, mamba, rng, false, () => null, "teacher") };
}

/**
 * The progressive step (stage 1 of the method, as the official `prev_checkpoint_path` does): a new hybrid with
 * `newAttnLayers` ⊆ `previous.mamba.attnLayers`. Every layer that is a Mamba layer in `previous` is copied
 * whole from it (mixer, MLP and norms); every newly replaced layer is converted from `source`'s attention at
 * that layer, with `source`'s MLP and norms; embeddings, final norm, lm_head and the layers that keep attention
 * come from `source`. `source` is the teacher (the official recipe) or a hybrid that still has attention on
 * those layers (e.g. `previous` itself). The mixer and its options are `previous`'s.
 */
export function mapAttentionToMambaProgressive(
  previous: HybridModel,
  source: Model | WeightSource,
  newAttnLayers: readonly number[],
  rng: Rng,
): HybridModel {
  const prev = previous.mamba;
  const attn = checkAttnLayers([...newAttnLayers], prev.nLayer, "attn_layers");
  const prevAttn = new Set(prev.attnLayers);
  const revived = attn.filter((i) => !prevAttn.has(i));
  if (revived.length > 0) {
    throw new UserError(
      `attn_layers: layer(s) ${revived.join(", ")} are Mamba layers in the previous hybrid ` +
        `(its attn_layers are [${prev.attnLayers}]); progressive distillation only replaces more attention ` +
        `layers, so the new attn_layers must be a subset of the previous ones`,
    );
  }
  const sc = source.config, pc = previous.config;
  for (
    const [k, a, b] of [
      ["hidden_size", sc.hiddenSize, pc.hiddenSize],
      ["num_hidden_layers", sc.numLayers, pc.numLayers],
      ["num_attention_heads", sc.numHeads, pc.numHeads],
      ["num_key_value_heads", sc.numKvHeads, pc.numKvHeads],
      ["head_dim", sc.headDim, pc.headDim],
      ["intermediate_size", sc.intermediateSize, pc.intermediateSize],
      ["vocab_size", sc.vocabSize, pc.vocabSize],
    ] as const
  ) {
    if (a !== b) throw new UserError(`source model: ${k} is ${a} but the previous hybrid's is ${b}`);
  }
  const mamba: MambaConfig = { ...prev, attnLayers: attn, ssmCfg: { ...prev.ssmCfg } };
  const fromPrevious = (i: number): WeightMap | null => {
    if (prevAttn.has(i)) return null;
    const p = layerPrefix(i);
    const names = [...mambaMixerShapes(prev, i).keys(), ...mlpAndNormShapes(pc, i).keys()];
    const m: WeightMap = new Map();
    for (const n of names) {
      if (!n.startsWith(p)) throw new Error("unreachable");
      m.set(n, getWeight(previous.weights, n, undefined, "previous hybrid"));
    }
    return m;
  };
  const weights = assemble(
    { config: sc, weights: source.weights },
    mamba,
    rng,
    true,
    fromPrevious,
    "source model",
  );
  return { kind: "hybrid", config: pc, mamba, weights };
}

/**
 * The layers that keep attention when every k-th layer does (method.md 1: layer i is kept when (i + 1) % k == 0;
 * k = 2 keeps 50%, 4 keeps 25%, 8 keeps 12.5%). `k = Infinity` (or 0) keeps none.
 */
export function everyKthAttentionLayer(numLayers: number, k: number): number[] {
  if (k === 0 || k === Infinity) return [];
  if (!Number.isSafeInteger(k) || k < 1) {
    throw new UserError(`attention every k layers: k must be a positive integer, found ${k}`);
  }
  return Array.from({ length: numLayers }, (_, i) => i).filter((i) => (i + 1) % k === 0);
}
