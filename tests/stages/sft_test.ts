// The sft stage through the runner: completion-only loss on prompt/completion data goes down, an optional KL
// to a teacher is logged, every parameter trains, and an interrupted run resumes to the same bytes.
import assert from "node:assert/strict";
import { loadModel } from "../../models/checkpoint.ts";
import { tempProject } from "../pipelines/helpers.ts";
import {
  assertResumesToSameOutput,
  fixture,
  outputPath,
  runRecipe,
  stageMetrics,
  stageTestOptions,
  TEACHER,
} from "./helpers.ts";

function recipe(sftParams: string): string {
  return `name: sft_test
description: sft a few steps
settings: { seed: 2 }
stages:
  tokens:
    kind: tokenize
    params: { format: prompt_completion, max_length: 48, packing: none, limit: 4 }
    inputs: { tokenizer: ${TEACHER}, data: [${fixture("chat/alpaca_en_demo.json")}] }
  sft:
    kind: sft
    params: { per_device_train_batch_size: 4, gradient_accumulation_steps: 1, logging_steps: 1, ${sftParams} }
    inputs: { model: ${TEACHER}, data: "\${tokens.tokens}", teacher: ${TEACHER} }
`;
}

Deno.test(
  "sft: the completion loss goes down; all parameters train; the KL term is logged",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const r = await runRecipe(
        p.write(
          "r.yaml",
          recipe("max_steps: 8, learning_rate: 3.0e-3, kl_weight: 0.1, warmup_ratio: 0"),
        ),
      );
      assert.equal(r.code, 0, r.stderr);
      const m = stageMetrics(p, "sft");
      assert.equal(m.length, 8);
      assert.ok(m.every((x) => Number.isFinite(x.values.kl) && Number.isFinite(x.values.ce)));
      assert.equal(m[0].values.kl, 0, "the student starts as the teacher");
      // the four sequences are one batch: every step sees the same data
      const ce = m.map((x) => x.values.ce);
      assert.ok(ce[7] < ce[0] - 0.5, `ce did not go down: ${ce.map((x) => x.toFixed(3))}`);
      const out = await loadModel(outputPath(p, "sft", "model"));
      const teacher = await loadModel(TEACHER);
      for (
        const name of [
          "model.embed_tokens.weight",
          "model.norm.weight",
          "model.layers.0.self_attn.q_proj.weight",
        ]
      ) {
        assert.notDeepEqual(out.weights.get(name)!.data, teacher.weights.get(name)!.data, `${name} trains`);
      }
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "sft: interrupted after a checkpoint, the rerun resumes to the uninterrupted bytes",
  stageTestOptions,
  async () => {
    await assertResumesToSameOutput({
      text: recipe("max_steps: 5, learning_rate: 1.0e-3, save_steps: 2"),
      stage: "sft",
      port: "model",
      resumed: /sft: resuming from step \d+/,
    });
  },
);

Deno.test("sft: kl_weight without a teacher is a user error", stageTestOptions, async () => {
  const p = tempProject();
  try {
    const text = recipe("max_steps: 1, kl_weight: 0.5").replace(`, teacher: ${TEACHER} }`, " }");
    const r = await runRecipe(p.write("r.yaml", text));
    assert.equal(r.code, 2);
    assert.match(r.stderr, /kl_weight > 0 needs the teacher input/);
  } finally {
    await p.cleanup();
  }
});
