/**
 * Distillery: a declarative pipeline runner that distills a pretrained Transformer into a hybrid Mamba model.
 *
 * The runner's public API: the stage-kind contract (what `stages/*.ts` implement), parameter schemas, the
 * registry, and functions to load, plan and run recipes programmatically (what `main.ts` does).
 *
 * @module
 */

// The stage-kind contract.
export {
  type AnyStageKind,
  type Artifact,
  type ArtifactType,
  type Checkpoint,
  type Checkpoints,
  defineStage,
  type HubRef,
  type InputPort,
  type InputPorts,
  type InputsOf,
  type MetricValue,
  type OutputPort,
  type OutputPorts,
  type OutputsOf,
  type Progress,
  type ProgressExtra,
  type RuntimeFacts,
  safeJoin,
  type StageContext,
  type StageKind,
  type StageLog,
  type StageSettings,
} from "./pipelines/stage.ts";
export {
  type AlwaysPresent,
  type ArrayParam,
  type At,
  type BooleanParam,
  describeFields,
  type FieldDoc,
  type NumberParam,
  type ObjectParam,
  type ParamCommon,
  type ParamFields,
  type ParamSchema,
  type ParamsOf,
  type Simplify,
  type StringParam,
  validateFields,
  type ValueOf,
} from "./pipelines/params.ts";
export { StageRegistry } from "./pipelines/registry.ts";
export { defaultRegistry } from "./stages/registry.ts";

// Recipes, plans and runs.
export {
  loadRecipe,
  type Recipe,
  RECIPE_SETTINGS,
  type RecipeSettings,
  type RecipeStage,
} from "./pipelines/validate.ts";
export { type Problem, Problems, RecipeError } from "./pipelines/diagnostics.ts";
export {
  type Loc,
  type ScalarValue,
  type YEntry,
  type YMap,
  type YNode,
  type YScalar,
  type YSeq,
} from "./pipelines/source.ts";
export { type FileInputRef, type HubInputRef, type InputRef, type StageOutputRef } from "./pipelines/refs.ts";
export { type Cycle, type DagNode } from "./pipelines/dag.ts";
export { isUserError, UserError } from "./util/errors.ts";
export {
  type CacheEntry,
  type ObjectCheck,
  type ObjectManifest,
  Store,
  type StoredOutput,
} from "./pipelines/store.ts";
export { type CacheDirSource, type StateDirs } from "./pipelines/paths.ts";
export { type Output, processOutput } from "./pipelines/progress.ts";
export { type GcOptions } from "./pipelines/gc.ts";
export { type ArtifactHash, type StatStamp, type TreeEntry } from "./pipelines/hash.ts";
export { InputDigester } from "./pipelines/inputs.ts";
export { type LockedOutput, type RecipeRecord } from "./pipelines/lockfile.ts";
export { type PlannedStageEvent } from "./pipelines/events.ts";
export {
  type EffectiveSettings,
  type Evaluation,
  formatPlan,
  type KnownOutputs,
  type PlanEnv,
  type PlannedStage,
  planToJson,
  type ResolveRuntimeFacts,
  type Selection,
} from "./pipelines/plan.ts";
export {
  openSession,
  planRecipe,
  type RunOptions,
  type RunOutcome,
  runRecipe,
  type Session,
  type SessionOptions,
} from "./pipelines/runner.ts";
export { explainStage, type Explanation, formatExplanation } from "./pipelines/explain.ts";
export { listRuns, type RunInfo, type RunRecord, type StageResult } from "./pipelines/runs.ts";
export { type EventOutput, readEvents, type RunEvent, type StoredEvent } from "./pipelines/events.ts";
export { type LockFile, readLockFile, type StageRecord } from "./pipelines/lockfile.ts";
export { collectGarbage, type GcResult } from "./pipelines/gc.ts";
export { type KeyInputs, stageKey } from "./pipelines/keys.ts";
export { main, type MainDeps, requestedRuntimeFacts } from "./main.ts";

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
