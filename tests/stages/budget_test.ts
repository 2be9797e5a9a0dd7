// countSteps predicts exactly how many steps a BatchIterator yields for epoch, step and token budgets.
import assert from "node:assert/strict";
import { BatchIterator, type BatchOptions, memorySource } from "../../data/batches.ts";
import { countSteps } from "../../stages/shared/budget.ts";
import { lrSchedule } from "../../stages/shared/train_params.ts";
import { Rng } from "../../util/rng.ts";

function source(n: number, seed: number) {
  const rng = new Rng(seed);
  return memorySource(Array.from({ length: n }, () => {
    const len = 2 + rng.int(30);
    return { ids: new Array(len).fill(3), mask: new Array(len).fill(1) };
  }));
}

function iterated(src: ReturnType<typeof source>, o: BatchOptions): number {
  const it = new BatchIterator(src, o);
  let n = 0;
  while (it.next()) n++;
  return n;
}

Deno.test("countSteps equals the BatchIterator's step count for every budget kind", () => {
  const src = source(37, 1);
  const cases: BatchOptions[] = [
    { batchSize: 4, seed: 1 },
    { batchSize: 4, gradAccumSteps: 3, seed: 1, epochs: 2 },
    { batchSize: 5, seed: 1, epochs: 3, dropLast: true },
    { batchSize: 4, seed: 1, maxSteps: 50 },
    { batchSize: 4, gradAccumSteps: 2, seed: 2, maxTokens: 2000 },
    { batchSize: 3, seed: 3, maxTokens: 777, shuffle: false },
    { batchSize: 4, seed: 4, maxTokens: 100000, maxSteps: 20 },
  ];
  for (const o of cases) assert.equal(countSteps(src, o), iterated(src, o), JSON.stringify(o));
  const pairs = source(40, 2);
  const po: BatchOptions = { batchSize: 3, seed: 5, pairs: true, maxTokens: 900 };
  assert.equal(countSteps(pairs, po), iterated(pairs, po));
});

Deno.test("lrSchedule: warm-up from the ratio (rounded up), cosine to 0, warmup_steps overrides the ratio", () => {
  const base = {
    learning_rate: 1e-3,
    lr_scheduler_type: "cosine" as const,
    warmup_ratio: 0.1,
    warmup_steps: null,
  };
  // deno-lint-ignore no-explicit-any
  const s = lrSchedule(base as any, 95);
  assert.equal(s(0), 0);
  assert.ok(Math.abs(s(10) - 1e-3) < 1e-12, "peak after ceil(9.5) = 10 warm-up steps");
  assert.ok(s(94) < 1e-5 && s(94) > 0);
  // deno-lint-ignore no-explicit-any
  const w = lrSchedule({ ...base, warmup_steps: 2, lr_scheduler_type: "constant" } as any, 95);
  assert.deepEqual([w(0), w(1), w(2), w(50)], [0, 5e-4, 1e-3, 1e-3]);
});
