/**
 * Helpers for the training-stage tests: fixture paths, recipes run through the real runner in-process,
 * interruption after the first checkpoint, and readers for metrics and outputs.
 *
 * @module
 */
import { join } from "node:path";
import { listCheckpoints } from "../../pipelines/checkpoints.ts";
import type { Checkpoint } from "../../pipelines/stage.ts";
import { lastEvents, lastRun, runCli, type TempProject, tempProject } from "../pipelines/helpers.ts";
import assert from "node:assert/strict";
import type { CliResult } from "../pipelines/helpers.ts";

/** Absolute path of a fixture file. */
export function fixture(rel: string): string {
  return new URL(`../../fixtures/${rel}`, import.meta.url).pathname;
}

/** The fixture teacher. */
export const TEACHER = fixture("models/stories260K-hf");
/** TinyStories training text. */
export const TRAIN_TEXT = fixture("text/tinystories_train.txt");
/** The cloze task (1,600 items built from the validation stories). */
export const CLOZE = fixture("eval/tinystories_cloze.jsonl");

/** Options of every GPU stage test (the device outlives a test). */
export const stageTestOptions = { sanitizeResources: false, sanitizeOps: false } as const;

/** Runs `run <recipe>` in-process with the software adapter. */
export function runRecipe(recipe: string, extra: string[] = [], signal?: AbortSignal): Promise<CliResult> {
  return runCli(["run", recipe, "--gpu", Deno.env.get("DISTILLERY_GPU") ?? "builtin", ...extra], { signal });
}

/** The checkpoints currently stored in a project's cache (of every stage key), oldest step first. */
export function storedCheckpoints(p: TempProject): Checkpoint[] {
  const root = join(p.cacheDir, "checkpoints");
  const all: Checkpoint[] = [];
  try {
    for (const d of Deno.readDirSync(root)) all.push(...listCheckpoints(join(root, d.name)));
  } catch {
    // none yet
  }
  return all.sort((a, b) => a.step - b.step);
}

/** Steps of the checkpoints currently stored in a project's cache. */
export function checkpointSteps(p: TempProject): number[] {
  return storedCheckpoints(p).map((cp) => cp.step);
}

/**
 * Runs a recipe and interrupts it (as Ctrl-C does) as soon as `until` holds for the stored checkpoint steps
 * (by default: a first checkpoint exists); the stage saves what it has and the run exits with 130.
 */
export async function runAndInterrupt(
  p: TempProject,
  recipe: string,
  until: (steps: number[]) => boolean = (steps) => steps.length > 0,
): Promise<CliResult> {
  const ctl = new AbortController();
  const timer = setInterval(() => {
    if (until(checkpointSteps(p))) ctl.abort(new DOMException("interrupted by the test", "AbortError"));
  }, 5);
  try {
    return await runRecipe(recipe, [], ctl.signal);
  } finally {
    clearInterval(timer);
  }
}

/** What {@linkcode assertResumesToSameOutput} runs and compares. */
export interface ResumeCheck {
  /** The recipe YAML. */
  text: string;
  /** The stage and output port whose digest must match. */
  stage: string;
  port: string;
  /** What the resumed run prints. */
  resumed: RegExp;
  /** Targets of the reference and resumed runs (default: the whole recipe). */
  targets?: string[];
  /** Runs between the interrupted run and the rerun (to inspect or rewrite the checkpoints left behind). */
  beforeResume?: (p: TempProject, recipe: string) => void | Promise<void>;
}

/**
 * The resume check of every resumable stage: a reference run of the recipe in one project; in another, a run
 * interrupted at its first checkpoint (exit 130), `beforeResume`, then the rerun, which must say it resumed
 * and end with the reference's output digest. `then` makes further checks on the resumed project before both
 * are removed.
 */
export async function assertResumesToSameOutput(
  c: ResumeCheck,
  then?: (p: TempProject, recipe: string) => void | Promise<void>,
): Promise<void> {
  const ref = tempProject(), p = tempProject();
  try {
    const targets = c.targets ?? [];
    const r0 = await runRecipe(ref.write("r.yaml", c.text), targets);
    assert.equal(r0.code, 0, r0.stderr);
    const path = p.write("r.yaml", c.text);
    const r1 = await runAndInterrupt(p, path);
    assert.equal(r1.code, 130, r1.stderr);
    assert.ok(checkpointSteps(p).length > 0);
    await c.beforeResume?.(p, path);
    const r2 = await runRecipe(path, targets);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stderr + r2.stdout, c.resumed);
    assert.equal(outputDigest(p, c.stage, c.port), outputDigest(ref, c.stage, c.port));
    await then?.(p, path);
  } finally {
    await ref.cleanup();
    await p.cleanup();
  }
}

/** Metric records of a stage in the newest run. */
export function stageMetrics(
  p: TempProject,
  stage: string,
): { step: number; values: Record<string, number> }[] {
  return lastEvents(p)
    .filter((e) => e.type === "metric" && (e as { stage?: string }).stage === stage)
    .map((e) => e as unknown as { step: number; values: Record<string, number> });
}

/** Path of a stage's output port in the newest run. */
export function outputPath(p: TempProject, stage: string, port: string): string {
  const s = lastRun(p).stages.find((x) => x.stage === stage);
  const path = s?.outputs[port]?.path;
  if (!path) throw new Error(`stage ${stage} has no output ${port} in the last run`);
  return path;
}

/** Output digest of a stage's port in the newest run. */
export function outputDigest(p: TempProject, stage: string, port: string): string {
  const s = lastRun(p).stages.find((x) => x.stage === stage);
  const d = s?.outputs[port]?.digest;
  if (!d) throw new Error(`stage ${stage} has no output ${port} in the last run`);
  return d;
}

/** A tokenize stage over the first `limit` paragraphs of the training text, in recipe YAML. */
export function textTokensStage(name: string, limit: number, maxLength: number): string {
  return `  ${name}:
    kind: tokenize
    params: { max_length: ${maxLength}, limit: ${limit} }
    inputs: { tokenizer: ${TEACHER}, data: [${TRAIN_TEXT}] }
`;
}
