/**
 * What the model commands (`generate`, `forward`) share: opening a model given as a local directory or a Hub id
 * (`org/name[@revision]`, through the Hub cache; `HF_HUB_OFFLINE=1` for the cache only) on the GPU, and the
 * options that choose the GPU provider and dtype.
 *
 * @module
 */
import { Option } from "commander";
import type { Command } from "commander";
import { resolveModelSource } from "../models/hub.ts";
import { describeModel, loadModel } from "../models/checkpoint.ts";
import { CausalLM } from "../models/causal_lm.ts";
import type { Model } from "../models/weights.ts";
import { Tokenizer } from "../models/tokenizer.ts";
import { acquireRuntime } from "../runtime/runtime.ts";
import { parseProviderPreference, type ProviderPreference } from "../runtime/provider.ts";
import type { Output } from "../pipelines/progress.ts";
import { isUserError, UserError } from "../util/errors.ts";

/** Options every model command takes. */
export interface ModelOptions {
  /** Local directory or Hub id. */
  model: string;
  /** WebGPU provider (default: `DISTILLERY_GPU`, else auto). */
  gpu?: string;
  /** Storage dtype on the GPU. */
  dtype?: "f32" | "f16";
}

/** Adds `--model`, `--gpu` and `--dtype` to a command. */
export function addModelOptions(c: Command): Command {
  return c
    .requiredOption("--model <dir|org/name[@rev]>", "model directory or Hugging Face Hub id")
    .addOption(
      new Option("--gpu <provider>", "WebGPU provider (default: $DISTILLERY_GPU or auto)").choices([
        "auto",
        "dawn",
        "builtin",
      ]),
    )
    .addOption(new Option("--dtype <dtype>", "weights and activations on the GPU").choices(["f32", "f16"]));
}

/** A model opened for a command. */
export interface OpenedModel {
  /** Its local directory. */
  dir: string;
  /** The CPU model (config and weights). */
  model: Model;
  /** The model on the GPU. */
  lm: CausalLM;
}

/** Resolves, loads and uploads a model; a one-line description goes to stderr. */
export async function openModel(opts: ModelOptions, out: Output): Promise<OpenedModel> {
  const src = await resolveModelSource(opts.model);
  const model = await loadModel(src.dir);
  const gpu: ProviderPreference | undefined = opts.gpu
    ? parseProviderPreference(opts.gpu, "--gpu")
    : undefined;
  const rt = await acquireRuntime(gpu ? { gpu } : {});
  const lm = CausalLM.fromModel(rt, model, { dtype: opts.dtype ?? "f32" });
  const where = src.origin === "hub" ? `${src.repoId}@${src.commit?.slice(0, 12)}` : src.dir;
  out.err(`model: ${describeModel(model)} (${where})\n`);
  return { dir: src.dir, model, lm };
}

/** The tokenizer of a model directory, or of `--tokenizer` when given (models shipped without one). */
export async function openTokenizer(dir: string, tokenizer?: string): Promise<Tokenizer> {
  if (tokenizer) return await Tokenizer.fromDir((await resolveModelSource(tokenizer)).dir);
  try {
    return await Tokenizer.fromDir(dir);
  } catch (e) {
    if (!isUserError(e)) throw e;
    throw new UserError(`${(e as Error).message} (give --tokenizer <dir|org/name> for a model without one)`, {
      cause: e,
    });
  }
}
