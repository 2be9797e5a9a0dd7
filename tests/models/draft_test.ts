import assert from "node:assert/strict";
import { join } from "node:path";
import { buildDraftModel } from "../../models/draft.ts";
import { exportModel, loadModel } from "../../models/checkpoint.ts";
import { dampLayers, llamaConfig, randomTransformer } from "../../models/random_init.ts";
import { CausalLM } from "../../models/causal_lm.ts";
import { EMBED, LM_HEAD } from "../../models/weights.ts";
import { UserError } from "../../util/errors.ts";
import { Rng } from "../../util/rng.ts";
import { FIXTURE_MODELS, fixturePath } from "../reference/fixtures.ts";
import { gpuTestOptions, maxAbsDiff, testRuntime } from "../helpers/gpu.ts";

Deno.test("draft: chosen teacher layers are renumbered, globals shared, the config says how many", async () => {
  const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
  const d = buildDraftModel(teacher, [0, 4]);
  assert.equal(d.kind, "transformer");
  assert.equal(d.config.numLayers, 2);
  assert.equal(d.config.raw.num_hidden_layers, 2);
  assert.equal(teacher.config.numLayers, 5, "the source config is not modified");
  for (const [name, t] of d.weights) {
    const src = name.replace("model.layers.1.", "model.layers.4.");
    assert.equal(t, teacher.weights.get(src), `${name} is ${src} of the teacher`);
  }
  assert.equal(d.weights.get(LM_HEAD), d.weights.get(EMBED), "tied lm_head stays tied");
  assert.equal(d.weights.size, 3 + 2 * 9);
});

Deno.test("draft: from a hybrid, Mamba layers stay Mamba layers; attention only gives a Transformer", async () => {
  const hybrid = await loadModel(fixturePath(FIXTURE_MODELS.hybrid.dir));
  const a = buildDraftModel(hybrid, [1, 3]);
  assert.equal(a.kind, "transformer");
  const h = buildDraftModel(hybrid, [0, 1, 4]);
  assert.equal(h.kind, "hybrid");
  if (h.kind === "hybrid") {
    assert.deepEqual(h.mamba.attnLayers, [1]);
    assert.equal(h.mamba.nLayer, 3);
    assert.ok(h.weights.has("model.layers.2.mamba.in_proj.weight"));
  }
});

Deno.test("draft: bad layer lists are user errors", async () => {
  const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
  assert.throws(() => buildDraftModel(teacher, []), UserError);
  assert.throws(() => buildDraftModel(teacher, [0, 5]), /outside the source model's 0\.\.4/);
  assert.throws(() => buildDraftModel(teacher, [3, 1]), /ascending and unique/);
  assert.throws(() => buildDraftModel(teacher, [1, 1]), /ascending and unique/);
});

Deno.test(
  "draft: exported drafts load back; a draft of every layer computes the source's logits",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
    const dir = await Deno.makeTempDir();
    try {
      await exportModel(join(dir, "d"), buildDraftModel(teacher, [0, 4]));
      const back = await loadModel(join(dir, "d"));
      assert.equal(back.config.numLayers, 2);
      assert.deepEqual(
        back.weights.get("model.layers.1.mlp.up_proj.weight")!.data,
        teacher.weights.get("model.layers.4.mlp.up_proj.weight")!.data,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
    const all = CausalLM.fromModel(rt, buildDraftModel(teacher, [0, 1, 2, 3, 4]));
    const ref = CausalLM.fromModel(rt, teacher);
    const ids = Int32Array.from([1, 5, 9, 200, 31]);
    const [a, b] = await rt.scope(async () => [
      await all.forward(ids, 1, 5).logits.read(),
      await ref.forward(ids, 1, 5).logits.read(),
    ]);
    assert.equal(maxAbsDiff(a, b), 0);
    all.dispose();
    ref.dispose();
  },
);

Deno.test("random init: shapes of the config, tied embeddings, the requested spread, norms one", () => {
  const cfg = llamaConfig({
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 100,
    tie_word_embeddings: true,
  });
  const m = randomTransformer(cfg, new Rng(3), 0.02);
  assert.equal(m.weights.get(LM_HEAD), m.weights.get(EMBED));
  const q = m.weights.get("model.layers.1.self_attn.q_proj.weight")!;
  assert.deepEqual(q.shape, [32, 32]);
  const sd = Math.sqrt(q.data.reduce((s, v) => s + v * v, 0) / q.data.length);
  assert.ok(Math.abs(sd - 0.02) < 0.002, `std ${sd}`);
  assert.ok(m.weights.get("model.norm.weight")!.data.every((v) => v === 1));
  const again = randomTransformer(cfg, new Rng(3), 0.02);
  assert.deepEqual(again.weights.get(EMBED)!.data, m.weights.get(EMBED)!.data, "a seed reproduces the model");
});

Deno.test("dampLayers scales the residual writes of the chosen layers only", () => {
  const cfg = llamaConfig({
    hidden_size: 16,
    intermediate_size: 32,
    num_hidden_layers: 3,
    num_attention_heads: 2,
    vocab_size: 50,
  });
  const m = randomTransformer(cfg, new Rng(1));
  const d = dampLayers(m, [1, 2], 0.5);
  for (const l of [0, 1, 2]) {
    for (const n of ["self_attn.o_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight"]) {
      const name = `model.layers.${l}.${n}`;
      const f = l > 0 && !n.includes("q_proj") ? 0.5 : 1;
      const a = d.weights.get(name)!.data, b = m.weights.get(name)!.data;
      assert.ok(a.every((v, i) => v === Math.fround(b[i] * f)), name);
    }
  }
});
