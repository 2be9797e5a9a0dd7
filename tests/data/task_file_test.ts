import assert from "node:assert/strict";
import { loadTaskFile, loadTaskItems, parseTaskYaml } from "../../data/task_file.ts";
import { compileTemplate, renderTemplate } from "../../data/template.ts";
import { assertUserError, fixture, withTempDir, writeTree } from "./helpers.ts";

Deno.test("template: field, nested and indexed access; single placeholder keeps the value's type", () => {
  const doc = { ctx: "A cat", q: { stem: "Why?" }, endings: ["x", "y"], label: 1 };
  assert.deepEqual(renderTemplate(compileTemplate("{{endings}}", "t"), doc), { ok: true, value: ["x", "y"] });
  assert.deepEqual(renderTemplate(compileTemplate("{{ label }}", "t"), doc), { ok: true, value: 1 });
  assert.deepEqual(renderTemplate(compileTemplate("Q: {{q.stem}} {{ endings[1] }} {{label}}", "t"), doc), {
    ok: true,
    value: "Q: Why? y 1",
  });
  const missing = renderTemplate(compileTemplate("{{q.body}}", "t"), doc);
  assert.deepEqual(missing, {
    ok: false,
    field: "q.body",
    expected: "a value",
    found: "nothing (field missing)",
  });
  const listInText = renderTemplate(compileTemplate("see {{endings}}", "t"), doc);
  assert.equal(!listInText.ok && listInText.field, "endings");
  const oob = renderTemplate(compileTemplate("{{endings[5]}}", "t"), doc);
  assert.equal(!oob.ok && oob.expected, "an index below 2");
  for (
    const bad of [
      "{{ ctx | trim }}",
      "{% if x %}a{% endif %}",
      "{{ ctx + 'x' }}",
      "{{ f() }}",
      "{{ctx",
      "a}}",
    ]
  ) {
    assert.throws(
      () => compileTemplate(bad, "task.yaml:3 doc_to_text"),
      /task.yaml:3 doc_to_text: unsupported/,
    );
  }
});

const CLOZE_YAML = (dataPath: string) =>
  [
    "task: cloze_yaml",
    `dataset_path: ${dataPath}`,
    "output_type: multiple_choice",
    'doc_to_text: "{{ctx}}"',
    'doc_to_choice: "{{endings}}"',
    "doc_to_target: label",
    "metric_list:",
    "  - metric: acc",
    "  - metric: acc_norm",
    "metadata:",
    "  version: 1.0",
  ].join("\n");

Deno.test("task file: a YAML task over the cloze fixture gives the same items as the JSONL defaults", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, { "cloze.yaml": CLOZE_YAML(fixture("eval/tinystories_cloze.jsonl")) });
    const task = await loadTaskFile(`${dir}/cloze.yaml`);
    assert.equal(task.name, "cloze_yaml");
    assert.equal(task.targetDelimiter, " ");
    assert.equal(task.version, 1);
    const viaYaml = await loadTaskItems(task);
    const viaJsonl = await loadTaskItems(await loadTaskFile(fixture("eval/tinystories_cloze.jsonl")));
    assert.equal(viaYaml.items.length, 1600);
    assert.deepEqual(
      viaYaml.items.map((e) => [e.context, e.choices, e.label]),
      viaJsonl.items.map((e) => [e.context, e.choices, e.label]),
    );
    assert.equal(viaJsonl.task.name, "tinystories_cloze");
  });
});

Deno.test("task file: lm-eval style local data_files, templates with text, and text targets", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "data/test.jsonl": [
        { question: { stem: "2+2" }, choices: { text: ["three", "four"] }, answerKey: "four" },
        { question: { stem: "1+1" }, choices: { text: ["two", "five"] }, answerKey: "0" },
      ].map((x) => JSON.stringify(x)).join("\n"),
      "t.yaml": [
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        "    test: data/test.jsonl",
        "test_split: test",
        'doc_to_text: "Question: {{question.stem}}\\nAnswer:"',
        "doc_to_choice: '{{choices.text}}'",
        "doc_to_target: answerKey",
      ].join("\n"),
    });
    const { items } = await loadTaskItems(await loadTaskFile(`${dir}/t.yaml`));
    assert.deepEqual(items.map((e) => [e.context, e.choices, e.label]), [
      ["Question: 2+2\nAnswer:", ["three", "four"], 1],
      ["Question: 1+1\nAnswer:", ["two", "five"], 0],
    ]);
  });
});

Deno.test("task file: malformed task files are refused with file, line and field", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "bad.jsonl": [
        '{"ctx": "a", "endings": ["x", "y"], "label": 0}',
        '{"ctx": "b", "endings": ["x", "y"]}',
        '{"ctx": "c", "endings": ["x", "y"], "label": 7}',
        '{"ctx": "d", "endings": [], "label": 0}',
      ].join("\n"),
      "t.yaml": CLOZE_YAML("bad.jsonl"),
    });
    for (const f of ["bad.jsonl", "t.yaml"]) {
      await assertUserError(
        async () => loadTaskItems(await loadTaskFile(`${dir}/${f}`)),
        `bad.jsonl:2 (record 1): field "label"`,
        `bad.jsonl:3 (record 2): field "label": expected an index from 0 to 1, found 7`,
        `bad.jsonl:4 (record 3): field "endings": expected a non-empty list of strings, found an empty list`,
      );
    }
    const skip = await loadTaskItems(await loadTaskFile(`${dir}/bad.jsonl`), { onInvalid: "skip" });
    assert.deepEqual([skip.items.length, skip.report.skipped], [1, 3]);
  });
  const f = "tasks/x.yaml";
  const base = "dataset_path: d.jsonl\ndoc_to_text: ctx\ndoc_to_choice: endings\n";
  await assertUserError(
    () => parseTaskYaml(base + "doc_to_targt: label\n", f),
    "tasks/x.yaml:4",
    '"doc_to_targt"',
  );
  await assertUserError(() => parseTaskYaml(base, f), 'missing task setting "doc_to_target"');
  await assertUserError(
    () => parseTaskYaml(base + "doc_to_target: label\nprocess_docs: !function utils.process\n", f),
    "tasks/x.yaml:5",
  );
  await assertUserError(
    () => parseTaskYaml(base + "doc_to_target: '{{ label | int }}'\n", f),
    "unsupported template",
  );
  await assertUserError(
    () => parseTaskYaml(base + "doc_to_target: label\noutput_type: generate_until\n", f),
    "tasks/x.yaml:5",
    "only multiple_choice",
  );
  await assertUserError(
    () => parseTaskYaml(base + "doc_to_target: label\ninclude: base.yaml\n", f),
    "include",
  );
  await assertUserError(() => parseTaskYaml(base + "doc_to_target: [1\n", f), "tasks/x.yaml", "invalid YAML");
  const hub = parseTaskYaml(
    "dataset_path: Rowan/hellaswag\ndoc_to_text: ctx\ndoc_to_choice: endings\ndoc_to_target: label\n",
    f,
  );
  assert.equal(hub.dataset.path, "hf://datasets/Rowan/hellaswag");
});
