/**
 * Documents to score for perplexity: the records of a text dataset, each one document, tokenised without
 * special tokens.
 *
 * The evaluate stage and the distillation benchmark both read their documents here, so the benchmark's
 * figures are the stage's by construction (same documents, same order, same ids) and a bad record fails both
 * the same way instead of being skipped by one of them.
 *
 * A record is a document when it is a string, or an object whose `textField` holds a string (text files give
 * `{ text }`). Empty texts are not documents: they have no token to score, and counting them would add a
 * phantom sample (and, for word perplexity, a phantom word).
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { formatSource } from "./problems.ts";
import { iterateRecords, type ReadOptions, type ResolvedDataset } from "./records.ts";
import type { TextTokenizer } from "./tokenizer.ts";

/** One document to score. */
export interface TextDocument {
  /** The text as read. */
  text: string;
  /** Where it came from, as messages print it (`file:line (record i)`). */
  source: string;
  /** Token ids of `text` alone (no BOS/EOS). */
  ids: number[];
}

/** The documents kept, and how many there were in all. */
export interface TextDocuments {
  /** The first `limit` documents (all of them without a limit), in dataset order. */
  docs: TextDocument[];
  /** Every non-empty document read, kept or not (lm-eval's `n-samples.original`). */
  original: number;
}

/** Options for {@linkcode readTextDocuments}. */
export interface TextDocumentOptions {
  /** The field of object records that holds the text (string records are the text themselves). */
  textField: string;
  /**
   * Keep at most this many documents (null or undefined: all). Unlike the spec's record `limit`, the rest are
   * still read, so that `original` counts them.
   */
  limit?: number | null;
}

/**
 * Reads the documents of a resolved dataset, keeps the first `opts.limit` and tokenises those.
 *
 * @throws {UserError} for a record that could not be parsed, or whose text is not a string; the message names
 * the record's file, line and index (and the field).
 */
export async function readTextDocuments(
  ds: ResolvedDataset,
  spec: ReadOptions,
  tok: Pick<TextTokenizer, "encode">,
  opts: TextDocumentOptions,
): Promise<TextDocuments> {
  const limit = opts.limit ?? Infinity;
  const docs: TextDocument[] = [];
  let original = 0;
  for await (const rec of iterateRecords(ds, spec)) {
    const where = formatSource(rec.source);
    if (rec.error) throw new UserError(`${where}: ${rec.error}`);
    const v = rec.value as Record<string, unknown>;
    const text = typeof v === "string" ? v : v?.[opts.textField];
    if (typeof text !== "string") {
      throw new UserError(`${where}: field "${opts.textField}": expected the document text (a string)`);
    }
    if (text === "") continue;
    original++;
    // read on past the limit: a bad record later in the file is still an error, and `original` counts all
    if (docs.length >= limit) continue;
    docs.push({ text, source: where, ids: tok.encode(text, { addSpecialTokens: false }) });
  }
  return { docs, original };
}
