/**
 * Draft models for speculative decoding (method.md section 3): a small model made of chosen decoder layers of a
 * larger one (e.g. the first and last, `[0, 31]`), with that model's embeddings, final norm and lm_head, so it
 * shares the tokenizer and the output space. The paper's drafts are 2- or 4-layer Transformers built from the
 * teacher; taken from a hybrid, chosen Mamba layers stay Mamba layers (the draft is then a hybrid itself).
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { checkAttnLayers, type TransformerConfig } from "./config.ts";
import { EMBED, FINAL_NORM, layerPrefix, LM_HEAD, type Model, type WeightMap } from "./weights.ts";

/**
 * A draft made of `layers` (ascending, unique, in range) of `source`: layer `layers[j]` becomes layer j. Tensors
 * are shared with the source map, not copied. The config is the source's with `num_hidden_layers` set (the raw
 * JSON too, so an export writes a loadable config.json); from a hybrid, `attn_layers` is renumbered.
 */
export function buildDraftModel(source: Model, layers: readonly number[]): Model {
  const c = source.config;
  const where = "draft layers";
  if (layers.length === 0) throw new UserError(`${where}: name at least one layer of the source model`);
  for (let j = 0; j < layers.length; j++) {
    const l = layers[j];
    if (!(Number.isInteger(l) && l >= 0 && l < c.numLayers)) {
      throw new UserError(`${where}: layer ${l} is outside the source model's 0..${c.numLayers - 1}`);
    }
    if (j > 0 && l <= layers[j - 1]) {
      throw new UserError(`${where}: layers must be ascending and unique, found ${layers.join(", ")}`);
    }
  }
  const config: TransformerConfig = {
    ...c,
    numLayers: layers.length,
    eosTokenIds: [...c.eosTokenIds],
    raw: { ...c.raw, num_hidden_layers: layers.length },
  };
  const weights: WeightMap = new Map();
  for (const name of [EMBED, FINAL_NORM, LM_HEAD]) {
    const t = source.weights.get(name);
    if (t) weights.set(name, t);
  }
  layers.forEach((l, j) => {
    const from = layerPrefix(l), to = layerPrefix(j);
    for (const [name, t] of source.weights) {
      if (name.startsWith(from)) weights.set(to + name.slice(from.length), t);
    }
  });
  if (source.kind === "transformer") return { kind: "transformer", config, weights };
  const attn = layers.flatMap((l, j) => (source.mamba.attnLayers.includes(l) ? [j] : []));
  if (attn.length === layers.length) {
    // only attention layers: a plain Transformer draft
    return { kind: "transformer", config, weights };
  }
  return {
    kind: "hybrid",
    config,
    mamba: {
      ...source.mamba,
      nLayer: layers.length,
      attnLayers: checkAttnLayers(attn, layers.length, "attn_layers"),
      ssmCfg: { ...source.mamba.ssmCfg },
    },
    weights,
  };
}
