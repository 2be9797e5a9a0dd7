/**
 * Typed model descriptions: the teacher's Hugging Face `config.json` (Llama and Mistral) and the hybrid's
 * MambaInLlama `mamba_config.json`, parsed and checked, plus the RoPE inverse frequencies they imply.
 *
 * Missing optional fields take the defaults of transformers' `LlamaConfig` / `MistralConfig`, so a config means
 * here what it means there. Anything Distillery cannot run (another architecture, biases in the projections,
 * an activation other than SiLU, a RoPE type other than default/linear/llama3, Mamba options the official code
 * has but the method does not use) is refused with a {@linkcode UserError} naming the file and the field.
 *
 * @module
 */
import { join } from "node:path";
import { UserError } from "../util/errors.ts";

/** RoPE frequency scaling of a teacher (`rope_scaling` / `rope_parameters`). */
export type RopeScaling =
  | { type: "linear"; factor: number }
  | {
    type: "llama3";
    factor: number;
    lowFreqFactor: number;
    highFreqFactor: number;
    originalMaxPositionEmbeddings: number;
  };

/** A Llama or Mistral decoder-only model, as described by its `config.json`. */
export interface TransformerConfig {
  /** `architectures[0]` of the file, or the class implied by `model_type`. */
  architecture: "LlamaForCausalLM" | "MistralForCausalLM";
  /** HF `model_type`. */
  modelType: "llama" | "mistral";
  /** D, the residual width (`hidden_size`). */
  hiddenSize: number;
  /** Number of decoder layers (`num_hidden_layers`). */
  numLayers: number;
  /** H, attention heads (`num_attention_heads`). */
  numHeads: number;
  /** Hkv, key/value heads (`num_key_value_heads`, default H). */
  numKvHeads: number;
  /** hd, per-head width (`head_dim`, default D / H). */
  headDim: number;
  /** MLP width (`intermediate_size`). */
  intermediateSize: number;
  /** Vocabulary size (`vocab_size`). */
  vocabSize: number;
  /** RoPE base (`rope_theta` or `rope_parameters.rope_theta`). */
  ropeTheta: number;
  /** RoPE scaling, or null for plain RoPE. */
  ropeScaling: RopeScaling | null;
  /** Mistral's attention window in tokens, or null for full causal attention. */
  slidingWindow: number | null;
  /** RMSNorm epsilon (`rms_norm_eps`). */
  rmsNormEps: number;
  /** True when `lm_head` shares the embedding matrix. */
  tieWordEmbeddings: boolean;
  /** Beginning-of-sequence id, or null. */
  bosTokenId: number | null;
  /** End-of-sequence ids (config.json's, plus generation_config.json's when loaded from a directory). */
  eosTokenIds: number[];
  /** Padding id, or null. */
  padTokenId: number | null;
  /** `max_position_embeddings`. */
  maxPositionEmbeddings: number;
  /** The stored weight dtype the file declares (`torch_dtype`, or transformers-5 `dtype`), or null. */
  torchDtype: string | null;
  /** The parsed JSON, kept so an export writes the teacher's file back unchanged. */
  raw: Record<string, unknown>;
}

/** Which Mamba mixer a hybrid uses (method.md 1.1 and 1.2). */
export type MambaMixer = "mamba2" | "mamba1";

/** The Mamba part of a hybrid, as described by its `mamba_config.json`. */
export interface MambaConfig {
  /** Mixer variant; see {@linkcode parseMambaConfig} for the rule that decides it. */
  mixer: MambaMixer;
  /** D (`d_model`). */
  dModel: number;
  /** Width of z, C and y (`d_inner`; default expand * d_model). */
  dInner: number;
  /** Width of x and B (`d_xb`, = Hkv * hd for attention-initialised hybrids). */
  dXb: number;
  /** SSM state size: hd for Mamba2, 16 by default for Mamba1. */
  dState: number;
  /** Mamba2: number of heads (= ngroups); Mamba1: number of 16-wide C groups (d_inner / d_state). */
  nHeads: number;
  /** Mamba2: head width (= d_state); Mamba1: d_state as well (the group width). */
  headDim: number;
  /** Causal conv kernel width (always 4). */
  dConv: number;
  /** Mamba1 only: rank of the dt projection (ceil(D / 16) unless given); 0 for Mamba2. */
  dtRank: number;
  /** Mamba2 only: scan chunk size (default 256); it changes rounding only. 0 for Mamba1. */
  chunkSize: number;
  /** Number of decoder layers (`n_layer`). */
  nLayer: number;
  /** Layers that keep attention, sorted; every other layer is a Mamba layer. */
  attnLayers: number[];
  /** RMSNorm epsilon of the decoder layers. */
  rmsNormEps: number;
  /** MLP width. */
  intermediateSize: number;
  /** MLP activation (always "silu"). */
  hiddenAct: string;
  /** `vocab_size` as written (the official code writes null). */
  vocabSize: number | null;
  /** The `ssm_cfg` object as written. */
  ssmCfg: Record<string, unknown>;
}

/** A hybrid model's full description: the teacher's config.json and the mamba_config.json. */
export interface HybridConfig {
  /** The teacher's configuration (attention layers, MLPs, embeddings, RoPE). */
  teacher: TransformerConfig;
  /** The Mamba layers' configuration. */
  mamba: MambaConfig;
}

type Json = Record<string, unknown>;

function bad(file: string, field: string, what: string): never {
  throw new UserError(`${file}: field "${field}" ${what}`);
}

/** `o[key]` as a positive integer (or `fallback` when absent); `label` is the field's name in messages. */
function posInt(o: Json, file: string, key: string, fallback?: number, label = key): number {
  const v = o[key] ?? fallback;
  if (v === undefined) bad(file, label, "is missing (a positive integer is required)");
  if (!Number.isSafeInteger(v) || (v as number) <= 0) {
    bad(file, label, `must be a positive integer, found ${JSON.stringify(v)}`);
  }
  return v as number;
}

/** `o[key]` as a positive finite number (or `fallback` when absent). */
function posNum(o: Json, file: string, key: string, fallback?: number, label = key): number {
  const v = o[key] ?? fallback;
  if (v === undefined) bad(file, label, "is missing (a positive number is required)");
  if (typeof v !== "number" || !(v > 0) || !Number.isFinite(v)) {
    bad(file, label, `must be a positive number, found ${JSON.stringify(v)}`);
  }
  return v;
}

function optId(o: Json, file: string, field: string): number | null {
  const v = o[field];
  if (v === undefined || v === null) return null;
  if (Array.isArray(v)) {
    if (v.length === 0) return null;
    return optId({ [field]: v[0] }, file, field);
  }
  if (!Number.isSafeInteger(v) || (v as number) < 0) {
    bad(file, field, `must be a token id, found ${JSON.stringify(v)}`);
  }
  return v as number;
}

function idList(o: Json, file: string, field: string): number[] {
  const v = o[field];
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const x of list) {
    if (!Number.isSafeInteger(x) || x < 0) {
      bad(file, field, `must be a token id or a list of ids, found ${JSON.stringify(v)}`);
    }
  }
  return list as number[];
}

function asObject(json: unknown, file: string): Json {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new UserError(`${file}: expected a JSON object`);
  }
  return json as Json;
}

const ARCHITECTURES = { llama: "LlamaForCausalLM", mistral: "MistralForCausalLM" } as const;

function parseRope(o: Json, file: string): { theta: number; scaling: RopeScaling | null } {
  // transformers 5 writes `rope_parameters` (theta inside); older files have `rope_theta` + `rope_scaling`.
  const params = o.rope_parameters;
  let scaling: Json | null = null;
  let theta: number;
  let field = "rope_scaling";
  if (params !== undefined && params !== null) {
    field = "rope_parameters";
    const p = asObject(params, `${file} (rope_parameters)`);
    theta = posNum(
      { rope_theta: p.rope_theta ?? o.rope_theta },
      file,
      "rope_theta",
      10000,
      "rope_parameters.rope_theta",
    );
    scaling = p;
  } else {
    theta = posNum(o, file, "rope_theta", 10000);
    if (o.rope_scaling !== undefined && o.rope_scaling !== null) {
      scaling = asObject(o.rope_scaling, `${file} (rope_scaling)`);
    }
  }
  if (scaling === null) return { theta, scaling: null };
  const type = scaling.rope_type ?? scaling.type ?? "default";
  const sc = scaling;
  const num = (k: string) => posNum(sc, file, k, undefined, `${field}.${k}`);
  if (sc.partial_rotary_factor !== undefined && sc.partial_rotary_factor !== 1) {
    bad(file, `${field}.partial_rotary_factor`, "is not supported (only full rotary embeddings)");
  }
  switch (type) {
    case "default":
      return { theta, scaling: null };
    case "linear":
      return { theta, scaling: { type: "linear", factor: num("factor") } };
    case "llama3": {
      const s = {
        type: "llama3" as const,
        factor: num("factor"),
        lowFreqFactor: num("low_freq_factor"),
        highFreqFactor: num("high_freq_factor"),
        originalMaxPositionEmbeddings: num("original_max_position_embeddings"),
      };
      if (!(s.highFreqFactor > s.lowFreqFactor)) {
        bad(file, `${field}.high_freq_factor`, `must be larger than low_freq_factor (${s.lowFreqFactor})`);
      }
      return { theta, scaling: s };
    }
    default:
      bad(
        file,
        `${field}.rope_type`,
        `${JSON.stringify(type)} is not supported (supported: default, linear, llama3)`,
      );
  }
}

/**
 * Parses a teacher's `config.json` object. `file` names the file in error messages. Only `llama` and
 * `mistral` are accepted; defaults follow transformers' config classes.
 */
export function parseTransformerConfig(json: unknown, file = "config.json"): TransformerConfig {
  const o = asObject(json, file);
  const archs = o.architectures;
  const arch0 = Array.isArray(archs) && typeof archs[0] === "string" ? archs[0] : undefined;
  const modelType = o.model_type;
  if (modelType !== "llama" && modelType !== "mistral") {
    throw new UserError(
      `${file}: unsupported architecture: model_type ${JSON.stringify(modelType)}${
        arch0 ? ` (${arch0})` : ""
      }; ` +
        `Distillery supports model_type "llama" (LlamaForCausalLM) and "mistral" (MistralForCausalLM)`,
    );
  }
  const architecture = ARCHITECTURES[modelType];
  if (arch0 !== undefined && arch0 !== architecture) {
    throw new UserError(
      `${file}: unsupported architecture ${arch0} for model_type "${modelType}" (expected ${architecture})`,
    );
  }
  const hiddenSize = posInt(o, file, "hidden_size");
  const numLayers = posInt(o, file, "num_hidden_layers");
  const numHeads = posInt(o, file, "num_attention_heads");
  const numKvHeads = posInt(o, file, "num_key_value_heads", numHeads);
  if (numHeads % numKvHeads !== 0) {
    bad(file, "num_key_value_heads", `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }
  let headDim: number;
  if (o.head_dim === undefined || o.head_dim === null) {
    if (hiddenSize % numHeads !== 0) {
      bad(
        file,
        "head_dim",
        `is missing and hidden_size (${hiddenSize}) is not a multiple of num_attention_heads (${numHeads})`,
      );
    }
    headDim = hiddenSize / numHeads;
  } else {
    headDim = posInt(o, file, "head_dim");
  }
  if (headDim % 2 !== 0) bad(file, "head_dim", `must be even for RoPE, found ${headDim}`);
  const act = o.hidden_act ?? "silu";
  if (act !== "silu") bad(file, "hidden_act", `${JSON.stringify(act)} is not supported (only "silu")`);
  for (const b of ["attention_bias", "mlp_bias"]) {
    if (o[b] === true) bad(file, b, "is true: biases in the projections are not supported");
  }
  const rope = parseRope(o, file);
  let slidingWindow: number | null = null;
  if (modelType === "mistral") {
    // MistralConfig's default window is 4096; an explicit null turns it off.
    const sw = Object.hasOwn(o, "sliding_window") ? o.sliding_window : 4096;
    if (sw !== null) slidingWindow = posInt({ sliding_window: sw }, file, "sliding_window");
  } else if (o.sliding_window !== undefined && o.sliding_window !== null) {
    bad(file, "sliding_window", "is set for a llama model; only mistral models use a sliding window");
  }
  const tie = o.tie_word_embeddings ?? false;
  if (typeof tie !== "boolean") {
    bad(file, "tie_word_embeddings", `must be true or false, found ${JSON.stringify(tie)}`);
  }
  const dtype = o.torch_dtype ?? o.dtype ?? null;
  return {
    architecture,
    modelType,
    hiddenSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    intermediateSize: posInt(o, file, "intermediate_size"),
    vocabSize: posInt(o, file, "vocab_size"),
    ropeTheta: rope.theta,
    ropeScaling: rope.scaling,
    slidingWindow,
    rmsNormEps: posNum(o, file, "rms_norm_eps", 1e-6),
    tieWordEmbeddings: tie,
    bosTokenId: optId(o, file, "bos_token_id"),
    eosTokenIds: idList(o, file, "eos_token_id"),
    padTokenId: optId(o, file, "pad_token_id"),
    maxPositionEmbeddings: posInt(
      o,
      file,
      "max_position_embeddings",
      modelType === "mistral" ? 131072 : 2048,
    ),
    torchDtype: typeof dtype === "string" ? dtype : null,
    raw: o,
  };
}

async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: file not found`, { cause: e });
    throw e;
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
}

/**
 * Reads `config.json` from a model directory; EOS ids from `generation_config.json` (when present) are added,
 * as generation in transformers stops on those.
 */
export async function loadTransformerConfig(dir: string): Promise<TransformerConfig> {
  const path = join(dir, "config.json");
  const cfg = parseTransformerConfig(await readJson(path), path);
  const genPath = join(dir, "generation_config.json");
  let gen: unknown;
  try {
    gen = JSON.parse(await Deno.readTextFile(genPath));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return cfg;
    throw new UserError(`${genPath}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  const g = asObject(gen, genPath);
  for (const id of idList(g, genPath, "eos_token_id")) {
    if (!cfg.eosTokenIds.includes(id)) cfg.eosTokenIds.push(id);
  }
  if (cfg.bosTokenId === null) cfg.bosTokenId = optId(g, genPath, "bos_token_id");
  if (cfg.padTokenId === null) cfg.padTokenId = optId(g, genPath, "pad_token_id");
  return cfg;
}

/** ssm_cfg keys only the official Mamba2 layer accepts (their presence marks a Mamba2 config). */
const MAMBA2_ONLY = [
  "ngroups",
  "headdim",
  "d_ssm",
  "chunk_size",
  "A_init_range",
  "D_has_hdim",
  "rmsnorm",
  "norm_before_gate",
  "dt_limit",
  "conv_init",
  "use_mem_eff_path",
  "bias",
];
/** ssm_cfg keys only the official Mamba1 layer accepts. */
const MAMBA1_ONLY = [
  "dt_rank",
  "dt_init",
  "dt_scale",
  "proj_x_bias",
  "proj_z_bias",
  "out_proj_bias",
  "use_fast_path",
];
/** ssm_cfg keys both accept; other keys are unknown to the official code and refused. */
const MAMBA_COMMON = [
  "d_state",
  "d_conv",
  "expand",
  "dt_min",
  "dt_max",
  "dt_init_floor",
  "repeat_kv_before_conv",
  "conv_bias",
];

/**
 * The rule that decides a hybrid's mixer from its `ssm_cfg`, written for the two layouts the official
 * MambaInLlama code produces: its Mamba2 scripts always write `ngroups` (the Mamba2 layer requires
 * d_inner == ngroups * d_state, which the default ngroups = 1 breaks for every real model) and its Mamba1
 * scripts write `{"expand": 1}` only. So: any Mamba2-only key (ngroups, headdim, chunk_size, ...) means
 * "mamba2"; otherwise "mamba1". A config mixing Mamba1-only and Mamba2-only keys is refused: neither official
 * layer would accept it.
 */
export function mixerOf(ssmCfg: Record<string, unknown>, file = "mamba_config.json"): MambaMixer {
  const m2 = MAMBA2_ONLY.filter((k) => Object.hasOwn(ssmCfg, k));
  const m1 = MAMBA1_ONLY.filter((k) => Object.hasOwn(ssmCfg, k));
  if (m2.length > 0 && m1.length > 0) {
    bad(file, "ssm_cfg", `mixes Mamba2-only keys (${m2}) with Mamba1-only keys (${m1})`);
  }
  return m2.length > 0 ? "mamba2" : "mamba1";
}

/**
 * Checks an `attn_layers` list: integers in [0, nLayer), strictly increasing (sorted, no duplicates).
 * Returns a copy. `where` names the file or parameter in messages.
 */
export function checkAttnLayers(attnLayers: unknown, nLayer: number, where: string): number[] {
  if (!Array.isArray(attnLayers)) {
    throw new UserError(
      `${where}: attn_layers must be a list of layer indices, found ${JSON.stringify(attnLayers)}`,
    );
  }
  for (let i = 0; i < attnLayers.length; i++) {
    const v = attnLayers[i];
    if (!Number.isSafeInteger(v) || v < 0 || v >= nLayer) {
      throw new UserError(
        `${where}: attn_layers[${i}] = ${JSON.stringify(v)} is not a layer index in [0, ${nLayer})`,
      );
    }
    if (i > 0 && v <= attnLayers[i - 1]) {
      throw new UserError(
        `${where}: attn_layers must be sorted without duplicates, found ${attnLayers[i - 1]} before ${v} ` +
          `(${JSON.stringify(attnLayers)})`,
      );
    }
  }
  return [...attnLayers];
}

/**
 * Parses a `mamba_config.json` object (MambaInLlama layout: d_model, ssm_cfg, rms_norm_eps, vocab_size, d_inner,
 * d_xb, intermediate_size, hidden_act, n_layer, attn_layers). The mixer comes from {@linkcode mixerOf} unless
 * `mixer` forces it. Options the method does not use (biases, d_ssm, norm before gate, ...) are refused.
 */
export function parseMambaConfig(json: unknown, file = "mamba_config.json", mixer?: MambaMixer): MambaConfig {
  const o = asObject(json, file);
  const ssm = o.ssm_cfg === undefined || o.ssm_cfg === null ? {} : asObject(o.ssm_cfg, `${file} (ssm_cfg)`);
  for (const k of Object.keys(ssm)) {
    if (![...MAMBA2_ONLY, ...MAMBA1_ONLY, ...MAMBA_COMMON].includes(k)) {
      bad(file, `ssm_cfg.${k}`, "is not an option of the official Mamba layers");
    }
  }
  const kind = mixer ?? mixerOf(ssm, file);
  const dModel = posInt(o, file, "d_model");
  const expand = posInt(ssm, file, "expand", 2, "ssm_cfg.expand");
  const dInner = o.d_inner === undefined || o.d_inner === null ? expand * dModel : posInt(o, file, "d_inner");
  const dXb = posInt(o, file, "d_xb");
  const nLayer = posInt(o, file, "n_layer");
  const dConv = ssm.d_conv ?? 4;
  if (dConv !== 4) bad(file, "ssm_cfg.d_conv", `must be 4, found ${JSON.stringify(dConv)}`);
  if ((ssm.conv_bias ?? true) !== true) bad(file, "ssm_cfg.conv_bias", "must be true");
  const act = o.hidden_act ?? "silu";
  if (act !== "silu") bad(file, "hidden_act", `${JSON.stringify(act)} is not supported (only "silu")`);
  const vocab = o.vocab_size;
  if (vocab !== undefined && vocab !== null && (!Number.isSafeInteger(vocab) || (vocab as number) <= 0)) {
    bad(file, "vocab_size", `must be a positive integer or null, found ${JSON.stringify(vocab)}`);
  }
  const base = {
    dModel,
    dInner,
    dXb,
    dConv: 4,
    nLayer,
    attnLayers: checkAttnLayers(o.attn_layers ?? [], nLayer, file),
    rmsNormEps: posNum(o, file, "rms_norm_eps", 1e-5),
    intermediateSize: posInt(o, file, "intermediate_size"),
    hiddenAct: "silu",
    vocabSize: (vocab ?? null) as number | null,
    ssmCfg: ssm,
  };
  const divides = (a: number, an: string, b: number, bn: string) => {
    if (b % a !== 0) bad(file, an, `(${a}) must divide ${bn} (${b})`);
  };
  if (kind === "mamba2") {
    const dState = posInt(ssm, file, "d_state", 128, "ssm_cfg.d_state");
    const nGroups = posInt(ssm, file, "ngroups", 1, "ssm_cfg.ngroups");
    if (nGroups * dState !== dInner) {
      bad(
        file,
        "ssm_cfg.ngroups",
        `* d_state (${nGroups} * ${dState}) must equal d_inner (${dInner}) for a Mamba2 hybrid`,
      );
    }
    divides(dState, "ssm_cfg.d_state", dXb, "d_xb");
    divides(dXb, "d_xb", dInner, "d_inner");
    if (ssm.d_ssm !== undefined && ssm.d_ssm !== null && ssm.d_ssm !== dInner) {
      bad(file, "ssm_cfg.d_ssm", "must be null or d_inner (a gated-MLP share of the mixer is not supported)");
    }
    const flags: [string, unknown][] = [
      ["D_has_hdim", false],
      ["rmsnorm", true],
      ["norm_before_gate", false],
      ["repeat_kv_before_conv", false],
      ["bias", false],
    ];
    for (const [k, want] of flags) {
      if (Object.hasOwn(ssm, k) && ssm[k] !== want) {
        bad(file, `ssm_cfg.${k}`, `must be ${want} (the method's Mamba2 layer)`);
      }
    }
    if (ssm.dt_limit !== undefined) {
      bad(file, "ssm_cfg.dt_limit", "is not supported (the method does not clamp delta)");
    }
    const chunk = posInt(ssm, file, "chunk_size", 256, "ssm_cfg.chunk_size");
    return {
      mixer: "mamba2",
      ...base,
      dState,
      nHeads: nGroups,
      headDim: dState,
      dtRank: 0,
      chunkSize: chunk,
    };
  }
  const dState = posInt(ssm, file, "d_state", 16, "ssm_cfg.d_state");
  divides(dState, "ssm_cfg.d_state", dXb, "d_xb");
  divides(dState, "ssm_cfg.d_state", dInner, "d_inner");
  divides(dXb / dState, "d_xb / d_state", dInner / dState, "d_inner / d_state");
  if ((ssm.repeat_kv_before_conv ?? true) !== true) {
    bad(
      file,
      "ssm_cfg.repeat_kv_before_conv",
      "must be true (the method's Mamba1 layer convolves the repeated x)",
    );
  }
  for (const k of ["proj_x_bias", "proj_z_bias", "out_proj_bias"]) {
    if (ssm[k] === true) bad(file, `ssm_cfg.${k}`, "is true: biases in the projections are not supported");
  }
  const dtRankRaw = ssm.dt_rank ?? "auto";
  const dtRank = dtRankRaw === "auto"
    ? Math.ceil(dModel / 16)
    : posInt(ssm, file, "dt_rank", undefined, "ssm_cfg.dt_rank");
  return { mixer: "mamba1", ...base, dState, nHeads: dInner / dState, headDim: dState, dtRank, chunkSize: 0 };
}

/** Reads and parses `mamba_config.json` in a hybrid directory. */
export async function loadMambaConfig(dir: string, mixer?: MambaMixer): Promise<MambaConfig> {
  const path = join(dir, "mamba_config.json");
  return parseMambaConfig(await readJson(path), path, mixer);
}

/**
 * Checks that a mamba_config fits its teacher config (same width, depth, MLP width, and x/B/C widths that
 * attention weights can fill); `file` names the mamba_config in messages.
 */
export function checkHybridConfig(
  teacher: TransformerConfig,
  mamba: MambaConfig,
  file = "mamba_config.json",
): void {
  const same = (field: string, got: number, want: number, wantName: string) => {
    if (got !== want) bad(file, field, `is ${got} but the teacher's ${wantName} is ${want}`);
  };
  same("d_model", mamba.dModel, teacher.hiddenSize, "hidden_size");
  same("n_layer", mamba.nLayer, teacher.numLayers, "num_hidden_layers");
  same("intermediate_size", mamba.intermediateSize, teacher.intermediateSize, "intermediate_size");
  if (mamba.vocabSize !== null) same("vocab_size", mamba.vocabSize, teacher.vocabSize, "vocab_size");
}

/**
 * The mamba_config for a Mamba2 hybrid of `teacher` (method.md 1.1): nheads = ngroups = H, d_state = hd,
 * d_inner = H * hd, d_xb = Hkv * hd, written as the official code writes it. When d_inner is not a multiple of
 * 64, `ssm_cfg.headdim` = hd is added: the official Mamba2 layer asserts d_inner % headdim == 0 with its
 * default headdim 64 before it overrides headdim with d_state, so without it the official code cannot load
 * the checkpoint.
 */
export function makeMamba2Config(teacher: TransformerConfig, attnLayers: readonly number[]): MambaConfig {
  const H = teacher.numHeads, hd = teacher.headDim;
  const dInner = H * hd;
  const ssmCfg: Record<string, unknown> = { expand: 1, ngroups: H, d_state: hd };
  if (dInner % 64 !== 0) ssmCfg.headdim = hd;
  return {
    mixer: "mamba2",
    dModel: teacher.hiddenSize,
    dInner,
    dXb: teacher.numKvHeads * hd,
    dState: hd,
    nHeads: H,
    headDim: hd,
    dConv: 4,
    dtRank: 0,
    chunkSize: 256,
    nLayer: teacher.numLayers,
    attnLayers: checkAttnLayers([...attnLayers], teacher.numLayers, "attn_layers"),
    rmsNormEps: teacher.rmsNormEps,
    intermediateSize: teacher.intermediateSize,
    hiddenAct: "silu",
    vocabSize: null,
    ssmCfg,
  };
}

/**
 * The mamba_config for a Mamba1 hybrid of `teacher` (method.md 1.2): d_state 16, d_inner = H * hd,
 * d_xb = Hkv * hd, dt_rank = ceil(D / 16), `ssm_cfg {"expand": 1}` as the official Mamba1 scripts write it.
 */
export function makeMamba1Config(teacher: TransformerConfig, attnLayers: readonly number[]): MambaConfig {
  const dInner = teacher.numHeads * teacher.headDim;
  const dXb = teacher.numKvHeads * teacher.headDim;
  const dState = 16;
  if (dXb % dState !== 0 || dInner % dState !== 0 || (dInner / dState) % (dXb / dState) !== 0) {
    throw new UserError(
      `a Mamba1 hybrid needs d_xb (${dXb}) and d_inner (${dInner}) to be multiples of d_state 16, with d_xb/16 ` +
        `dividing d_inner/16; this teacher's head sizes do not allow that (use mixer mamba2)`,
    );
  }
  return {
    mixer: "mamba1",
    dModel: teacher.hiddenSize,
    dInner,
    dXb,
    dState,
    nHeads: dInner / dState,
    headDim: dState,
    dConv: 4,
    dtRank: Math.ceil(teacher.hiddenSize / 16),
    chunkSize: 0,
    nLayer: teacher.numLayers,
    attnLayers: checkAttnLayers([...attnLayers], teacher.numLayers, "attn_layers"),
    rmsNormEps: teacher.rmsNormEps,
    intermediateSize: teacher.intermediateSize,
    hiddenAct: "silu",
    vocabSize: null,
    ssmCfg: { expand: 1 },
  };
}

/** The `mamba_config.json` object for a config, keys in the official writer's order. */
export function mambaConfigToJson(cfg: MambaConfig): Record<string, unknown> {
  return {
    d_model: cfg.dModel,
    ssm_cfg: { ...cfg.ssmCfg },
    rms_norm_eps: cfg.rmsNormEps,
    vocab_size: cfg.vocabSize,
    d_inner: cfg.dInner,
    d_xb: cfg.dXb,
    intermediate_size: cfg.intermediateSize,
    hidden_act: cfg.hiddenAct,
    n_layer: cfg.nLayer,
    attn_layers: [...cfg.attnLayers],
  };
}

/**
 * RoPE inverse frequencies inv_freq[i], i < hd/2, bit-identical to transformers' `inv_freq` buffer:
 * theta^(-2i/hd), then the scaling. `linear` divides by the factor. `llama3` keeps high frequencies (wavelength
 * below original_max / high_freq_factor), divides low frequencies (wavelength above original_max /
 * low_freq_factor) by the factor, and blends in between with s = (original_max / wavelength - low) /
 * (high - low): (1 - s) * f / factor + s * f. None of these types rescales the attention (factor 1).
 *
 * transformers evaluates these formulas on float32 tensors, so every step here is rounded to float32 the same
 * way (`Math.fround` after each operation, powers correctly rounded). Evaluating in float64 and rounding once
 * at the end differs from transformers by one ulp in about a third of the entries (checked against
 * transformers 5.17 for default, linear and llama3 scaling), which shifts RoPE angles by up to position * 6e-8.
 */
export function ropeInverseFrequencies(
  config: Pick<TransformerConfig, "headDim" | "ropeTheta" | "ropeScaling">,
): Float32Array {
  const f32 = Math.fround;
  const dim = config.headDim;
  const out = new Float32Array(dim / 2);
  const s = config.ropeScaling;
  const base = f32(config.ropeTheta);
  for (let i = 0; i < dim / 2; i++) {
    let f = f32(1 / f32(Math.pow(base, f32((2 * i) / dim))));
    if (s?.type === "linear") f = f32(f / s.factor);
    else if (s?.type === "llama3") {
      const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      const wavelen = f32(f32(2 * Math.PI) / f);
      const scaled = wavelen > lowWavelen ? f32(f / s.factor) : f;
      if (!(wavelen < highWavelen) && !(wavelen > lowWavelen)) {
        const smooth = f32(
          f32(f32(s.originalMaxPositionEmbeddings) / wavelen) - s.lowFreqFactor,
        ) / f32(s.highFreqFactor - s.lowFreqFactor);
        const sm = f32(smooth);
        f = f32(f32(f32(f32(1 - sm) * scaled) / s.factor) + f32(sm * scaled));
      } else f = scaled;
    }
    out[i] = f;
  }
  return out;
}
