/**
 * Helpers for the runner tests: temporary projects, the CLI in-process and as a real subprocess, and readers for
 * what a run leaves behind.
 *
 * @module
 */
import { join } from "node:path";
import { main, type MainDeps } from "../../main.ts";
import { memoryOutput } from "../../pipelines/progress.ts";
import { listRuns, type RunRecord } from "../../pipelines/runs.ts";
import { readEvents, type StoredEvent } from "../../pipelines/events.ts";

/** Absolute path of main.ts. */
export const MAIN_TS = new URL("../../main.ts", import.meta.url).pathname;

/** A temporary project directory (not inside a git repository, so state goes to `<dir>/.distillery`). */
export interface TempProject {
  /** Absolute path. */
  dir: string;
  /** Writes a file (creating parent directories); returns its absolute path. */
  write(rel: string, text: string): string;
  /** Absolute path of a file in the project. */
  path(rel: string): string;
  /** The project's `.distillery/runs`. */
  runsDir: string;
  /** The default cache, `.distillery/cache`. */
  cacheDir: string;
  /** Removes everything (read-only cache files included). */
  cleanup(): Promise<void>;
}

/** Creates a temporary project. */
export function tempProject(): TempProject {
  const dir = Deno.makeTempDirSync({ prefix: "distillery-test-" });
  return {
    dir,
    write(rel, text) {
      const p = join(dir, rel);
      Deno.mkdirSync(join(p, ".."), { recursive: true });
      Deno.writeTextFileSync(p, text);
      return p;
    },
    path: (rel) => join(dir, rel),
    runsDir: join(dir, ".distillery", "runs"),
    cacheDir: join(dir, ".distillery", "cache"),
    async cleanup() {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** Result of a CLI invocation. */
export interface CliResult {
  /** Exit code. */
  code: number;
  /** Standard output. */
  stdout: string;
  /** Standard error. */
  stderr: string;
}

/** Runs the CLI in this process (fast; same code path as the binary except `Deno.exit`). */
export async function runCli(args: string[], deps: MainDeps = {}): Promise<CliResult> {
  const output = memoryOutput();
  const code = await main(args, { output, ...deps });
  return { code, stdout: output.stdout(), stderr: output.stderr() };
}

/** Spawns `deno run -A main.ts ...args` as a real process. */
export async function spawnCli(
  args: string[],
  opts: { cwd?: string; env?: Record<string, string> } = {},
): Promise<CliResult> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN_TS, ...args],
    cwd: opts.cwd,
    env: { NO_COLOR: "1", ...opts.env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Starts the CLI as a child process without waiting (for kill tests). */
export function startCli(args: string[], opts: { cwd?: string } = {}): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN_TS, ...args],
    cwd: opts.cwd,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** The newest run record of a project (throws when the newest run has no run.json). */
export function lastRun(p: TempProject): RunRecord {
  const runs = listRuns(p.runsDir);
  if (runs.length === 0 || !runs[0].record) throw new Error(`no finished run in ${p.runsDir}`);
  return runs[0].record;
}

/** Events of the newest run of a project. */
export function lastEvents(p: TempProject): StoredEvent[] {
  const runs = listRuns(p.runsDir);
  if (runs.length === 0) throw new Error(`no run in ${p.runsDir}`);
  return readEvents(join(runs[0].dir, "events.jsonl"));
}

/** Names of the stages the newest run actually computed. */
export function ranStages(p: TempProject): string[] {
  return lastRun(p).stages.filter((s) => s.action === "ran").map((s) => s.stage);
}

/** Output digests by `stage.port` of the newest run. */
export function outputDigests(p: TempProject): Record<string, string> {
  const r: Record<string, string> = {};
  for (const s of lastRun(p).stages) {
    for (const [port, o] of Object.entries(s.outputs)) r[`${s.stage}.${port}`] = o.digest;
  }
  return r;
}

/** Polls until `cond` is true (or throws after `timeoutMs`). */
export async function waitFor(cond: () => boolean, timeoutMs = 20000, what = "condition"): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A recipe with four test stages: text -> upper -> count, and text -> train. Used by several tests. */
export const CHAIN_RECIPE = `name: chain
description: test chain
settings: { seed: 3 }
stages:
  text:
    kind: testing.text
    params: { text: "alpha beta", repeat: 2 }
  upper:
    kind: testing.transform
    params: { mode: upper }
    inputs: { source: "\${text.text}", extra: data/extra.txt }
  count:
    kind: testing.count
    inputs: { source: "\${upper.text}" }
  train:
    kind: testing.train
    params: { steps: 6, checkpoint_every: 2 }
    inputs: { data: "\${text.text}" }
`;
