import assert from "node:assert/strict";
import { verifyGreedy, verifySampled } from "../../models/speculative.ts";
import { sampleFrom } from "../../models/sampling.ts";
import { Rng } from "../../util/rng.ts";

Deno.test("speculative greedy: accepts the agreeing prefix, then emits the target's token", () => {
  assert.deepEqual(verifyGreedy([5, 6, 7], [5, 6, 9, 1]), {
    accepted: 2,
    tokens: [5, 6, 9],
    finished: false,
  });
  assert.deepEqual(verifyGreedy([5, 6], [5, 6, 8]), { accepted: 2, tokens: [5, 6, 8], finished: false });
  assert.deepEqual(verifyGreedy([4], [5, 6]), { accepted: 0, tokens: [5], finished: false });
  // end of sequence inside the accepted prefix stops there
  assert.deepEqual(verifyGreedy([5, 2, 7], [5, 2, 7, 7], 2), { accepted: 2, tokens: [5, 2], finished: true });
});

Deno.test("speculative sampling: emitted tokens follow the target distribution (chi-square)", () => {
  // Context-free toy models: the target always has p, the draft always q, so every emitted token must be
  // distributed as p, and consecutive pairs as p x p, whatever q is.
  const p = [0.5, 0.2, 0.15, 0.1, 0.05];
  const q = [0.1, 0.1, 0.3, 0.2, 0.3];
  const rng = new Rng(2024);
  const K = 3;
  const first = new Array(5).fill(0);
  const pairs = new Array(25).fill(0);
  const n = 40_000;
  let acceptedTotal = 0, rounds = 0;
  for (let i = 0; i < n; i++) {
    // generate a 2-token continuation with as many verification rounds as it takes
    const out: number[] = [];
    while (out.length < 2) {
      const draft = Array.from({ length: K }, () => sampleFrom(q, rng));
      const r = verifySampled(draft, Array(K).fill(q), Array(K + 1).fill(p), rng);
      acceptedTotal += r.accepted;
      rounds++;
      out.push(...r.tokens);
    }
    first[out[0]]++;
    pairs[out[0] * 5 + out[1]]++;
  }
  const chi = (counts: number[], probs: number[]) => {
    const tot = counts.reduce((a, b) => a + b);
    return counts.reduce((s, c, i) => s + (c - tot * probs[i]) ** 2 / (tot * probs[i]), 0);
  };
  // 99.9% quantiles: 4 dof 18.5, 24 dof 51.2
  assert.ok(chi(first, p) < 18.5, `first-token chi2 ${chi(first, p)}`);
  const pp = p.flatMap((a) => p.map((b) => a * b));
  assert.ok(chi(pairs, pp) < 51.2, `pair chi2 ${chi(pairs, pp)}`);
  // the expected acceptance rate per token is sum(min(p, q)) = 0.1 + 0.1 + 0.15 + 0.1 + 0.05 = 0.5
  // expected accepted per round with K=3 and acceptance 0.5 each: 0.5 + 0.25 + 0.125 = 0.875
  const meanAccepted = acceptedTotal / rounds;
  assert.ok(Math.abs(meanAccepted - 0.875) < 0.03, `mean accepted ${meanAccepted}`);
});

Deno.test("speculative sampling: identical draft and target accept everything", () => {
  const p = [0.3, 0.7];
  const rng = new Rng(1);
  for (let i = 0; i < 100; i++) {
    const draft = [sampleFrom(p, rng), sampleFrom(p, rng)];
    assert.equal(verifySampled(draft, [p, p], [p, p, p], rng).accepted, 2);
  }
});
