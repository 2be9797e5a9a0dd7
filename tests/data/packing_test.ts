import assert from "node:assert/strict";
import { packSequences, SequencePacker, singleSequence } from "../../data/packing.ts";
import { loadExamples, type TextExample } from "../../data/formats.ts";
import { readRecords } from "../../data/records.ts";
import { type TokenizedSequence, tokenizeText } from "../../data/tokenize.ts";
import { fixture, fixtureTokenizer } from "./helpers.ts";

async function storyDocs(n: number): Promise<TokenizedSequence[]> {
  const recs = await readRecords({ path: fixture("text/tinystories_valid.txt"), limit: n });
  const { examples } = await loadExamples(recs, { format: "text" });
  return (examples as TextExample[]).map((e) => tokenizeText(fixtureTokenizer(), e));
}

Deno.test("packing: windows of max_length concatenate back to the documents, masks and starts preserved", async () => {
  const docs = await storyDocs(120);
  const L = 128;
  const packed = packSequences(docs, L);
  const allIds = docs.flatMap((d) => d.ids), allMask = docs.flatMap((d) => d.mask);
  assert.deepEqual(packed.flatMap((p) => p.ids), allIds);
  assert.deepEqual(packed.flatMap((p) => p.mask), allMask);
  assert.ok(packed.slice(0, -1).every((p) => p.ids.length === L));
  assert.equal(packed.at(-1)!.ids.length, allIds.length - L * (packed.length - 1));
  // Document starts: absolute positions equal the running document offsets, and each starts with BOS.
  const absolute = packed.flatMap((p, w) => p.docStarts.map((s) => w * L + s));
  let off = 0;
  const expected = docs.map((d) => ((off += d.ids.length), off - d.ids.length));
  assert.deepEqual(absolute, expected);
  assert.deepEqual(packed.flatMap((p) => p.docRecords), docs.map((d) => d.source.index));
  for (const p of packed) for (const s of p.docStarts) assert.equal(p.ids[s], 1);
  const dropped = packSequences(docs, L, { dropRemainder: true });
  assert.equal(dropped.length, packed.length - 1);
});

Deno.test("packing: a document longer than several windows spans them without starts in the middle", () => {
  const doc = (n: number, index: number): TokenizedSequence => ({
    ids: Array.from({ length: n }, (_, i) => (i === 0 ? 1 : 10 + (i % 50))),
    mask: Array.from({ length: n }, (_, i) => (i === 0 ? 0 : 1)),
    source: { file: "f", index },
  });
  const p = new SequencePacker(16);
  assert.deepEqual(p.push(doc(5, 0)), []);
  const out = p.push(doc(50, 1));
  assert.equal(out.length, 3);
  assert.deepEqual(out.map((w) => w.docStarts), [[0, 5], [], []]);
  assert.deepEqual(out.map((w) => w.docRecords), [[0, 1], [], []]);
  const rest = p.push(doc(3, 2));
  assert.equal(rest.length, 0);
  const last = p.finish();
  assert.equal(last.length, 1);
  assert.deepEqual([last[0].ids.length, last[0].docStarts, last[0].docRecords], [58 - 48, [7], [2]]);
  assert.deepEqual(p.finish(), []);
  assert.throws(() => new SequencePacker(1), RangeError);
  const single = singleSequence(doc(20, 3), 8);
  assert.deepEqual([single.ids.length, single.docStarts, single.docRecords], [8, [0], [3]]);
});
