// The DPO benchmark's split and scoring rules (bench/dpo_quality.ts), on the real cloze fixture: the held-out
// split shares no ending with the train pairs under --overlap drop, the naive split is reported as conflicting,
// and reward accuracy counts ties as wrong.
import assert from "node:assert/strict";
import { type ClozeItem, DEFAULTS, lengthControl, rewardStats, splitCloze } from "../../bench/dpo_quality.ts";

const CLOZE = new URL("../../fixtures/eval/tinystories_cloze.jsonl", import.meta.url);
const items: ClozeItem[] = Deno.readTextFileSync(CLOZE).trim().split("\n").map((l) => JSON.parse(l));

Deno.test("dpo_quality: --overlap drop leaves no held-out ending in any train pair", () => {
  const s = splitCloze(items, { ...DEFAULTS, heldOut: 400, pairsPerItem: 3, overlap: "drop" });
  assert.equal(s.heldItems.length, 400);
  assert.equal(s.trainItems.length, 1200);
  assert.deepEqual(s.heldItems[0], items[1200]);
  assert.equal(s.heldPairs.length, 1200);
  assert.equal(s.trainPairs.length + s.dropped, 3600);
  assert.ok(s.trainPairs.length > 1000, `${s.trainPairs.length} train pairs`);
  const held = new Set(s.heldItems.flatMap((it) => it.endings.map((e) => " " + e)));
  for (const p of s.trainPairs) assert.ok(!held.has(p.chosen) && !held.has(p.rejected), p.id);
  assert.equal(s.heldConflicts.filter((c) => c).length, 0);
  // pairs follow the evaluate stage's cloze convention
  const it = items[1200], p = s.heldPairs[0];
  assert.equal(p.prompt, it.ctx);
  assert.equal(p.chosen, " " + it.endings[it.label]);
  assert.notEqual(p.rejected, p.chosen);
  assert.equal(s.heldPairsNoContext[0].prompt, "");
  assert.equal(s.heldPairsNoContext[0].chosen, it.endings[it.label]);
});

Deno.test("dpo_quality: the naive split trains most held-out sentences the other way", () => {
  const s = splitCloze(items, { ...DEFAULTS, heldOut: 400, pairsPerItem: 3, overlap: "keep" });
  assert.equal(s.trainPairs.length, 3600);
  const conflicts = s.heldConflicts.filter((c) => c).length;
  assert.ok(conflicts > 600, `${conflicts} conflicting held-out pairs`);
  const one = splitCloze(items, { ...DEFAULTS, heldOut: 400, pairsPerItem: 1, overlap: "keep" });
  assert.equal(one.trainPairs.length, 1200);
  // one wrong ending per item, rotating through the three
  for (const i of [0, 1, 2, 3]) {
    const others = items[i].endings.filter((_, j) => j !== items[i].label);
    assert.equal(one.trainPairs[i].rejected, " " + others[i % 3]);
  }
  assert.throws(() => splitCloze(items, { ...DEFAULTS, pairsPerItem: 2 }), /pairs-per-item/);
});

Deno.test("dpo_quality: reward accuracy counts ties as wrong and splits by length", () => {
  const ref = { chosen: new Float32Array([-5, -5, -5, -5]), rejected: new Float32Array([-6, -6, -6, -6]) };
  const pol = { chosen: new Float32Array([-5, -4, -5, -7]), rejected: new Float32Array([-6, -6, -5, -6]) };
  // rewards (beta 0.5): tie, +1 vs 0, 0 vs +0.5, -1 vs 0
  const r = rewardStats(pol, ref, 0.5);
  assert.equal(r.pairs, 4);
  assert.equal(r.accuracy, 0.25);
  assert.ok(Math.abs(r.margin - (0 + 0.5 - 0.5 - 1) / 4) < 1e-7);
  assert.equal(rewardStats(ref, ref, 0.1).accuracy, 0);
  const len = { chosen: new Int32Array([3, 3, 9, 9]), rejected: new Int32Array([5, 5, 5, 9]) };
  const lc = lengthControl(pol, ref, len, 0.5);
  assert.deepEqual(lc.chosen_shorter, { pairs: 2, accuracy: 0.5 });
  assert.deepEqual(lc.chosen_longer, { pairs: 1, accuracy: 0 });
  assert.deepEqual(lc.equal_length, { pairs: 1, accuracy: 0 });
  assert.equal(lc.shorter_wins_rule, 0.5);
});
