/**
 * The shipped recipes: every paper recipe (and the demo) validates and plans; and the CI use case - after a
 * run, changing only an evaluation parameter makes `plan` schedule only evaluation stages.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { runCli, tempProject } from "./pipelines/helpers.ts";

const RECIPES = new URL("../recipes/", import.meta.url).pathname;
const FIXTURES = new URL("../fixtures/", import.meta.url).pathname;

const PAPER = [
  "paper/base.yaml",
  "zephyr-50.yaml",
  "zephyr-25.yaml",
  "zephyr-12.5.yaml",
  "llama3-8b-50.yaml",
  "llama3.2-3b-mamba2-50.yaml",
  "tiny.yaml",
  "stories-hybrid.yaml",
];

for (const r of PAPER) {
  Deno.test(`recipe ${r} passes plan`, { sanitizeResources: false, sanitizeOps: false }, async () => {
    const p = tempProject();
    try {
      const res = await runCli(["plan", join(RECIPES, r), "--cache-dir", p.cacheDir]);
      assert.equal(res.code, 0, res.stderr);
      assert.match(res.stdout, /will run/);
    } finally {
      await p.cleanup();
    }
  });
}

/** A copy of the demo recipe with tiny budgets and absolute fixture paths, in a temporary project. */
function tinyCopy(p: ReturnType<typeof tempProject>): string {
  let text = Deno.readTextFileSync(join(RECIPES, "tiny.yaml")).replaceAll("../fixtures/", FIXTURES);
  const shrink: [RegExp, string][] = [
    [/max_new_tokens: 96/, "max_new_tokens: 8"],
    [/limit: 96\n/, "limit: 8\n"],
    [/max_steps: \d+/g, "max_steps: 2"],
    [/limit: 64 }/, "limit: 8 }"],
    [/offset: 1000, limit: 96/, "offset: 1000, limit: 8"],
    [/limit: 100, batch_size: 16/g, "limit: 4, batch_size: 16"],
    [/k: \[1, 2, 4\]/, "k: [1]"],
    [/max_new_tokens: 32/, "max_new_tokens: 4"],
  ];
  for (const [re, by] of shrink) {
    const before = text;
    text = text.replace(re, by);
    assert.notEqual(text, before, `tiny.yaml no longer contains ${re}: update this test's budgets`);
  }
  return p.write("tiny-copy.yaml", text);
}

Deno.test(
  "changing one evaluation parameter of the demo recipe reruns only evaluation stages",
  { sanitizeResources: false, sanitizeOps: false },
  async () => {
    const p = tempProject();
    try {
      const recipe = tinyCopy(p);
      const first = await runCli(["run", recipe]);
      assert.equal(first.code, 0, first.stderr + first.stdout);
      const again = await runCli(["plan", recipe]);
      assert.equal(again.code, 0, again.stderr);
      assert.doesNotMatch(again.stdout, /will run/, "a re-run after a complete run plans nothing");
      // one evaluation parameter changes (in the recipe file itself, as a CI job would do)
      Deno.writeTextFileSync(
        recipe,
        Deno.readTextFileSync(recipe).replace(
          "{ model_name: hybrid-50, max_length: 256, limit: 4",
          "{ model_name: hybrid-50, max_length: 128, limit: 4",
        ),
      );
      const changed = await runCli(["plan", recipe, "--json"]);
      assert.equal(changed.code, 0, changed.stderr);
      const plan = JSON.parse(changed.stdout) as { stage: string; kind: string; action: string }[];
      const toRun = plan.filter((s) => s.action === "run");
      assert.deepEqual(toRun.map((s) => s.stage), ["eval_hybrid_50"]);
      assert.ok(toRun.every((s) => s.kind === "evaluate"));
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "recipes/stories-hybrid.yaml runs end to end at tiny budgets: every student is trained and evaluated",
  { sanitizeResources: false, sanitizeOps: false },
  async () => {
    const p = tempProject();
    try {
      let text = Deno.readTextFileSync(join(RECIPES, "stories-hybrid.yaml")).replaceAll(
        "../fixtures/",
        FIXTURES,
      );
      const shrink: [RegExp, string][] = [
        [/max_new_tokens: 256/, "max_new_tokens: 8"],
        [/batch_size: 1024/, "batch_size: 16\n      limit: 16"],
        [/max_steps: 3000/, "max_steps: 2"],
        [/per_device_train_batch_size: 32/, "per_device_train_batch_size: 2"],
        [/save_steps: 500/, "save_steps: 1"],
        [/limit: 300, batch_size: 64/g, "limit: 2, batch_size: 8"],
      ];
      for (const [re, by] of shrink) {
        const before = text;
        text = text.replace(re, by);
        assert.notEqual(text, before, `stories-hybrid.yaml no longer contains ${re}: update this test`);
      }
      const res = await runCli(["run", p.write("stories.yaml", text)]);
      assert.equal(res.code, 0, res.stderr + res.stdout);
      const out = res.stdout + res.stderr;
      for (
        const e of ["teacher", "hybrid_50", "hybrid_25", "hybrid_50_e2e", "hybrid_50_random", "hybrid_50_mlp"]
      ) {
        const m = out.match(new RegExp(`eval_${e}: tinystories_valid: token_perplexity ([0-9.]+)`));
        assert.ok(m && Number(m[1]) > 1, `eval_${e}: no perplexity in the output`);
      }
    } finally {
      await p.cleanup();
    }
  },
);
