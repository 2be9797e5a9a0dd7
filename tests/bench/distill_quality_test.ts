import assert from "node:assert/strict";
import { join } from "node:path";
import { DEFAULTS, qualityRecipe } from "../../bench/distill_quality.ts";
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
