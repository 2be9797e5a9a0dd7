/**
 * Loading helpers for the reference fixtures (fixtures/reference/): model weights as float64 lookups for the
 * float64 reference model, and the stored oracle tensors.
 *
 * @module
 */
import { loadModel } from "../../models/checkpoint.ts";
import { ropeInverseFrequencies } from "../../models/config.ts";
import { openSafetensors, type SafetensorsFile } from "../../models/safetensors.ts";
import type { RefConfig, RefWeights } from "./model_f64.ts";

/** Absolute path of a file under the repository's fixtures/ folder. */
export function fixturePath(rel: string): string {
  return new URL(`../../fixtures/${rel}`, import.meta.url).pathname;
}

/** The fixture models by short name. */
export const FIXTURE_MODELS = {
  llama: { dir: "models/stories260K-hf", oracle: "reference/llama_stories260k/fixtures.safetensors" },
  hybrid: {
    dir: "reference/hybrid_mamba2_stories260k/model",
    oracle: "reference/hybrid_mamba2_stories260k/fixtures.safetensors",
  },
  mistral: { dir: "reference/mini_mistral/model", oracle: "reference/mini_mistral/fixtures.safetensors" },
} as const;

/** A fixture model as a float64 reference config and weight lookup. */
export async function loadReferenceModel(
  name: keyof typeof FIXTURE_MODELS,
): Promise<{ cfg: RefConfig; w: RefWeights }> {
  const model = await loadModel(fixturePath(FIXTURE_MODELS[name].dir));
  const c = model.config;
  const cache = new Map<string, Float64Array>();
  const w: RefWeights = (n) => {
    let v = cache.get(n);
    if (!v) {
      const t = model.weights.get(n);
      if (!t) throw new Error(`reference: no weight ${n}`);
      cache.set(n, v = Float64Array.from(t.data));
    }
    return v;
  };
  const cfg: RefConfig = {
    D: c.hiddenSize,
    nLayers: c.numLayers,
    H: c.numHeads,
    Hkv: c.numKvHeads,
    hd: c.headDim,
    I: c.intermediateSize,
    V: c.vocabSize,
    eps: c.rmsNormEps,
    invFreq: Float64Array.from(ropeInverseFrequencies(c)),
    slidingWindow: c.slidingWindow,
    attnLayers: model.kind === "hybrid" ? model.mamba.attnLayers : undefined,
  };
  return { cfg, w };
}

/** The oracle tensors of a fixture model. */
export function openOracle(name: keyof typeof FIXTURE_MODELS): Promise<SafetensorsFile> {
  return openSafetensors(fixturePath(FIXTURE_MODELS[name].oracle));
}
