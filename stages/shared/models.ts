/**
 * What stage kinds share about models: turning an input artifact (a stage output, a local directory or an
 * `hf://` reference) into a local model directory, loading it onto the GPU, and writing a model artifact in the
 * Hugging Face / MambaInLlama layout.
 *
 * @module
 */
import type { Artifact, StageSettings } from "../../pipelines/stage.ts";
import { resolveModelSource } from "../../models/hub.ts";
import { exportModel, loadModel } from "../../models/checkpoint.ts";
import type { Model } from "../../models/weights.ts";
import { CausalLM, type CausalLMOptions } from "../../models/causal_lm.ts";
import { acquireRuntime, type Runtime } from "../../runtime/runtime.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { UserError } from "../../util/errors.ts";

/** The local directory of a model input: a stage output or local path as is, a Hub reference via the Hub cache. */
export async function modelDir(input: Artifact, port = "model"): Promise<string> {
  if (input.kind === "hub") {
    if (!input.hub || input.hub.repoType !== "model") {
      throw new UserError(`input ${port}: ${input.ref} is not a model repository`);
    }
    const src = input.hub.revision ? `${input.hub.repo}@${input.hub.revision}` : input.hub.repo;
    return (await resolveModelSource(src)).dir;
  }
  if (!input.path) throw new UserError(`input ${port}: ${input.ref} has no local path`);
  return input.path;
}

/** Loads a model input's weights and configuration on the CPU. */
export async function loadModelInput(
  input: Artifact,
  port = "model",
): Promise<{ dir: string; model: Model }> {
  const dir = await modelDir(input, port);
  return { dir, model: await loadModel(dir) };
}

/** Loads a model input's tokenizer. */
export async function loadTokenizerInput(input: Artifact, port = "model"): Promise<Tokenizer> {
  return await Tokenizer.fromDir(await modelDir(input, port));
}

/** The process-wide runtime on the provider the recipe asks for (`settings.gpu`, overridable by `--gpu`). */
export function stageRuntime(settings: Pick<StageSettings, "gpu">): Promise<Runtime> {
  return acquireRuntime({ gpu: settings.gpu });
}

/** Uploads a CPU model to the GPU with the recipe's dtype. */
export function toGpu(
  rt: Runtime,
  model: Model,
  settings: Pick<StageSettings, "dtype">,
  opts: CausalLMOptions = {},
) {
  return CausalLM.fromModel(rt, model, { dtype: settings.dtype, ...opts });
}

/**
 * Writes a model artifact (config.json, mamba_config.json for hybrids, model.safetensors, tokenizer files from
 * `tokenizerDir`) into `outDir`, which the runner created empty. Written in f32 so training results are not
 * rounded; `dtype` can ask for F16/BF16 (export).
 */
export async function writeModelArtifact(
  outDir: string,
  model: Model,
  tokenizerDir: string,
  dtype: "F32" | "F16" | "BF16" = "F32",
): Promise<void> {
  // exportModel writes a directory atomically by renaming into place; the runner's output directory exists and
  // is empty, so write into a child first and move the files up.
  const tmp = `${outDir}/.export`;
  await exportModel(tmp, model, { tokenizerDir, dtype });
  for await (const e of Deno.readDir(tmp)) await Deno.rename(`${tmp}/${e.name}`, `${outDir}/${e.name}`);
  await Deno.remove(tmp);
}

/** The CPU model of a GPU model (weights downloaded). */
export async function fromGpu(lm: CausalLM): Promise<Model> {
  const weights = await lm.toWeightMap();
  return lm.mamba
    ? { kind: "hybrid", config: lm.config, mamba: lm.mamba, weights }
    : { kind: "transformer", config: lm.config, weights };
}
