// Acceptance test: `kill -9` during a checkpointing stage, then the same command again, resumes from the latest
// complete checkpoint, skips the finished stages and ends with the digest of an uninterrupted run.
import assert from "node:assert/strict";
import { join } from "node:path";
import { listCheckpoints } from "../../pipelines/checkpoints.ts";
import { Rng } from "../../util/rng.ts";
import { lastEvents, outputDigests, ranStages, spawnCli, startCli, tempProject, waitFor } from "./helpers.ts";

const RECIPE = `name: resume
description: kill -9 and resume
settings: { seed: 11, keep_checkpoints: 2 }
stages:
  text:
    kind: testing.text
    params: { text: "seed data" }
  train:
    kind: testing.train
    params: { steps: 40, dim: 256, checkpoint_every: 3, step_ms: 30 }
    inputs: { data: "\${text.text}" }
`;

function checkpointSteps(cacheDir: string): number[] {
  const root = join(cacheDir, "checkpoints");
  const steps: number[] = [];
  try {
    for (const d of Deno.readDirSync(root)) {
      for (const cp of listCheckpoints(join(root, d.name))) steps.push(cp.step);
    }
  } catch {
    // not created yet
  }
  return steps;
}

Deno.test("kill -9 mid-stage, then rerun: resumes from a checkpoint and reproduces the uninterrupted digest", async () => {
  const ref = tempProject();
  const p = tempProject();
  try {
    // The uninterrupted reference (step_ms is not part of the key, so the fast run has the same key).
    const refRecipe = ref.write("resume.yaml", RECIPE);
    const r0 = await spawnCli(["run", refRecipe, "--set", "train.params.step_ms=0"]);
    assert.equal(r0.code, 0, r0.stderr);
    const expected = outputDigests(ref)["train.weights"];

    const recipe = p.write("resume.yaml", RECIPE);
    const rng = new Rng(Date.now());
    let killedAt: number[] = [];
    for (let attempt = 0; attempt < 2; attempt++) {
      const child = startCli(["run", recipe]);
      // Wait for a first (new) checkpoint, then kill at a random moment - possibly in the middle of a save.
      const before = Math.max(0, ...checkpointSteps(p.cacheDir));
      await waitFor(() => checkpointSteps(p.cacheDir).some((s) => s > before), 20000, "a checkpoint");
      await new Promise((r) => setTimeout(r, rng.int(120)));
      child.kill("SIGKILL");
      const status = await child.status;
      assert.equal(status.signal, "SIGKILL");
      await child.stdout.cancel();
      await child.stderr.cancel();
      killedAt = checkpointSteps(p.cacheDir);
      assert.ok(
        killedAt.length >= 1 && killedAt.length <= 3,
        `checkpoints are pruned to keep_checkpoints: ${killedAt}`,
      );
    }

    const status = await spawnCli(["status", recipe]);
    assert.match(status.stdout, /did not finish/);
    assert.match(status.stdout, /train\s+testing\.train\s+started, did not finish \(last step \d+\)/);

    const resumeFrom = Math.max(...killedAt);
    const r = await spawnCli(["run", recipe]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /train: resuming from step \d+/);
    assert.deepEqual(ranStages(p), ["train"], "the finished text stage is not run again");
    const metrics = lastEvents(p).filter((e) => e.type === "metric");
    assert.ok(metrics.length > 0);
    const firstStep = (metrics[0] as { step: number }).step;
    assert.ok(
      firstStep > 1 && firstStep >= resumeFrom - 3,
      `resumed at step ${firstStep}, latest checkpoint ${resumeFrom}`,
    );
    assert.equal(outputDigests(p)["train.weights"], expected);
    assert.deepEqual(checkpointSteps(p.cacheDir), [], "checkpoints are deleted once the output is stored");
  } finally {
    await ref.cleanup();
    await p.cleanup();
  }
});

Deno.test("a stage that fails (NaN loss) keeps its checkpoints, is recorded as failed, and the same command resumes", async () => {
  const p = tempProject();
  try {
    const recipe = p.write(
      "nan.yaml",
      RECIPE.replace("step_ms: 30 }", "step_ms: 0, fail_at_step: 10 }"),
    );
    const r = await spawnCli(["run", recipe]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(
      r.stderr,
      /train \(testing\.train\) failed: loss is NaN at step 10; the last good checkpoint is kept \(checkpoint at step 9 kept: the next run resumes from it\)/,
    );
    assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace for a user error");
    const lock = Deno.readTextFileSync(p.path("distillery.lock"));
    assert.match(lock, /train:\n\s+kind: testing\.train\n\s+status: failed/);
    assert.match(lock, /error: loss is NaN at step 10/);
    const ev = lastEvents(p);
    const failed = ev.find((e) => e.type === "stage_failed") as {
      user_error: boolean;
      checkpoint_step: number;
    };
    assert.equal(failed.user_error, true);
    assert.equal(failed.checkpoint_step, 9);
    assert.ok(
      ev.some((e) => e.type === "metric" && e.values.loss === null),
      "the NaN loss is logged (as null)",
    );
    assert.deepEqual(checkpointSteps(p.cacheDir), [6, 9]);

    const plan = await spawnCli(["plan", recipe]);
    assert.match(
      plan.stdout,
      /train\s+testing\.train\s+will run\s+previous attempt failed: loss is NaN at step 10/,
    );
    assert.match(plan.stdout, /will resume from checkpoint at step 9/);
    const again = await spawnCli(["run", recipe]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /train: resuming from step 9/);
    assert.equal(
      lastEvents(p).filter((e) => e.type === "metric").map((e) => (e as { step: number }).step).join(","),
      "10",
      "the resumed attempt starts at step 10",
    );
    // Fixing the parameter changes the key: that run starts afresh, it does not reuse the failed run's state.
    const fixed = await spawnCli(["run", recipe, "--set", "train.params.fail_at_step=null"]);
    assert.equal(fixed.code, 0, fixed.stderr);
    assert.doesNotMatch(fixed.stderr, /resuming/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("Ctrl-C (SIGINT) stops the stage at a step boundary: exit 130, recorded as interrupted, checkpoints kept", async () => {
  const p = tempProject();
  try {
    const recipe = p.write("resume.yaml", RECIPE.replace("step_ms: 30", "step_ms: 50"));
    const child = startCli(["run", recipe]);
    await waitFor(() => checkpointSteps(p.cacheDir).length > 0, 20000, "a checkpoint");
    child.kill("SIGINT");
    const out = await child.output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 130, stderr);
    assert.match(stderr, /interrupted: stopping/);
    assert.match(
      stderr,
      /train: interrupted after .* \(checkpoint at step \d+ kept: the next run resumes from it\)/,
    );
    const failed = lastEvents(p).find((e) => e.type === "stage_failed") as { interrupted: boolean };
    assert.equal(failed.interrupted, true);
    assert.equal(lastEvents(p).at(-1)!.type, "run_finish");
    assert.match(Deno.readTextFileSync(p.path("distillery.lock")), /error: interrupted/);
    assert.ok(checkpointSteps(p.cacheDir).length > 0);
    const again = await spawnCli(["run", recipe, "--set", "train.params.step_ms=0"]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /resuming from step/);
  } finally {
    await p.cleanup();
  }
});
