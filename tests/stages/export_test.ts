/**
 * The export stage: the MambaInLlama layout for a hybrid (round trip bit-exact in F32), dtype choice, and the
 * `dest` copy beside the recipe (atomic replacement of a previous export, refusal to replace anything else).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadModel } from "../../models/checkpoint.ts";
import { openSafetensors } from "../../models/safetensors.ts";
import { LM_HEAD } from "../../models/weights.ts";
import { HYBRID_DIR, TEACHER_DIR, withRecipe } from "./recipe_run.ts";

function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

Deno.test("export: a hybrid in the MambaInLlama layout, copied to dest beside the recipe", async () => {
  await withRecipe(
    `name: ex
stages:
  hybrid:
    kind: export
    params: { dest: out/hybrid-40 }
    inputs: { model: ${HYBRID_DIR}, tokenizer: ${TEACHER_DIR} }
  teacher_f16:
    kind: export
    params: { dtype: F16 }
    inputs: { model: ${TEACHER_DIR} }
`,
    { "out/hybrid-40/model.safetensors": "an old export" },
    async (run, p) => {
      const r = await run();
      assert.equal(r.code, 0, r.stderr);
      const out = r.outputs["hybrid.model"];
      assert.deepEqual(names(out), [
        "config.json",
        "generation_config.json",
        "mamba_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
      ]);
      // F32 (the stored dtype) round trip: bit-exact, lm_head stored for the official loader
      const [a, b] = [await loadModel(out), await loadModel(HYBRID_DIR)];
      assert.equal(a.kind, "hybrid");
      for (const [k, t] of b.weights) assert.deepEqual(a.weights.get(k)!.data, t.data, k);
      assert.ok((await openSafetensors(join(out, "model.safetensors"))).has(LM_HEAD));
      assert.deepEqual(
        JSON.parse(Deno.readTextFileSync(join(out, "mamba_config.json"))).attn_layers,
        [1, 3],
      );
      // dest: the same files, replacing the previous export
      const dest = p.path("out/hybrid-40");
      assert.deepEqual(names(dest), names(out));
      for (const n of names(out)) {
        assert.deepEqual(Deno.readFileSync(join(dest, n)), Deno.readFileSync(join(out, n)), n);
      }
      assert.deepEqual(names(p.path("out")), ["hybrid-40"], "no temporary directory left behind");

      const f16 = r.outputs["teacher_f16.model"];
      assert.ok(!names(f16).includes("mamba_config.json"));
      const st = await openSafetensors(join(f16, "model.safetensors"));
      assert.equal(st.info("model.norm.weight").dtype, "F16");
      assert.equal(JSON.parse(Deno.readTextFileSync(join(f16, "config.json"))).torch_dtype, "float16");
    },
  );
});

Deno.test("export: a dest holding other files is never replaced", async () => {
  await withRecipe(
    `name: ex
stages:
  e:
    kind: export
    params: { dest: . }
    inputs: { model: ${TEACHER_DIR} }
`,
    {},
    async (run, p) => {
      const r = await run();
      assert.equal(r.code, 2, r.stderr);
      assert.match(
        r.stderr,
        /holds files an export does not write \(.*recipe\.yaml.*\); refusing to replace it/,
      );
      assert.ok(Deno.statSync(p.path("recipe.yaml")).isFile);
    },
  );
});
