/**
 * Step checkpoints of a running stage, stored in `<cache>/checkpoints/<stage key>/step-<N>/`.
 *
 * A checkpoint directory appears under its final name only once complete (it is written to a hidden temporary
 * directory and renamed), so after `kill -9` at any moment {@linkcode StageCheckpoints.latest} returns the newest
 * complete one. Because the directory is keyed by the stage key, a run with different parameters or inputs never
 * resumes from it.
 *
 * @module
 */
import { join } from "node:path";
import { writeDirAtomic } from "../util/atomic.ts";
import { removeTree } from "./store.ts";
import type { Checkpoint, Checkpoints } from "./stage.ts";

const STEP_DIR = /^step-(\d{12})$/;

/** The directory name for a step (zero-padded so names sort by step). */
export function stepDirName(step: number): string {
  return `step-${String(step).padStart(12, "0")}`;
}

/** Lists the complete checkpoints under `dir`, oldest first. */
export function listCheckpoints(dir: string): Checkpoint[] {
  const out: Checkpoint[] = [];
  try {
    for (const d of Deno.readDirSync(dir)) {
      const m = STEP_DIR.exec(d.name);
      if (m && d.isDirectory) out.push({ step: Number(m[1]), dir: join(dir, d.name) });
    }
  } catch {
    return [];
  }
  return out.sort((a, b) => a.step - b.step);
}

/** {@linkcode Checkpoints} for one stage key. */
export class StageCheckpoints implements Checkpoints {
  /** How many checkpoints are kept. */
  readonly keep: number;
  readonly #dir: string;
  readonly #onSaved: (cp: Checkpoint) => void;

  /**
   * @param dir the stage key's checkpoint directory
   * @param keep how many to keep (at least 1)
   * @param onSaved called after each save (the runner logs an event)
   */
  constructor(dir: string, keep: number, onSaved: (cp: Checkpoint) => void = () => {}) {
    this.#dir = dir;
    this.keep = Math.max(1, keep);
    this.#onSaved = onSaved;
  }

  /** Saves a checkpoint atomically, then prunes all but the newest `keep`. */
  async save(step: number, write: (dir: string) => Promise<void>): Promise<void> {
    if (!Number.isInteger(step) || step < 0) {
      throw new Error(`checkpoint step must be a non-negative integer, got ${step}`);
    }
    await Deno.mkdir(this.#dir, { recursive: true });
    const final = join(this.#dir, stepDirName(step));
    await writeDirAtomic(final, write);
    const all = listCheckpoints(this.#dir);
    for (const cp of all.slice(0, Math.max(0, all.length - this.keep))) await removeTree(cp.dir);
    // Leftover temporary directories of a killed save are garbage once a newer save succeeded.
    for (const d of Deno.readDirSync(this.#dir)) {
      if (d.name.startsWith(".") && d.name.endsWith(".tmp") && !d.name.includes(`.${Deno.pid}.`)) {
        await removeTree(join(this.#dir, d.name));
      }
    }
    this.#onSaved({ step, dir: final });
  }

  /** The newest complete checkpoint, or null. */
  latest(): Checkpoint | null {
    const all = listCheckpoints(this.#dir);
    return all.length > 0 ? all[all.length - 1] : null;
  }

  /** Deletes every checkpoint (after the stage's output is stored). */
  async clear(): Promise<void> {
    await removeTree(this.#dir);
  }
}
