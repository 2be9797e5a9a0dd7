/**
 * Distillery: a declarative pipeline runner that distills a pretrained Transformer into a hybrid Mamba model.
 *
 * @module
 */

// Models, CPU side: configs, weights on disk (safetensors, PyTorch .bin, Hub cache), tokenizer, mapping.
export {
  checkAttnLayers,
  checkHybridConfig,
  type HybridConfig,
  loadMambaConfig,
  loadTransformerConfig,
  makeMamba1Config,
  makeMamba2Config,
  type MambaConfig,
  mambaConfigToJson,
  type MambaMixer,
  mixerOf,
  parseMambaConfig,
  parseTransformerConfig,
  ropeInverseFrequencies,
  type RopeScaling,
  type TransformerConfig,
} from "./models/config.ts";
export { type Dtype, DTYPE_SIZE } from "./models/dtype.ts";
export {
  encodeSafetensors,
  openSafetensors,
  openShardedSafetensors,
  SafetensorsFile,
  ShardedSafetensors,
  type TensorInfo,
  type TensorSource,
  type TensorToWrite,
  writeSafetensors,
} from "./models/safetensors.ts";
export { openTorchCheckpoint, TorchCheckpoint } from "./models/torch_pickle.ts";
export {
  countParameters,
  EMBED,
  FINAL_NORM,
  getWeight,
  type HostTensor,
  type HybridModel,
  hybridWeightShapes,
  layerPrefix,
  LM_HEAD,
  mambaMixerShapes,
  type Model,
  openModelTensors,
  readWeightMap,
  type TransformerModel,
  transformerWeightShapes,
  type WeightMap,
} from "./models/weights.ts";
export {
  describeModel,
  exportModel,
  type ExportOptions,
  isHybridDir,
  loadHybridModel,
  loadModel,
  loadTransformerModel,
} from "./models/checkpoint.ts";
export {
  hubCacheDir,
  type HubOptions,
  resolveDatasetSource,
  type ResolvedSource,
  resolveModelSource,
} from "./models/hub.ts";
export {
  type ChatMessage,
  type ChatTemplateOptions,
  FALLBACK_CHAT_TEMPLATE,
  StreamDecoder,
  Tokenizer,
} from "./models/tokenizer.ts";
export {
  everyKthAttentionLayer,
  mapAttentionToMamba,
  mapAttentionToMamba1,
  mapAttentionToMamba2,
  mapAttentionToMambaProgressive,
  randomInitMamba,
  type WeightSource,
} from "./models/mapping.ts";
export { Rng, type RngState } from "./util/rng.ts";
