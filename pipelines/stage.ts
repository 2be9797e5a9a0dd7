/**
 * The stage-kind contract: what every file under `stages/` implements and what the runner hands to it.
 *
 * A stage kind is a plain object built with {@linkcode defineStage}:
 *
 * ```ts
 * import { defineStage } from "../pipelines/stage.ts";
 *
 * export const tokenize = defineStage({
 *   kind: "tokenize",
 *   version: 1,
 *   doc: "Applies the chat template and packs token ids into fixed-length rows.",
 *   params: {
 *     max_length: { type: "number", integer: true, min: 8, default: 2048, doc: "Tokens per packed row." },
 *   },
 *   inputs: {
 *     tokenizer: { doc: "Model directory or hf:// id whose tokenizer to use.", type: "dir" },
 *     data: { doc: "Text or chat records (JSONL, parquet).", list: true },
 *   },
 *   outputs: {
 *     tokens: { doc: "Packed token rows (uint32) and their loss masks.", type: "dir" },
 *   },
 *   async run(ctx) {
 *     ctx.params.max_length;      // number (typed from the schema)
 *     ctx.inputs.data;            // Artifact[] (a list port)
 *     ctx.outputs.tokens;         // a fresh empty directory to fill
 *   },
 * });
 * ```
 *
 * and is registered by adding it to the list in `stages/registry.ts`.
 *
 * What the runner guarantees to `run(ctx)`:
 * - `ctx.params` is validated and has every default filled in; the same values entered the cache key.
 * - `ctx.inputs` are resolved artifacts whose digests entered the key. Stage outputs live in the read-only
 *   content-addressed store: read them, never modify them.
 * - `ctx.outputs` are temporary paths on the cache's filesystem: a `dir` port is an existing empty directory, a
 *   `file` port is a path whose parent exists. After `run` resolves, the runner hashes what was written and moves
 *   it into the store; if `run` throws (or the process dies) nothing reaches the store.
 * - `run` is called again only when the key changes, the entry is missing/corrupt, or the user forces it. After a
 *   crash, the next call sees the checkpoints the previous attempt saved (`ctx.checkpoints.latest()`).
 *
 * What a stage must do:
 * - Derive its result only from `ctx.params`, `ctx.inputs`, and - if it declares them - `ctx.settings.seed`
 *   (`usesSeed`) and the device facts (`usesDevice`). Anything else it reads is invisible to the cache key.
 * - Bump `version` whenever a code change changes its results: that invalidates old cache entries.
 * - Write only under `ctx.outputs`, `ctx.workDir` and checkpoint directories. Build file names from parameters
 *   with {@linkcode safeJoin}, never by string concatenation.
 * - Throw a `UserError` (util/errors.ts) for problems with the user's data or parameters (NaN loss, a malformed
 *   record): the runner prints it without a stack trace and exits with code 2. Anything else is treated as a bug.
 * - Watch `ctx.signal` in long loops (Ctrl-C) and save a checkpoint regularly.
 *
 * @module
 */
import type { ParamFields, ParamsOf } from "./params.ts";
export { safeJoin } from "./paths.ts";
export type { ParamFields, ParamSchema, ParamsOf } from "./params.ts";

/** Whether an artifact is a single file or a directory tree. */
export type ArtifactType = "dir" | "file";

/** An input port of a stage kind: one named thing the recipe wires in under `inputs:`. */
export interface InputPort {
  /** What the input is and which formats the stage accepts. Shown by `distillery stages <kind>`. */
  doc: string;
  /** The recipe may leave this input out (then `ctx.inputs[port]` is undefined, or `[]` for list ports). */
  optional?: boolean;
  /** The recipe may give several references (a YAML list); `ctx.inputs[port]` is then always an array. */
  list?: boolean;
  /**
   * The kind of artifact expected. When set, validation checks that wired stage outputs and local paths are of
   * this type (Hub references are not checked: they are downloaded by the stage).
   */
  type?: ArtifactType;
}

/** An output port of a stage kind: one artifact that `run` writes and the runner stores by content. */
export interface OutputPort {
  /** What the artifact contains and its layout. Shown by `distillery stages <kind>`. */
  doc: string;
  /** `dir`: `ctx.outputs[port]` is an empty directory to fill. `file`: a path to create as a regular file. */
  type: ArtifactType;
}

/** Input ports of a stage kind, by name. */
export type InputPorts = { readonly [port: string]: InputPort };
/** Output ports of a stage kind, by name. */
export type OutputPorts = { readonly [port: string]: OutputPort };

/**
 * A resolved input, as `run` receives it. Its `digest` entered the stage's cache key.
 *
 * - `kind: "stage"`: another stage's output; `path` points into the read-only content-addressed store.
 * - `kind: "file"`: a local file or directory named in the recipe (relative paths resolve against the recipe
 *   file that wrote them); `path` is absolute; `digest` covers its content, not its name.
 * - `kind: "hub"`: a Hugging Face Hub reference (`hf://org/name[@revision]`, `hf://datasets/org/name[@revision]`);
 *   there is no `path` - the stage downloads it (through models/ code) into `ctx.sharedCacheDir`. Its `digest`
 *   is the canonical reference string, so only a pinned commit sha makes the key reproducible.
 */
export interface Artifact {
  /** The reference exactly as written in the recipe, e.g. `${distill.model}`, `data/train.jsonl`, `hf://gpt2`. */
  ref: string;
  /** Where the artifact comes from. */
  kind: "stage" | "file" | "hub";
  /** Absolute path to read (stage outputs and local files); undefined for Hub references. */
  path?: string;
  /** `sha256:<hex>` of the content (stage outputs, local files) or the canonical `hf://` reference (Hub). */
  digest: string;
  /** File or directory (known for stage outputs and local paths). */
  type?: ArtifactType;
  /** For Hub references: the parsed repository. */
  hub?: HubRef;
  /** For stage outputs: which stage and port produced it. */
  from?: { stage: string; port: string };
}

/** A parsed Hugging Face Hub reference. */
export interface HubRef {
  /** `model` for `hf://org/name`, `dataset` for `hf://datasets/org/name`. */
  repoType: "model" | "dataset";
  /** `org/name` (or a bare `name`). */
  repo: string;
  /** Branch, tag or commit sha after `@`; undefined means the default branch (not reproducible). */
  revision?: string;
}

/** The TypeScript type of `ctx.inputs` for a port map. */
export type InputsOf<I extends InputPorts> = {
  -readonly [K in keyof I]: I[K] extends { list: true } ? Artifact[]
    : I[K] extends { optional: true } ? Artifact | undefined
    : Artifact;
};

/** The TypeScript type of `ctx.outputs` for a port map: a path per port. */
export type OutputsOf<O extends OutputPorts> = { -readonly [K in keyof O]: string };

/** A metric or final-metric value; non-finite numbers are recorded as null in JSON. */
export type MetricValue = number | string | boolean | null;

/**
 * Facts about the numeric runtime that change results: they enter the key of stages with `usesDevice: true`.
 * Provided by the runtime layer (the runner never imports it). Conventional keys: `provider` (`dawn`,
 * `builtin`), `adapter` (vendor/architecture/driver), `dtype` (`f32`, `f16`).
 */
export type RuntimeFacts = Readonly<Record<string, string | number | boolean>>;

/** Recipe settings visible to a stage. Reading a field the kind did not declare a use of throws. */
export interface StageSettings {
  /** Recipe seed (`settings.seed`); only for kinds with `usesSeed: true`, where it enters the key. */
  readonly seed: number;
  /** Requested compute dtype; only for kinds with `usesDevice: true`. */
  readonly dtype: "f32" | "f16";
  /** Requested GPU provider (`auto`, `dawn`, `builtin`); only for kinds with `usesDevice: true`. */
  readonly gpu: "auto" | "dawn" | "builtin";
}

/** A complete checkpoint on disk. */
export interface Checkpoint {
  /** The step it was saved at. */
  step: number;
  /** Directory holding what `save` wrote; read-only by convention. */
  dir: string;
}

/**
 * Step-indexed checkpoints of one stage, stored under the cache and keyed by the stage's cache key (so a changed
 * parameter never resumes from a stale checkpoint). They are outside the content key: the key certifies the final
 * output, checkpoints only make reaching it resumable. The runner deletes them once the stage's output is stored,
 * and keeps them when the stage fails or the process dies.
 */
export interface Checkpoints {
  /**
   * Saves a checkpoint atomically: `write` fills a fresh temporary directory (weights, optimizer state, RNG state
   * via `Rng.getState()`, data position...), which is renamed into place only when `write` resolves, so a crash
   * mid-save leaves the previous checkpoint as the latest. Older checkpoints beyond `keep` are then deleted.
   */
  save(step: number, write: (dir: string) => Promise<void>): Promise<void>;
  /** The newest complete checkpoint, or null. Call it at the start of `run` to resume. */
  latest(): Checkpoint | null;
  /** How many checkpoints are kept (recipe `settings.keep_checkpoints`). */
  readonly keep: number;
}

/** Extra figures for a progress update. */
export interface ProgressExtra {
  /** Tokens processed so far in this stage (cumulative): the display shows tokens/s from it. */
  tokens?: number;
  /** Any other figure to show on the progress line (e.g. `loss`). */
  [name: string]: number | undefined;
}

/** Live progress of the running stage (a single updating line on a TTY, periodic lines in CI). */
export interface Progress {
  /** Starts (or restarts) a progress bar of `total` units (`unit` defaults to "step"); `label` names the phase. */
  start(total: number, unit?: string, label?: string): void;
  /** Reports that `done` units of `total` are complete (absolute, not an increment). Cheap: call it every step. */
  update(done: number, extra?: ProgressExtra): void;
}

/** The stage's structured log; everything lands in the run's `events.jsonl` (see events.ts). */
export interface StageLog {
  /** Records training/eval metrics at a step (loss curves are drawn from these). */
  metric(step: number, record: Record<string, MetricValue>): void;
  /** An informational message (printed, and kept in the event log). */
  info(message: string): void;
  /** A warning (printed, kept in the event log, and counted in the run summary). */
  warn(message: string): void;
}

/** Everything `run` receives. Generic in the kind's schemas so that params, inputs and outputs are typed. */
export interface StageContext<
  P extends ParamFields = ParamFields,
  I extends InputPorts = InputPorts,
  O extends OutputPorts = OutputPorts,
> {
  /** The stage's name in the recipe (e.g. `distill_50`). */
  readonly stage: string;
  /** The stage kind (e.g. `distill`). */
  readonly kind: string;
  /** The stage's cache key (`sha256:<hex>`). */
  readonly key: string;
  /** Validated parameters with defaults filled in (exactly what entered the key). */
  readonly params: ParamsOf<P>;
  /** Resolved inputs by port. */
  readonly inputs: InputsOf<I>;
  /** Temporary output paths by port; moved into the store after `run` resolves. */
  readonly outputs: OutputsOf<O>;
  /** Resumable step checkpoints. */
  readonly checkpoints: Checkpoints;
  /** Live progress display. */
  readonly progress: Progress;
  /** Metrics and messages for the event log. */
  readonly log: StageLog;
  /** Recipe settings the kind declared a use of. */
  readonly settings: StageSettings;
  /** Runtime facts that entered the key (kinds with `usesDevice: true`), else null. */
  readonly runtimeFacts: RuntimeFacts | null;
  /** Aborted on Ctrl-C (SIGINT/SIGTERM): save what you can and throw `signal.reason`. */
  readonly signal: AbortSignal;
  /** Sets the stage's final metrics (merged over repeated calls); recorded in the lock file and the run record. */
  setMetrics(record: Record<string, MetricValue>): void;
  /** A scratch directory for this attempt, deleted after the stage ends (whatever the outcome). */
  readonly workDir: string;
  /**
   * A persistent directory shared by all stages and runs using this cache, for downloads such as Hub snapshots
   * (use a sub-directory per thing, e.g. `hub/<repo>@<revision>`). Not content-addressed: never put results
   * here. `distillery gc --downloads` empties it.
   */
  readonly sharedCacheDir: string;
  /** Id of the current run (its directory is `.distillery/runs/<runId>`). */
  readonly runId: string;
  /**
   * Absolute directory of the recipe file being run: the base for parameters that name a path outside the
   * cache, such as the export stage's `dest`. Writing there is a side effect that the cache key does not
   * cover (a cached stage does not run again to rewrite it).
   */
  readonly recipeDir: string;
}

/**
 * A stage kind: the unit of work a recipe's `stages:` entries instantiate.
 *
 * @typeParam P the parameter schema (see params.ts)
 * @typeParam I the input ports
 * @typeParam O the output ports
 */
export interface StageKind<
  P extends ParamFields = ParamFields,
  I extends InputPorts = InputPorts,
  O extends OutputPorts = OutputPorts,
> {
  /** Name used in recipes (`kind: distill`): lower-case letters, digits, `_` and `.`. */
  kind: string;
  /**
   * Implementation version, a positive integer in the cache key. Bump it whenever a code change can change the
   * stage's outputs for the same params and inputs; leave it for pure refactors.
   */
  version: number;
  /** What the stage does, in a paragraph: shown by `distillery stages <kind>`. */
  doc: string;
  /** Parameter schema; `ctx.params` is typed from it. */
  params: P;
  /** Input ports. */
  inputs: I;
  /** Output ports (at least one). */
  outputs: O;
  /**
   * Same key -> same output bytes (default true). The runner warns when a deterministic stage recomputes an entry
   * and gets a different digest. Set false for measurements such as throughput benchmarks.
   */
  deterministic?: boolean;
  /** Runs numerics on the GPU: the runtime facts (provider, adapter, dtype) enter the key. Default false. */
  usesDevice?: boolean;
  /** Reads `ctx.settings.seed`: the recipe seed enters the key. Default false. */
  usesSeed?: boolean;
  /** A kind that exists for Distillery's own tests and demo; hidden from `distillery stages` unless `--all`. */
  testOnly?: boolean;
  /** Does the work. Resolves when every output is written; throws on failure. */
  run(ctx: StageContext<P, I, O>): Promise<void>;
}

/**
 * Declares a stage kind with full type inference: `ctx.params`, `ctx.inputs` and `ctx.outputs` inside `run` are
 * typed from the literal schemas. Returns its argument unchanged.
 */
export function defineStage<
  const P extends ParamFields,
  const I extends InputPorts,
  const O extends OutputPorts,
>(kind: StageKind<P, I, O>): StageKind<P, I, O> {
  return kind;
}

/** A stage kind of any schema, as the registry and runner hold it. */
// deno-lint-ignore no-explicit-any
export type AnyStageKind = StageKind<any, any, any>;
