/**
 * `export`: writes a model artifact in the layout that Hugging Face transformers (teachers) and the official
 * MambaInLlama code (hybrids) load: `config.json` (the teacher's, dtype field set to the stored dtype),
 * `mamba_config.json` for a hybrid, one `model.safetensors` with `lm_head.weight` stored even when tied (the
 * official loader is strict), and the tokenizer and generation files.
 *
 * The export is a cached artifact like any other. With `dest`, it is also copied to that directory (relative
 * to the recipe file): written under a temporary name and renamed into place when complete, replacing what was
 * there. That copy is a side effect outside the cache: it happens when the stage runs, so a cached export does
 * not rewrite a `dest` deleted since (`run --force <stage>` does).
 *
 * @module
 */
import { isAbsolute, join, resolve } from "node:path";
import { defineStage } from "../pipelines/stage.ts";
import { UserError } from "../util/errors.ts";
import { writeDirAtomic } from "../util/atomic.ts";
import { describeModel, TOKENIZER_FILES } from "../models/checkpoint.ts";
import type { Model } from "../models/weights.ts";
import { loadModelInput, modelDir, writeModelArtifact } from "./shared/models.ts";

/** The export stage kind. */
export const exportStage = defineStage({
  kind: "export",
  version: 1,
  doc:
    "Writes a model in the MambaInLlama / Hugging Face layout (config.json, mamba_config.json for hybrids, " +
    "model.safetensors, tokenizer files) in F32, F16 or BF16, and optionally copies it to a directory beside " +
    "the recipe.",
  params: {
    dtype: {
      type: "string",
      enum: ["F32", "F16", "BF16"],
      nullable: true,
      doc:
        "Stored dtype of the weights (default: the input's stored dtype when all its tensors share one of " +
        "these, else F32).",
    },
    dest: {
      type: "string",
      nullable: true,
      doc:
        "Also write the export to this directory (relative to the recipe file), atomically, replacing it. " +
        "A side effect outside the cache: rewritten only when the stage runs.",
    },
  },
  inputs: {
    model: { doc: "The model to export (a model artifact, local directory or hf://org/name).", type: "dir" },
    tokenizer: {
      doc:
        "Where to take the tokenizer files from, when the model has none (default: the model's directory).",
      optional: true,
      type: "dir",
    },
  },
  outputs: {
    model: {
      type: "dir",
      doc: "config.json, mamba_config.json (hybrids), model.safetensors, tokenizer and generation files.",
    },
  },
  async run(ctx) {
    const { dir, model } = await loadModelInput(ctx.inputs.model);
    const tokDir = ctx.inputs.tokenizer ? await modelDir(ctx.inputs.tokenizer, "tokenizer") : dir;
    const dtype = ctx.params.dtype ?? storedDtype(model);
    let dest: string | null = null;
    if (ctx.params.dest !== null) {
      if (ctx.params.dest.trim() === "") {
        throw new UserError("export: dest is empty (remove it or name a directory)");
      }
      dest = isAbsolute(ctx.params.dest) ? ctx.params.dest : resolve(ctx.recipeDir, ctx.params.dest);
    }
    if (dest) await checkReplaceable(dest);
    await writeModelArtifact(ctx.outputs.model, model, tokDir, dtype);
    ctx.log.info(`${describeModel(model)}, stored as ${dtype}`);
    if (dest) {
      await writeDirAtomic(dest, async (tmp) => {
        for await (const e of Deno.readDir(ctx.outputs.model)) {
          await Deno.copyFile(join(ctx.outputs.model, e.name), join(tmp, e.name));
        }
      });
      ctx.log.info(`written to ${dest}`);
    }
    ctx.setMetrics({ dtype, ...(dest ? { dest } : {}) });
  },
});

const MODEL_FILES = new Set(["config.json", "mamba_config.json", "model.safetensors", ...TOKENIZER_FILES]);

/**
 * `dest` is replaced whole, so it must be absent, empty, or a model directory holding only files an export
 * writes (a previous export): a mistyped `dest: .` must never delete the user's files.
 */
async function checkReplaceable(dest: string): Promise<void> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.lstat(dest);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  if (!st.isDirectory) throw new UserError(`export: dest ${dest} exists and is not a directory`);
  const foreign: string[] = [];
  for await (const e of Deno.readDir(dest)) {
    const shard = /^model-\d+-of-\d+\.safetensors$|^model\.safetensors\.index\.json$/.test(e.name);
    if (!e.isFile || !(MODEL_FILES.has(e.name) || shard)) foreign.push(e.name);
  }
  if (foreign.length) {
    throw new UserError(
      `export: dest ${dest} holds files an export does not write (${foreign.slice(0, 5).join(", ")}` +
        `${foreign.length > 5 ? ", ..." : ""}); refusing to replace it: choose a new or empty directory`,
    );
  }
}

/** The weights' stored dtype when they share one that export can write, else F32. */
function storedDtype(model: Model): "F32" | "F16" | "BF16" {
  const kinds = new Set([...model.weights.values()].map((t) => t.storedDtype ?? "F32"));
  const only = kinds.size === 1 ? [...kinds][0] : "F32";
  return only === "F16" || only === "BF16" ? only : "F32";
}
