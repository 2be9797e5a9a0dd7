import assert from "node:assert/strict";
import { isUserError } from "../../util/errors.ts";
import { RecipeError } from "../../pipelines/diagnostics.ts";
import { loadRecipe } from "../../pipelines/validate.ts";
import { defaultRegistry } from "../../stages/registry.ts";
import { tempProject } from "./helpers.ts";

const registry = defaultRegistry();

const BASE = `name: base
description: the shared recipe
settings: { seed: 5, dtype: f32, keep_checkpoints: 3 }
stages:
  text:
    kind: testing.text
    params: { text: "from base", repeat: 2 }
  up:
    kind: testing.transform
    params: { mode: lower, prefix: "> " }
    inputs: { source: ["\${text.text}"], extra: data/base.txt }
  count:
    kind: testing.count
    inputs: { source: "\${up.text}" }
`;

Deno.test("extends: maps merge, lists and scalars replace, null removes a stage, paths resolve against their file", () => {
  const p = tempProject();
  try {
    p.write("shared/base.yaml", BASE);
    p.write("shared/data/base.txt", "base data\n");
    p.write("variants/data/mine.txt", "my data\n");
    const child = p.write(
      "variants/child.yaml",
      `name: child
extends: ../shared/base.yaml
settings: { seed: 6 }
stages:
  up:
    params: { mode: upper }
    inputs: { source: ["\${text.text}", data/mine.txt] }
  count: null
  extra_stage:
    kind: testing.text
    params: { text: new }
`,
    );
    const r = loadRecipe(child, registry);
    assert.equal(r.name, "child");
    assert.equal(r.description, "the shared recipe", "inherited");
    assert.deepEqual(r.settings, {
      seed: 6,
      dtype: "f32",
      keep_checkpoints: 3,
      gpu: "auto",
      cache_dir: null,
    });
    assert.deepEqual([...r.stages.keys()], ["text", "up", "extra_stage"]);
    assert.deepEqual(r.stages.get("up")!.params, { mode: "upper", prefix: "> " }, "params merge key by key");
    const up = r.stages.get("up")!.inputs;
    assert.deepEqual(up.source.map((x) => x.text), ["${text.text}", "data/mine.txt"], "lists replace");
    assert.equal(
      (up.source[1] as { path: string }).path,
      p.path("variants/data/mine.txt"),
      "relative to the child file",
    );
    assert.equal(
      (up.extra[0] as { path: string }).path,
      p.path("shared/data/base.txt"),
      "relative to the base file",
    );
    assert.deepEqual(r.files, [p.path("variants/child.yaml"), p.path("shared/base.yaml")]);
    assert.deepEqual(r.order, ["text", "up", "extra_stage"]);
  } finally {
    p.cleanup();
  }
});

Deno.test("errors inside a base recipe point into the base file", () => {
  const p = tempProject();
  try {
    p.write("base.yaml", BASE.replace("repeat: 2", "repeat: two"));
    p.write("data/base.txt", "x\n");
    const child = p.write("child.yaml", "name: child\nextends: base.yaml\n");
    assert.throws(() => loadRecipe(child, registry), (e: unknown) => {
      assert.ok(e instanceof RecipeError);
      assert.equal(e.problems.length, 1);
      assert.ok(e.problems[0].loc!.file.endsWith("base.yaml"));
      assert.deepEqual([e.problems[0].loc!.line, e.problems[0].loc!.col], [7, 42]);
      return true;
    });
  } finally {
    p.cleanup();
  }
});

Deno.test("--set overrides params (nested too), inputs and settings, and is validated like the recipe", () => {
  const p = tempProject();
  try {
    p.write("data/base.txt", "x\n");
    p.write("other.txt", "y\n");
    const file = p.write("r.yaml", BASE);
    const r = loadRecipe(file, registry, [
      "text.params.repeat=7",
      "up.params.prefix=null",
      "stages.up.params.mode=reverse",
      `up.inputs.extra=${p.path("other.txt")}`,
      "settings.seed=42",
    ]);
    assert.equal(r.stages.get("text")!.params.repeat, 7);
    assert.equal(r.stages.get("up")!.params.prefix, null);
    assert.equal(r.stages.get("up")!.params.mode, "reverse");
    assert.equal((r.stages.get("up")!.inputs.extra[0] as { path: string }).path, p.path("other.txt"));
    assert.equal(r.settings.seed, 42);

    const bad = () =>
      loadRecipe(file, registry, [
        "text.params.repeat=[1, 2]",
        "text.paramz.repeat=1",
        "text=1",
        "settings.sead=1",
        "up.params.mode=upper=lower",
        "novalue",
      ]);
    assert.throws(bad, (e: unknown) => {
      assert.ok(isUserError(e));
      const msg = (e as Error).message;
      assert.match(
        msg,
        /--set text\.params\.repeat=\[1, 2\]: stages\.text\.params\.repeat: expected an integer >= 1 and <= 1000, found a list of 2/,
      );
      assert.match(
        msg,
        /--set text\.paramz\.repeat=1: expected text\.params\.<field>.* \(did you mean "params"\?\)/,
      );
      assert.match(msg, /--set text=1: expected text\.params\.<field>/);
      assert.match(
        msg,
        /--set settings\.sead=1: settings\.sead: unknown field "sead" \(did you mean "seed"\?\)/,
      );
      assert.match(
        msg,
        /--set up\.params\.mode=upper=lower: stages\.up\.params\.mode: expected one of .* found string "upper=lower"/,
      );
      assert.match(msg, /--set novalue: expected --set <stage>\.params\.<field>=<value>/);
      assert.match(msg, /has 6 problems/);
      return true;
    });
  } finally {
    p.cleanup();
  }
});

Deno.test("anchors, aliases and << merge keys work in recipes", () => {
  const p = tempProject();
  try {
    const file = p.write(
      "anchors.yaml",
      `name: anchors
stages:
  a:
    kind: testing.text
    params: &common { text: shared, repeat: 4 }
  b:
    kind: testing.text
    params:
      <<: *common
      repeat: 5
  c:
    kind: testing.text
    params: *common
`,
    );
    const r = loadRecipe(file, registry);
    assert.deepEqual(r.stages.get("a")!.params, { text: "shared", repeat: 4 });
    assert.deepEqual(
      r.stages.get("b")!.params,
      { text: "shared", repeat: 5 },
      "explicit keys win over merged ones",
    );
    assert.deepEqual(r.stages.get("c")!.params, { text: "shared", repeat: 4 });
  } finally {
    p.cleanup();
  }
});

Deno.test("hub references: canonical digests, unpinned revisions warn", () => {
  const p = tempProject();
  try {
    const sha = "0123456789abcdef0123456789abcdef01234567";
    const file = p.write(
      "hub.yaml",
      `name: hub
stages:
  t:
    kind: testing.transform
    inputs: { source: ["hf://HuggingFaceH4/zephyr-7b-beta@${sha}", "hf://datasets/roneneldan/TinyStories", "hf://gpt2@main"] }
`,
    );
    const r = loadRecipe(file, registry);
    const refs = r.stages.get("t")!.inputs.source;
    assert.deepEqual(
      refs.map((x) => x.kind === "hub" ? [x.canonical, x.hub.repoType, x.hub.revision ?? null] : null),
      [
        [`hf://HuggingFaceH4/zephyr-7b-beta@${sha}`, "model", sha],
        ["hf://datasets/roneneldan/TinyStories", "dataset", null],
        ["hf://gpt2@main", "model", "main"],
      ],
    );
    assert.equal(r.warnings.length, 2);
    assert.match(r.warnings[0].message, /hf:\/\/datasets\/roneneldan\/TinyStories is not pinned to a commit/);
  } finally {
    p.cleanup();
  }
});

Deno.test("a missing recipe file is a user error naming it", () => {
  assert.throws(() => loadRecipe("/nonexistent/recipe.yaml", registry), (e: unknown) => {
    assert.ok(isUserError(e));
    assert.match((e as Error).message, /cannot read recipe \/nonexistent\/recipe\.yaml: file not found/);
    return true;
  });
});
