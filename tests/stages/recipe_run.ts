/**
 * Helpers for stage tests: run a one-recipe project through the real CLI in this process and read what the
 * stages wrote.
 *
 * @module
 */
import { dirname, join } from "node:path";
import { tmpdir } from "node:os";
import { repoFolderName } from "../../models/hub.ts";
import { fixture, TEACHER } from "./helpers.ts";
import { type CliResult, lastRun, runCli, type TempProject, tempProject } from "../pipelines/helpers.ts";

export { fixture } from "./helpers.ts";

/** The fixture teacher (stories260K). */
export const TEACHER_DIR = TEACHER;
/** The fixture hybrid (official MambaInLlama layout, no tokenizer files). */
export const HYBRID_DIR = fixture("reference/hybrid_mamba2_stories260k/model");

/** Result of {@linkcode runRecipe}: the CLI's result and the stored output paths by `stage.port`. */
export interface StageRun extends CliResult {
  /** Output paths by `stage.port` (empty when the run failed before storing anything). */
  outputs: Record<string, string>;
}

/**
 * Writes `files` (relative path -> text) and `recipe.yaml` into a fresh project, runs `run recipe.yaml` with
 * `args`, and returns the result with the stored outputs. The project is passed to `use` and removed after.
 */
export async function withRecipe<T>(
  recipe: string,
  files: Record<string, string>,
  use: (run: (args?: string[]) => Promise<StageRun>, p: TempProject) => Promise<T>,
): Promise<T> {
  const p = tempProject();
  try {
    for (const [rel, text] of Object.entries(files)) p.write(rel, text);
    const path = p.write("recipe.yaml", recipe);
    const run = async (args: string[] = []): Promise<StageRun> => {
      const r = await runCli(["run", path, ...args]);
      const outputs: Record<string, string> = {};
      try {
        for (const s of lastRun(p).stages) {
          for (const [port, o] of Object.entries(s.outputs)) outputs[`${s.stage}.${port}`] = o.path;
        }
      } catch {
        // no finished run record: leave outputs empty
      }
      return { ...r, outputs };
    };
    return await use(run, p);
  } finally {
    await p.cleanup();
  }
}

/**
 * Writes a Hub cache snapshot the way Python's huggingface_hub lays it out (`blobs/<sha256>`, relative symlinks
 * in `snapshots/<commit>`, `refs/main`), holding `files` (name -> content). Returns the snapshot directory.
 */
export async function writeHubSnapshot(
  cacheDir: string,
  type: "model" | "dataset",
  repo: string,
  commit: string,
  files: Record<string, Uint8Array | string>,
): Promise<string> {
  const storage = join(cacheDir, repoFolderName(repo, type));
  const snapshot = join(storage, "snapshots", commit);
  await Deno.mkdir(join(storage, "blobs"), { recursive: true });
  await Deno.mkdir(join(storage, "refs"), { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    const data = typeof content === "string" ? new TextEncoder().encode(content) : content;
    const etag = [...new Uint8Array(await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>))]
      .map((b) => b.toString(16).padStart(2, "0")).join("");
    await Deno.writeFile(join(storage, "blobs", etag), data);
    const link = join(snapshot, name);
    await Deno.mkdir(dirname(link), { recursive: true });
    await Deno.symlink(`${"../".repeat(name.split("/").length + 1)}blobs/${etag}`, link);
  }
  await Deno.writeTextFile(join(storage, "refs", "main"), commit);
  return snapshot;
}

/**
 * Runs `fn` with environment variables set (e.g. HF_HUB_CACHE, HF_HUB_OFFLINE), restoring them after.
 * `deno test --parallel` runs test files on threads of one process, which share one environment: without the
 * lock, one file's restore could pull another's HF_HUB_CACHE away mid-run. An exclusive file lock (each call
 * opens the file anew, so threads exclude each other) lets one such section run at a time.
 */
export async function withEnv<T>(vars: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const lock = await Deno.open(join(tmpdir(), "distillery-tests-env.lock"), { create: true, write: true });
  await lock.lock(true);
  const old = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  for (const [k, v] of Object.entries(vars)) Deno.env.set(k, v);
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(old)) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    await lock.unlock();
    lock.close();
  }
}
