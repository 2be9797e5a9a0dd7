import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { BatchIterator } from "../../data/batches.ts";
import { TokenFileReader } from "../../data/token_file.ts";
import { tokenizeDatasetToFile } from "../../data/tokenize_dataset.ts";
import { assertUserError, fixture, fixtureTokenizer, withTempDir, writeTree } from "./helpers.ts";

const ctx = () => ({
  tokenizer: fixtureTokenizer(),
  tokenizerInfo: { digest: "sha256:stories260k-test", bos_id: 1, eos_id: 2, vocab_size: 512 },
});
const sha = async (p: string) => createHash("sha256").update(await Deno.readFile(p)).digest("hex");

Deno.test("tokenize dataset: alpaca -> chat template -> packed token file -> batches, deterministic bytes", async () => {
  await withTempDir(async (dir) => {
    const params = {
      dataset: { path: fixture("chat/alpaca_en_demo.json"), limit: 40 },
      format: "prompt_completion" as const,
      maxLength: 256,
    };
    const a = await tokenizeDatasetToFile(`${dir}/a.tokens`, params, ctx());
    const b = await tokenizeDatasetToFile(`${dir}/b.tokens`, params, ctx());
    assert.equal(await sha(`${dir}/a.tokens`), await sha(`${dir}/b.tokens`));
    assert.deepEqual(a.report, { policy: "error", seen: 40, kept: 40, skipped: 0, problems: [] });
    assert.equal(a.header.num_docs, 40);
    assert.equal(a.header.num_tokens, a.stats.tokens);
    assert.equal(a.header.num_target_tokens, a.stats.targetTokens);
    assert.deepEqual(a.header.meta, { records: { seen: 40, kept: 40, skipped: 0 }, stats: { ...a.stats } });
    assert.equal(b.header.payload_sha256, a.header.payload_sha256);
    using r = await TokenFileReader.open(`${dir}/a.tokens`);
    assert.equal(r.header.packing, "packed");
    for (let i = 0; i < r.numSequences - 1; i++) assert.equal(r.sequenceLength(i), 256);
    const it = new BatchIterator(r, { batchSize: 4, gradAccumSteps: 2, seed: 1 });
    let steps = 0, tokens = 0;
    for (let s = it.next(); s; s = it.next()) {
      steps++;
      tokens += s.tokens;
      for (const m of s.micro) assert.equal(m.seqLen, 256);
    }
    assert.equal(tokens, a.header.num_tokens);
    assert.equal(steps, Math.ceil(r.numSequences / 8));
  });
});

Deno.test("tokenize dataset: preference pairs, and text with packing none / padding_free", async () => {
  await withTempDir(async (dir) => {
    const pref = await tokenizeDatasetToFile(`${dir}/p.tokens`, {
      dataset: { path: fixture("preference/dpo_en_demo.json"), limit: 6 },
      format: "preference",
      maxLength: 128,
    }, ctx());
    assert.equal(pref.header.layout, "pairs");
    assert.equal(pref.header.num_sequences, 12);
    assert.ok(pref.header.max_sequence_length <= 128);
    assert.ok(pref.stats.truncated > 0, "long dpo_en_demo answers are truncated at 128");
    for (const packing of ["none", "padding_free"] as const) {
      const t = await tokenizeDatasetToFile(`${dir}/${packing}.tokens`, {
        dataset: { path: fixture("text/tinystories_valid.txt"), limit: 30 },
        format: "text",
        maxLength: 64,
        packing,
      }, ctx());
      assert.equal(t.header.num_sequences, 30);
      assert.equal(t.header.packing, packing);
      assert.ok(t.header.max_sequence_length <= 64);
    }
    await assertUserError(
      () =>
        tokenizeDatasetToFile(`${dir}/x.tokens`, {
          dataset: { path: fixture("preference/dpo_en_demo.json") },
          format: "preference",
          maxLength: 128,
          packing: "packed",
        }, ctx()),
      "packing: none",
    );
  });
});

Deno.test("tokenize dataset: on_invalid skip counts bad records; error leaves no file", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "chat.jsonl": [
        { messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "hello" }] },
        { messages: [{ role: "user", content: "no answer" }] },
        "not json",
        { conversations: [{ from: "human", value: "q" }, { from: "gpt", value: "a" }] },
      ].map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join("\n"),
    });
    const params = { dataset: { path: `${dir}/chat.jsonl` }, format: "chat" as const, maxLength: 32 };
    const skipped = await tokenizeDatasetToFile(`${dir}/s.tokens`, { ...params, onInvalid: "skip" }, ctx());
    assert.deepEqual([skipped.report.seen, skipped.report.kept, skipped.report.skipped], [4, 2, 2]);
    assert.deepEqual(skipped.report.problems.map((p) => p.source.line), [2, 3]);
    assert.deepEqual(skipped.header.meta.records, { seen: 4, kept: 2, skipped: 2 });
    await assertUserError(
      () => tokenizeDatasetToFile(`${dir}/e.tokens`, params, ctx()),
      "chat.jsonl:2 (record 1)",
      "chat.jsonl:3 (record 2)",
    );
    assert.ok(
      ![...Deno.readDirSync(dir)].some((e) => e.name.startsWith("e.tokens") || e.name.includes(".tmp")),
    );
    const ac = new AbortController();
    ac.abort(new Error("stop"));
    await assert.rejects(
      () => tokenizeDatasetToFile(`${dir}/c.tokens`, params, { ...ctx(), signal: ac.signal }),
      /stop/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), ["chat.jsonl", "s.tokens"]);
  });
});
