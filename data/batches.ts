/**
 * Data order and batching for training: seeded shuffles per epoch, micro-batches for gradient accumulation,
 * token budgets, and a serialisable position for exact resume from a checkpoint.
 *
 * Order. Items (sequences, or preference pairs) are visited in epochs; each epoch is a permutation drawn with
 * {@linkcode Rng} (Fisher-Yates) from one generator seeded by the recipe's seed, so epoch e's order depends
 * on the seed and e only. Without shuffling, items go in file order. The order is one endless stream across
 * epochs: a batch can take the last items of one epoch and the first of the next.
 *
 * Position. `{epoch, index, epochRngState, step, tokensSeen, targetTokensSeen, numItems}` after any step is
 * plain JSON. Resuming restores the generator to the state at the start of that epoch, redraws the epoch's
 * permutation, and continues at `index`, so a resumed run yields exactly the steps an uninterrupted run would.
 *
 * Batches. A step is `gradAccumSteps` micro-batches of `batchSize` items. Layout `padded` gives [rows, seqLen]
 * ids and masks (right padding with `padId`, mask 0 on padding); layout `padding_free` concatenates a
 * micro-batch's sequences into one row with `cuSeqlens` boundaries and per-sequence position ids. Preference
 * pairs give 2*batchSize rows per micro-batch: all chosen rows, then all rejected rows (TRL's concatenated
 * order). Batch masks are ready for the loss: the first token of every sequence has mask 0 (nothing predicts
 * it), so `mask[t] = 1` means "add the loss of predicting ids[t] from position t-1".
 *
 * Budgets. Training stops at the first of `epochs`, `maxSteps` or `maxTokens` (tokens fed to the model, padding
 * excluded; the step that crosses the budget is the last). With none of them set, one epoch.
 *
 * @module
 */
import { Rng, type RngState } from "../util/rng.ts";
export type { RngState } from "../util/rng.ts";
import { UserError } from "../util/errors.ts";
import type { SequenceData, SequenceSource } from "./token_file.ts";

/** Serialisable position of a {@linkcode DataOrder}. */
export interface DataOrderState {
  /** Current epoch (0-based). */
  epoch: number;
  /** Next position within the epoch's order. */
  index: number;
  /** Generator state at the start of `epoch` (before its permutation was drawn). */
  epochRngState: RngState;
}

/** An endless, seeded order over `numItems` items, epoch by epoch. */
export class DataOrder {
  /** Items per epoch. */
  readonly numItems: number;
  readonly #shuffle: boolean;
  readonly #rng: Rng;
  #epoch = 0;
  #index = 0;
  #epochState: RngState;
  #perm: Uint32Array;

  /** Starts at epoch 0; `seed` seeds the shuffles (ignored when `shuffle` is false). */
  constructor(numItems: number, opts: { seed: number | string; shuffle?: boolean }) {
    if (!Number.isInteger(numItems) || numItems <= 0) {
      throw new UserError(`training data: expected at least one sequence, found ${numItems}`);
    }
    this.numItems = numItems;
    this.#shuffle = opts.shuffle ?? true;
    this.#rng = new Rng(opts.seed);
    this.#epochState = this.#rng.getState();
    this.#perm = this.#draw();
  }

  /** The order at `state` (see {@linkcode DataOrder.state}). */
  static restore(
    numItems: number,
    opts: { seed: number | string; shuffle?: boolean },
    state: DataOrderState,
  ): DataOrder {
    const o = new DataOrder(numItems, opts);
    if (
      !Number.isInteger(state.epoch) || state.epoch < 0 || !Number.isInteger(state.index) ||
      state.index < 0 || state.index > numItems
    ) {
      throw new UserError(
        `data position: invalid epoch/index ${state.epoch}/${state.index} for ${numItems} items`,
      );
    }
    o.#rng.setState(state.epochRngState);
    o.#epochState = o.#rng.getState();
    o.#perm = o.#draw();
    o.#epoch = state.epoch;
    o.#index = state.index;
    return o;
  }

  #draw(): Uint32Array {
    const p = new Uint32Array(this.numItems);
    for (let i = 0; i < p.length; i++) p[i] = i;
    if (this.#shuffle) {
      for (let i = p.length - 1; i > 0; i--) {
        const j = this.#rng.int(i + 1);
        const t = p[i];
        p[i] = p[j];
        p[j] = t;
      }
    }
    return p;
  }

  /** The current epoch (0-based). */
  get epoch(): number {
    return this.#epoch;
  }

  /** The next item, moving to the next epoch (and its permutation) when this one is used up. */
  next(): number {
    if (this.#index >= this.numItems) {
      this.#epoch++;
      this.#index = 0;
      this.#epochState = this.#rng.getState();
      this.#perm = this.#draw();
    }
    return this.#perm[this.#index++];
  }

  /** Items left in the current epoch. */
  get remainingInEpoch(): number {
    return this.numItems - this.#index;
  }

  /** A snapshot for checkpoints. */
  state(): DataOrderState {
    return { epoch: this.#epoch, index: this.#index, epochRngState: structuredClone(this.#epochState) };
  }
}

/** How batches are laid out. */
export type BatchLayout = "padded" | "padding_free";

/** Options for {@linkcode BatchIterator}. */
export interface BatchOptions {
  /** Items per micro-batch (sequences, or pairs). */
  batchSize: number;
  /** Micro-batches per optimizer step (default 1). */
  gradAccumSteps?: number;
  /** `padded` (default) or `padding_free`. */
  layout?: BatchLayout;
  /** Largest padded width; default the longest sequence in the source. */
  seqLen?: number;
  /**
   * `padded` layout: each micro-batch is padded to its own longest sequence rounded up to a multiple of this
   * (TRL's `pad_to_multiple_of`), at most `seqLen`; 0 pads every micro-batch to `seqLen`. Default 8. Padding
   * is masked and every layer is causal, so this changes the work done, not the result.
   */
  padToMultipleOf?: number;
  /** Id used for padding (default 0; masked out either way). */
  padId?: number;
  /** Seed of the data order. */
  seed: number | string;
  /** Shuffle each epoch (default true). */
  shuffle?: boolean;
  /** Items are preference pairs: item i is sequences 2i (chosen) and 2i+1 (rejected). */
  pairs?: boolean;
  /** Stop after this many epochs. */
  epochs?: number;
  /** Stop after this many optimizer steps. */
  maxSteps?: number;
  /** Stop once this many (non-padding) tokens have been fed. */
  maxTokens?: number;
  /** Drop a final step that is smaller than a full one (default false). */
  dropLast?: boolean;
}

/** One micro-batch. */
export interface MicroBatch {
  /** Rows (2*items for pairs, 1 for padding_free). */
  rows: number;
  /** Width of every row. */
  seqLen: number;
  /** Token ids, row-major [rows, seqLen]. */
  ids: Int32Array;
  /** Loss mask, [rows, seqLen]; 0 on padding and on the first token of every sequence. */
  mask: Uint8Array;
  /** Valid (non-padding) tokens per row. */
  lengths: Int32Array;
  /** Position ids, [rows, seqLen] (0-based within each sequence; 0 on padding). */
  positions: Int32Array;
  /** padding_free only: boundaries of the concatenated sequences, [numSequences + 1]. */
  cuSeqlens?: Int32Array;
  /** The source sequences in this micro-batch, in row order (for pairs: chosen ones, then rejected ones). */
  sequences: number[];
  /** Non-padding tokens. */
  tokens: number;
  /** Tokens with mask 1. */
  targetTokens: number;
}

/** One optimizer step's data. */
export interface TrainStep {
  /** 0-based step number. */
  step: number;
  /** Epoch of the first item (0-based). */
  epoch: number;
  /** The micro-batches (gradAccumSteps of them, fewer only at the very end). */
  micro: MicroBatch[];
  /** Non-padding tokens over all micro-batches. */
  tokens: number;
  /** Target tokens over all micro-batches (normalise summed losses by this for a per-token mean). */
  targetTokens: number;
}

/** Serialisable iterator position (store it in checkpoints). */
export interface BatchPosition {
  /** The data order. */
  order: DataOrderState;
  /** Steps completed. */
  step: number;
  /** Tokens fed so far. */
  tokensSeen: number;
  /** Target tokens so far. */
  targetTokensSeen: number;
  /** Items in the data (checked on resume). */
  numItems: number;
}

/** Steps needed to feed `tokens` tokens at `tokensPerStep` per step (a "train for N tokens" budget). */
export function stepsForTokenBudget(tokens: number, tokensPerStep: number): number {
  if (!(tokens > 0) || !(tokensPerStep > 0)) {
    throw new RangeError("stepsForTokenBudget: positive values needed");
  }
  return Math.ceil(tokens / tokensPerStep);
}

/** Yields training steps from a {@linkcode SequenceSource}. */
export class BatchIterator {
  readonly #src: SequenceSource;
  readonly #opts:
    & Required<Pick<BatchOptions, "batchSize" | "gradAccumSteps" | "layout" | "padId">>
    & BatchOptions;
  readonly #seqLen: number;
  readonly #order: DataOrder;
  readonly #numItems: number;
  #step = 0;
  #tokensSeen = 0;
  #targetsSeen = 0;
  #itemsServed = 0;
  #done = false;

  /**
   * Creates an iterator at the start of the data, or at `position` when resuming.
   *
   * @throws {UserError} for invalid options, a sequence longer than `seqLen`, or a position from other data.
   */
  constructor(source: SequenceSource, opts: BatchOptions, position?: BatchPosition) {
    const posInt = (v: unknown) => typeof v === "number" && Number.isInteger(v) && v > 0;
    if (!posInt(opts.batchSize)) {
      throw new UserError(`batch_size: expected a positive integer, found ${opts.batchSize}`);
    }
    const accum = opts.gradAccumSteps ?? 1;
    if (!posInt(accum)) {
      throw new UserError(`gradient_accumulation_steps: expected a positive integer, found ${accum}`);
    }
    for (const k of ["epochs", "maxSteps", "maxTokens"] as const) {
      if (opts[k] !== undefined && !posInt(opts[k])) {
        throw new UserError(`${k}: expected a positive integer, found ${opts[k]}`);
      }
    }
    const layout = opts.layout ?? "padded";
    if (layout !== "padded" && layout !== "padding_free") throw new UserError(`layout: unknown "${layout}"`);
    const multiple = opts.padToMultipleOf;
    if (multiple !== undefined && !(Number.isInteger(multiple) && multiple >= 0)) {
      throw new UserError(`pad_to_multiple_of: expected a non-negative integer, found ${multiple}`);
    }
    this.#src = source;
    this.#opts = { ...opts, gradAccumSteps: accum, layout, padId: opts.padId ?? 0 };
    if (opts.pairs && source.numSequences % 2 !== 0) {
      throw new UserError(
        `preference data: expected pairs of sequences, found ${source.numSequences} sequences`,
      );
    }
    this.#numItems = opts.pairs ? source.numSequences / 2 : source.numSequences;
    let longest = 0;
    for (let i = 0; i < source.numSequences; i++) longest = Math.max(longest, source.sequenceLength(i));
    this.#seqLen = opts.seqLen ?? longest;
    if (layout === "padded" && longest > this.#seqLen) {
      throw new UserError(
        `seq_len ${this.#seqLen} is shorter than the longest tokenized sequence (${longest})`,
      );
    }
    const orderOpts = { seed: opts.seed, shuffle: opts.shuffle };
    if (position) {
      if (position.numItems !== this.#numItems) {
        throw new UserError(
          `cannot resume: the checkpoint's data position is for ${position.numItems} items, the data has ` +
            `${this.#numItems} (the tokenized data changed)`,
        );
      }
      this.#order = DataOrder.restore(this.#numItems, orderOpts, position.order);
      this.#step = position.step;
      this.#tokensSeen = position.tokensSeen;
      this.#targetsSeen = position.targetTokensSeen;
      this.#itemsServed = position.order.epoch * this.#numItems + position.order.index;
    } else {
      this.#order = new DataOrder(this.#numItems, orderOpts);
    }
  }

  /** The padded width (layout `padded`). */
  get seqLen(): number {
    return this.#seqLen;
  }

  /** Steps completed. */
  get step(): number {
    return this.#step;
  }

  /** The position after the last step returned (JSON-serialisable). */
  position(): BatchPosition {
    return {
      order: this.#order.state(),
      step: this.#step,
      tokensSeen: this.#tokensSeen,
      targetTokensSeen: this.#targetsSeen,
      numItems: this.#numItems,
    };
  }

  #itemsLeft(): number {
    const o = this.#opts;
    const epochs = o.epochs ?? (o.maxSteps === undefined && o.maxTokens === undefined ? 1 : undefined);
    return epochs === undefined ? Infinity : epochs * this.#numItems - this.#itemsServed;
  }

  /** The next step, or null when a budget is used up. */
  next(): TrainStep | null {
    const o = this.#opts;
    if (this.#done) return null;
    if (
      (o.maxSteps !== undefined && this.#step >= o.maxSteps) ||
      (o.maxTokens !== undefined && this.#tokensSeen >= o.maxTokens)
    ) {
      this.#done = true;
      return null;
    }
    const perStep = o.batchSize * o.gradAccumSteps;
    const left = this.#itemsLeft();
    if (left <= 0 || (o.dropLast && left < perStep)) {
      this.#done = true;
      return null;
    }
    const epoch = this.#order.remainingInEpoch === 0 ? this.#order.epoch + 1 : this.#order.epoch;
    const micro: MicroBatch[] = [];
    let budget = Math.min(left, perStep);
    while (budget > 0) {
      const n = Math.min(o.batchSize, budget);
      const items: number[] = [];
      for (let k = 0; k < n; k++) items.push(this.#order.next());
      this.#itemsServed += n;
      budget -= n;
      micro.push(this.#assemble(items));
    }
    const tokens = micro.reduce((a, m) => a + m.tokens, 0);
    const targetTokens = micro.reduce((a, m) => a + m.targetTokens, 0);
    this.#tokensSeen += tokens;
    this.#targetsSeen += targetTokens;
    return { step: this.#step++, epoch, micro, tokens, targetTokens };
  }

  #assemble(items: number[]): MicroBatch {
    const seqIdx = this.#opts.pairs ? [...items.map((i) => 2 * i), ...items.map((i) => 2 * i + 1)] : items;
    const seqs = seqIdx.map((i) => this.#src.read(i));
    return this.#opts.layout === "padded" ? this.#padded(seqIdx, seqs) : this.#paddingFree(seqIdx, seqs);
  }

  #padded(seqIdx: number[], seqs: SequenceData[]): MicroBatch {
    const rows = seqs.length;
    const m = this.#opts.padToMultipleOf ?? 8;
    const longest = seqs.reduce((a, sq) => Math.max(a, sq.ids.length), 1);
    const T = m > 0 ? Math.min(this.#seqLen, Math.ceil(longest / m) * m) : this.#seqLen;
    const ids = new Int32Array(rows * T).fill(this.#opts.padId);
    const mask = new Uint8Array(rows * T);
    const positions = new Int32Array(rows * T);
    const lengths = new Int32Array(rows);
    let tokens = 0, targets = 0;
    seqs.forEach((s, r) => {
      const n = s.ids.length;
      lengths[r] = n;
      tokens += n;
      for (let t = 0; t < n; t++) {
        ids[r * T + t] = s.ids[t];
        positions[r * T + t] = t;
        const m = t === 0 ? 0 : s.mask[t];
        mask[r * T + t] = m;
        targets += m;
      }
    });
    return {
      rows,
      seqLen: T,
      ids,
      mask,
      lengths,
      positions,
      sequences: seqIdx,
      tokens,
      targetTokens: targets,
    };
  }

  #paddingFree(seqIdx: number[], seqs: SequenceData[]): MicroBatch {
    const total = seqs.reduce((a, s) => a + s.ids.length, 0);
    const ids = new Int32Array(total), mask = new Uint8Array(total), positions = new Int32Array(total);
    const cu = new Int32Array(seqs.length + 1);
    let at = 0, targets = 0;
    seqs.forEach((s, k) => {
      cu[k] = at;
      for (let t = 0; t < s.ids.length; t++) {
        ids[at + t] = s.ids[t];
        positions[at + t] = t;
        const m = t === 0 ? 0 : s.mask[t];
        mask[at + t] = m;
        targets += m;
      }
      at += s.ids.length;
    });
    cu[seqs.length] = at;
    return {
      rows: 1,
      seqLen: total,
      ids,
      mask,
      lengths: new Int32Array([total]),
      positions,
      cuSeqlens: cu,
      sequences: seqIdx,
      tokens: total,
      targetTokens: targets,
    };
  }
}

/** A {@linkcode SequenceSource} over sequences in memory (tests, small evaluation sets). */
export function memorySource(seqs: { ids: ArrayLike<number>; mask: ArrayLike<number> }[]): SequenceSource {
  return {
    numSequences: seqs.length,
    sequenceLength: (i) => seqs[i].ids.length,
    read: (i) => ({
      ids: Uint32Array.from(seqs[i].ids),
      mask: Uint8Array.from(seqs[i].mask),
      docStarts: [0],
      docRecords: [i],
    }),
  };
}
