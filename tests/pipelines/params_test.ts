import assert from "node:assert/strict";
import { closest, formatProblem, Problems } from "../../pipelines/diagnostics.ts";
import {
  checkSchema,
  describeFields,
  describeType,
  type ParamFields,
  type ParamsOf,
  validateFields,
} from "../../pipelines/params.ts";
import { parseYaml, type YNode } from "../../pipelines/source.ts";
import { defineStage } from "../../pipelines/stage.ts";

const SCHEMA = {
  learning_rate: { type: "number", exclusiveMin: 0, default: 8e-5, doc: "Peak learning rate." },
  steps: { type: "number", integer: true, min: 1, required: true, doc: "Optimizer steps." },
  schedule: { type: "string", enum: ["cosine", "linear"], default: "cosine", doc: "Decay." },
  revision: { type: "string", pattern: "^[0-9a-f]{7,40}$", nullable: true, doc: "A commit." },
  frozen: { type: "boolean", default: false, doc: "Freeze the MLP." },
  note: { type: "string", doc: "Optional free text." },
  steps_schedule: {
    type: "array",
    minItems: 1,
    default: [{ attn_layers: [0, 2] }],
    doc: "Progressive steps.",
    items: {
      type: "object",
      doc: "One step.",
      fields: {
        attn_layers: {
          type: "array",
          items: { type: "number", integer: true, min: 0, doc: "layer" },
          required: true,
          doc: "Kept attention layers.",
        },
        tokens: { type: "number", integer: true, min: 1, default: 1000, doc: "Token budget." },
      },
    },
  },
} as const satisfies ParamFields;

function node(yaml: string): YNode {
  const problems = new Problems();
  const n = parseYaml(yaml, "t.yaml", problems);
  assert.equal(problems.count, 0, JSON.stringify(problems.list));
  return n!;
}

function validate(yaml: string) {
  const problems = new Problems();
  const value = validateFields(SCHEMA, node(yaml), {
    path: "params",
    loc: { file: "t.yaml", line: 1, col: 1 },
    problems,
  });
  return { value, problems: problems.list.map(formatProblem) };
}

Deno.test("validateFields fills defaults (nested ones too) and keeps given values", () => {
  const { value, problems } = validate(
    "steps: 10\nsteps_schedule: [{ attn_layers: [1, 3] }, { attn_layers: [3], tokens: 5 }]",
  );
  assert.deepEqual(problems, []);
  assert.deepEqual(value, {
    learning_rate: 8e-5,
    steps: 10,
    schedule: "cosine",
    revision: null,
    frozen: false,
    steps_schedule: [{ attn_layers: [1, 3], tokens: 1000 }, { attn_layers: [3], tokens: 5 }],
  });
  assert.ok(!("note" in value), "optional fields without default stay absent");
});

Deno.test("validateFields reports every problem with position, path, expected and found", () => {
  const { problems } = validate(
    [
      "learning_rate: 0",
      "schedule: cosin",
      "revision: xyz",
      "frozen: 'yes'",
      "lerning_rate: 1",
      "steps_schedule: [{ attn_layers: [-1], tokens: 0, extra: 1 }]",
    ].join("\n"),
  );
  // Exact content, independent of order:
  const expected = [
    "t.yaml:1:16: params.learning_rate: expected a number > 0, found number 0",
    't.yaml:2:11: params.schedule: expected one of "cosine", "linear", found string "cosin" (did you mean "cosine"?)',
    't.yaml:3:11: params.revision: expected a string matching /^[0-9a-f]{7,40}$/ or null, found string "xyz"',
    't.yaml:4:9: params.frozen: expected true or false, found string "yes"',
    't.yaml:5:1: params.lerning_rate: unknown field "lerning_rate" (did you mean "learning_rate"?)',
    't.yaml:6:50: params.steps_schedule[0].extra: unknown field "extra" (expected one of "attn_layers", "tokens")',
    't.yaml:1:1: params.steps: missing required field "steps": an integer >= 1 (Optimizer steps.)',
    "t.yaml:6:34: params.steps_schedule[0].attn_layers[0]: expected an integer >= 0, found number -1",
    "t.yaml:6:47: params.steps_schedule[0].tokens: expected an integer >= 1, found number 0",
  ];
  assert.deepEqual([...problems].sort(), [...expected].sort());
});

Deno.test("numbers: integer, bounds, non-finite and quoted numbers", () => {
  const f = {
    n: { type: "number", integer: true, min: 0, max: 10, doc: "n" },
  } as const satisfies ParamFields;
  const check = (yaml: string) => {
    const problems = new Problems();
    const v = validateFields(f, node(yaml), {
      path: "p",
      loc: { file: "t.yaml", line: 1, col: 1 },
      problems,
    });
    return { v, msg: problems.list.map((p) => p.message + (p.hint ? ` (${p.hint})` : "")) };
  };
  assert.deepEqual(check("n: 10").v, { n: 10 });
  assert.deepEqual(check("n: 0x0a").v, { n: 10 });
  assert.deepEqual(check("n: 11").msg, ["expected an integer >= 0 and <= 10, found number 11"]);
  assert.deepEqual(check("n: .nan").msg, ["expected an integer >= 0 and <= 10, found NaN"]);
  assert.deepEqual(check("n: .inf").msg, ["expected an integer >= 0 and <= 10, found number Infinity"]);
  assert.deepEqual(check("n: '3'").msg, [
    'expected an integer >= 0 and <= 10, found string "3" (remove the quotes to write a number)',
  ]);
  assert.deepEqual(check("n: [1]").msg, ["expected an integer >= 0 and <= 10, found a list of 1"]);
});

Deno.test("strings are never silently converted from numbers or booleans", () => {
  const f = { s: { type: "string", doc: "s" } } as const satisfies ParamFields;
  const problems = new Problems();
  validateFields(f, node("s: 1e3"), { path: "p", loc: { file: "t.yaml", line: 1, col: 1 }, problems });
  assert.equal(
    formatProblem(problems.list[0]),
    "t.yaml:1:4: p.s: expected a string, found number 1000 (quote the value to write a string)",
  );
});

Deno.test("ParamsOf types ctx.params from the schema", () => {
  type P = ParamsOf<typeof SCHEMA>;
  const p: P = {
    learning_rate: 1,
    steps: 2,
    schedule: "linear",
    revision: null,
    frozen: true,
    steps_schedule: [{ attn_layers: [1], tokens: 3 }],
  };
  const lr: number = p.learning_rate;
  const sched: "cosine" | "linear" = p.schedule;
  const rev: string | null = p.revision;
  const note: string | undefined = p.note;
  const layers: number[] = p.steps_schedule[0].attn_layers;
  // @ts-expect-error: "step" is not a schedule
  const bad: P["schedule"] = "step";
  assert.ok([lr, sched, rev, note, layers, bad]);

  const kind = defineStage({
    kind: "typed",
    version: 1,
    doc: "typed",
    params: {
      k: { type: "number", default: 1, doc: "k" },
      s: { type: "string", enum: ["a", "b"], required: true, doc: "s" },
    },
    inputs: {
      one: { doc: "one" },
      many: { doc: "many", list: true },
      maybe: { doc: "maybe", optional: true },
    },
    outputs: { out: { doc: "out", type: "dir" } },
    run(ctx) {
      const k: number = ctx.params.k;
      const s: "a" | "b" = ctx.params.s;
      const one: string = ctx.inputs.one.digest;
      const many: number = ctx.inputs.many.length;
      const maybe: string | undefined = ctx.inputs.maybe?.path;
      const out: string = ctx.outputs.out;
      // @ts-expect-error: no such output
      ctx.outputs.nope;
      // @ts-expect-error: an optional input may be undefined
      ctx.inputs.maybe.path;
      assert.ok([k, s, one, many, maybe, out]);
      return Promise.resolve();
    },
  });
  assert.equal(kind.kind, "typed");
});

Deno.test("checkSchema catches author mistakes: missing docs, bad defaults, bad patterns", () => {
  const errors = checkSchema({
    a: { type: "number", min: 1, default: 0, doc: "a" },
    b: { type: "string", pattern: "([", doc: "b" },
    c: { type: "boolean", doc: "" },
    d: { type: "string", enum: [], doc: "d" },
    e: { type: "object", doc: "e", fields: { x: { type: "number", required: true, default: 1, doc: "x" } } },
    f: { type: "object", doc: "f", fields: { y: { type: "number", inKey: false, doc: "y" } } },
  } as unknown as ParamFields);
  assert.equal(errors.length, 6, errors.join("\n"));
  assert.match(errors[0], /^a: default does not fit its schema: expected a number >= 1, found number 0/);
  assert.match(errors[1], /^b: bad pattern/);
  assert.match(errors[2], /^c: missing doc/);
  assert.match(errors[3], /^d: empty enum/);
  assert.match(errors[4], /^e\.x: required fields have no default/);
  assert.match(errors[5], /^f\.y: inKey applies to top-level parameters only/);
});

Deno.test("describeType and describeFields render the docs", () => {
  assert.equal(describeType(SCHEMA.learning_rate), "a number > 0");
  assert.equal(describeType(SCHEMA.schedule), 'one of "cosine", "linear"');
  assert.equal(
    describeType(SCHEMA.steps_schedule.items.fields.attn_layers),
    "a list of integers >= 0",
  );
  assert.equal(describeType(SCHEMA.revision), "a string matching /^[0-9a-f]{7,40}$/ or null");
  assert.equal(
    describeType(SCHEMA.steps_schedule),
    "a list of mappings with fields attn_layers, tokens (at least 1 item)",
  );
  const rows = describeFields(SCHEMA);
  assert.deepEqual(rows.map((r) => r.path), [
    "learning_rate",
    "steps",
    "schedule",
    "revision",
    "frozen",
    "note",
    "steps_schedule",
    "steps_schedule[].attn_layers",
    "steps_schedule[].tokens",
  ]);
  assert.equal(rows[1].presence, "required");
  assert.equal(rows[0].presence, "default: 0.00008");
  assert.equal(rows[5].presence, "optional");
});

Deno.test("did-you-mean finds typos, transpositions and prefixes but not unrelated words", () => {
  assert.equal(closest("lerning_rate", ["learning_rate", "steps"]), "learning_rate");
  assert.equal(closest("stpes", ["steps", "seed"]), "steps");
  assert.equal(closest("learn_rate", ["learning_rate"]), "learning_rate");
  assert.equal(closest("Seed", ["seed"]), "seed");
  assert.equal(closest("temperature", ["steps", "seed"]), undefined);
  assert.equal(closest("c", ["a", "b"]), undefined);
});
