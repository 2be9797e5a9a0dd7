/**
 * What the ref_logprobs and dpo stages share: the summed completion log-probabilities of preference pairs, and
 * the reference log-prob artifact.
 *
 * A micro-batch of preference pairs has 2B rows, the B chosen sequences then the B rejected ones (TRL's
 * concatenated order, data/batches.ts). The log-probability of a sequence is the sum over its target tokens
 * (the completion, by the tokenize stage's mask) of log p(token | prefix), as TRL's `concatenated_forward`.
 *
 * The reference artifact is a directory with `logprobs.safetensors` (F32 `chosen` and `rejected`, one value
 * per pair in token-file order) and `summary.json` (`pairs`, `tokens_sha256` = the pairs token file's payload
 * digest, `max_length`), so the dpo stage can check that it uses the reference of the same pairs.
 *
 * @module
 */
import { join } from "node:path";
import type { MicroBatch } from "../../data/batches.ts";
import type { CausalLM } from "../../models/causal_lm.ts";
import { openSafetensors, writeSafetensors } from "../../models/safetensors.ts";
import { sequenceLogprobs } from "../../runtime/ops/loss.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import type { Artifact } from "../../pipelines/stage.ts";
import { UserError } from "../../util/errors.ts";
import { IGNORE_INDEX, nextTokenLabels, nextTokenMask } from "./tokens.ts";

/** The summed target log-probabilities `[2B]` (chosen rows, then rejected rows) of a pairs micro-batch. */
export function pairLogprobs(lm: CausalLM, mb: MicroBatch): Tensor {
  const rt = lm.rt;
  const { rows, seqLen: T } = mb;
  const labels = nextTokenLabels(mb);
  const targets = rt.tensor(labels, [rows, T], "i32");
  const mask = rt.tensor(nextTokenMask(labels), [rows, T], "f32");
  const logits = lm.forward(mb.ids, rows, T).logits;
  return sequenceLogprobs(logits.view([rows, T, lm.config.vocabSize]), targets, mask);
}

/** Target tokens of the chosen rows (the first half) of a pairs micro-batch: what RPO's NLL averages over. */
export function chosenTargetCount(mb: MicroBatch): number {
  const labels = nextTokenLabels(mb);
  let n = 0;
  for (let i = 0; i < (mb.rows / 2) * mb.seqLen; i++) n += labels[i] === IGNORE_INDEX ? 0 : 1;
  return n;
}

/** Reference log-probabilities of every pair. */
export interface RefLogprobs {
  /** Summed log p_ref(chosen | prompt) per pair. */
  chosen: Float32Array;
  /** Summed log p_ref(rejected | prompt) per pair. */
  rejected: Float32Array;
  /** Payload digest of the pairs token file they were computed on. */
  tokensSha256: string;
  /** The max_length truncation they were computed with (null: none). */
  maxLength: number | null;
}

/** File names of the reference artifact. */
export const REF_FILES = { values: "logprobs.safetensors", summary: "summary.json" } as const;

/** Writes a reference artifact into `dir`. */
export async function writeRefLogprobs(dir: string, r: RefLogprobs): Promise<void> {
  await writeSafetensors(join(dir, REF_FILES.values), {
    chosen: { shape: [r.chosen.length], data: r.chosen },
    rejected: { shape: [r.rejected.length], data: r.rejected },
  });
  const mean = (a: Float32Array) => a.reduce((x, y) => x + y, 0) / Math.max(1, a.length);
  await Deno.writeTextFile(
    join(dir, REF_FILES.summary),
    JSON.stringify(
      {
        pairs: r.chosen.length,
        tokens_sha256: r.tokensSha256,
        max_length: r.maxLength,
        mean_chosen: mean(r.chosen),
        mean_rejected: mean(r.rejected),
      },
      null,
      2,
    ) + "\n",
  );
}

/** Reads a reference artifact (an input of the dpo stage). */
export async function readRefLogprobs(input: Artifact, port = "ref"): Promise<RefLogprobs> {
  if (!input.path) throw new UserError(`input ${port}: ${input.ref} has no local path`);
  let summary: { pairs: number; tokens_sha256: string; max_length: number | null };
  try {
    summary = JSON.parse(await Deno.readTextFile(join(input.path, REF_FILES.summary)));
  } catch {
    throw new UserError(
      `input ${port}: ${input.ref} is not a ref_logprobs output (no readable summary.json)`,
    );
  }
  const f = await openSafetensors(join(input.path, REF_FILES.values));
  const chosen = await f.readFloat32("chosen"), rejected = await f.readFloat32("rejected");
  if (chosen.length !== summary.pairs || rejected.length !== summary.pairs) {
    throw new UserError(
      `input ${port}: ${input.ref} is damaged (${chosen.length} values for ${summary.pairs} pairs)`,
    );
  }
  return { chosen, rejected, tokensSha256: summary.tokens_sha256, maxLength: summary.max_length };
}
