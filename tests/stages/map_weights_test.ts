// map_weights through the runner: attention fractions by the every-k rule, attention vs random init, the
// progressive form, and parameter errors.
import assert from "node:assert/strict";
import { loadModel } from "../../models/checkpoint.ts";
import type { HybridModel } from "../../models/weights.ts";
import { attentionLayersForFraction } from "../../stages/map_weights.ts";
import { tempProject } from "../pipelines/helpers.ts";
import { outputPath, runRecipe, stageTestOptions, TEACHER } from "./helpers.ts";

Deno.test("attention_fraction keeps every k-th layer; other fractions are refused", () => {
  assert.deepEqual(attentionLayersForFraction(32, 0.5), Array.from({ length: 16 }, (_, i) => 2 * i + 1));
  assert.deepEqual(attentionLayersForFraction(32, 0.25), [3, 7, 11, 15, 19, 23, 27, 31]);
  assert.deepEqual(attentionLayersForFraction(32, 0.125), [7, 15, 23, 31]);
  assert.deepEqual(attentionLayersForFraction(5, 0), []);
  assert.throws(() => attentionLayersForFraction(32, 0.3), /not 1\/k/);
});

Deno.test(
  "map_weights: attention init copies v/k/q/o, random init does not, progressive keeps Mamba layers",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const text = `name: map
description: map weights
settings: { seed: 9 }
stages:
  half:
    kind: map_weights
    params: { attention_fraction: 0.5 }
    inputs: { teacher: ${TEACHER} }
  random:
    kind: map_weights
    params: { attn_layers: [1, 3], init: random }
    inputs: { teacher: ${TEACHER} }
  quarter:
    kind: map_weights
    params: { attn_layers: [3] }
    inputs: { teacher: ${TEACHER}, previous: "\${half.model}" }
`;
      const r = await runRecipe(p.write("r.yaml", text));
      assert.equal(r.code, 0, r.stderr);
      const teacher = await loadModel(TEACHER);
      const half = await loadModel(outputPath(p, "half", "model")) as HybridModel;
      const random = await loadModel(outputPath(p, "random", "model")) as HybridModel;
      const quarter = await loadModel(outputPath(p, "quarter", "model")) as HybridModel;
      assert.deepEqual(half.mamba.attnLayers, [1, 3]);
      assert.deepEqual(quarter.mamba.attnLayers, [3]);
      const out = "model.layers.0.mamba.out_proj.weight";
      assert.deepEqual(
        half.weights.get(out)!.data,
        teacher.weights.get("model.layers.0.self_attn.o_proj.weight")!.data,
      );
      assert.notDeepEqual(random.weights.get(out)!.data, half.weights.get(out)!.data);
      for (const l of [0, 2, 4]) {
        const n = `model.layers.${l}.mamba.in_proj.weight`;
        assert.deepEqual(
          quarter.weights.get(n)!.data,
          half.weights.get(n)!.data,
          `layer ${l} kept from previous`,
        );
      }
      assert.ok(quarter.weights.has("model.layers.1.mamba.in_proj.weight"));
      const both = await runRecipe(
        p.write(
          "b.yaml",
          text.replace("attention_fraction: 0.5", "attention_fraction: 0.5, attn_layers: [1]"),
        ),
      );
      assert.equal(both.code, 2);
      assert.match(both.stderr, /set exactly one of attn_layers and attention_fraction/);
    } finally {
      await p.cleanup();
    }
  },
);
