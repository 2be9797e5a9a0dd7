/**
 * Test-only stage kinds (runner tests, benchmarks and the smoke demo). They are registered in the default
 * registry so subprocess tests and `deno task demo` can use them, and hidden from `distillery stages` unless
 * `--all` is given.
 *
 * @module
 */
import type { AnyStageKind } from "../../pipelines/stage.ts";
import { bytesStage, deviceStage, misbehaveStage } from "./misc.ts";
import { countStage, textStage, transformStage } from "./text.ts";
import { trainStage } from "./train.ts";

/** Every test-only stage kind. */
export const TESTING_KINDS: AnyStageKind[] = [
  textStage,
  transformStage,
  countStage,
  trainStage,
  bytesStage,
  misbehaveStage,
  deviceStage,
];
