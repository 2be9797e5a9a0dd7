/**
 * The registry of stage kinds the CLI knows.
 *
 * To add a stage kind: write `stages/<kind>.ts` exporting a kind built with `defineStage` (see
 * `pipelines/stage.ts` for the contract), import it here and add it to `BUILTIN_KINDS`. That is all: recipes can
 * use it, `distillery stages <kind>` documents it, and its schema is checked at start-up.
 *
 * @module
 */
import { StageRegistry } from "../pipelines/registry.ts";
import type { AnyStageKind } from "../pipelines/stage.ts";
import { TESTING_KINDS } from "./testing/mod.ts";
import { makeDraftStage } from "./make_draft.ts";
import { specBenchStage } from "./spec_bench.ts";
import { evaluateStage } from "./evaluate.ts";
import { loadModelStage } from "./load_model.ts";
import { exportStage } from "./export.ts";
import { tokenizeStage } from "./tokenize.ts";
import { distillStage } from "./distill.ts";
import { pseudoLabelStage } from "./pseudo_label.ts";
import { mapWeightsStage } from "./map_weights.ts";
import { sftStage } from "./sft.ts";
import { refLogprobsStage } from "./ref_logprobs.ts";
import { dpoStage } from "./dpo.ts";

/** The real stage kinds, in the order the docs list them. */
export const BUILTIN_KINDS: AnyStageKind[] = [
  loadModelStage,
  tokenizeStage,
  pseudoLabelStage,
  mapWeightsStage,
  distillStage,
  sftStage,
  refLogprobsStage,
  dpoStage,
  evaluateStage,
  makeDraftStage,
  specBenchStage,
  exportStage,
];

/** A registry with every built-in kind plus the test-only kinds (hidden from docs unless asked for). */
export function defaultRegistry(): StageRegistry {
  return new StageRegistry([...BUILTIN_KINDS, ...TESTING_KINDS]);
}
