// Two runs at once never compute the same cache entry twice: the second waits (saying for whom) or, with
// --no-wait, refuses; gc waits for runs to finish.
import assert from "node:assert/strict";
import { listRuns } from "../../pipelines/runs.ts";
import { readEvents } from "../../pipelines/events.ts";
import { join } from "node:path";
import { spawnCli, startCli, tempProject, waitFor } from "./helpers.ts";

const RECIPE = `name: race
stages:
  train:
    kind: testing.train
    params: { steps: 30, step_ms: 40, checkpoint_every: 10 }
`;

function trainStarted(runsDir: string): boolean {
  for (const r of listRuns(runsDir)) {
    try {
      if (readEvents(join(r.dir, "events.jsonl")).some((e) => e.type === "stage_start")) return true;
    } catch {
      // not written yet
    }
  }
  return false;
}

async function collect(child: Deno.ChildProcess) {
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("a second run of the same stage waits for the first, then uses its result", async () => {
  const p = tempProject();
  try {
    const recipe = p.write("race.yaml", RECIPE);
    const first = startCli(["run", recipe]);
    await waitFor(() => trainStarted(p.runsDir), 20000, "the first run to start training");
    const second = await spawnCli(["run", recipe]);
    const a = await collect(first);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(second.code, 0, second.stderr);
    assert.match(
      second.stderr,
      /train: waiting for process \d+ on .* \(computing stage train of recipe race\), which is computing the same result/,
    );
    assert.match(second.stderr, /train: cached \(computed by another run meanwhile\)/);
    const runs = listRuns(p.runsDir);
    assert.equal(runs.length, 2);
    const actions = runs.map((r) => r.record!.stages[0].action).sort();
    assert.deepEqual(actions, ["cached", "ran"], "computed once");
    const digests = new Set(runs.map((r) => r.record!.stages[0].outputs.weights.digest));
    assert.equal(digests.size, 1);
  } finally {
    await p.cleanup();
  }
});

Deno.test("--no-wait refuses at once and names the holder; gc --no-wait refuses while a run is active", async () => {
  const p = tempProject();
  try {
    const recipe = p.write("race.yaml", RECIPE);
    const first = startCli(["run", recipe]);
    await waitFor(() => trainStarted(p.runsDir), 20000, "the first run to start training");
    const second = await spawnCli(["run", recipe, "--no-wait"]);
    assert.equal(second.code, 2);
    assert.match(
      second.stderr,
      /error: stage train \(key \w+\) is locked by process \d+ on .*computing stage train of recipe race\); run again without --no-wait to wait for it/,
    );
    const gc = await spawnCli(["gc", "--no-wait", "--cache-dir", p.cacheDir], { cwd: p.dir });
    assert.equal(gc.code, 2);
    assert.match(gc.stderr, /runs are using the cache .*; run gc again without --no-wait to wait/);
    const a = await collect(first);
    assert.equal(a.code, 0, a.stderr);
  } finally {
    await p.cleanup();
  }
});
