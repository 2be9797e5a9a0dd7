/**
 * `map_weights`: builds a hybrid from a teacher (method.md section 1 and Algorithm 1 of the paper) - the layers
 * not kept as attention become Mamba layers initialised from their attention weights - or converts more layers
 * of an existing hybrid (the progressive form).
 *
 * @module
 */
import { defineStage } from "../pipelines/stage.ts";
import {
  everyKthAttentionLayer,
  mapAttentionToMamba,
  mapAttentionToMambaProgressive,
  randomInitMamba,
} from "../models/mapping.ts";
import { countParameters, type HybridModel } from "../models/weights.ts";
import { Rng } from "../util/rng.ts";
import { UserError } from "../util/errors.ts";
import { loadModelInput, modelDir, writeModelArtifact } from "./shared/models.ts";

/**
 * The attention layers for a fraction of `numLayers` kept by the every-k rule (method.md section 1: layer i
 * keeps attention when (i + 1) % k == 0, k = 1 / fraction; 0 keeps none).
 */
export function attentionLayersForFraction(numLayers: number, fraction: number): number[] {
  if (fraction === 0) return [];
  const k = Math.round(1 / fraction);
  if (!(fraction > 0 && fraction <= 1) || Math.abs(1 / k - fraction) > 1e-9) {
    throw new UserError(
      `attention_fraction: ${fraction} is not 1/k for a whole k (use 0.5, 0.25, 0.125, ... or give attn_layers)`,
    );
  }
  return everyKthAttentionLayer(numLayers, k);
}

/** The map_weights stage kind. */
export const mapWeightsStage = defineStage({
  kind: "map_weights",
  version: 1,
  doc:
    "Turns a Llama/Mistral teacher into a hybrid: the layers outside attn_layers become Mamba layers whose " +
    "x, B, C and output projections are the attention's v, k, q and o projections (the rest drawn from the " +
    "seed); embeddings, norms, MLPs and the kept attention layers are the teacher's. With a previous hybrid, " +
    "converts more of its attention layers (progressive distillation), keeping its Mamba layers.",
  usesSeed: true,
  params: {
    attn_layers: {
      type: "array",
      items: { type: "number", integer: true, min: 0, doc: "A layer index (0-based)." },
      nullable: true,
      doc: "Layers that keep attention (paper 50% of 32 layers: [1, 3, ..., 31]).",
    },
    attention_fraction: {
      type: "number",
      min: 0,
      max: 1,
      nullable: true,
      doc: "Instead of attn_layers: keep every k-th layer, k = 1 / fraction (0.5 -> [1,3,...], 0.25 -> " +
        "[3,7,...], 0: none).",
    },
    mixer: {
      type: "string",
      enum: ["mamba2", "mamba1"],
      default: "mamba2",
      doc: "Mamba layer kind (paper: Mamba2 is the main variant).",
    },
    init: {
      type: "string",
      enum: ["attention", "random"],
      default: "attention",
      doc:
        "attention: the paper's initialisation from q/k/v/o; random: PyTorch default init of every mixer " +
        "tensor (the paper's ablation).",
    },
    seed: {
      type: "number",
      integer: true,
      min: 0,
      nullable: true,
      doc: "Seed of the new parameters; null: the recipe's settings.seed.",
    },
  },
  inputs: {
    teacher: { doc: "The teacher (Llama/Mistral directory, stage output or hf:// reference)." },
    previous: {
      doc: "Optional hybrid to convert further: its Mamba layers are kept, its attention layers outside " +
        "attn_layers are converted from the teacher's attention.",
      optional: true,
    },
  },
  outputs: {
    model: {
      type: "dir",
      doc: "The hybrid: config.json, mamba_config.json, model.safetensors, tokenizer files.",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    const seed = p.seed ?? ctx.settings.seed;
    const { model: teacher } = await loadModelInput(ctx.inputs.teacher, "teacher");
    if (teacher.kind !== "transformer") {
      throw new UserError(
        `input teacher: ${ctx.inputs.teacher.ref} is a hybrid; give the Transformer teacher`,
      );
    }
    if ((p.attn_layers === null) === (p.attention_fraction === null)) {
      throw new UserError("map_weights: set exactly one of attn_layers and attention_fraction");
    }
    const attn = p.attn_layers
      ? [...p.attn_layers].sort((a, b) => a - b)
      : attentionLayersForFraction(teacher.config.numLayers, p.attention_fraction!);
    const rng = new Rng(seed);
    let hybrid: HybridModel;
    if (ctx.inputs.previous) {
      const { model: prev } = await loadModelInput(ctx.inputs.previous, "previous");
      if (prev.kind !== "hybrid") {
        throw new UserError(
          `input previous: ${ctx.inputs.previous.ref} is not a hybrid (no mamba_config.json)`,
        );
      }
      if (p.init === "random") {
        throw new UserError("map_weights: init random is for a one-shot mapping; drop the previous input");
      }
      if (prev.mamba.mixer !== p.mixer) {
        throw new UserError(
          `map_weights: mixer ${p.mixer}, but the previous hybrid uses ${prev.mamba.mixer}`,
        );
      }
      hybrid = mapAttentionToMambaProgressive(prev, teacher, attn, rng);
    } else if (p.init === "random") {
      hybrid = randomInitMamba(teacher.weights, teacher.config, attn, rng, p.mixer);
    } else {
      hybrid = mapAttentionToMamba(teacher.weights, teacher.config, attn, rng, p.mixer);
    }
    await writeModelArtifact(ctx.outputs.model, hybrid, await modelDir(ctx.inputs.teacher, "teacher"));
    ctx.setMetrics({
      attention_layers: hybrid.mamba.attnLayers.length,
      mamba_layers: teacher.config.numLayers - hybrid.mamba.attnLayers.length,
      parameters: countParameters(hybrid.weights),
    });
  },
});
