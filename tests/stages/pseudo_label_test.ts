// pseudo_label through the runner: text prefixes of equal length and chat prompts, seeded reproducible
// sampling, a dataset the tokenize stage reads, and part-way resume with identical output; checkpoints that
// link earlier chunks' part files instead of rewriting them, and resume from the older single-file format.
import assert from "node:assert/strict";
import { join } from "node:path";
import { StageCheckpoints } from "../../pipelines/checkpoints.ts";
import type { Checkpoint } from "../../pipelines/stage.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { type Labelled, partFileName, readCompletions, writeCompletions } from "../../stages/pseudo_label.ts";
import { tempProject } from "../pipelines/helpers.ts";
import {
  assertResumesToSameOutput,
  outputPath,
  runAndInterrupt,
  runRecipe,
  stageTestOptions,
  storedCheckpoints,
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

/** Fake completions 0..n-1 (the checkpoint functions only store and read them back). */
function fakeRecords(n: number): Labelled[] {
  return Array.from({ length: n }, (_, i) => ({
    prompt: `p${i}`,
    completion: `c${i}`,
    text: `p${i}c${i}`,
    completion_tokens: i + 1,
    finished: i % 2 === 0,
  }));
}

/** Inode of each part file of a checkpoint, by name. */
function partInodes(cp: Checkpoint): Map<string, number | null> {
  const out = new Map<string, number | null>();
  for (const e of Deno.readDirSync(join(cp.dir, "parts"))) {
    out.set(e.name, Deno.statSync(join(cp.dir, "parts", e.name)).ino);
  }
  return out;
}

/** Rewrites a checkpoint in the format before part files: every completion in one completions.jsonl. */
async function toLegacyFormat(cp: Checkpoint): Promise<void> {
  const recs = await readCompletions(cp);
  await Deno.remove(join(cp.dir, "parts"), { recursive: true });
  await Deno.writeTextFile(
    join(cp.dir, "completions.jsonl"),
    recs.map((r) => JSON.stringify(r)).join("\n") + "\n",
  );
}

Deno.test(
  "pseudo_label checkpoints: a save links the earlier parts and writes only the new chunk",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      // keep 1: the older checkpoint is pruned after each save, and the newer must not depend on it
      const cps = new StageCheckpoints(dir, 1);
      const recs = fakeRecords(10);
      await cps.save(4, (d) => writeCompletions(d, recs.slice(0, 4), cps.latest()));
      const first = cps.latest()!;
      const firstInodes = partInodes(first);
      assert.deepEqual([...firstInodes.keys()], [partFileName(0)]);
      await cps.save(8, (d) => writeCompletions(d, recs.slice(0, 8), cps.latest()));
      const second = cps.latest()!;
      const secondInodes = partInodes(second);
      assert.deepEqual([...secondInodes.keys()].sort(), [partFileName(0), partFileName(4)]);
      assert.equal(
        secondInodes.get(partFileName(0)),
        firstInodes.get(partFileName(0)),
        "part 0 is a hard link",
      );
      // the first checkpoint is pruned, yet the second still holds all of its completions
      assert.deepEqual(cps.latest(), second);
      assert.throws(() => Deno.statSync(first.dir), Deno.errors.NotFound);
      assert.deepEqual(await readCompletions(second), recs.slice(0, 8));
      await cps.save(10, (d) => writeCompletions(d, recs, cps.latest()));
      const third = cps.latest()!;
      const thirdInodes = partInodes(third);
      for (const [name, ino] of secondInodes) {
        assert.equal(thirdInodes.get(name), ino, `${name} is a hard link`);
      }
      assert.deepEqual(await readCompletions(third), recs);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "pseudo_label checkpoints: the single-file format reads, and the next save starts parts",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      const cps = new StageCheckpoints(dir, 2);
      const recs = fakeRecords(7);
      await cps.save(3, (d) => writeCompletions(d, recs.slice(0, 3), null));
      const legacy = cps.latest()!;
      await toLegacyFormat(legacy);
      assert.deepEqual(await readCompletions(legacy), recs.slice(0, 3));
      await cps.save(7, (d) => writeCompletions(d, recs, cps.latest()));
      const next = cps.latest()!;
      // the legacy file is not linked: its completions go into the new checkpoint's first part, once
      assert.deepEqual([...partInodes(next).keys()], [partFileName(0)]);
      assert.deepEqual(await readCompletions(next), recs);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "pseudo_label checkpoints: a missing or short part is an error, not shifted completions",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      const cps = new StageCheckpoints(dir, 1);
      const recs = fakeRecords(6);
      await cps.save(2, (d) => writeCompletions(d, recs.slice(0, 2), cps.latest()));
      await cps.save(4, (d) => writeCompletions(d, recs.slice(0, 4), cps.latest()));
      await cps.save(6, (d) => writeCompletions(d, recs, cps.latest()));
      const cp = cps.latest()!;
      await Deno.remove(join(cp.dir, "parts", partFileName(2)));
      await assert.rejects(
        readCompletions(cp),
        /part 000000000004\.jsonl starts at completion 4, expected 2/,
      );
      await Deno.remove(join(cp.dir, "parts", partFileName(4)));
      await assert.rejects(readCompletions(cp), /holds 2 completions, not 6/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "pseudo_label: a resumed run's checkpoints hard-link the parts of the one it resumed from",
  stageTestOptions,
  async () => {
    await assertResumesToSameOutput({
      text: recipe("limit: 24, save_every: 2"),
      stage: "labels",
      port: "data",
      resumed: /labels: resuming after (4|8|12|16|20) of 24 prompts/,
      // a second interrupted run, stopped once it saved a checkpoint of its own
      beforeResume: async (p, path) => {
        const before = storedCheckpoints(p).at(-1)!;
        const inodes = partInodes(before);
        const r = await runAndInterrupt(p, path, (steps) => steps.some((s) => s > before.step));
        assert.equal(r.code, 130, r.stderr);
        const after = storedCheckpoints(p).at(-1)!;
        assert.ok(after.step > before.step);
        const linked = partInodes(after);
        for (const [name, ino] of inodes) assert.equal(linked.get(name), ino, `${name} is a hard link`);
        assert.ok(linked.has(partFileName(before.step)), "the new chunks are a part of their own");
      },
    });
  },
);

Deno.test(
  "pseudo_label: resumes from a checkpoint in the single-file format (completions.jsonl)",
  stageTestOptions,
  async () => {
    await assertResumesToSameOutput({
      text: recipe("limit: 16, save_every: 2"),
      stage: "labels",
      port: "data",
      resumed: /labels: resuming after (4|8|12) of 16 prompts/,
      beforeResume: async (p) => {
        for (const cp of storedCheckpoints(p)) await toLegacyFormat(cp);
      },
    });
  },
);
