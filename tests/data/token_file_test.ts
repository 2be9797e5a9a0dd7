import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { loadExamples, type PreferenceExample, type TextExample } from "../../data/formats.ts";
import { packSequences } from "../../data/packing.ts";
import { readRecords } from "../../data/records.ts";
import {
  type TokenFileInfo,
  TokenFileReader,
  TokenFileWriter,
  writeTokenFile,
} from "../../data/token_file.ts";
import { pairToSequences, tokenizePreference, tokenizeText } from "../../data/tokenize.ts";
import { assertUserError, fixture, fixtureTokenizer, withTempDir } from "./helpers.ts";

const info = (meta: Record<string, unknown> = {}): TokenFileInfo => ({
  format: "text",
  layout: "sequences",
  max_length: 64,
  packing: "packed",
  tokenizer: { digest: "sha256:test", bos_id: 1, eos_id: 2, vocab_size: 512 },
  meta,
});

async function packedStories(n = 40, L = 64) {
  const recs = await readRecords({ path: fixture("text/tinystories_valid.txt"), limit: n });
  const { examples } = await loadExamples(recs, { format: "text" });
  const docs = (examples as TextExample[]).map((e) => tokenizeText(fixtureTokenizer(), e));
  return packSequences(docs, L);
}

const sha = async (p: string) => createHash("sha256").update(await Deno.readFile(p)).digest("hex");

Deno.test("token file: packed stories round-trip exactly, with header counts and document starts", async () => {
  const packed = await packedStories();
  await withTempDir(async (dir) => {
    const path = `${dir}/train.tokens`;
    const header = await writeTokenFile(path, info({ stats: { docs: 40 } }), packed);
    assert.equal(header.num_sequences, packed.length);
    assert.equal(header.num_tokens, packed.reduce((a, p) => a + p.ids.length, 0));
    assert.equal(header.num_target_tokens, packed.reduce((a, p) => a + p.mask.reduce((x, y) => x + y, 0), 0));
    assert.equal(header.num_docs, 40);
    assert.equal(header.max_sequence_length, 64);
    const r = await TokenFileReader.open(path);
    try {
      assert.deepEqual(r.header, header);
      for (let i = 0; i < packed.length; i++) {
        const s = r.read(i);
        assert.deepEqual(Array.from(s.ids), packed[i].ids);
        assert.deepEqual(Array.from(s.mask), packed[i].mask);
        assert.deepEqual(s.docStarts, packed[i].docStarts);
        assert.deepEqual(s.docRecords, packed[i].docRecords);
        assert.equal(r.sequenceLength(i), packed[i].ids.length);
      }
      await r.verify();
      assert.throws(() => r.read(packed.length), RangeError);
    } finally {
      r.close();
    }
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name),
      ["train.tokens"],
      "no temporary files left",
    );
  });
});

Deno.test("token file: equal inputs give byte-identical files (meta key order does not matter)", async () => {
  const packed = await packedStories(10);
  await withTempDir(async (dir) => {
    await writeTokenFile(`${dir}/a`, info({ x: 1, params: { b: 2, a: 1 } }), packed);
    await writeTokenFile(`${dir}/b`, info({ params: { a: 1, b: 2 }, x: 1 }), packed);
    assert.equal(await sha(`${dir}/a`), await sha(`${dir}/b`));
    await writeTokenFile(`${dir}/c`, info({ x: 2, params: { a: 1, b: 2 } }), packed);
    assert.notEqual(await sha(`${dir}/a`), await sha(`${dir}/c`));
  });
});

Deno.test("token file: preference pairs layout", async () => {
  const tok = fixtureTokenizer();
  const recs = await readRecords({ path: fixture("preference/dpo_en_demo.json"), limit: 4 });
  const { examples } = await loadExamples(recs, { format: "preference" });
  const pairs = (examples as PreferenceExample[]).map((e) => tokenizePreference(tok, e));
  await withTempDir(async (dir) => {
    const path = `${dir}/pairs.tokens`;
    await writeTokenFile(
      path,
      { ...info(), format: "preference", layout: "pairs", packing: "none", max_length: null },
      pairs.flatMap((p) =>
        pairToSequences(p).map((s) => ({ ids: s.ids, mask: s.mask, docRecords: [s.source.index] }))
      ),
    );
    using r = await TokenFileReader.open(path);
    assert.equal(r.numPairs, 4);
    const { chosen, rejected } = r.readPair(2);
    assert.deepEqual(Array.from(chosen.ids), [...pairs[2].prompt, ...pairs[2].chosen]);
    assert.deepEqual(Array.from(rejected.ids).slice(pairs[2].prompt.length), pairs[2].rejected);
    assert.equal(chosen.mask.indexOf(1), pairs[2].prompt.length);
    assert.deepEqual(chosen.docRecords, [2]);
  });
});

Deno.test("token file: failed or aborted writes leave nothing under the final name", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/x.tokens`;
    const w = await TokenFileWriter.create(path, info());
    await w.append({ ids: [1, 5, 6], mask: [0, 1, 1] });
    await assert.rejects(() => w.append({ ids: [1, 600], mask: [0, 1] }), /id 600 out of range/);
    await assert.rejects(() => w.append({ ids: [1, 5], mask: [0, 2] }), /mask value 2/);
    await assert.rejects(() => w.append({ ids: [], mask: [] }), /empty sequence/);
    await w.abort();
    assert.deepEqual([...Deno.readDirSync(dir)], []);
    await assert.rejects(
      () => writeTokenFile(path, { ...info(), layout: "pairs" }, [{ ids: [1, 2], mask: [0, 1] }]),
      /even number/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)], []);
    await assert.rejects(
      () => writeTokenFile(path, info({ huge: "x".repeat(5000) }), [{ ids: [1, 2], mask: [0, 1] }]),
      /reserved/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)], []);
  });
});

Deno.test("token file: damaged files are refused with the file's name", async () => {
  const packed = await packedStories(10);
  await withTempDir(async (dir) => {
    const good = `${dir}/good.tokens`;
    const header = await writeTokenFile(good, info(), packed);
    const bytes = await Deno.readFile(good);
    const variant = async (name: string, edit: (b: Uint8Array) => Uint8Array) => {
      const p = `${dir}/${name}`;
      await Deno.writeFile(p, edit(bytes.slice()));
      return p;
    };
    const truncated = await variant("truncated.tokens", (b) => b.subarray(0, b.length - 9));
    await assertUserError(
      () => TokenFileReader.open(truncated),
      "truncated.tokens",
      "re-run the tokenize stage",
    );
    const magic = await variant("magic.tokens", (b) => (b[0] = 0x58, b));
    await assertUserError(() => TokenFileReader.open(magic), "magic.tokens", "magic");
    const json = await variant("json.tokens", (b) => (b[16] = 0x5b, b));
    await assertUserError(() => TokenFileReader.open(json), "json.tokens", "not valid JSON");
    const longer = await variant("longer.tokens", (b) => new Uint8Array([...b, 0]));
    await assertUserError(() => TokenFileReader.open(longer), "longer.tokens", "bytes");
    const offsets = await variant("offsets.tokens", (b) => {
      new DataView(b.buffer).setBigUint64(header.sections.offsets.offset + 8, 10n ** 6n, true);
      return b;
    });
    await assertUserError(() => TokenFileReader.open(offsets), "offsets.tokens", "sequence");
    await assertUserError(() => TokenFileReader.open(`${dir}/none.tokens`), "none.tokens", "cannot open");
    // Damage that only shows when reading or verifying.
    const mask = await variant("mask.tokens", (b) => (b[header.sections.mask.offset + 70] = 7, b));
    using m = await TokenFileReader.open(mask);
    await assertUserError(() => m.read(1), "mask.tokens", "sequence 1 token 6");
    const flip = await variant("flip.tokens", (b) => (b[header.sections.ids.offset + 40] ^= 1, b));
    using f = await TokenFileReader.open(flip);
    await assertUserError(() => f.verify(), "flip.tokens", "payload sha256");
  });
});
