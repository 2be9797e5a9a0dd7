/**
 * Host-side model weights: a name -> {shape, float32 data} map (a {@linkcode WeightMap}), the tensor names and
 * shapes a configuration requires, and loading a model directory's weights with every tensor checked.
 *
 * Names are the Hugging Face / MambaInLlama state-dict keys (`model.layers.3.self_attn.q_proj.weight`, ...),
 * shapes are PyTorch's ([out, in] for Linear weights). With tied embeddings `lm_head.weight` is the same
 * {@linkcode HostTensor} object as `model.embed_tokens.weight` (one tensor, two names), so whoever uploads or
 * trains the weights can see the tie by identity.
 *
 * @module
 */
import { join } from "node:path";
import { UserError } from "../util/errors.ts";
import type { Dtype } from "./dtype.ts";
import type { HybridConfig, MambaConfig, TransformerConfig } from "./config.ts";
import {
  numElements,
  openSafetensors,
  openShardedSafetensors,
  ShardedSafetensors,
  type TensorSource,
  type TensorToWrite,
} from "./safetensors.ts";
import { openTorchCheckpoint } from "./torch_pickle.ts";

/** One tensor in host memory, always float32. */
export interface HostTensor {
  /** Shape, outermost dimension first (PyTorch order). */
  shape: number[];
  /** Row-major float32 values. */
  data: Float32Array;
  /** The dtype it was stored in when it was loaded from a file (informational). */
  storedDtype?: Dtype;
}

/** Model weights by state-dict name. */
export type WeightMap = Map<string, HostTensor>;

/** A plain Llama / Mistral model: its config.json and weights. */
export interface TransformerModel {
  /** Discriminant. */
  kind: "transformer";
  /** The model's config.json. */
  config: TransformerConfig;
  /** All weights, `lm_head.weight` included (aliased to the embedding when tied). */
  weights: WeightMap;
}

/** A hybrid: the teacher's config.json, the mamba_config.json and the weights. */
export interface HybridModel {
  /** Discriminant. */
  kind: "hybrid";
  /** The teacher's config.json (attention layers, MLPs, embeddings, RoPE). */
  config: TransformerConfig;
  /** The Mamba layers' configuration (mixer, widths, attn_layers). */
  mamba: MambaConfig;
  /** All weights, `lm_head.weight` included (aliased to the embedding when tied). */
  weights: WeightMap;
}

/** Either kind of model. */
export type Model = TransformerModel | HybridModel;

/** Names of the embedding, final norm and output projection. */
export const EMBED = "model.embed_tokens.weight";
/** Name of the final RMSNorm weight. */
export const FINAL_NORM = "model.norm.weight";
/** Name of the output projection. */
export const LM_HEAD = "lm_head.weight";

/** Prefix of decoder layer `i`'s tensors (`model.layers.{i}.`). */
export function layerPrefix(i: number): string {
  return `model.layers.${i}.`;
}

/** Shapes of one attention decoder layer (self_attn + MLP + both norms). */
export function attentionLayerShapes(c: TransformerConfig, i: number): Map<string, number[]> {
  const p = layerPrefix(i), D = c.hiddenSize;
  return new Map([
    [`${p}self_attn.q_proj.weight`, [c.numHeads * c.headDim, D]],
    [`${p}self_attn.k_proj.weight`, [c.numKvHeads * c.headDim, D]],
    [`${p}self_attn.v_proj.weight`, [c.numKvHeads * c.headDim, D]],
    [`${p}self_attn.o_proj.weight`, [D, c.numHeads * c.headDim]],
    ...mlpAndNormShapes(c, i),
  ]);
}

/** Shapes of a decoder layer's MLP and its two RMSNorms (shared by attention and Mamba layers). */
export function mlpAndNormShapes(c: TransformerConfig, i: number): Map<string, number[]> {
  const p = layerPrefix(i), D = c.hiddenSize, I = c.intermediateSize;
  return new Map([
    [`${p}mlp.gate_proj.weight`, [I, D]],
    [`${p}mlp.up_proj.weight`, [I, D]],
    [`${p}mlp.down_proj.weight`, [D, I]],
    [`${p}input_layernorm.weight`, [D]],
    [`${p}post_attention_layernorm.weight`, [D]],
  ]);
}

/** Shapes of one Mamba mixer's tensors (`model.layers.{i}.mamba.*`), Mamba2 or Mamba1 (method.md 1.1, 1.2). */
export function mambaMixerShapes(m: MambaConfig, i: number): Map<string, number[]> {
  const p = `${layerPrefix(i)}mamba.`, D = m.dModel;
  if (m.mixer === "mamba2") {
    const convDim = 2 * m.dXb + m.dInner;
    return new Map([
      [`${p}in_proj.weight`, [2 * m.dInner + 2 * m.dXb + m.nHeads, D]],
      [`${p}conv1d.weight`, [convDim, 1, m.dConv]],
      [`${p}conv1d.bias`, [convDim]],
      [`${p}dt_bias`, [m.nHeads]],
      [`${p}A_log`, [m.nHeads]],
      [`${p}D`, [m.nHeads]],
      [`${p}norm.weight`, [m.dInner]],
      [`${p}out_proj.weight`, [D, m.dInner]],
    ]);
  }
  return new Map([
    [`${p}in_proj_x.weight`, [m.dXb, D]],
    [`${p}in_proj_z.weight`, [m.dInner, D]],
    [`${p}B_proj.weight`, [m.dXb, D]],
    [`${p}C_proj.weight`, [m.dInner, D]],
    [`${p}dt_proj_down.weight`, [m.dtRank, D]],
    [`${p}dt_proj.weight`, [m.dInner, m.dtRank]],
    [`${p}dt_proj.bias`, [m.dInner]],
    [`${p}conv1d.weight`, [m.dInner, 1, m.dConv]],
    [`${p}conv1d.bias`, [m.dInner]],
    [`${p}A_log`, [m.dInner, m.dState]],
    [`${p}D`, [m.dInner]],
    [`${p}out_proj.weight`, [D, m.dInner]],
  ]);
}

function globalShapes(c: TransformerConfig): [string, number[]][] {
  return [
    [EMBED, [c.vocabSize, c.hiddenSize]],
    [FINAL_NORM, [c.hiddenSize]],
    [LM_HEAD, [c.vocabSize, c.hiddenSize]],
  ];
}

/** Every tensor a Llama / Mistral model of this config has, with its shape (`lm_head.weight` included). */
export function transformerWeightShapes(c: TransformerConfig): Map<string, number[]> {
  const out = new Map(globalShapes(c));
  for (let i = 0; i < c.numLayers; i++) for (const [k, v] of attentionLayerShapes(c, i)) out.set(k, v);
  return out;
}

/** Every tensor a hybrid of this config has: attention layers on `attn_layers`, Mamba layers elsewhere. */
export function hybridWeightShapes(c: HybridConfig): Map<string, number[]> {
  const out = new Map(globalShapes(c.teacher));
  const attn = new Set(c.mamba.attnLayers);
  for (let i = 0; i < c.teacher.numLayers; i++) {
    const layer = attn.has(i)
      ? attentionLayerShapes(c.teacher, i)
      : new Map([...mambaMixerShapes(c.mamba, i), ...mlpAndNormShapes(c.teacher, i)]);
    for (const [k, v] of layer) out.set(k, v);
  }
  return out;
}

/** Tensors some checkpoints carry that hold no parameters (HF ignores them too). */
const IGNORED = [/\.rotary_emb\.inv_freq$/];

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function listSome(names: string[], max = 12): string {
  return names.length <= max
    ? names.join(", ")
    : `${names.slice(0, max).join(", ")} and ${names.length - max} more`;
}

/**
 * Checks a set of tensor shapes against the expected ones and throws one {@linkcode UserError} listing every
 * missing, unexpected and wrong-shape tensor. Names in `optional` may be absent (a tied `lm_head.weight`);
 * `hint` is appended to the message.
 */
export function checkWeightShapes(
  actual: ReadonlyMap<string, readonly number[]>,
  expected: ReadonlyMap<string, readonly number[]>,
  where: string,
  options: { optional?: readonly string[]; hint?: string } = {},
): void {
  const optional = new Set(options.optional ?? []);
  const missing = [...expected.keys()].filter((k) => !actual.has(k) && !optional.has(k));
  const unexpected = [...actual.keys()].filter((k) => !expected.has(k) && !IGNORED.some((r) => r.test(k)));
  const wrong = [...expected.entries()]
    .filter(([k, s]) => actual.has(k) && !sameShape(actual.get(k)!, s))
    .map(([k, s]) => `${k} is [${actual.get(k)}], expected [${s}]`);
  if (missing.length + unexpected.length + wrong.length === 0) return;
  const parts = [];
  if (missing.length) parts.push(`missing ${missing.length} tensor(s): ${listSome(missing)}`);
  if (unexpected.length) parts.push(`unexpected ${unexpected.length} tensor(s): ${listSome(unexpected)}`);
  if (wrong.length) parts.push(`wrong shape: ${listSome(wrong)}`);
  throw new UserError(
    `${where}: weights do not match the config: ${parts.join("; ")}${
      options.hint ? ` (${options.hint})` : ""
    }`,
  );
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/**
 * Opens the weight files of a model directory, lazily: `model.safetensors.index.json` (sharded) if present,
 * else `model.safetensors`, else a single other `*.safetensors` file, else PyTorch's
 * `pytorch_model.bin.index.json` / `pytorch_model.bin` (read without executing the pickle). Nothing but
 * headers (and the pickle) is read.
 */
export async function openModelTensors(dir: string): Promise<TensorSource> {
  const index = join(dir, "model.safetensors.index.json");
  if (await exists(index)) return await openShardedSafetensors(index);
  const single = join(dir, "model.safetensors");
  if (await exists(single)) return await openSafetensors(single);
  let entries: string[];
  try {
    entries = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new UserError(`${dir}: model directory not found`, { cause: e });
    }
    throw e;
  }
  const st = entries.filter((n) => n.endsWith(".safetensors"));
  if (st.length === 1) return await openSafetensors(join(dir, st[0]));
  if (st.length > 1) {
    throw new UserError(
      `${dir}: several .safetensors files (${st.join(", ")}) but no model.safetensors.index.json`,
    );
  }
  const binIndex = join(dir, "pytorch_model.bin.index.json");
  if (await exists(binIndex)) return await ShardedSafetensors.open(binIndex, openTorchCheckpoint);
  const bin = join(dir, "pytorch_model.bin");
  if (await exists(bin)) return await openTorchCheckpoint(bin);
  throw new UserError(
    `${dir}: no weights: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or ` +
      `pytorch_model.bin.index.json`,
  );
}

/** Shapes of every tensor in a source (no data read). */
export function sourceShapes(source: TensorSource): Map<string, number[]> {
  return new Map(source.names().map((n) => [n, source.info(n).shape]));
}

/** Reads the named tensors (default: all) of a source into a {@linkcode WeightMap}, converted to float32. */
export async function readWeightMap(
  source: TensorSource,
  names: readonly string[] = source.names(),
): Promise<WeightMap> {
  const out: WeightMap = new Map();
  for (const name of names) {
    const info = source.info(name);
    out.set(name, { shape: [...info.shape], data: await source.readFloat32(name), storedDtype: info.dtype });
  }
  return out;
}

/**
 * Checks a source's tensors against a config and loads them. For a tied config a missing `lm_head.weight` is
 * the embedding; a stored one is ignored, since transformers also ties it to the embedding on load.
 */
export async function loadCheckedWeights(
  source: TensorSource,
  expected: ReadonlyMap<string, readonly number[]>,
  tied: boolean,
  where: string,
): Promise<WeightMap> {
  checkWeightShapes(sourceShapes(source), expected, where, {
    optional: tied ? [LM_HEAD] : [],
    hint: tied ? undefined : "tie_word_embeddings is false, so lm_head.weight must be stored",
  });
  const names = [...expected.keys()].filter((k) => source.has(k) && !(tied && k === LM_HEAD));
  const weights = await readWeightMap(source, names);
  if (tied) weights.set(LM_HEAD, weights.get(EMBED)!);
  return weights;
}

/** Returns the named tensor, checking its shape when `shape` is given; a {@linkcode UserError} otherwise. */
export function getWeight(
  weights: WeightMap,
  name: string,
  shape?: readonly number[],
  where = "weights",
): HostTensor {
  const t = weights.get(name);
  if (!t) throw new UserError(`${where}: missing tensor ${name}`);
  if (shape && !sameShape(t.shape, shape)) {
    throw new UserError(`${where}: tensor ${name} is [${t.shape}], expected [${shape}]`);
  }
  if (t.data.length !== numElements(t.shape)) {
    throw new Error(`${where}: tensor ${name} has ${t.data.length} values for shape [${t.shape}]`);
  }
  return t;
}

/** Copies a tensor (new Float32Array); ties are not preserved by this. */
export function cloneTensor(t: HostTensor): HostTensor {
  return {
    shape: [...t.shape],
    data: t.data.slice(),
    ...(t.storedDtype ? { storedDtype: t.storedDtype } : {}),
  };
}

/** Deep copy of a weight map that keeps aliasing: names sharing one tensor share its copy. */
export function cloneWeightMap(weights: WeightMap): WeightMap {
  const copies = new Map<HostTensor, HostTensor>();
  const out: WeightMap = new Map();
  for (const [k, t] of weights) {
    let c = copies.get(t);
    if (!c) copies.set(t, c = cloneTensor(t));
    out.set(k, c);
  }
  return out;
}

/** Number of parameters, counting a tensor shared by several names once. */
export function countParameters(weights: WeightMap): number {
  let n = 0;
  for (const t of new Set(weights.values())) n += t.data.length;
  return n;
}

/** The writer's view of a weight map, every tensor stored as `dtype` (F32 unless asked). */
export function weightsToWrite(
  weights: WeightMap,
  dtype: "F32" | "F16" | "BF16" = "F32",
): Map<string, TensorToWrite> {
  return new Map([...weights].map(([k, t]) => [k, { shape: t.shape, data: t.data, dtype }]));
}
