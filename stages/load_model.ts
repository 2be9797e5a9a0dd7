/**
 * `load_model`: brings a teacher or a hybrid into the cache as a model artifact, from a local directory or the
 * Hugging Face Hub (`hf://org/name[@revision]`, through the standard Hub cache, so files Python tools already
 * downloaded are reused; `HF_HUB_OFFLINE=1` uses the cache only).
 *
 * Everything is checked before anything is written: config.json (and mamba_config.json for a hybrid), every
 * weight tensor's name, dtype and shape against the config (safetensors headers and offsets; no weight data is
 * read unless converting), and the tokenizer (tokenizer.json, chat template). Without `dtype` the files are
 * kept as they are (single or sharded safetensors): hard-linked when the source is immutable (Hub cache blobs,
 * other stages' outputs) and the filesystem allows it, else copied. Local directories are copied by default,
 * because the cache makes its files read-only and a hard link would make the user's own files read-only too.
 * With `dtype`, or for PyTorch `.bin` checkpoints, the weights are converted and written as one
 * `model.safetensors`.
 *
 * @module
 */
import { join } from "node:path";
import { defineStage } from "../pipelines/stage.ts";
import type { Artifact } from "../pipelines/stage.ts";
import { UserError } from "../util/errors.ts";
import { resolveModelSource } from "../models/hub.ts";
import {
  checkHybridConfig,
  loadMambaConfig,
  loadTransformerConfig,
  type MambaConfig,
} from "../models/config.ts";
import { loadModel, TOKENIZER_FILES } from "../models/checkpoint.ts";
import { numElements, type TensorSource } from "../models/safetensors.ts";
import {
  checkWeightShapes,
  EMBED,
  hybridWeightShapes,
  LM_HEAD,
  openModelTensors,
  sourceShapes,
  transformerWeightShapes,
} from "../models/weights.ts";
import { Tokenizer } from "../models/tokenizer.ts";
import { modelDir, writeModelArtifact } from "./shared/models.ts";

const DTYPE_OF_TORCH: Record<string, "F32" | "F16" | "BF16"> = {
  float32: "F32",
  float16: "F16",
  bfloat16: "BF16",
};

/** The load_model stage kind. */
export const loadModelStage = defineStage({
  kind: "load_model",
  version: 1,
  doc:
    "Loads a teacher or hybrid from a local directory or hf://org/name[@revision] (Hub cache, offline with " +
    "HF_HUB_OFFLINE=1), checks config, weights and tokenizer, and stores it as a model artifact (files linked " +
    "or copied as they are, or converted to another dtype).",
  params: {
    dtype: {
      type: "string",
      enum: ["F32", "F16", "BF16"],
      nullable: true,
      doc: "Convert the weights to this dtype (one model.safetensors). Default: keep the stored files; " +
        "PyTorch .bin checkpoints are converted to safetensors in the config's torch_dtype.",
    },
    link: {
      type: "string",
      enum: ["auto", "always", "never"],
      default: "auto",
      inKey: false,
      doc: "Hard-link unconverted files instead of copying: auto = for Hub cache blobs and stage outputs " +
        "(immutable), always = also for local directories (their files become read-only), never = copy.",
    },
  },
  inputs: {
    model: {
      doc: "A model directory (HF layout, or MambaInLlama layout for a hybrid) or hf://org/name[@revision].",
      type: "dir",
    },
    tokenizer: {
      doc: "A directory (or hf:// model) whose tokenizer files to use, for models shipped without them.",
      optional: true,
      type: "dir",
    },
  },
  outputs: {
    model: {
      type: "dir",
      doc:
        "config.json, mamba_config.json (hybrids), weights (model.safetensors or shards), tokenizer files.",
    },
  },
  async run(ctx) {
    const input = ctx.inputs.model;
    const dir = await sourceDir(input, (m) => ctx.log.info(m));
    const tokDir = ctx.inputs.tokenizer ? await sourceDir(ctx.inputs.tokenizer, () => {}) : dir;

    // ---- check everything first
    const config = await loadTransformerConfig(dir);
    let mamba: MambaConfig | null = null;
    if (await isFile(join(dir, "mamba_config.json"))) {
      mamba = await loadMambaConfig(dir);
      checkHybridConfig(config, mamba, join(dir, "mamba_config.json"));
    }
    const source = await openModelTensors(dir);
    const expected = mamba ? hybridWeightShapes({ teacher: config, mamba }) : transformerWeightShapes(config);
    checkWeightShapes(sourceShapes(source), expected, source.path, {
      optional: config.tieWordEmbeddings ? [LM_HEAD] : [],
      hint: config.tieWordEmbeddings
        ? undefined
        : "tie_word_embeddings is false, so lm_head.weight must be stored",
    });
    let tok: Tokenizer;
    try {
      tok = await Tokenizer.fromDir(tokDir);
    } catch (e) {
      if (e instanceof UserError && !ctx.inputs.tokenizer) {
        throw new UserError(`${e.message} (give a tokenizer input for a model shipped without one)`, {
          cause: e,
        });
      }
      throw e;
    }
    if (tok.vocabSize > config.vocabSize) {
      throw new UserError(
        `${tokDir}: the tokenizer has ${tok.vocabSize} tokens but the model's vocab_size is ${config.vocabSize}`,
      );
    }

    // ---- write
    const out = ctx.outputs.model;
    const weightFiles = weightFilesOf(source);
    const isBin = weightFiles.some((f) => !f.endsWith(".safetensors") && !f.endsWith(".json"));
    const dtype = ctx.params.dtype ?? (isBin ? DTYPE_OF_TORCH[config.torchDtype ?? ""] ?? "F32" : null);
    if (dtype) {
      ctx.log.info(`converting the weights to ${dtype}`);
      await writeModelArtifact(out, await loadModel(dir), tokDir, dtype);
    } else {
      const link = ctx.params.link === "always" || (ctx.params.link === "auto" && input.kind !== "file");
      let linked = 0, copied = 0;
      const place = async (from: string, name: string, mayLink: boolean) => {
        if (mayLink && await tryLink(from, join(out, name))) linked++;
        else {
          await Deno.copyFile(from, join(out, name));
          copied++;
        }
      };
      for (const f of ["config.json", ...(mamba ? ["mamba_config.json"] : []), ...weightFiles]) {
        await place(join(dir, f), f, link);
      }
      const tokLink = ctx.params.link === "always" ||
        (ctx.params.link === "auto" && (ctx.inputs.tokenizer ?? input).kind !== "file");
      for (const f of TOKENIZER_FILES) {
        if (!(await isFile(join(out, f))) && await isFile(join(tokDir, f))) {
          await place(join(tokDir, f), f, tokLink);
        }
      }
      ctx.log.info(`${linked} file(s) hard-linked, ${copied} copied`);
    }
    const params = countParams(source, config.tieWordEmbeddings);
    const kind = mamba
      ? `hybrid ${mamba.mixer}, attention on [${mamba.attnLayers.join(", ")}] of ${config.numLayers} layers`
      : `${config.architecture}, ${config.numLayers} layers`;
    ctx.log.info(`${kind}, ${(params / 1e6).toFixed(2)}M parameters, vocabulary ${config.vocabSize}`);
    ctx.setMetrics({
      parameters: params,
      layers: config.numLayers,
      attention_fraction: mamba ? mamba.attnLayers.length / config.numLayers : 1,
      dtype: dtype ?? storedDtypes(source),
    });
  },
});

/** The local directory of an input, resolving Hub references through the Hub cache (with a log line). */
async function sourceDir(input: Artifact, log: (m: string) => void): Promise<string> {
  if (input.kind !== "hub") return await modelDir(input);
  if (!input.hub || input.hub.repoType !== "model") {
    throw new UserError(`input ${input.ref}: not a model repository (hf://org/name[@revision])`);
  }
  const ref = input.hub.revision ? `${input.hub.repo}@${input.hub.revision}` : input.hub.repo;
  const r = await resolveModelSource(ref);
  log(`${ref}: commit ${r.commit}${r.fromCache ? " (from the Hub cache)" : ""}`);
  return r.dir;
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Hard-links the file `from` resolves to (Hub snapshots hold symlinks to blobs); false when not possible. */
async function tryLink(from: string, to: string): Promise<boolean> {
  try {
    await Deno.link(await Deno.realPath(from), to);
    return true;
  } catch {
    return false; // another filesystem, or links not permitted: copy instead
  }
}

/** The weight files of a source, relative to its directory (the index too, for sharded checkpoints). */
function weightFilesOf(source: TensorSource): string[] {
  const files = new Set<string>();
  for (const n of source.names()) files.add(basenameOf(source.info(n).file));
  if (source.path.endsWith(".index.json")) files.add(basenameOf(source.path));
  return [...files].sort();
}

function basenameOf(p: string): string {
  return p.slice(p.lastIndexOf("/") + 1);
}

function countParams(source: TensorSource, tied: boolean): number {
  let n = 0;
  for (const name of source.names()) {
    if (tied && name === LM_HEAD && source.has(EMBED)) continue;
    n += numElements(source.info(name).shape);
  }
  return n;
}

function storedDtypes(source: TensorSource): string {
  return [...new Set(source.names().map((n) => source.info(n).dtype))].sort().join(",");
}
