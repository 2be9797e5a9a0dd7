/**
 * The token artifact (what the `tokenize` stage writes and the training stages read) and the step from a
 * micro-batch of token rows to what the loss kernels take.
 *
 * A token artifact is a directory with `tokens.bin` (the binary token file of `data/token_file.ts`: ids, loss
 * masks, sequence offsets) and `summary.json` (counts and the tokenize parameters, for people and reports).
 *
 * @module
 */
import { join } from "node:path";
import type { Artifact } from "../../pipelines/stage.ts";
import { type SequenceData, type SequenceSource, TokenFileReader } from "../../data/token_file.ts";
import type { MicroBatch } from "../../data/batches.ts";
import { UserError } from "../../util/errors.ts";

/** File name of the token file inside a token artifact. */
export const TOKENS_FILE = "tokens.bin";
/** File name of the human-readable summary inside a token artifact. */
export const TOKENS_SUMMARY = "summary.json";

/** Label of a position that is not a training target (the loss kernels' ignore index). */
export const IGNORE_INDEX = -100;

/**
 * Opens the token file of a token input, checking its layout (`sequences` for language-model training,
 * `pairs` for preference data) and that its ids fit the model's vocabulary.
 */
export async function openTokensInput(
  input: Artifact,
  opts: { port: string; layout: "sequences" | "pairs"; vocabSize?: number },
): Promise<TokenFileReader> {
  if (!input.path) throw new UserError(`input ${opts.port}: ${input.ref} has no local path`);
  let path = input.path;
  if ((await Deno.stat(path)).isDirectory) path = join(path, TOKENS_FILE);
  const reader = await TokenFileReader.open(path);
  const h = reader.header;
  if (h.layout !== opts.layout) {
    reader.close();
    throw new UserError(
      `input ${opts.port}: ${input.ref} holds ${h.layout === "pairs" ? "preference pairs" : "sequences"} ` +
        `(format ${h.format}), this stage needs ${
          opts.layout === "pairs" ? "preference pairs (tokenize with format: preference)" : "sequences"
        }`,
    );
  }
  const v = h.tokenizer.vocab_size;
  if (opts.vocabSize !== undefined && v !== null && v > opts.vocabSize) {
    reader.close();
    throw new UserError(
      `input ${opts.port}: ${input.ref} was tokenized with a vocabulary of ${v} ids, more than the model's ` +
        `${opts.vocabSize}: tokenize with the model's tokenizer`,
    );
  }
  return reader;
}

/**
 * A view of a sequence source whose sequences are cut to `maxLength` tokens (the start kept, as TRL's
 * `max_length` truncation does). `truncated` counts the sequences that are longer.
 */
export function truncatedSource(
  src: SequenceSource,
  maxLength: number,
): SequenceSource & { truncated: number } {
  let truncated = 0;
  for (let i = 0; i < src.numSequences; i++) if (src.sequenceLength(i) > maxLength) truncated++;
  return {
    truncated,
    numSequences: src.numSequences,
    sequenceLength: (i) => Math.min(maxLength, src.sequenceLength(i)),
    read(i): SequenceData {
      const s = src.read(i);
      if (s.ids.length <= maxLength) return s;
      const keep = s.docStarts.filter((d) => d < maxLength).length;
      return {
        ids: s.ids.subarray(0, maxLength),
        mask: s.mask.subarray(0, maxLength),
        docStarts: s.docStarts.slice(0, keep),
        docRecords: s.docRecords.slice(0, keep),
      };
    },
  };
}

/**
 * Next-token labels of a padded micro-batch: row position t is trained to predict ids[t + 1] when that token is
 * a target (`mask[t + 1] = 1`), else it gets {@linkcode IGNORE_INDEX}; the last position of a row never has a
 * target. One label per logits row, `[rows * seqLen]`.
 */
export function nextTokenLabels(mb: MicroBatch): Int32Array {
  const { rows, seqLen: T, ids, mask } = mb;
  const labels = new Int32Array(rows * T).fill(IGNORE_INDEX);
  for (let r = 0; r < rows; r++) {
    for (let t = 0; t + 1 < T; t++) {
      const j = r * T + t + 1;
      if (mask[j]) labels[j - 1] = ids[j];
    }
  }
  return labels;
}

/** The 0/1 mask of {@linkcode nextTokenLabels} as f32 (1 where a label is set). */
export function nextTokenMask(labels: Int32Array): Float32Array {
  const m = new Float32Array(labels.length);
  for (let i = 0; i < labels.length; i++) m[i] = labels[i] === IGNORE_INDEX ? 0 : 1;
  return m;
}
