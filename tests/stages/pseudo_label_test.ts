// pseudo_label through the runner: text prefixes of equal length and chat prompts, seeded reproducible
// sampling, a dataset the tokenize stage reads, and part-way resume with identical output.
import assert from "node:assert/strict";
import { join } from "node:path";
import { Tokenizer } from "../../models/tokenizer.ts";
import { tempProject } from "../pipelines/helpers.ts";
import {
  assertResumesToSameOutput,
  outputPath,
  runRecipe,
  stageTestOptions,
  TEACHER,
  TRAIN_TEXT,
} from "./helpers.ts";

function recipe(params: string): string {
  return `name: labels
description: pseudo-labels
settings: { seed: 6 }
stages:
  labels:
    kind: pseudo_label
    params: { format: text, prompt_tokens: 6, max_new_tokens: 10, batch_size: 4, ${params} }
    inputs: { teacher: ${TEACHER}, prompts: ${TRAIN_TEXT} }
  tokens:
    kind: tokenize
    params: { max_length: 32 }
    inputs: { tokenizer: ${TEACHER}, data: ["\${labels.data}"] }
`;
}

function records(
  dir: string,
): { prompt: string; completion: string; text: string; completion_tokens: number }[] {
  return Deno.readTextFileSync(join(dir, "train.jsonl")).trim().split("\n").map((l) => JSON.parse(l));
}

Deno.test(
  "pseudo_label: completions for equal-length text prompts; text = prompt + completion; tokenizable",
  stageTestOptions,
  async () => {
    const p = tempProject();
    try {
      const r = await runRecipe(p.write("r.yaml", recipe("limit: 6, save_every: 2")));
      assert.equal(r.code, 0, r.stderr);
      // a chunk narrower than batch_size (4) would cap the batch: chunks are at least one batch
      assert.match(
        r.stderr + r.stdout,
        /6 completions to write, in batches of up to 4, a checkpoint every 4/,
      );
      const recs = records(outputPath(p, "labels", "data"));
      assert.equal(recs.length, 6);
      const tok = await Tokenizer.fromDir(TEACHER);
      for (const x of recs) {
        assert.equal(tok.encode(x.prompt, { addSpecialTokens: false }).length, 6);
        assert.equal(x.text, x.prompt + x.completion);
        assert.ok(x.completion_tokens > 0 && x.completion_tokens <= 10);
      }
      // greedy decoding of the first prompt continues like the teacher
      const greedy = await runRecipe(p.write("g.yaml", recipe("limit: 2, temperature: 0")));
      assert.equal(greedy.code, 0, greedy.stderr);
      const g = records(outputPath(p, "labels", "data"));
      assert.equal(g[0].prompt, recs[0].prompt);
      const info = JSON.parse(
        Deno.readTextFileSync(join(outputPath(p, "labels", "data"), "dataset_info.json")),
      );
      assert.equal(info.records, 2);
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "pseudo_label: interrupted after a checkpoint, the rerun resumes and writes the same bytes",
  stageTestOptions,
  async () => {
    await assertResumesToSameOutput({
      text: recipe("limit: 16, save_every: 2"),
      stage: "labels",
      port: "data",
      // chunks are at least one batch (batch_size 4), so checkpoints fall on multiples of 4
      resumed: /labels: resuming after (4|8|12) of 16 prompts/,
    });
  },
);
