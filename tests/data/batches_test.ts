import assert from "node:assert/strict";
import {
  BatchIterator,
  type BatchOptions,
  DataOrder,
  memorySource,
  stepsForTokenBudget,
  type TrainStep,
} from "../../data/batches.ts";
import { TokenFileReader, writeTokenFile } from "../../data/token_file.ts";
import { assertUserError, withTempDir } from "./helpers.ts";

/** n sequences of varying length; token values encode (sequence, position) so rows can be checked. */
function synthetic(n: number, maxLen = 9) {
  return Array.from({ length: n }, (_, i) => {
    const len = 2 + ((i * 5) % (maxLen - 1));
    return {
      ids: Array.from({ length: len }, (_, t) => 1000 * i + t + 1),
      mask: Array.from({ length: len }, (_, t): number => (t === 0 || (i % 3 === 0 && t < 2) ? 0 : 1)),
    };
  });
}

const drain = (it: BatchIterator) => {
  const out: TrainStep[] = [];
  for (let s = it.next(); s; s = it.next()) out.push(s);
  return out;
};

Deno.test("batches: DataOrder draws a fresh seeded permutation per epoch and restores exactly", () => {
  const a = new DataOrder(10, { seed: 7 }), b = new DataOrder(10, { seed: 7 });
  const ea = Array.from({ length: 30 }, () => a.next());
  assert.deepEqual(ea, Array.from({ length: 30 }, () => b.next()));
  for (let e = 0; e < 3; e++) {
    assert.deepEqual([...ea.slice(10 * e, 10 * e + 10)].sort((x, y) => x - y), [...Array(10).keys()]);
  }
  assert.notDeepEqual(ea.slice(0, 10), ea.slice(10, 20));
  assert.notDeepEqual(
    ea.slice(0, 10),
    Array.from({ length: 10 }, () => new DataOrder(10, { seed: 8 }).next()),
  );
  const plain = new DataOrder(4, { seed: 1, shuffle: false });
  assert.deepEqual(Array.from({ length: 6 }, () => plain.next()), [0, 1, 2, 3, 0, 1]);
  const c = new DataOrder(10, { seed: 7 });
  for (let i = 0; i < 13; i++) c.next();
  const saved = JSON.parse(JSON.stringify(c.state()));
  const rest = Array.from({ length: 20 }, () => c.next());
  const r = DataOrder.restore(10, { seed: 7 }, saved);
  assert.deepEqual(Array.from({ length: 20 }, () => r.next()), rest);
  assert.deepEqual(rest, ea.slice(13, 30).concat(Array.from({ length: 3 }, () => b.next())));
});

Deno.test("batches: padded micro-batches carry ids, masks (0 on padding and first tokens) and positions", () => {
  const data = synthetic(7);
  const it = new BatchIterator(memorySource(data), { batchSize: 3, seed: 1, shuffle: false, padId: -1 });
  const steps = drain(it);
  assert.equal(steps.length, 3);
  assert.deepEqual(steps.map((s) => s.micro[0].rows), [3, 3, 1]);
  const m = steps[0].micro[0];
  // padded to this micro-batch's longest sequence, rounded up to a multiple of 8, at most the source's longest
  const batchLongest = Math.max(...m.sequences.map((i) => data[i].ids.length));
  const sourceLongest = Math.max(...data.map((d) => d.ids.length));
  assert.equal(m.seqLen, Math.min(sourceLongest, Math.ceil(batchLongest / 8) * 8));
  for (let r = 0; r < 3; r++) {
    const d = data[m.sequences[r]];
    const row = (a: Int32Array | Uint8Array) => Array.from(a.subarray(r * m.seqLen, (r + 1) * m.seqLen));
    assert.deepEqual(row(m.ids), [...d.ids, ...Array(m.seqLen - d.ids.length).fill(-1)]);
    assert.deepEqual(row(m.mask), [0, ...d.mask.slice(1), ...Array(m.seqLen - d.ids.length).fill(0)]);
    assert.deepEqual(row(m.positions).slice(0, d.ids.length), [...d.ids.keys()]);
    assert.equal(m.lengths[r], d.ids.length);
  }
  const total = data.reduce((a, d) => a + d.ids.length, 0);
  assert.equal(steps.reduce((a, s) => a + s.tokens, 0), total);
  assert.equal(
    steps.reduce((a, s) => a + s.targetTokens, 0),
    data.reduce((a, d) => a + d.mask.slice(1).reduce((x, y) => x + y, 0), 0),
  );
  assert.equal(it.position().tokensSeen, total);
});

Deno.test("batches: resuming from a serialised position reproduces the uninterrupted run exactly", async () => {
  const src = memorySource(synthetic(17));
  const opts: BatchOptions = { batchSize: 3, gradAccumSteps: 2, seed: "run-1", epochs: 3 };
  const full = drain(new BatchIterator(src, opts));
  assert.equal(full.length, Math.ceil((17 * 3) / 6));
  const first = new BatchIterator(src, opts);
  for (let i = 0; i < 4; i++) first.next();
  const pos = JSON.parse(JSON.stringify(first.position()));
  const resumed = drain(new BatchIterator(src, opts, pos));
  const key = (s: TrainStep) => ({
    step: s.step,
    epoch: s.epoch,
    seqs: s.micro.map((m) => m.sequences),
    ids: s.micro.map((m) => Array.from(m.ids)),
  });
  assert.deepEqual(resumed.map(key), full.slice(4).map(key));
  // Each epoch visits every item once.
  const visits = full.flatMap((s) => s.micro.flatMap((m) => m.sequences));
  assert.equal(visits.length, 51);
  for (let e = 0; e < 3; e++) assert.equal(new Set(visits.slice(17 * e, 17 * e + 17)).size, 17);
  assert.deepEqual(full.map((s) => s.epoch).slice(0, 4), [0, 0, 0, 1], "step 2 starts with item 12 of 17");
  await assertUserError(() => new BatchIterator(memorySource(synthetic(16)), opts, pos), "17 items", "16");
});

Deno.test("batches: token and step budgets, epochs and dropLast", async () => {
  const src = memorySource(Array.from({ length: 10 }, () => ({ ids: [1, 2, 3, 4], mask: [0, 1, 1, 1] })));
  const byTokens = drain(new BatchIterator(src, { batchSize: 2, seed: 0, maxTokens: 20 }));
  assert.equal(byTokens.length, 3, "8 + 8 < 20 <= 24 tokens: the crossing step is the last");
  assert.equal(byTokens.length, stepsForTokenBudget(20, 8));
  const long = drain(new BatchIterator(src, { batchSize: 4, seed: 0, maxTokens: 1000 }));
  assert.equal(long.length, Math.ceil(1000 / 16), "a token budget cycles through epochs");
  assert.equal(drain(new BatchIterator(src, { batchSize: 4, seed: 0, maxSteps: 5 })).length, 5);
  assert.equal(drain(new BatchIterator(src, { batchSize: 4, seed: 0 })).length, 3, "one epoch by default");
  assert.equal(drain(new BatchIterator(src, { batchSize: 4, seed: 0, dropLast: true })).length, 2);
  assert.equal(drain(new BatchIterator(src, { batchSize: 4, seed: 0, epochs: 2 })).length, 5);
  await assertUserError(() => new BatchIterator(src, { batchSize: 0, seed: 0 }), "batch_size");
  await assertUserError(
    () => new BatchIterator(src, { batchSize: 2, seed: 0, seqLen: 3 }),
    "seq_len 3",
    "(4)",
  );
});

Deno.test("batches: preference pairs and padding-free layout", () => {
  const seqs = Array.from({ length: 8 }, (_, i) => ({
    ids: Array.from({ length: 3 + (i % 3) }, (_, t) => 100 * i + t),
    mask: Array.from({ length: 3 + (i % 3) }, (_, t) => (t >= 2 ? 1 : 0)),
  }));
  const pairs = new BatchIterator(memorySource(seqs), { batchSize: 2, seed: 3, pairs: true });
  const s = pairs.next()!;
  const [c0, c1, r0, r1] = s.micro[0].sequences;
  assert.deepEqual([c0 % 2, c1 % 2, r0, r1], [0, 0, c0 + 1, c1 + 1]);
  const free = new BatchIterator(memorySource(seqs), {
    batchSize: 3,
    seed: 3,
    shuffle: false,
    layout: "padding_free",
  });
  const m = free.next()!.micro[0];
  assert.equal(m.rows, 1);
  assert.deepEqual(Array.from(m.cuSeqlens!), [0, 3, 7, 12]);
  assert.deepEqual(Array.from(m.ids), [...seqs[0].ids, ...seqs[1].ids, ...seqs[2].ids]);
  assert.deepEqual(Array.from(m.positions), [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]);
  assert.deepEqual(Array.from(m.mask), [0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1]);
});

Deno.test("batches: reading from a token file gives the same batches as from memory", async () => {
  const data = synthetic(11);
  await withTempDir(async (dir) => {
    const info = {
      format: "text",
      layout: "sequences" as const,
      max_length: 16,
      packing: "none" as const,
      tokenizer: { digest: "t", bos_id: 1, eos_id: 2, vocab_size: null },
    };
    await writeTokenFile(`${dir}/t.tokens`, info, data);
    using r = await TokenFileReader.open(`${dir}/t.tokens`);
    const opts: BatchOptions = { batchSize: 4, seed: 9 };
    const a = drain(new BatchIterator(r, opts)), b = drain(new BatchIterator(memorySource(data), opts));
    assert.deepEqual(
      a.map((s) => s.micro.map((m) => Array.from(m.ids))),
      b.map((s) => s.micro.map((m) => Array.from(m.ids))),
    );
  });
});

Deno.test("batches: each padded micro-batch is as wide as its longest sequence (pad_to_multiple_of), or fixed with 0", () => {
  // lengths 3, 3, 3, 3, 30, 30: the short items share micro-batches without the long ones' padding
  const data = [3, 3, 3, 3, 30, 30].map((len, i) => ({
    ids: Array.from({ length: len }, (_, t) => 100 * i + t + 1),
    mask: Array.from({ length: len }, () => 1),
  }));
  const widths = (opts: { padToMultipleOf?: number }) =>
    drain(new BatchIterator(memorySource(data), { batchSize: 2, seed: 0, shuffle: false, ...opts }))
      .map((s) => s.micro[0].seqLen);
  assert.deepEqual(widths({}), [8, 8, 30]);
  assert.deepEqual(widths({ padToMultipleOf: 4 }), [4, 4, 30]);
  assert.deepEqual(widths({ padToMultipleOf: 64 }), [30, 30, 30]);
  assert.deepEqual(widths({ padToMultipleOf: 0 }), [30, 30, 30]);
  assert.throws(
    () => new BatchIterator(memorySource(data), { batchSize: 2, seed: 0, padToMultipleOf: -1 }),
    /pad_to_multiple_of: expected a non-negative integer/,
  );
});
