import assert from "node:assert/strict";
import { argmax, sampleToken, samplingDistribution } from "../../models/sampling.ts";
import { Rng } from "../../util/rng.ts";

const logits = [2.0, 1.0, 0.5, 0.5, -1.0, 3.0];

Deno.test("sampling: greedy is argmax (first index on ties)", () => {
  assert.equal(argmax(logits), 5);
  assert.equal(argmax([1, 3, 3]), 1);
  assert.equal(sampleToken(logits, { temperature: 0 }, new Rng(1)), 5);
});

Deno.test("sampling: temperature softmax, then top-k, then top-p as in HF generate", () => {
  const p = samplingDistribution(logits, { temperature: 0.5 });
  const e = logits.map((l) => Math.exp(l / 0.5));
  const z = e.reduce((a, b) => a + b);
  p.forEach((v, i) => assert.ok(Math.abs(v - e[i] / z) < 1e-12));
  const k2 = samplingDistribution(logits, { temperature: 1, topK: 2 });
  assert.deepEqual([...k2].map((v) => v > 0), [true, false, false, false, false, true]);
  assert.ok(Math.abs(k2[5] - Math.exp(3) / (Math.exp(3) + Math.exp(2))) < 1e-12);
  // top-p: probabilities at T=1 are about [0.233, 0.086, 0.052, 0.052, 0.012, 0.634]:
  // 0.634 < 0.8, 0.634 + 0.233 >= 0.8 -> keep two tokens
  const p8 = samplingDistribution(logits, { temperature: 1, topP: 0.8 });
  assert.deepEqual([...p8].map((v) => v > 0), [true, false, false, false, false, true]);
  const p5 = samplingDistribution(logits, { temperature: 1, topP: 0.5 });
  assert.deepEqual([...p5].map((v) => v > 0), [false, false, false, false, false, true]);
});

Deno.test("sampling: empirical frequencies match the distribution (chi-square, 5 dof)", () => {
  const rng = new Rng(123);
  const opts = { temperature: 1.3 };
  const p = samplingDistribution(logits, opts);
  const n = 60_000;
  const counts = new Array(6).fill(0);
  for (let i = 0; i < n; i++) counts[sampleToken(logits, opts, rng)]++;
  const chi2 = counts.reduce((s, c, i) => s + (c - n * p[i]) ** 2 / (n * p[i]), 0);
  // 99.9% quantile of chi-square with 5 degrees of freedom is 20.5
  assert.ok(chi2 < 20.5, `chi2 ${chi2}`);
});

Deno.test("sampling: equal seeds give equal token streams", () => {
  const a = new Rng(9), b = new Rng(9);
  const opts = { temperature: 0.8, topK: 4, topP: 0.95 };
  const sa = Array.from({ length: 50 }, () => sampleToken(logits, opts, a));
  const sb = Array.from({ length: 50 }, () => sampleToken(logits, opts, b));
  assert.deepEqual(sa, sb);
});
