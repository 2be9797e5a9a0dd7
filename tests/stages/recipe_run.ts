/**
 * Helpers for stage tests: run a one-recipe project through the real CLI in this process and read what the
 * stages wrote.
 *
 * @module
 */
import { type CliResult, lastRun, runCli, type TempProject, tempProject } from "../pipelines/helpers.ts";

/** Absolute path of a file or folder under the repository's fixtures/. */
export function fixture(rel: string): string {
  return new URL(`../../fixtures/${rel}`, import.meta.url).pathname;
}

/** The fixture teacher (stories260K) and the fixture Mamba2 hybrid built from it. */
export const TEACHER_DIR = fixture("models/stories260K-hf");
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
