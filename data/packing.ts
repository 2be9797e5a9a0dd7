/**
 * Packing tokenised documents into training sequences.
 *
 * Modes (the `packing` parameter of the tokenize stage):
 * - `packed`: documents are concatenated in order into one stream and cut into windows of exactly `max_length`
 *   tokens, masks carried along (TRL's "wrapped" packing). A document can continue from one window into the
 *   next; the last window may be shorter (batches pad it; `dropRemainder` drops it). Attention is NOT reset at
 *   document boundaries (like TRL's simple packing): each window is one causal sequence, so a document sees the
 *   tail of the previous one. Documents are separated by what tokenisation put at their ends and starts (EOS
 *   after text, BOS before the next document, or the chat template's turn markers). Where each document starts
 *   inside a window is recorded (`docStarts`), so that a later attention-resetting kernel or position-id
 *   reset can use them without re-tokenising.
 * - `none`: one sequence per document, truncated to `max_length` (keep the start); batches pad them.
 * - `padding_free`: like `none` in the token file; batches concatenate the sequences of a batch into one row with
 *   cumulative boundaries (varlen style) instead of padding.
 *
 * Note that the first token of a window has no context inside the window, so its mask bit never contributes
 * (the loss starts at position 1 of every sequence; see tokenize.ts for the mask convention).
 *
 * @module
 */
import type { TokenizedSequence } from "./tokenize.ts";

/** How documents become training sequences. */
export type PackingMode = "packed" | "none" | "padding_free";

/** All packing modes, for schema checks. */
export const PACKING_MODES: readonly PackingMode[] = ["packed", "none", "padding_free"];

/** A training sequence made of one or more (pieces of) documents. */
export interface PackedSequence {
  /** Token ids. */
  ids: number[];
  /** Loss mask (see tokenize.ts). */
  mask: number[];
  /** Positions in `ids` where a document begins (position 0 only if a document begins exactly there). */
  docStarts: number[];
  /** For each entry of `docStarts`, the index of the document's record in its file. */
  docRecords: number[];
}

/** Streams documents into fixed windows of `maxLength` tokens. */
export class SequencePacker {
  readonly #maxLength: number;
  // Pending tokens are #ids[#head..]; the consumed prefix is dropped in bulk so long documents stay linear.
  #ids: number[] = [];
  #mask: number[] = [];
  #head = 0;
  // Document starts, as absolute indices into #ids, with their record indices.
  #starts: number[] = [];
  #records: number[] = [];

  /** Creates a packer for windows of `maxLength` tokens. */
  constructor(maxLength: number) {
    if (!Number.isInteger(maxLength) || maxLength < 2) {
      throw new RangeError(`SequencePacker: maxLength must be an integer >= 2, got ${maxLength}`);
    }
    this.#maxLength = maxLength;
  }

  /** Adds a document; returns the windows it completed (possibly none). */
  push(doc: TokenizedSequence): PackedSequence[] {
    if (doc.ids.length === 0) return [];
    this.#starts.push(this.#ids.length);
    this.#records.push(doc.source.index);
    for (let i = 0; i < doc.ids.length; i++) {
      this.#ids.push(doc.ids[i]);
      this.#mask.push(doc.mask[i]);
    }
    const out: PackedSequence[] = [];
    while (this.#ids.length - this.#head >= this.#maxLength) out.push(this.#take(this.#maxLength));
    this.#compact();
    return out;
  }

  /** Ends the stream: the final shorter window (unless empty or `dropRemainder`). */
  finish(dropRemainder = false): PackedSequence[] {
    const left = this.#ids.length - this.#head;
    const out = left === 0 || dropRemainder ? [] : [this.#take(left)];
    this.#ids = [];
    this.#mask = [];
    this.#head = 0;
    this.#starts = [];
    this.#records = [];
    return out;
  }

  #take(n: number): PackedSequence {
    const from = this.#head, to = from + n;
    const ids = this.#ids.slice(from, to);
    const mask = this.#mask.slice(from, to);
    const docStarts: number[] = [], docRecords: number[] = [];
    let k = 0;
    while (k < this.#starts.length && this.#starts[k] < to) {
      docStarts.push(this.#starts[k] - from);
      docRecords.push(this.#records[k]);
      k++;
    }
    if (k > 0) {
      this.#starts.splice(0, k);
      this.#records.splice(0, k);
    }
    this.#head = to;
    return { ids, mask, docStarts, docRecords };
  }

  #compact(): void {
    if (this.#head === 0 || this.#head < this.#ids.length / 2) return;
    const h = this.#head;
    this.#ids = this.#ids.slice(h);
    this.#mask = this.#mask.slice(h);
    this.#starts = this.#starts.map((s) => s - h);
    this.#head = 0;
  }
}

/** Packs documents into windows (convenience over {@linkcode SequencePacker}). */
export function packSequences(
  docs: Iterable<TokenizedSequence>,
  maxLength: number,
  opts: { dropRemainder?: boolean } = {},
): PackedSequence[] {
  const p = new SequencePacker(maxLength);
  const out: PackedSequence[] = [];
  for (const d of docs) out.push(...p.push(d));
  out.push(...p.finish(opts.dropRemainder));
  return out;
}

/** One document as a sequence on its own (modes `none` and `padding_free`), truncated to `maxLength`. */
export function singleSequence(doc: TokenizedSequence, maxLength: number): PackedSequence {
  const n = Math.min(doc.ids.length, maxLength);
  return {
    ids: doc.ids.slice(0, n),
    mask: doc.mask.slice(0, n),
    docStarts: [0],
    docRecords: [doc.source.index],
  };
}
