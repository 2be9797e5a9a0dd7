/**
 * The Distillery command-line interface.
 *
 * ```sh
 * deno task run recipes/tiny.yaml                     # run (cached stages are skipped)
 * deno task run recipes/tiny.yaml --set distill.params.learning_rate=1e-4
 * deno task plan recipes/tiny.yaml                    # what would run, and why
 * deno task explain recipes/tiny.yaml distill         # every input of a stage's cache key
 * deno task status                                    # the last run
 * deno run -A main.ts gc --dry-run                    # unreferenced cache entries
 * deno task stages [kind]                             # stage kinds and their parameters
 * deno run -A main.ts generate --model <dir|org/name> --prompt "..."   # stream a model's continuation
 * deno run -A main.ts forward --model <dir> --input-ids ids.json --out out.safetensors [--layers]
 * ```
 *
 * {@linkcode main} does everything but exit, so tests can call it in-process; {@linkcode MainDeps} is where the
 * runtime (device facts) and the report (run-finished hook) plug in.
 *
 * @module
 */
import { Command, CommanderError, Option } from "commander";
import { isUserError, UserError } from "./util/errors.ts";
import { formatSettingsDoc, formatStageKind, formatStageList } from "./pipelines/docs.ts";
import { didYouMean } from "./pipelines/diagnostics.ts";
import { explainStage, formatExplanation } from "./pipelines/explain.ts";
import { formatBytes } from "./pipelines/format.ts";
import { collectGarbage, findLockFiles } from "./pipelines/gc.ts";
import { findGitRoot, resolveStateDirs } from "./pipelines/paths.ts";
import { formatPlan, planToJson, type ResolveRuntimeFacts, type Selection } from "./pipelines/plan.ts";
import { type Output, processOutput } from "./pipelines/progress.ts";
import type { StageRegistry } from "./pipelines/registry.ts";
import type { RuntimeFacts } from "./pipelines/stage.ts";
import { openSession, planRecipe, runRecipe, type RunRecord } from "./pipelines/runner.ts";
import { formatRunStatus, lastRunStatus } from "./pipelines/status.ts";
import { Store } from "./pipelines/store.ts";
import { defaultRegistry } from "./stages/registry.ts";
import { latestRunDir, writeRunReport } from "./pipelines/report/mod.ts";
import { numericFacts } from "./runtime/facts.ts";
import { addGenerateCommand } from "./cli/generate.ts";
import { addForwardCommand } from "./cli/forward.ts";

/** What the CLI is wired to. Everything has a default; tests and other layers replace pieces. */
export interface MainDeps {
  /** Where to print (default: the process's stdout/stderr). */
  output?: Output;
  /** Stage kinds (default: `stages/registry.ts`). */
  registry?: StageRegistry;
  /** Runtime facts for device stages' keys (default: {@linkcode requestedRuntimeFacts}). */
  resolveRuntimeFacts?: ResolveRuntimeFacts;
  /** Called when a run ends (the report writer plugs in here). */
  onRunFinished?: (runDir: string, record: RunRecord) => Promise<void> | void;
  /** Aborted on Ctrl-C. */
  signal?: AbortSignal;
}

/**
 * The requested provider and dtype, without probing an adapter (tests use it to stay GPU-free).
 */
export const requestedRuntimeFacts: ResolveRuntimeFacts = (s): Promise<RuntimeFacts> =>
  Promise.resolve({ provider: s.gpu, dtype: s.dtype });

/**
 * The real runtime facts: the provider `auto` resolves to and the adapter that would run, so results computed on
 * another provider or GPU are never reused.
 */
export const probedRuntimeFacts: ResolveRuntimeFacts = (s): Promise<RuntimeFacts> =>
  numericFacts(s.gpu, s.dtype);

const collect = (v: string, prev: string[]) => [...prev, v];
const collectList = (
  v: string,
  prev: string[],
) => [...prev, ...v.split(",").map((x) => x.trim()).filter(Boolean)];

interface SelectionFlags {
  only: string[];
  from: string[];
  force: string[];
  forceAll?: boolean;
}

function selectionOf(targets: string[], o: SelectionFlags): Selection {
  return { targets, only: o.only, from: o.from, force: o.force, forceAll: !!o.forceAll };
}

function addSessionOptions(c: Command): Command {
  return c
    .option(
      "--set <path=value>",
      "override a recipe value, e.g. distill.params.learning_rate=1e-4 (repeatable)",
      collect,
      [],
    )
    .option(
      "--cache-dir <dir>",
      "cache directory (default: $DISTILLERY_CACHE, settings.cache_dir, .distillery/cache)",
    )
    .addOption(
      new Option("--gpu <provider>", "WebGPU provider (default: $DISTILLERY_GPU or the recipe)").choices([
        "auto",
        "dawn",
        "builtin",
      ]),
    )
    .option("--verify", "re-hash cached outputs instead of trusting their size and timestamps");
}

function addSelectionOptions(c: Command): Command {
  return c
    .option(
      "--only <stages>",
      "run only these stages (comma list, repeatable); their inputs must be cached",
      collectList,
      [],
    )
    .option(
      "--from <stages>",
      "rerun these stages and everything downstream (comma list, repeatable)",
      collectList,
      [],
    )
    .option(
      "--force <stages>",
      "recompute these stages even if cached (comma list, repeatable)",
      collectList,
      [],
    )
    .option("--force-all", "recompute every selected stage");
}

/** Runs the CLI with `args` (without the program name); resolves to the exit code. */
export async function main(args: string[], deps: MainDeps = {}): Promise<number> {
  const out = deps.output ?? processOutput();
  const registry = deps.registry ?? defaultRegistry();
  const resolveRuntimeFacts = deps.resolveRuntimeFacts ?? probedRuntimeFacts;
  let exitCode = 0;

  const program = new Command("distillery")
    .description("Declarative distillation pipelines: Transformer teachers into hybrid Mamba students.")
    .exitOverride()
    .configureOutput({ writeOut: (s) => out.out(s), writeErr: (s) => out.err(s) })
    .showSuggestionAfterError(true)
    .allowExcessArguments(false);

  const printPlan = async (recipe: string, targets: string[], o: Record<string, unknown>) => {
    const { plan } = await planRecipe({
      recipePath: recipe,
      registry,
      overrides: o.set as string[],
      cacheDir: o.cacheDir as string | undefined,
      gpu: o.gpu as "auto" | "dawn" | "builtin" | undefined,
      verify: !!o.verify,
      resolveRuntimeFacts,
      selection: selectionOf(targets, o as unknown as SelectionFlags),
    });
    out.out(o.json ? JSON.stringify(planToJson(plan), null, 2) + "\n" : formatPlan(plan));
  };

  addSelectionOptions(addSessionOptions(
    program.command("run")
      .description("run a recipe: cached stages are reused, the others computed (resuming from checkpoints)")
      .argument("[recipe]", "recipe file (YAML)")
      .argument("[stages...]", "run only these stages and what they need"),
  ))
    .option("--no-wait", "fail instead of waiting when another run holds a lock")
    .option("--dry-run", "print the plan and stop (same as plan)")
    .option("--json", "with --dry-run: print the plan as JSON")
    .option("--help-stage <kind>", "print the documentation of a stage kind and exit")
    .action(async (recipe: string | undefined, targets: string[], o) => {
      if (o.helpStage) {
        exitCode = printStageDoc(o.helpStage, registry, out);
        return;
      }
      if (!recipe) throw new UserError("run: missing the recipe file (deno task run <recipe.yaml>)");
      if (o.dryRun) return await printPlan(recipe, targets, o);
      const { exitCode: code } = await runRecipe({
        recipePath: recipe,
        registry,
        overrides: o.set,
        cacheDir: o.cacheDir,
        gpu: o.gpu,
        verify: !!o.verify,
        resolveRuntimeFacts,
        selection: selectionOf(targets, o),
        wait: o.wait,
        output: out,
        argv: ["run", ...args.slice(1)],
        signal: deps.signal,
        onRunFinished: deps.onRunFinished ?? (async (runDir: string) => {
          const { html } = await writeRunReport(runDir);
          out.out(`report: ${html}\n`);
        }),
      });
      exitCode = code;
    });

  addSelectionOptions(addSessionOptions(
    program.command("plan")
      .description("show, for every stage, whether it is cached or will run, and why")
      .argument("<recipe>", "recipe file (YAML)")
      .argument("[stages...]", "plan only these stages and what they need"),
  ))
    .option("--json", "print the plan as JSON")
    .action(async (recipe: string, targets: string[], o) => await printPlan(recipe, targets, o));

  addSessionOptions(
    program.command("explain")
      .description("print every input of a stage's cache key and what differs from the last recorded run")
      .argument("<recipe>", "recipe file (YAML)")
      .argument("<stage>", "stage name"),
  )
    .option("--json", "print as JSON")
    .action(async (recipe: string, stage: string, o) => {
      const session = await openSession({
        recipePath: recipe,
        registry,
        overrides: o.set,
        cacheDir: o.cacheDir,
        gpu: o.gpu,
        verify: !!o.verify,
        resolveRuntimeFacts,
      });
      const x = await explainStage(session, stage);
      await session.env.digester.save();
      out.out(o.json ? JSON.stringify(x, null, 2) + "\n" : formatExplanation(x));
    });

  program.command("status")
    .description("summarise the last run (of a recipe, or of the project)")
    .argument("[recipe]", "recipe file: show its last run")
    .option("--json", "print as JSON")
    .action(async (recipe: string | undefined, o) => {
      let runsDir: string, name: string | undefined;
      if (recipe) {
        const session = await openSession({ recipePath: recipe, registry, resolveRuntimeFacts });
        runsDir = session.dirs.runs;
        name = session.recipe.name;
      } else {
        runsDir = resolveStateDirs(Deno.cwd() + "/x").runs;
      }
      const s = lastRunStatus(runsDir, name);
      if (!s) {
        out.out(`no runs recorded${name ? ` for recipe ${name}` : ""} in ${runsDir}\n`);
        return;
      }
      out.out(o.json ? JSON.stringify(s, null, 2) + "\n" : formatRunStatus(s));
    });

  program.command("gc")
    .description(
      "remove cache entries not referenced by any distillery.lock (found under the project, or given)",
    )
    .argument(
      "[lockfiles...]",
      "lock files whose records to keep (default: every distillery.lock in the project)",
    )
    .option("--cache-dir <dir>", "cache directory (default: $DISTILLERY_CACHE or .distillery/cache)")
    .option("--dry-run", "only report what would be removed")
    .option("--keep-days <n>", "also keep what runs of the last n days used", (v) => Number(v), 0)
    .option("--checkpoints", "also remove step checkpoints of unfinished stages")
    .option("--downloads", "also remove shared downloads (Hub snapshots)")
    .option("--no-wait", "fail instead of waiting for running runs")
    .action(async (lockfiles: string[], o) => {
      if (!Number.isFinite(o.keepDays) || o.keepDays < 0) {
        throw new UserError("--keep-days expects a number of days >= 0");
      }
      const root = findGitRoot(Deno.cwd()) ?? Deno.cwd();
      const dirs = resolveStateDirs(root + "/x", { flag: o.cacheDir });
      const files = lockfiles.length > 0 ? lockfiles : findLockFiles(root);
      const store = new Store(dirs.cache);
      await store.init();
      if (dirs.cacheSource !== "default") {
        out.err(
          `note: the cache ${dirs.cache} may be shared with other projects; only the ${files.length} lock file(s) ` +
            "listed below keep their entries\n",
        );
      }
      for (const f of files) out.err(`keeping what ${f} records\n`);
      const r = await collectGarbage({
        store,
        lockFiles: files,
        runsDirs: [dirs.runs],
        keepDays: o.keepDays,
        dryRun: !!o.dryRun,
        checkpoints: !!o.checkpoints,
        downloads: !!o.downloads,
        wait: o.wait,
        onWait: () => out.err("waiting for running runs to finish...\n"),
      });
      const verb = o.dryRun ? "would free" : "freed";
      out.out(
        `${verb} ${
          formatBytes(r.bytesFreed)
        }: ${r.entriesRemoved} cache entries, ${r.objectsRemoved} objects, ` +
          `${r.tmpRemoved} temporary directories${
            o.checkpoints ? `, ${r.checkpointsRemoved} checkpoint directories` : ""
          }\n` +
          `kept ${r.entriesKept} entries and ${r.objectsKept} objects` +
          (r.checkpointBytesKept
            ? `; checkpoints ${formatBytes(r.checkpointBytesKept)} (--checkpoints removes them)`
            : "") +
          (r.downloadBytesKept
            ? `; downloads ${formatBytes(r.downloadBytesKept)} (--downloads removes them)`
            : "") +
          "\n",
      );
    });

  program.command("stages")
    .description("list stage kinds, or document one (inputs, outputs, every parameter with type and default)")
    .argument("[kind]", "a stage kind")
    .option("--all", "include test-only kinds")
    .option("--settings", "document the recipe settings block")
    .action((kind: string | undefined, o) => {
      if (o.settings) out.out(formatSettingsDoc());
      else if (kind) exitCode = printStageDoc(kind, registry, out);
      else out.out(formatStageList(registry, !!o.all));
    });

  program.command("report")
    .description("write the HTML report, results.json and summary.md of a run (default: the last run)")
    .argument("[run]", "run directory (default: the newest under .distillery/runs)")
    .option("--runs-dir <dir>", "where runs are kept", ".distillery/runs")
    .option("--out <dir>", "write the report files here instead of the run directory")
    .action(async (run: string | undefined, o) => {
      const dir = run ?? await latestRunDir(o.runsDir);
      const { html } = await writeRunReport(dir, o.out ? { outDir: o.out } : {});
      out.out(`report: ${html}\n`);
    });

  addGenerateCommand(program, out, deps.signal);
  addForwardCommand(program, out);

  try {
    await program.parseAsync(args, { from: "user" });
    return exitCode;
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version end here with code 0; usage errors get the user-error exit code.
      return e.exitCode === 0 ? 0 : 2;
    }
    if (isUserError(e)) {
      out.err(`error: ${(e as Error).message}\n`);
      return 2;
    }
    out.err(`internal error (please report it): ${(e as Error)?.stack ?? e}\n`);
    return 1;
  }
}

function printStageDoc(kind: string, registry: StageRegistry, out: Output): number {
  const k = registry.get(kind);
  if (!k) {
    out.err(`error: unknown stage kind "${kind}" (${didYouMean(kind, registry.names(), "a kind:")})\n`);
    return 2;
  }
  out.out(formatStageKind(k));
  return 0;
}

if (import.meta.main) {
  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = () => {
    interrupts++;
    if (interrupts === 1) {
      controller.abort(new DOMException("interrupted", "AbortError"));
      Deno.stderr.writeSync(
        new TextEncoder().encode("\ninterrupted: stopping (press Ctrl-C again to quit at once)\n"),
      );
    } else {
      Deno.exit(130);
    }
  };
  Deno.addSignalListener("SIGINT", onSignal);
  if (Deno.build.os !== "windows") Deno.addSignalListener("SIGTERM", onSignal);
  const code = await main(Deno.args, { signal: controller.signal });
  Deno.exit(code);
}
