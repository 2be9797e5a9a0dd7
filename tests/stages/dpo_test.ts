// ref_logprobs and dpo through the runner, on preference pairs made from the cloze items (chosen = the true
// ending, rejected = a wrong one): rewards are logged with TRL's definitions and reward accuracy rises, the
// reference is checked against the pairs, and an interrupted run resumes to the same bytes.
import assert from "node:assert/strict";
import { join } from "node:path";
import { tempProject } from "../pipelines/helpers.ts";
import { TokenFileReader } from "../../data/token_file.ts";
import { TOKENS_FILE } from "../../stages/shared/tokens.ts";
import {
  assertResumesToSameOutput,
  CLOZE,
  outputPath,
  runRecipe,
  stageMetrics,
  stageTestOptions,
  TEACHER,
} from "./helpers.ts";

const BETA = 0.1;

function pairs(name: string, offset: number, limit: number): string {
  return `  ${name}:
    kind: tokenize
    params: { format: preference, pairs_from_choices: true, template: none, max_length: 40, max_prompt_length: 20, offset: ${offset}, limit: ${limit} }
    inputs: { tokenizer: ${TEACHER}, data: [${CLOZE}] }
`;
}

function recipe(dpoParams: string): string {
  return `name: dpo_test
description: dpo on cloze pairs
settings: { seed: 4 }
stages:
${pairs("train_pairs", 0, 16)}${pairs("held_pairs", 1200, 8)}  ref_train:
    kind: ref_logprobs
    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}" }
  dpo:
    kind: dpo
    params: { beta: ${BETA}, per_device_train_batch_size: 8, gradient_accumulation_steps: 1, logging_steps: 1, ${dpoParams} }
    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}", ref: "\${ref_train.ref}" }
  ref_held:
    kind: ref_logprobs
    inputs: { model: ${TEACHER}, pairs: "\${held_pairs.tokens}" }
`;
}

Deno.test(
  "dpo: rewards are logged with TRL's definitions and reward accuracy rises over a few steps",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const r = await runRecipe(
        p.write("r.yaml", recipe("max_steps: 8, learning_rate: 1.0e-3, warmup_ratio: 0")),
        ["dpo"],
      );
      assert.equal(r.code, 0, r.stderr);
      const m = stageMetrics(p, "dpo");
      assert.equal(m.length, 8);
      for (
        const k of ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "loss"]
      ) {
        assert.ok(m.every((x) => Number.isFinite(x.values[k])), k);
      }
      // step 1 scores the reference itself: zero rewards, loss ln 2
      assert.ok(Math.abs(m[0].values.loss - Math.log(2)) < 1e-5, `loss ${m[0].values.loss}`);
      assert.equal(m[0].values["rewards/margins"], 0);
      assert.equal(m[0].values["rewards/accuracies"], 0);
      for (const x of m) {
        const v = x.values;
        assert.ok(Math.abs(v["rewards/margins"] - (v["rewards/chosen"] - v["rewards/rejected"])) < 1e-4);
      }
      const late = m.slice(-2).map((x) => x.values["rewards/accuracies"]);
      assert.ok(
        late.every((a) => a >= 0.75),
        `reward accuracy ${m.map((x) => x.values["rewards/accuracies"])}`,
      );
      assert.ok(m[7].values["rewards/margins"] > m[2].values["rewards/margins"]);
      assert.ok(m[7].values.loss < 0.5);
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "dpo: interrupted after a checkpoint, resumes to the same bytes; a reference of other pairs is refused",
  stageTestOptions,
  async () => {
    const text = recipe("max_steps: 4, learning_rate: 1.0e-3, save_steps: 2");
    await assertResumesToSameOutput(
      { text, stage: "dpo", port: "model", resumed: /dpo: resuming from step \d+/, targets: ["dpo"] },
      async (p) => {
        const wrong = text.replace(`ref: "\${ref_train.ref}"`, `ref: "\${ref_held.ref}"`);
        const w = await runRecipe(p.write("w.yaml", wrong), ["dpo"]);
        assert.equal(w.code, 2);
        assert.match(w.stderr, /was computed on other pairs/);
      },
    );
  },
);

Deno.test(
  "ref_logprobs: interrupted part-way, the rerun resumes after the scored pairs and writes the same bytes",
  stageTestOptions,
  async () => {
    const text = recipe("max_steps: 1").replace(
      `kind: ref_logprobs\n    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}" }`,
      `kind: ref_logprobs\n    params: { per_device_batch_size: 4, save_steps: 1 }\n    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}" }`,
    );
    assert.match(text, /save_steps: 1/);
    await assertResumesToSameOutput({
      text,
      stage: "ref_train",
      port: "ref",
      resumed: /ref_train: resuming after \d+ of 16 pairs/,
      targets: ["ref_train"],
    });
  },
);

Deno.test(
  "dpo rpo_alpha: adds the chosen tokens' mean NLL to the loss and keeps the chosen log-probs higher",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      // one micro-batch of all 16 pairs per step, so step 1 covers every pair
      const train = "max_steps: 6, learning_rate: 1.0e-3, warmup_ratio: 0";
      const text =
        recipe(train).replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 16") +
        `  dpo_rpo:
    kind: dpo
    params: { beta: ${BETA}, per_device_train_batch_size: 16, gradient_accumulation_steps: 1, logging_steps: 1, ${train}, rpo_alpha: 0.5 }
    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}", ref: "\${ref_train.ref}" }
`;
      const r = await runRecipe(p.write("r.yaml", text), ["dpo", "dpo_rpo"]);
      assert.equal(r.code, 0, r.stderr);
      const plain = stageMetrics(p, "dpo"), rpo = stageMetrics(p, "dpo_rpo");
      // the chosen completions' target tokens: sequence 2i of the pairs file is pair i's chosen one, and a
      // token is a target when it is masked in and not the first of its sequence
      const reader = await TokenFileReader.open(join(outputPath(p, "train_pairs", "tokens"), TOKENS_FILE));
      let chosenTokens = 0;
      try {
        for (let i = 0; i < reader.numSequences; i += 2) {
          const { mask } = reader.read(i);
          for (let t = 1; t < mask.length; t++) chosenTokens += mask[t];
        }
      } finally {
        reader.close();
      }
      // step 1 scores the reference itself: the DPO part is ln 2, the rest 0.5 x the chosen tokens' mean NLL
      const v = rpo[0].values;
      const expected = Math.log(2) + (0.5 * -16 * v["logps/chosen"]) / chosenTokens;
      assert.ok(Math.abs(v.loss - expected) < 1e-4 * expected, `loss ${v.loss}, expected ${expected}`);
      assert.ok(Math.abs(plain[0].values.loss - Math.log(2)) < 1e-5, "the plain run is unchanged");
      // the NLL term holds the chosen completions up while DPO pushes the pair apart
      const last = (m: typeof rpo, k: string) => m[m.length - 1].values[k];
      assert.ok(
        last(rpo, "logps/chosen") > last(plain, "logps/chosen"),
        `logps/chosen: rpo ${last(rpo, "logps/chosen")}, plain ${last(plain, "logps/chosen")}`,
      );
      assert.ok(last(rpo, "rewards/margins") > 0, "still learns the preference");
    } finally {
      await p.cleanup();
    }
  },
);
