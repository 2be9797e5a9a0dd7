/**
 * Model directories on disk: loading a teacher (plain Hugging Face layout) or a hybrid (MambaInLlama layout),
 * and exporting either so that transformers and the official MambaInLlama code can open it.
 *
 * A hybrid directory holds the teacher's `config.json`, `mamba_config.json`, `model.safetensors` (or shards) and
 * the tokenizer files; a directory is a hybrid exactly when it has a `mamba_config.json`. Export writes the whole
 * directory under a temporary name and renames it into place when complete, with `lm_head.weight` stored even
 * for tied embeddings: the official loader is strict and fails without it (fixtures/reference/README.md §4.4),
 * while transformers accepts it and re-ties on load.
 *
 * @module
 */
import { join } from "node:path";
import { UserError } from "../util/errors.ts";
import { writeDirAtomic } from "../util/atomic.ts";
import {
  checkHybridConfig,
  loadMambaConfig,
  loadTransformerConfig,
  mambaConfigToJson,
  type TransformerConfig,
} from "./config.ts";
import { writeSafetensors } from "./safetensors.ts";
import {
  countParameters,
  type HybridModel,
  hybridWeightShapes,
  loadCheckedWeights,
  type Model,
  openModelTensors,
  type TransformerModel,
  transformerWeightShapes,
  weightsToWrite,
} from "./weights.ts";

/** Tokenizer and generation files copied into an exported model directory when present in the source. */
export const TOKENIZER_FILES: readonly string[] = [
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
];

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** True when `dir` holds a hybrid (it has a `mamba_config.json`). */
export function isHybridDir(dir: string): Promise<boolean> {
  return isFile(join(dir, "mamba_config.json"));
}

async function checkDir(dir: string): Promise<void> {
  try {
    if (!(await Deno.stat(dir)).isDirectory) throw new UserError(`${dir}: not a directory`);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new UserError(`${dir}: model directory not found`, { cause: e });
    }
    throw e;
  }
}

/** Loads a Llama / Mistral model directory (config.json + safetensors), every tensor checked against the config. */
export async function loadTransformerModel(dir: string): Promise<TransformerModel> {
  await checkDir(dir);
  const config = await loadTransformerConfig(dir);
  const source = await openModelTensors(dir);
  const weights = await loadCheckedWeights(
    source,
    transformerWeightShapes(config),
    config.tieWordEmbeddings,
    source.path,
  );
  return { kind: "transformer", config, weights };
}

/**
 * Loads a hybrid directory (MambaInLlama layout), every tensor checked against config.json + mamba_config.json.
 * Reads directories the official code wrote (the fixture hybrid is one).
 */
export async function loadHybridModel(dir: string): Promise<HybridModel> {
  await checkDir(dir);
  const config = await loadTransformerConfig(dir);
  const mamba = await loadMambaConfig(dir);
  checkHybridConfig(config, mamba, join(dir, "mamba_config.json"));
  const source = await openModelTensors(dir);
  const names = source.names();
  const looksMamba1 = names.some((n) => n.endsWith(".mamba.in_proj_x.weight"));
  const looksMamba2 = names.some((n) => n.endsWith(".mamba.in_proj.weight"));
  if (
    (mamba.mixer === "mamba2" && looksMamba1 && !looksMamba2) ||
    (mamba.mixer === "mamba1" && looksMamba2 && !looksMamba1)
  ) {
    throw new UserError(
      `${join(dir, "mamba_config.json")}: ssm_cfg describes a ${mamba.mixer} hybrid but the weights in ` +
        `${source.path} are ${
          looksMamba1 ? "mamba1" : "mamba2"
        } layers (Mamba2 configs carry ssm_cfg.ngroups)`,
    );
  }
  const weights = await loadCheckedWeights(
    source,
    hybridWeightShapes({ teacher: config, mamba }),
    config.tieWordEmbeddings,
    source.path,
  );
  return { kind: "hybrid", config, mamba, weights };
}

/** Loads a teacher or a hybrid directory, whichever it is. */
export async function loadModel(dir: string): Promise<Model> {
  await checkDir(dir);
  return (await isHybridDir(dir)) ? await loadHybridModel(dir) : await loadTransformerModel(dir);
}

/** Options of {@linkcode exportModel}. */
export interface ExportOptions {
  /** A directory whose tokenizer and generation files (see {@linkcode TOKENIZER_FILES}) are copied. */
  tokenizerDir?: string;
  /** Stored dtype of the weights (default F32). */
  dtype?: "F32" | "F16" | "BF16";
  /** Extra safetensors `__metadata__` entries (`format: "pt"`, which transformers requires, is always set). */
  metadata?: Record<string, string>;
}

const TORCH_DTYPE_NAMES = { F32: "float32", F16: "float16", BF16: "bfloat16" } as const;

/**
 * The teacher's config.json, with its dtype field (`torch_dtype`, or transformers 5's `dtype`) set to the
 * stored dtype: transformers 5 loads with the config's dtype by default, so a float32 export of a bfloat16
 * teacher would otherwise be read back in bfloat16.
 */
function configJson(config: TransformerConfig, dtype: "F32" | "F16" | "BF16"): string {
  const raw = { ...config.raw };
  let set = false;
  for (const k of ["torch_dtype", "dtype"]) {
    if (Object.hasOwn(raw, k)) (raw[k] = TORCH_DTYPE_NAMES[dtype]), (set = true);
  }
  if (!set) raw.torch_dtype = TORCH_DTYPE_NAMES[dtype];
  return JSON.stringify(raw, null, 2) + "\n";
}

/**
 * Writes a model directory atomically: `config.json` (the teacher's, its dtype field set to the stored dtype),
 * `mamba_config.json` for a
 * hybrid, `model.safetensors` (keys sorted, deterministic bytes) and the tokenizer files of
 * `options.tokenizerDir`. An existing directory at `dir` is replaced only once the new one is complete.
 */
export async function exportModel(dir: string, model: Model, options: ExportOptions = {}): Promise<void> {
  const expected = model.kind === "hybrid"
    ? hybridWeightShapes({ teacher: model.config, mamba: model.mamba })
    : transformerWeightShapes(model.config);
  for (const [name, shape] of expected) {
    const t = model.weights.get(name);
    if (!t || t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new Error(
        `exportModel: tensor ${name} is ${t ? `[${t.shape}]` : "missing"}, expected [${shape}]`,
      );
    }
  }
  const extra = [...model.weights.keys()].filter((k) => !expected.has(k));
  if (extra.length) throw new Error(`exportModel: tensors not in the config: ${extra.join(", ")}`);
  const tokenizerFiles: string[] = [];
  if (options.tokenizerDir) {
    for (const f of TOKENIZER_FILES) if (await isFile(join(options.tokenizerDir, f))) tokenizerFiles.push(f);
  }
  await writeDirAtomic(dir, async (tmp) => {
    await Deno.writeTextFile(join(tmp, "config.json"), configJson(model.config, options.dtype ?? "F32"));
    if (model.kind === "hybrid") {
      await Deno.writeTextFile(
        join(tmp, "mamba_config.json"),
        JSON.stringify(mambaConfigToJson(model.mamba), null, 4) + "\n",
      );
    }
    await writeSafetensors(
      join(tmp, "model.safetensors"),
      weightsToWrite(model.weights, options.dtype ?? "F32"),
      {
        ...options.metadata,
        format: "pt",
      },
    );
    for (const f of tokenizerFiles) await Deno.copyFile(join(options.tokenizerDir!, f), join(tmp, f));
  });
}

/** A one-line description of a model for logs (`hybrid mamba2, 5 layers (attention on 1,3), 0.3M params`). */
export function describeModel(model: Model): string {
  const n = countParameters(model.weights);
  const params = n >= 1e9
    ? `${(n / 1e9).toFixed(2)}B`
    : n >= 1e6
    ? `${(n / 1e6).toFixed(1)}M`
    : `${(n / 1e3).toFixed(1)}K`;
  const c = model.config;
  if (model.kind === "transformer") return `${c.architecture}, ${c.numLayers} layers, ${params} params`;
  return `hybrid ${model.mamba.mixer} of ${c.architecture}, ${c.numLayers} layers ` +
    `(attention on ${
      model.mamba.attnLayers.length ? model.mamba.attnLayers.join(",") : "none"
    }), ${params} params`;
}
