/**
 * The whole data path of the `tokenize` stage in one call: resolve the dataset, read its records, normalise
 * them to the declared format (applying `on_invalid`), tokenise with masks, pack, and write the token file.
 *
 * The stage only has to map its recipe parameters to {@linkcode TokenizeDatasetParams}, pass the tokenizer (and
 * the Hub cache resolver), and report the returned statistics. Memory stays bounded by one packing window plus
 * one record: records are streamed, and the token file is written as it goes.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import type { HubDatasetResolver } from "./data_files.ts";
import { type DataFormat, normalizeRecords } from "./formats.ts";
import { type PackingMode, SequencePacker, singleSequence } from "./packing.ts";
import type { ProblemReport } from "./problems.ts";
import { type DatasetSpec, iterateRecords, resolveDataset } from "./records.ts";
import { type TokenFileHeader, TokenFileWriter, type TokenizerInfo } from "./token_file.ts";
import {
  newTokenizeStats,
  pairToSequences,
  type PreferenceOptions,
  tokenizeExample,
  type TokenizeOptions,
  tokenizePreference,
  type TokenizeStats,
} from "./tokenize.ts";
import type { TextTokenizer } from "./tokenizer.ts";

/** What to tokenise and how (the tokenize stage's parameters). */
export interface TokenizeDatasetParams {
  /** Which records. */
  dataset: DatasetSpec;
  /** The declared format (`multiple_choice` is for evaluation and is not tokenised here). */
  format: Exclude<DataFormat, "multiple_choice">;
  /** Canonical field -> dataset field. */
  fields?: Partial<Record<string, string>>;
  /** `error` (default) or `skip`. */
  onInvalid?: "error" | "skip";
  /** Sequence length: window size when packing, truncation length otherwise; preference max_length. */
  maxLength: number;
  /** `packed` (default for text/chat/prompt_completion), `none` or `padding_free`; preference needs `none`. */
  packing?: PackingMode;
  /** Drop the final shorter window when packing (default false). */
  dropRemainder?: boolean;
  /** Tokenisation options (completion-only masking, template, BOS/EOS). */
  tokenize?: TokenizeOptions;
  /** Preference only: TRL's max_prompt_length (default max_length / 2, as the paper's 1024 / 512) and truncation_mode. */
  preference?: Pick<PreferenceOptions, "maxPromptLength" | "truncationMode">;
}

/** Where the tokenizer and data come from. */
export interface TokenizeDatasetContext {
  /** The tokenizer (models layer). */
  tokenizer: TextTokenizer;
  /** Recorded in the token file header (digest of the tokenizer files, ids, vocabulary size). */
  tokenizerInfo: TokenizerInfo;
  /** Hub access for `hf://` datasets. */
  hub?: HubDatasetResolver;
  /** Base for relative dataset paths (e.g. the recipe's folder). */
  baseDir?: string;
  /** Cancels the pass (the partial file is removed). */
  signal?: AbortSignal;
  /** Called every `progressEvery` records with the number of records read so far. */
  onProgress?: (recordsRead: number) => void;
  /** Default 1000. */
  progressEvery?: number;
}

/** What a tokenize pass produced. */
export interface TokenizeDatasetResult {
  /** The written file's header. */
  header: TokenFileHeader;
  /** Records seen, kept and skipped (with the first problems when skipping). */
  report: ProblemReport;
  /** Token counts, boundary merges and truncations. */
  stats: TokenizeStats;
  /** The resolved files, in reading order (the runner hashes them for the cache key). */
  files: string[];
}

/**
 * Tokenises a dataset into a token file at `outPath` (written atomically).
 *
 * @throws {UserError} for dataset, format or template problems (the file is not created).
 */
export async function tokenizeDatasetToFile(
  outPath: string,
  params: TokenizeDatasetParams,
  ctx: TokenizeDatasetContext,
): Promise<TokenizeDatasetResult> {
  const pref = params.format === "preference";
  const packing = params.packing ?? (pref ? "none" : "packed");
  if (!Number.isInteger(params.maxLength) || params.maxLength < 2) {
    throw new UserError(`max_length: expected an integer >= 2, found ${params.maxLength}`);
  }
  if (pref && packing !== "none") {
    throw new UserError(`packing: preference data is stored as chosen/rejected pairs; use packing: none`);
  }
  if ((params.format as string) === "multiple_choice") {
    throw new UserError(
      `format multiple_choice is for evaluation tasks; the tokenize stage does not take it`,
    );
  }
  const ds = await resolveDataset(params.dataset, { hub: ctx.hub, baseDir: ctx.baseDir });
  let read = 0;
  const every = ctx.progressEvery ?? 1000;
  async function* records() {
    for await (const r of iterateRecords(ds, params.dataset)) {
      if (ctx.signal?.aborted) throw ctx.signal.reason ?? new DOMException("aborted", "AbortError");
      yield r;
      if (++read % every === 0) ctx.onProgress?.(read);
    }
  }
  const { examples, report } = normalizeRecords(records(), {
    format: params.format,
    fields: params.fields,
    onInvalid: params.onInvalid,
    what: `dataset ${params.dataset.path} (format ${params.format})`,
  });
  const stats = newTokenizeStats();
  const tokOpts = params.tokenize ?? {};
  const writer = await TokenFileWriter.create(outPath, {
    format: params.format,
    layout: pref ? "pairs" : "sequences",
    max_length: params.maxLength,
    packing,
    tokenizer: ctx.tokenizerInfo,
  });
  try {
    const packer = packing === "packed" ? new SequencePacker(params.maxLength) : null;
    const put = (s: { ids: number[]; mask: number[]; docStarts: number[]; docRecords: number[] }) =>
      writer.append(s);
    for await (const ex of examples) {
      if (pref) {
        if (ex.kind !== "preference") throw new Error("unreachable");
        const pair = tokenizePreference(ctx.tokenizer, ex, {
          ...tokOpts,
          maxLength: params.maxLength,
          maxPromptLength: params.preference?.maxPromptLength ?? Math.floor(params.maxLength / 2),
          truncationMode: params.preference?.truncationMode,
        }, stats);
        for (const s of pairToSequences(pair)) await put(singleSequence(s, Infinity));
        continue;
      }
      const seq = tokenizeExample(ctx.tokenizer, ex, tokOpts, stats);
      if (packer) {
        for (const w of packer.push(seq)) await put(w);
      } else {
        if (seq.ids.length > params.maxLength) stats.truncated++;
        await put(singleSequence(seq, params.maxLength));
      }
    }
    if (packer) { for (const w of packer.finish(params.dropRemainder)) await put(w); }
    const rep = report();
    if (writer.numSequences === 0) {
      throw new UserError(
        `dataset ${params.dataset.path}: no usable records (${rep.seen} read, ${rep.skipped} skipped)`,
      );
    }
    // The header's meta holds counts only (no paths), so equal inputs give equal bytes on any machine.
    const header = await writer.finish({
      records: { seen: rep.seen, kept: rep.kept, skipped: rep.skipped },
      stats: { ...stats },
    });
    return { header, report: rep, stats, files: ds.files.map((f) => f.path) };
  } catch (e) {
    await writer.abort();
    throw e;
  }
}
