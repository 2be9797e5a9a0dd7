import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  bosEachWindows,
  countBytes,
  countWords,
  droppedTokens,
  evalWindows,
  perplexityMetrics,
  rollingWindows,
} from "../../data/text_windows.ts";
import { fixture, fixtureTokenizer } from "./helpers.ts";

Deno.test("text windows: the reference fixture's 123 windows of [1] + ids[255w : 255(w+1)]", async () => {
  const bytes = (await Deno.readFile(fixture("text/tinystories_valid.txt"))).subarray(0, 65536);
  assert.equal(
    createHash("sha256").update(bytes).digest("hex"),
    "b43fab827af96eb643a8cb093cecc832a873dd53aa0e58002132683eca5ade11",
  );
  const ref: number[] = JSON.parse(
    await Deno.readTextFile(fixture("reference/llama_stories260k/ce_token_ids.json")),
  ).ids_without_bos;
  const ids = fixtureTokenizer().encode(new TextDecoder().decode(bytes), { addSpecialTokens: false });
  assert.deepEqual(ids, ref, "tokenizer.json reproduces the fixture's ids");
  const windows = bosEachWindows(ids, 256, 1);
  assert.equal(windows.length, 123);
  assert.equal(droppedTokens(ids, windows), 36);
  windows.forEach((w, i) => {
    assert.equal(w.input.length, 256);
    assert.equal(w.targets.length, 255);
    assert.equal(w.scoreFrom, 0);
    assert.deepEqual(w.input, [1, ...ref.slice(255 * i, 255 * (i + 1))]);
    // Position t's logits predict input[t + 1]: BOS is never a target.
    assert.deepEqual(w.targets, w.input.slice(1));
  });
  const kept = bosEachWindows(ids, 256, 1, { keepTrailing: true });
  assert.equal(kept.length, 124);
  assert.deepEqual(kept[123].targets, ref.slice(-36));
});

Deno.test("text windows: lm-eval rolling windows score every token once with up to L tokens of context", () => {
  const ids = Array.from({ length: 23 }, (_, i) => 100 + i);
  const L = 8;
  const w = rollingWindows(ids, L, 1);
  assert.deepEqual(w.flatMap((x) => x.targets), ids);
  assert.deepEqual(w[0], { input: [1, ...ids.slice(0, 7)], targets: ids.slice(0, 8), scoreFrom: 0 });
  assert.deepEqual(w[1], { input: ids.slice(7, 15), targets: ids.slice(8, 16), scoreFrom: 0 });
  // Last window: 7 new targets, but still L tokens of input (overlapping the previous window).
  assert.deepEqual(w[2], { input: ids.slice(14, 22), targets: ids.slice(16), scoreFrom: 1 });
  // Independent check: the token at each scored position is the document token just before the target.
  let d = 0;
  for (const x of w) {
    assert.ok(x.input.length <= L);
    x.targets.forEach((t, j) => {
      assert.equal(t, ids[d + j]);
      assert.equal(x.input[x.scoreFrom + j], d + j === 0 ? 1 : ids[d + j - 1]);
    });
    d += x.targets.length;
  }
  assert.deepEqual(rollingWindows([5, 6], 8, 1), [{ input: [1, 5], targets: [5, 6], scoreFrom: 0 }]);
  assert.deepEqual(rollingWindows([], 8, 1), []);
  assert.deepEqual(evalWindows(ids, { maxLength: L, prefixId: 1 }), w);
  assert.equal(droppedTokens(ids, w), 0);
  assert.throws(() => rollingWindows(ids, 1, 1), RangeError);
});

Deno.test("text windows: word and byte counts follow lm-eval; metrics use its formulas", () => {
  assert.equal(countWords("Once upon a time"), 4);
  assert.equal(
    countWords("  two\n\nwords "),
    4,
    "leading and trailing whitespace add empty pieces, as re.split does",
  );
  assert.equal(countWords("a\x1cb"), 2, "U+001C is whitespace for Python");
  assert.equal(countWords("a\ufeffb"), 1, "U+FEFF is not");
  assert.equal(countBytes("héllo"), 6);
  const m = perplexityMetrics({ nll: 100, tokens: 50, words: 40, bytes: 200 });
  assert.equal(m.mean_nll, 2);
  assert.equal(m.token_perplexity, Math.exp(2));
  assert.equal(m.word_perplexity, Math.exp(2.5));
  assert.equal(m.byte_perplexity, Math.exp(0.5));
  assert.equal(m.bits_per_byte, 0.5 / Math.LN2);
});
