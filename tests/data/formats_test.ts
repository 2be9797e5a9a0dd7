import assert from "node:assert/strict";
import {
  type ChatExample,
  loadExamples,
  type MultipleChoiceExample,
  type PreferenceExample,
  type PromptCompletionExample,
  RecordNormalizer,
  type TextExample,
} from "../../data/formats.ts";
import type { DatasetRecord } from "../../data/records.ts";
import { readRecords } from "../../data/records.ts";
import { assertUserError, fixture } from "./helpers.ts";

/** Records as a reader would give them, from in-memory values (file "mem.jsonl", line = index + 1). */
function mem(values: unknown[], file = "mem.jsonl"): DatasetRecord[] {
  return values.map((value, index) => ({ value, source: { file, index, line: index + 1 } }));
}

Deno.test("formats: alpaca_en_demo.json normalises to prompt/completion (instruction + \\n + input)", async () => {
  const recs = await readRecords({ path: fixture("chat/alpaca_en_demo.json") });
  const { examples, report } = await loadExamples(recs, { format: "prompt_completion" });
  assert.equal(examples.length, 999);
  assert.deepEqual(report, { policy: "error", seen: 999, kept: 999, skipped: 0, problems: [] });
  const raw = recs.map((r) => r.value as { instruction: string; input: string; output: string });
  const withInput = raw.findIndex((r) => r.input !== "");
  const ex = examples[withInput] as PromptCompletionExample;
  assert.equal(ex.prompt, `${raw[withInput].instruction}\n${raw[withInput].input}`);
  assert.equal(ex.completion, raw[withInput].output);
  assert.equal((examples[0] as PromptCompletionExample).prompt, raw[0].instruction);
  assert.equal(ex.source.index, withInput);
});

Deno.test("formats: dpo_en_demo.json (ShareGPT preference) normalises to message lists", async () => {
  const recs = await readRecords({ path: fixture("preference/dpo_en_demo.json") });
  const { examples } = await loadExamples(recs, { format: "preference" });
  assert.equal(examples.length, 300);
  const raw = recs.map((r) => r.value as { conversations: { from: string; value: string }[] });
  const first = examples[0] as PreferenceExample;
  assert.deepEqual(first.prompt, [{ role: "user", content: raw[0].conversations[0].value }]);
  assert.deepEqual(first.chosen, [{
    role: "assistant",
    content: (recs[0].value as { chosen: { value: string } }).chosen.value,
  }]);
  const sys = raw.findIndex((r) => r.conversations[0].from === "system");
  const withSys = examples[sys] as PreferenceExample;
  assert.equal((withSys.prompt as { role: string }[])[0].role, "system");
  const multi = raw.findIndex((r) => r.conversations.length === 5);
  assert.deepEqual((examples[multi] as PreferenceExample).prompt.length, 5);
  assert.equal(((examples[multi] as PreferenceExample).prompt as { role: string }[])[1].role, "assistant");
});

Deno.test("formats: chat accepts messages and ShareGPT conversations; problems name the field path", () => {
  const recs = mem([
    {
      messages: [{ role: "system", content: "be brief" }, { role: "user", content: "hi" }, {
        role: "assistant",
        content: "yo",
      }],
    },
    { conversations: [{ from: "human", value: "hi" }, { from: "gpt", value: "hello" }], system: "sys" },
    {
      messages: [{ role: "user", content: [{ type: "text", text: "a" }, { type: "text", text: "b" }] }, {
        role: "assistant",
        content: "c",
      }],
    },
    { messages: [{ role: "user", content: "hi" }, { role: "bot", content: "x" }] },
    { conversations: [{ from: "human", value: "hi" }, { from: "gpt" }] },
    { messages: [{ role: "user", content: "only a question" }] },
    {
      messages: [{ role: "user", content: "q" }, { role: "system", content: "late" }, {
        role: "assistant",
        content: "a",
      }],
    },
    { text: "no messages" },
  ]);
  const n = new RecordNormalizer({ format: "chat" });
  const out = recs.map((r) => n.normalize(r));
  assert.equal((out[0].example as ChatExample).messages.length, 3);
  assert.deepEqual((out[1].example as ChatExample).messages, [
    { role: "system", content: "sys" },
    { role: "user", content: "hi" },
    { role: "assistant", content: "hello" },
  ]);
  assert.equal((out[2].example as ChatExample).messages[0].content, "ab");
  assert.deepEqual(out[3].problems.map((p) => [p.field, p.source.line]), [["messages[1].role", 4]]);
  assert.match(out[3].problems[0].found, /"bot"/);
  assert.deepEqual(out[4].problems.map((p) => p.field), ["conversations[1].value"]);
  assert.deepEqual(out[5].problems.map((p) => [p.field, p.expected]), [[
    "messages",
    "at least one assistant turn",
  ]]);
  assert.deepEqual(out[6].problems.map((p) => p.field), ["messages[1].role"]);
  assert.deepEqual(out[7].problems.map((p) => p.field), ["messages"]);
});

Deno.test("formats: text with a configurable field; prompt/completion in TRL string and message forms", () => {
  const t = new RecordNormalizer({ format: "text", fields: { text: "content" } });
  assert.equal((t.normalize(mem([{ content: "doc" }])[0]).example as TextExample).text, "doc");
  assert.deepEqual(t.normalize(mem([{ content: "" }])[0]).problems.map((p) => p.expected), [
    "a non-empty string",
  ]);
  const pc = new RecordNormalizer({ format: "prompt_completion" });
  const r = mem([
    { prompt: "2+2=", completion: "4" },
    { prompt: [{ role: "user", content: "2+2?" }], completion: [{ role: "assistant", content: "4" }] },
    { prompt: [{ role: "user", content: "q" }], completion: [{ role: "user", content: "not an answer" }] },
    { instruction: "Say hi", output: "hi", system: "polite", history: [["q0", "a0"]] },
    { instruction: "Say hi", output: 3 },
    { question: "?" },
  ]);
  const o = r.map((x) => pc.normalize(x));
  assert.deepEqual(o[0].example, {
    kind: "prompt_completion",
    prompt: "2+2=",
    completion: "4",
    source: r[0].source,
  });
  assert.equal(((o[1].example as PromptCompletionExample).completion as unknown[]).length, 1);
  assert.deepEqual(o[2].problems.map((p) => p.field), ["completion[0].role"]);
  assert.deepEqual((o[3].example as PromptCompletionExample).prompt, [
    { role: "system", content: "polite" },
    { role: "user", content: "q0" },
    { role: "assistant", content: "a0" },
    { role: "user", content: "Say hi" },
  ]);
  assert.deepEqual(o[4].problems.map((p) => p.field), ["output"]);
  assert.match(o[5].problems[0].expected, /alpaca/);
});

Deno.test("formats: preference strings, message lists and TRL's implicit prompt", () => {
  const n = new RecordNormalizer({ format: "preference" });
  const u = (c: string) => ({ role: "user", content: c }),
    a = (c: string) => ({ role: "assistant", content: c });
  const recs = mem([
    { prompt: "The sky is", chosen: " blue", rejected: " green" },
    { prompt: [u("q")], chosen: [a("good")], rejected: [a("bad")] },
    { prompt: "q", chosen: [a("good")], rejected: "bad" },
    { chosen: [u("q"), a("good")], rejected: [u("q"), a("bad")] },
    { chosen: "x", rejected: "y" },
    {
      conversations: [{ from: "human", value: "q" }],
      chosen: { from: "human", value: "?" },
      rejected: { from: "gpt", value: "b" },
    },
    { prompt: "q", chosen: "a" },
  ]);
  const o = recs.map((r) => n.normalize(r));
  assert.deepEqual((o[0].example as PreferenceExample).chosen, " blue");
  assert.deepEqual((o[1].example as PreferenceExample).rejected, [a("bad")]);
  assert.deepEqual(o[2].example && { ...o[2].example, source: null }, {
    kind: "preference",
    prompt: [u("q")],
    chosen: [a("good")],
    rejected: [a("bad")],
    source: null,
  });
  const implicit = o[3].example as PreferenceExample;
  assert.deepEqual([implicit.prompt, implicit.chosen, implicit.rejected], [[u("q")], [a("good")], [
    a("bad"),
  ]]);
  assert.deepEqual(o[4].problems.map((p) => p.field), ["prompt"]);
  assert.deepEqual(o[5].problems.map((p) => [p.field, p.found]), [["chosen.from", "user"]]);
  assert.deepEqual(o[6].problems.map((p) => [p.field, p.found]), [["rejected", "nothing (field missing)"]]);
});

Deno.test("formats: multiple choice from the cloze fixture", async () => {
  const recs = await readRecords({ path: fixture("eval/tinystories_cloze.jsonl") });
  const { examples } = await loadExamples(recs, { format: "multiple_choice" });
  assert.equal(examples.length, 1600);
  const ex = examples[0] as MultipleChoiceExample;
  const raw = recs[0].value as { ctx: string; endings: string[]; label: number; id: string };
  assert.deepEqual([ex.context, ex.choices, ex.label, ex.id], [raw.ctx, raw.endings, raw.label, raw.id]);
  assert.ok(examples.every((e) => (e as MultipleChoiceExample).choices.length === 4));
});

Deno.test("formats: malformed multiple-choice items are refused with file, line and field", async () => {
  const bad = mem([
    { ctx: "ok", endings: ["a", "b"], label: 1 },
    { ctx: "no label", endings: ["a", "b"] },
    { ctx: "out of range", endings: ["a", "b"], label: 2 },
    { ctx: "empty", endings: [], label: 0 },
    { ctx: "blank ending", endings: ["a", ""], label: 0 },
    { ctx: 3, endings: ["a"], label: 0 },
    { ctx: "float", endings: ["a", "b"], label: 0.5 },
  ], "task.jsonl");
  const msg = await assertUserError(
    () => loadExamples(bad, { format: "multiple_choice", what: "task cloze" }),
    "task cloze: 6 record(s)",
    'task.jsonl:2 (record 1): field "label": expected an integer index into the choices, found nothing (field missing)',
    'task.jsonl:3 (record 2): field "label": expected an index from 0 to 1, found 2 (2 choices)',
    'task.jsonl:4 (record 3): field "endings": expected a non-empty list of strings, found an empty list',
    'task.jsonl:5 (record 4): field "endings[1]"',
    'task.jsonl:6 (record 5): field "ctx": expected a string, found the number 3',
    "task.jsonl:7 (record 6)",
  );
  assert.ok(!msg.includes("task.jsonl:1 "));
  const skipped = await loadExamples(bad, { format: "multiple_choice", onInvalid: "skip" });
  assert.equal(skipped.examples.length, 1);
  assert.deepEqual([skipped.report.seen, skipped.report.kept, skipped.report.skipped], [7, 1, 6]);
  assert.equal(skipped.report.problems.length, 6);
});

Deno.test("formats: on_invalid error stops after the first maxListed problems; bad JSON lines are problems", async () => {
  const many = mem(Array.from({ length: 1000 }, (_, i) => (i === 0 ? { text: "fine" } : { txt: "typo" })));
  let pulled = 0;
  async function* counting() {
    for (const r of many) {
      pulled++;
      yield r;
    }
  }
  await assertUserError(
    () => loadExamples(counting(), { format: "text", maxListed: 3 }),
    "stopped after the first 3 problems",
    "on_invalid: skip",
  );
  assert.equal(pulled, 4);
  const broken: DatasetRecord[] = [{
    value: undefined,
    source: { file: "f.jsonl", index: 0, line: 9 },
    error: "bad",
  }];
  await assertUserError(
    () => loadExamples(broken, { format: "text" }),
    'f.jsonl:9 (record 0): field "(record)"',
  );
  await assertUserError(() => loadExamples(mem(["str"]), { format: "text" }), "expected an object");
  assert.throws(() => new RecordNormalizer({ format: "chat", fields: { msgs: "x" } }), /unknown key "msgs"/);
  assert.throws(() => new RecordNormalizer({ format: "prose" as "text" }), /format: expected one of/);
  await assertUserError(
    () => loadExamples(mem([{ text: 1 }]), { format: "text", onInvalid: "ignore" as "skip" }),
    "on_invalid",
  );
});
