// The tokenize stage through the runner: token artifact layout, summary, skipped-record warnings, errors naming
// the record, several inputs, and preference pairs made from multiple-choice items.
import assert from "node:assert/strict";
import { join } from "node:path";
import { TokenFileReader } from "../../data/token_file.ts";
import { lastEvents, tempProject } from "../pipelines/helpers.ts";
import { CLOZE, fixture, outputPath, runRecipe, stageTestOptions, TEACHER, TRAIN_TEXT } from "./helpers.ts";

function recipe(params: string, data: string): string {
  return `name: tok
description: tokenize
stages:
  tok:
    kind: tokenize
    params: { ${params} }
    inputs: { tokenizer: ${TEACHER}, data: ${data} }
`;
}

Deno.test("tokenize: packed text rows, summary.json, final metrics", stageTestOptions, async () => {
  const p = tempProject();
  try {
    const r = await runRecipe(p.write("r.yaml", recipe("max_length: 64, limit: 30", `[${TRAIN_TEXT}]`)));
    assert.equal(r.code, 0, r.stderr);
    const dir = outputPath(p, "tok", "tokens");
    const reader = await TokenFileReader.open(join(dir, "tokens.bin"));
    try {
      assert.equal(reader.header.layout, "sequences");
      assert.equal(reader.header.packing, "packed");
      assert.equal(reader.sequenceLength(0), 64);
      const s = reader.read(0);
      assert.equal(s.ids[0], 1, "BOS first");
      assert.equal(s.mask[0], 0);
    } finally {
      reader.close();
    }
    const summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.equal(summary.records.kept, 30);
    assert.equal(summary.records.skipped, 0);
    assert.equal(summary.inputs[0].ref, TRAIN_TEXT);
    assert.ok(summary.num_tokens > 30 * 20);
  } finally {
    await p.cleanup();
  }
});

Deno.test(
  "tokenize: invalid records stop the stage naming file and record, or are skipped with a warning",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const data = p.write(
        "data/chat.jsonl",
        [
          JSON.stringify({
            messages: [{ role: "user", content: "Hi" }, { role: "assistant", content: "Hello!" }],
          }),
          JSON.stringify({ messages: "not a list" }),
          JSON.stringify({
            messages: [{ role: "user", content: "Tell a story" }, { role: "assistant", content: "Once." }],
          }),
        ].join("\n") + "\n",
      );
      const bad = await runRecipe(p.write("bad.yaml", recipe("format: chat, max_length: 64", `[${data}]`)));
      assert.equal(bad.code, 2);
      assert.match(bad.stderr, /chat\.jsonl/);
      assert.match(bad.stderr, /chat\.jsonl:2 \(record 1\): field "messages"/);
      const ok = await runRecipe(
        p.write("ok.yaml", recipe("format: chat, max_length: 64, on_invalid: skip", `[${data}]`)),
      );
      assert.equal(ok.code, 0, ok.stderr);
      const warns = lastEvents(p).filter((e) =>
        e.type === "log" && (e as { level: string }).level === "warn"
      );
      assert.equal(warns.length, 1);
      assert.match(JSON.stringify(warns[0]), /skipped 1 of 3 records/);
      const summary = JSON.parse(Deno.readTextFileSync(join(outputPath(p, "tok", "tokens"), "summary.json")));
      assert.deepEqual(summary.records, { seen: 3, kept: 2, skipped: 1 });
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "tokenize: several inputs are concatenated; chat data masks prompt tokens",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const alpaca = fixture("chat/alpaca_en_demo.json");
      const r = await runRecipe(
        p.write(
          "r.yaml",
          recipe(
            "format: prompt_completion, max_length: 128, packing: none, limit: 5",
            `[${alpaca}, ${alpaca}]`,
          ),
        ),
      );
      assert.equal(r.code, 0, r.stderr);
      const reader = await TokenFileReader.open(join(outputPath(p, "tok", "tokens"), "tokens.bin"));
      try {
        assert.equal(reader.numSequences, 10);
        const a = reader.read(0), b = reader.read(5);
        assert.deepEqual([...a.ids], [...b.ids], "the second input repeats the first");
        const targets = a.mask.reduce((x, y) => x + y, 0);
        assert.ok(targets > 0 && targets < a.ids.length, "only the completion is a target");
      } finally {
        reader.close();
      }
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "tokenize: pairs_from_choices makes preference pairs from cloze items",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const r = await runRecipe(
        p.write(
          "r.yaml",
          recipe(
            "format: preference, pairs_from_choices: true, template: none, max_length: 96, limit: 6",
            `[${CLOZE}]`,
          ),
        ),
      );
      assert.equal(r.code, 0, r.stderr);
      const reader = await TokenFileReader.open(join(outputPath(p, "tok", "tokens"), "tokens.bin"));
      try {
        assert.equal(reader.header.layout, "pairs");
        assert.equal(reader.numPairs, 6);
        const { chosen, rejected } = reader.readPair(0);
        assert.notDeepEqual([...chosen.ids], [...rejected.ids]);
        // the prompt (the story context) is shared and masked; the endings are targets
        let k = 0;
        while (chosen.ids[k] === rejected.ids[k]) k++;
        assert.ok(k > 10);
        assert.equal(chosen.mask.subarray(0, k).reduce((x, y) => x + y, 0), 0);
        assert.ok(chosen.mask.subarray(k).every((m) => m === 1));
      } finally {
        reader.close();
      }
      const wrong = await runRecipe(
        p.write(
          "w.yaml",
          recipe("format: text, pairs_from_choices: true, max_length: 96, limit: 6", `[${CLOZE}]`),
        ),
      );
      assert.equal(wrong.code, 2);
      assert.match(wrong.stderr, /pairs_from_choices needs format: preference/);
    } finally {
      await p.cleanup();
    }
  },
);
