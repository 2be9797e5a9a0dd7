/**
 * Random-init Llama models of a given shape, for benchmarks and tests that need real sizes but no checkpoint
 * (no network to the Hub): every matrix uniform with the standard deviation of transformers' `initializer_range`
 * (0.02 by default), every RMSNorm weight one, as `LlamaPreTrainedModel._init_weights` does up to the
 * distribution's shape (uniform instead of normal: several times faster to draw for a billion values, same
 * variance).
 *
 * @module
 */
import type { Rng } from "../util/rng.ts";
import { parseTransformerConfig, type TransformerConfig } from "./config.ts";
import {
  EMBED,
  layerPrefix,
  LM_HEAD,
  type Model,
  type TransformerModel,
  transformerWeightShapes,
  type WeightMap,
} from "./weights.ts";

/**
 * config.json of a tiny Llama (hidden 64, 4 layers, 4/2 heads of 16, vocab 512, tied): the 1B shape's structure
 * at sizes that run in milliseconds on the CPU adapter, for quick benchmark runs and structural tests.
 */
export const TINY_LLAMA_CONFIG: Readonly<Record<string, unknown>> = Object.freeze({
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 4,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 16,
  vocab_size: 512,
  tie_word_embeddings: true,
  rms_norm_eps: 1e-5,
});

/** config.json of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied). */
export const LLAMA_3_2_1B_CONFIG: Readonly<Record<string, unknown>> = Object.freeze({
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_size: 2048,
  intermediate_size: 8192,
  num_hidden_layers: 16,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 64,
  vocab_size: 128256,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000.0,
  rope_scaling: {
    rope_type: "llama3",
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
  },
  hidden_act: "silu",
  tie_word_embeddings: true,
  bos_token_id: 128000,
  eos_token_id: 128001,
  initializer_range: 0.02,
  torch_dtype: "float32",
});

/**
 * config.json of Zephyr-7B-beta (HuggingFaceH4/zephyr-7b-beta, Mistral-7B-v0.1 shapes: hidden 4096, 32 layers,
 * 32/8 heads of 128, intermediate 14336, vocab 32000, untied lm_head, sliding window 4096), the paper's main
 * teacher, for benchmarks at its real size without the checkpoint.
 */
export const ZEPHYR_7B_CONFIG: Readonly<Record<string, unknown>> = Object.freeze({
  architectures: ["MistralForCausalLM"],
  model_type: "mistral",
  hidden_size: 4096,
  intermediate_size: 14336,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  vocab_size: 32000,
  max_position_embeddings: 32768,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  hidden_act: "silu",
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
  initializer_range: 0.02,
  torch_dtype: "bfloat16",
});

/** A Llama config from config.json fields (validated like a file's). */
export function llamaConfig(fields: Record<string, unknown>): TransformerConfig {
  return parseTransformerConfig(
    { architectures: ["LlamaForCausalLM"], model_type: "llama", ...fields },
    "config",
  );
}

/**
 * A random-init Llama/Mistral model of `config`: matrices U(+-std*sqrt(3)) (standard deviation `std`, default the
 * config's `initializer_range` or 0.02), norm weights one. Tied configs share one embedding/lm_head tensor.
 * Tensors are drawn in the order of their names, so a seed reproduces a model.
 */
export function randomTransformer(config: TransformerConfig, rng: Rng, std?: number): TransformerModel {
  const sd = std ?? (typeof config.raw.initializer_range === "number" ? config.raw.initializer_range : 0.02);
  const bound = sd * Math.sqrt(3);
  const weights: WeightMap = new Map();
  const shapes = [...transformerWeightShapes(config)].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  for (const [name, shape] of shapes) {
    if (name === LM_HEAD && config.tieWordEmbeddings) continue;
    const n = shape.reduce((a, b) => a * b, 1);
    const data = shape.length === 1 ? new Float32Array(n).fill(1) : rng.uniformArray(n, -bound, bound);
    weights.set(name, { shape: [...shape], data });
  }
  if (config.tieWordEmbeddings) weights.set(LM_HEAD, weights.get(EMBED)!);
  return { kind: "transformer", config, weights };
}

/**
 * A copy of `model` whose decoder layers in `layers` write `factor` times less into the residual stream: their
 * mixer output projection (`o_proj`, or a Mamba layer's `out_proj`) and MLP `down_proj` are scaled. Other tensors
 * are shared. With small factors the model computes nearly what its remaining layers compute, so a draft built
 * from those layers agrees with it often: benchmarks and tests use it to measure speculative decoding at high
 * acceptance with the real cost of every layer.
 */
export function dampLayers(model: Model, layers: readonly number[], factor: number): Model {
  const weights: WeightMap = new Map(model.weights);
  for (const l of layers) {
    const p = layerPrefix(l);
    for (
      const name of [`${p}self_attn.o_proj.weight`, `${p}mamba.out_proj.weight`, `${p}mlp.down_proj.weight`]
    ) {
      const t = model.weights.get(name);
      if (t) weights.set(name, { shape: [...t.shape], data: t.data.map((v) => v * factor) });
    }
  }
  return { ...model, weights } as Model;
}
