/**
 * Training checkpoints: everything a training stage needs to continue bit-exactly where it stopped.
 *
 * A checkpoint directory (filled by `ctx.checkpoints.save`) holds
 * - `params.safetensors`: every trainable parameter by its Hugging Face name, F32 (f16 parameters are widened,
 *   which is exact, and narrowed back on load, which is exact too);
 * - `optimizer.safetensors`: AdamW's first and second moments as `exp_avg.<name>` and `exp_avg_sq.<name>` (F32);
 * - `state.json`: the step, the data position (data/batches.ts `BatchPosition`, which includes the data
 *   order's RNG state), the optimizer's per-parameter step counts and parameter order, and whatever the stage
 *   adds (`extra`: e.g. the progressive-schedule phase).
 *
 * Frozen parameters are not saved: they are the stage's inputs, rebuilt the same way on resume.
 *
 * @module
 */
import { join } from "node:path";
import type { BatchPosition } from "../../data/batches.ts";
import { openSafetensors, type TensorToWrite, writeSafetensors } from "../../models/safetensors.ts";
import type { AdamW } from "../../runtime/optim.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import { deviceBytes, hostArray } from "../../runtime/tensor.ts";
import { UserError } from "../../util/errors.ts";

/** Format version of `state.json`. */
export const TRAIN_STATE_VERSION = 1;

/** What `state.json` holds. */
export interface TrainStateMeta {
  /** Format version. */
  version: number;
  /** Optimizer steps completed (the checkpoint's step). */
  step: number;
  /** Data position after `step`. */
  position: BatchPosition;
  /** Anything else the stage needs to resume (JSON). */
  extra: Record<string, unknown>;
}

interface StoredMeta extends TrainStateMeta {
  optimizer: { names: string[]; steps: number[] };
}

/** Reads tensors to the CPU as f32 arrays with one GPU sync. */
async function readTensors(tensors: readonly Tensor[]): Promise<Float32Array[]> {
  if (tensors.length === 0) return [];
  const rt = tensors[0].rt;
  const bytes = await rt.dev.readMany(
    tensors.map((t) => ({ buffer: t.buffer, offset: 0, size: t.byteLength })),
  );
  return tensors.map((t, i) => {
    const a = hostArray(t.dtype, bytes[i]);
    return a instanceof Float32Array ? a : Float32Array.from(a);
  });
}

/**
 * Writes a checkpoint of `params` (trainable tensors, named), the optimizer and `meta` into `dir`.
 * One GPU sync for the parameters, one for the optimizer state.
 */
export async function saveTrainState(
  dir: string,
  params: ReadonlyMap<string, Tensor>,
  optimizer: AdamW,
  meta: Omit<TrainStateMeta, "version">,
): Promise<void> {
  const names = [...params.keys()];
  const values = await readTensors(names.map((n) => params.get(n)!));
  const pmap = new Map<string, TensorToWrite>();
  names.forEach((n, i) => pmap.set(n, { shape: [...params.get(n)!.shape], data: values[i] }));
  await writeSafetensors(join(dir, "params.safetensors"), pmap);
  const st = await optimizer.exportState();
  const shapes = new Map(optimizer.params.map((p, i) => [st.names[i], [...p.shape]]));
  const omap = new Map<string, TensorToWrite>();
  st.names.forEach((n, i) => {
    omap.set(`exp_avg.${n}`, { shape: shapes.get(n)!, data: st.m[i] });
    omap.set(`exp_avg_sq.${n}`, { shape: shapes.get(n)!, data: st.v[i] });
    // an f16 parameter's f32 master copy: without it a resumed run would continue from the rounded weights
    const master = st.master?.[i];
    if (master) omap.set(`master.${n}`, { shape: shapes.get(n)!, data: master });
  });
  await writeSafetensors(join(dir, "optimizer.safetensors"), omap);
  const stored: StoredMeta = {
    version: TRAIN_STATE_VERSION,
    ...meta,
    optimizer: { names: st.names, steps: st.steps },
  };
  await Deno.writeTextFile(join(dir, "state.json"), JSON.stringify(stored, null, 1) + "\n");
}

/** Reads the metadata of a checkpoint (to decide how to rebuild the model before restoring it). */
export async function readTrainStateMeta(dir: string): Promise<TrainStateMeta> {
  let meta: StoredMeta;
  try {
    meta = JSON.parse(await Deno.readTextFile(join(dir, "state.json")));
  } catch (e) {
    throw new UserError(`checkpoint ${dir}: state.json is unreadable (${(e as Error).message})`);
  }
  if (meta.version !== TRAIN_STATE_VERSION) {
    throw new UserError(
      `checkpoint ${dir} has format version ${meta.version}, this Distillery writes ${TRAIN_STATE_VERSION}; ` +
        `delete it to start over`,
    );
  }
  return { version: meta.version, step: meta.step, position: meta.position, extra: meta.extra ?? {} };
}

/** Overwrites a tensor's values from f32 data (narrowed to f16 for f16 tensors; padded to 4-byte writes). */
export function writeTensor(t: Tensor, data: Float32Array): void {
  const bytes = deviceBytes(t.dtype, data);
  let view = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.byteLength % 4 !== 0) {
    const padded = new Uint8Array(Math.ceil(view.byteLength / 4) * 4);
    padded.set(view);
    view = padded;
  }
  t.rt.dev.write(t.buffer, 0, view);
}

/**
 * Restores a checkpoint written by {@linkcode saveTrainState} into the given (same-named, same-shaped) trainable
 * parameters and optimizer, and returns its metadata.
 *
 * @throws {UserError} when the checkpoint does not match the model being trained (names, shapes, version).
 */
export async function loadTrainState(
  dir: string,
  params: ReadonlyMap<string, Tensor>,
  optimizer: AdamW,
): Promise<TrainStateMeta> {
  const bad = (what: string) =>
    new UserError(`checkpoint ${dir} does not match this training run: ${what}; delete it to start over`);
  let meta: StoredMeta;
  try {
    meta = JSON.parse(await Deno.readTextFile(join(dir, "state.json")));
  } catch (e) {
    throw new UserError(`checkpoint ${dir}: state.json is unreadable (${(e as Error).message})`);
  }
  if (meta.version !== TRAIN_STATE_VERSION) throw bad(`format version ${meta.version}`);
  const pf = await openSafetensors(join(dir, "params.safetensors"));
  const want = [...params.keys()].sort();
  const have = pf.names();
  if (want.join("\n") !== have.join("\n")) {
    const missing = want.filter((n) => !have.includes(n));
    const extra = have.filter((n) => !want.includes(n));
    throw bad(
      `trainable parameters differ (missing ${missing.join(", ") || "none"}; extra ${
        extra.join(", ") || "none"
      })`,
    );
  }
  for (const [name, t] of params) {
    const info = pf.info(name);
    if (info.shape.join(",") !== t.shape.join(",")) {
      throw bad(`${name} has shape [${info.shape}], the model [${t.shape}]`);
    }
    writeTensor(t, await pf.readFloat32(name));
  }
  const of = await openSafetensors(join(dir, "optimizer.safetensors"));
  const names = optimizer.params.map((p, i) => p.name ?? `param${i}`);
  if (names.join("\n") !== meta.optimizer.names.join("\n")) throw bad("the optimizer's parameters differ");
  const m: Float32Array[] = [], v: Float32Array[] = [], master: (Float32Array | null)[] = [];
  const saved = new Set(of.names());
  for (const n of names) {
    m.push(await of.readFloat32(`exp_avg.${n}`));
    v.push(await of.readFloat32(`exp_avg_sq.${n}`));
    // checkpoints from before master weights have none: the optimizer then starts them from the parameters
    master.push(saved.has(`master.${n}`) ? await of.readFloat32(`master.${n}`) : null);
  }
  optimizer.importState({ names, steps: meta.optimizer.steps, m, v, master });
  return { version: meta.version, step: meta.step, position: meta.position, extra: meta.extra ?? {} };
}
