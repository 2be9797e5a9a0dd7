import assert from "node:assert/strict";
import { join } from "node:path";
import { DEFAULTS, qualityRecipe, validationWindows, windowNll } from "../../bench/distill_quality.ts";
import { runCli, tempProject } from "../pipelines/helpers.ts";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";
import { loadRecipe } from "../../pipelines/validate.ts";
import { defaultRegistry } from "../../stages/registry.ts";

const VARIANTS = ["d50", "d25", "d50_random", "d50_mlp", "d50_prog", "d50_all"];

Deno.test("distill_quality: every variant's recipe validates, with the stages it depends on", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const pseudo of [0, 8]) {
      for (const v of VARIANTS) {
        const o = { ...DEFAULTS, steps: 301, pseudo, variants: [v] };
        const path = join(dir, `${v}_${pseudo}.yaml`);
        await Deno.writeTextFile(path, qualityRecipe(o));
        const recipe = loadRecipe(path, defaultRegistry());
        const names = [...recipe.stages.keys()];
        assert.ok(names.includes(v), `${v}: stage present`);
        assert.equal(names.includes("labels"), pseudo > 0, `${v}: pseudo-label stage iff --pseudo`);
        if (v === "d25" || v === "d50_all") assert.ok(names.includes("d50"), `${v} continues from d50`);
        if (v === "d50_random") {
          assert.ok(names.includes("random_init"), "d50_random starts from random_init");
        }
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("distill_quality: d50_prog splits the step budget over two phases; d50_all trains everything", () => {
  const text = qualityRecipe({
    ...DEFAULTS,
    steps: 301,
    variants: ["d50_prog", "d50_all"],
    lr2: 3e-4,
    ce2: 0,
  });
  assert.match(
    text,
    /schedule: \[\{ attn_layers: \[0, 1, 3, 4\], steps: 150 \}, \{ attn_layers: \[1, 3\], steps: 151 \}\]/,
  );
  const all = text.slice(text.indexOf("  d50_all:"));
  assert.match(all, /learning_rate: 0\.0003/);
  assert.match(all, /ce_weight: 0, kl_weight: 1/);
  assert.match(all, /trainable: all/);
});

Deno.test("distill_quality: --dtype reaches the recipe's settings.dtype", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const dtype of ["f32", "f16"] as const) {
      const path = join(dir, `${dtype}.yaml`);
      await Deno.writeTextFile(path, qualityRecipe({ ...DEFAULTS, steps: 10, variants: ["d50"], dtype }));
      assert.equal(loadRecipe(path, defaultRegistry()).settings.dtype, dtype);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("distill_quality: --pseudo-* options reach the pseudo_label stage", async () => {
  const o = {
    ...DEFAULTS,
    steps: 10,
    pseudo: 64,
    pseudoReturn: 8,
    pseudoTemperature: 1,
    pseudoTopK: 0,
    pseudoTopP: 1,
    variants: ["d50"],
  };
  const dir = await Deno.makeTempDir();
  try {
    const path = join(dir, "r.yaml");
    await Deno.writeTextFile(path, qualityRecipe(o));
    const labels = loadRecipe(path, defaultRegistry()).stages.get("labels")!;
    assert.deepEqual(
      [
        labels.params.limit,
        labels.params.num_return_sequences,
        labels.params.temperature,
        labels.params.top_k,
        labels.params.top_p,
      ],
      [64, 8, 1, 0, 1],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test(
  "distill_quality: its perplexity is the evaluate stage's (same documents, windows and scores)",
  gpuTestOptions,
  async () => {
    const teacher = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
    const valid = new URL("../../fixtures/text/tinystories_valid.txt", import.meta.url).pathname;
    const p = tempProject();
    try {
      const recipe = p.write(
        "eval.yaml",
        `name: eval
description: teacher perplexity
stages:
  eval_teacher:
    kind: evaluate
    params: { max_length: 64, limit: 3, batch_size: 8 }
    inputs: { model: ${teacher}, text: [${valid}] }
`,
      );
      const r = await runCli(["run", recipe]);
      assert.equal(r.code, 0, r.stderr);
      const m = (r.stdout + r.stderr).match(/token_perplexity ([0-9.]+)/);
      assert.ok(m, r.stdout + r.stderr);
      const lm = CausalLM.fromModel(await testRuntime(), await loadModel(teacher));
      try {
        const { nll, tokens } = await windowNll(lm, await validationWindows(3, 64));
        // the stage prints 4 decimals
        assert.ok(
          Math.abs(Math.exp(nll / tokens) - Number(m[1])) < 6e-5,
          `${Math.exp(nll / tokens)} vs ${m[1]}`,
        );
      } finally {
        lm.dispose();
      }
    } finally {
      await p.cleanup();
    }
  },
);
