/**
 * How many optimizer steps a training budget (epochs, steps or tokens) gives on a dataset, computed before
 * training starts: the learning-rate schedule needs its total length, and progress needs a total.
 *
 * @module
 */
import { type BatchOptions, DataOrder } from "../../data/batches.ts";
import type { SequenceSource } from "../../data/token_file.ts";

/**
 * The number of steps a `BatchIterator` with these options yields on `source` (same stopping rules: the first of
 * epochs, maxSteps and maxTokens; one epoch when none is set). A token budget is followed through the seeded
 * data order on sequence lengths alone, so it is exact without reading any tokens.
 */
export function countSteps(source: SequenceSource, o: BatchOptions): number {
  const numItems = o.pairs ? source.numSequences / 2 : source.numSequences;
  const perStep = o.batchSize * (o.gradAccumSteps ?? 1);
  const epochs = o.epochs ?? (o.maxSteps === undefined && o.maxTokens === undefined ? 1 : undefined);
  let steps = Infinity;
  if (epochs !== undefined) {
    const items = epochs * numItems;
    steps = o.dropLast ? Math.floor(items / perStep) : Math.ceil(items / perStep);
  }
  if (o.maxSteps !== undefined) steps = Math.min(steps, o.maxSteps);
  if (o.maxTokens === undefined) return steps;
  const len = (item: number) =>
    o.pairs
      ? source.sequenceLength(2 * item) + source.sequenceLength(2 * item + 1)
      : source.sequenceLength(item);
  const order = new DataOrder(numItems, { seed: o.seed, shuffle: o.shuffle });
  let tokens = 0, n = 0;
  while (n < steps && tokens < o.maxTokens) {
    for (let k = 0; k < perStep; k++) tokens += len(order.next());
    n++;
  }
  return n;
}
