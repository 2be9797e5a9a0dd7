import assert from "node:assert/strict";
import { readTextDocuments, type TextDocumentOptions } from "../../data/documents.ts";
import { type ReadOptions, resolveDataset } from "../../data/records.ts";
import type { TextTokenizer } from "../../data/tokenizer.ts";
import { assertUserError, fixture, fixtureTokenizer, withTempDir, writeTree } from "./helpers.ts";

/** An encoder that records what it was asked, so tests see which texts were tokenised and how. */
function recordingEncoder() {
  const calls: { text: string; addSpecialTokens?: boolean }[] = [];
  return {
    calls,
    encode(text: string, opts?: { addSpecialTokens?: boolean }): number[] {
      calls.push({ text, addSpecialTokens: opts?.addSpecialTokens });
      return [...text].map((c) => c.codePointAt(0)!);
    },
  };
}

function read(
  path: string,
  spec: ReadOptions,
  opts: TextDocumentOptions,
  tok: Pick<TextTokenizer, "encode"> = recordingEncoder(),
) {
  return resolveDataset({ path, ...spec }).then((ds) => readTextDocuments(ds, spec, tok, opts));
}

Deno.test("documents: plain-string records; empty texts are neither kept nor counted", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/s.jsonl`;
    await writeTree(dir, { "s.jsonl": '"ab"\n""\n"c"\n' });
    const tok = recordingEncoder();
    const { docs, original } = await read(path, {}, { textField: "text" }, tok);
    assert.equal(original, 2);
    assert.deepEqual(docs, [
      { text: "ab", source: `${path}:1 (record 0)`, ids: [97, 98] },
      { text: "c", source: `${path}:3 (record 2)`, ids: [99] },
    ]);
    // documents are scored as they are: the windows add BOS, the tokenizer must not
    assert.deepEqual(tok.calls, [{ text: "ab", addSpecialTokens: false }, {
      text: "c",
      addSpecialTokens: false,
    }]);
  });
});

Deno.test("documents: object records read the named field", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, { "o.jsonl": '{"body":"x","text":"not this"}\n{"body":""}\n{"body":"yz"}\n' });
    const { docs, original } = await read(`${dir}/o.jsonl`, {}, { textField: "body" });
    assert.equal(original, 2);
    assert.deepEqual(docs.map((d) => d.text), ["x", "yz"]);
  });
});

Deno.test("documents: text paragraphs tokenised by the fixture tokenizer without special tokens", async () => {
  const path = fixture("text/tinystories_valid.txt");
  const tok = fixtureTokenizer();
  const { docs, original } = await read(
    path,
    { textMode: "paragraphs", limit: 5 },
    { textField: "text" },
    tok,
  );
  assert.equal(original, 5);
  assert.equal(docs.length, 5);
  assert.equal(docs[1].source, `${path}:3 (record 1)`);
  for (const d of docs) assert.deepEqual(d.ids, tok.encode(d.text, { addSpecialTokens: false }));
  assert.notEqual(docs[0].ids[0], tok.bosId);
});

Deno.test("documents: limit keeps the first N documents (and tokenises only those); original counts all", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/l.jsonl`;
    await writeTree(dir, {
      "l.jsonl": ["a", "", "b", "c", "", "d"].map((t) => JSON.stringify({ text: t })).join("\n"),
    });
    const tok = recordingEncoder();
    const some = await read(path, {}, { textField: "text", limit: 2 }, tok);
    // the empty record between a and b does not use up the limit
    assert.deepEqual(some.docs.map((d) => d.text), ["a", "b"]);
    assert.equal(some.original, 4);
    assert.deepEqual(tok.calls.map((c) => c.text), ["a", "b"]);
    for (const limit of [null, undefined, 10]) {
      const all = await read(path, {}, { textField: "text", limit });
      assert.deepEqual(all.docs.map((d) => d.text), ["a", "b", "c", "d"], `limit ${limit}`);
      assert.equal(all.original, 4);
    }
    // the spec's record window applies first: original counts only what it lets through
    const window = await read(path, { offset: 2, limit: 3 }, { textField: "text", limit: 1 });
    assert.deepEqual(window.docs.map((d) => d.text), ["b"]);
    assert.equal(window.original, 2);
  });
});

Deno.test("documents: a record without a string text is a UserError naming file, record and field", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "n.jsonl": '{"text":"fine"}\n{"text":42}\n',
      "m.jsonl": '{"text":"fine"}\n{"body":"x"}\n',
      "bad.jsonl": '{"text":"fine"}\n{"text": oops}\n',
    });
    await assertUserError(
      () => read(`${dir}/n.jsonl`, {}, { textField: "text" }),
      `${dir}/n.jsonl:2 (record 1)`,
      'field "text": expected the document text (a string)',
    );
    // past the limit the record is still read, so it is still an error
    await assertUserError(
      () => read(`${dir}/m.jsonl`, {}, { textField: "text", limit: 1 }),
      `${dir}/m.jsonl:2 (record 1)`,
      'field "text"',
    );
    await assertUserError(
      () => read(`${dir}/bad.jsonl`, {}, { textField: "text" }),
      `${dir}/bad.jsonl:2 (record 1)`,
    );
  });
});
