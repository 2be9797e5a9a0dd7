// Acceptance tests of caching, run as real subprocesses: a re-run executes nothing, a parameter change reruns
// exactly the downstream stages, a changed input file reruns its consumers, a corrupted cache file is detected.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  CHAIN_RECIPE,
  lastEvents,
  lastRun,
  outputDigests,
  ranStages,
  spawnCli,
  tempProject,
} from "./helpers.ts";

function project() {
  const p = tempProject();
  p.write("data/extra.txt", "extra line\n");
  const recipe = p.write("chain.yaml", CHAIN_RECIPE);
  return { p, recipe };
}

Deno.test("a re-run is a cache hit: no stage executes, outputs are identical (subprocess)", async () => {
  const { p, recipe } = project();
  try {
    const first = await spawnCli(["run", recipe]);
    assert.equal(first.code, 0, first.stderr);
    assert.deepEqual(ranStages(p).sort(), ["count", "text", "train", "upper"]);
    const digests = outputDigests(p);

    const second = await spawnCli(["run", recipe]);
    assert.equal(second.code, 0, second.stderr);
    assert.deepEqual(ranStages(p), []);
    assert.deepEqual(lastRun(p).stages.map((s) => s.action), ["cached", "cached", "cached", "cached"]);
    assert.deepEqual(outputDigests(p), digests);
    assert.ok(!lastEvents(p).some((e) => e.type === "stage_start"), "no stage_start event on a cached run");
    assert.match(second.stderr, /0 to run, 4 cached/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a parameter change reruns exactly the stages downstream of it (subprocess, --set and recipe edit)", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    const before = outputDigests(p);

    // upper's mode feeds count, but not text or train.
    const r = await spawnCli(["run", recipe, "--set", "upper.params.mode=reverse"]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(ranStages(p).sort(), ["count", "upper"]);
    assert.match(
      r.stderr,
      /upper \(testing\.transform\): running \(params\.mode changed: "upper" -> "reverse"\)/,
    );
    assert.equal(outputDigests(p)["text.text"], before["text.text"]);
    assert.equal(outputDigests(p)["train.weights"], before["train.weights"]);
    assert.notEqual(outputDigests(p)["upper.text"], before["upper.text"]);

    // Editing the recipe file itself at the root: text feeds everything.
    Deno.writeTextFileSync(recipe, CHAIN_RECIPE.replace("repeat: 2", "repeat: 3"));
    const r2 = await spawnCli(["run", recipe]);
    assert.equal(r2.code, 0, r2.stderr);
    assert.deepEqual(ranStages(p).sort(), ["count", "text", "train", "upper"]);

    // Back to the original recipe: everything is still in the cache.
    Deno.writeTextFileSync(recipe, CHAIN_RECIPE);
    const r3 = await spawnCli(["run", recipe]);
    assert.equal(r3.code, 0, r3.stderr);
    assert.deepEqual(ranStages(p), []);
    assert.deepEqual(outputDigests(p), before);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a parameter that is not in the key (inKey: false) does not rerun anything", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    const r = await spawnCli(["run", recipe, "--set", "train.params.checkpoint_every=3"]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(ranStages(p), []);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a changed input file reruns its consumers and what depends on them (subprocess)", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    // Same size, new content: the stat stamp changes, so the file is re-hashed.
    Deno.writeTextFileSync(p.path("data/extra.txt"), "other line\n");
    const plan = await spawnCli(["plan", recipe]);
    assert.equal(plan.code, 0, plan.stderr);
    assert.match(
      plan.stdout,
      /upper\s+testing\.transform\s+will run\s+input extra: content of data\/extra\.txt changed/,
    );
    assert.match(plan.stdout, /count\s+testing\.count\s+will run\s+upstream upper will run first/);
    assert.match(plan.stdout, /train\s+testing\.train\s+cached/);
    const r = await spawnCli(["run", recipe]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(ranStages(p).sort(), ["count", "upper"]);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a rerun stage that reproduces its output lets its consumers hit the cache (early cutoff)", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    // Upper-casing makes the new extra text produce the same output as before: count need not run.
    Deno.writeTextFileSync(p.path("data/extra.txt"), "EXTRA LINE\n");
    const r = await spawnCli(["run", recipe]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(ranStages(p), ["upper"]);
    assert.match(r.stderr, /count: cached/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("moving an input file without changing it reruns nothing (names are not in the key)", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    p.write("elsewhere/renamed.txt", Deno.readTextFileSync(p.path("data/extra.txt")));
    const r = await spawnCli([
      "run",
      recipe,
      "--set",
      "upper.inputs.extra=" + p.path("elsewhere/renamed.txt"),
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(ranStages(p), []);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a corrupted cache file is detected and the stage recomputed (subprocess)", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    const before = outputDigests(p);
    const counts = lastRun(p).stages.find((s) => s.stage === "count")!.outputs.counts.path;
    const file = join(counts, "counts.json");
    await Deno.chmod(file, 0o644);
    const text = Deno.readTextFileSync(file);
    Deno.writeTextFileSync(file, text.replace(/\d/, (d) => String((Number(d) + 1) % 10))); // same size

    const plan = await spawnCli(["plan", recipe]);
    assert.match(
      plan.stdout,
      /count\s+testing\.count\s+will run\s+cache entry is corrupt: .*counts\.json changed/,
    );
    const r = await spawnCli(["run", recipe]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stderr,
      /count: cache entry is corrupt: .*counts\.json changed \(expected sha256:\w+, found sha256:\w+\); recomputing/,
    );
    assert.deepEqual(ranStages(p), ["count"]);
    assert.equal(outputDigests(p)["count.counts"], before["count.counts"], "recomputed to the same digest");
    assert.equal(JSON.parse(Deno.readTextFileSync(file)).lines, 3);
    // The repaired entry is trusted again without re-hashing.
    const again = await spawnCli(["run", recipe]);
    assert.equal(again.code, 0);
    assert.deepEqual(ranStages(p), []);
  } finally {
    await p.cleanup();
  }
});

Deno.test("--verify re-hashes cached outputs and catches damage that stat stamps cannot see", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await spawnCli(["run", recipe])).code, 0);
    const out = lastRun(p).stages.find((s) => s.stage === "text")!.outputs.text;
    await Deno.chmod(out.path, 0o644);
    Deno.writeTextFileSync(out.path, Deno.readTextFileSync(out.path).replace("alpha", "ALPHA"));
    // Simulate damage the file system did not register (bit rot): the manifest's stamp matches the file again.
    const manifestPath = out.path + ".json";
    const manifest = JSON.parse(Deno.readTextFileSync(manifestPath));
    const st = Deno.statSync(out.path);
    manifest.entries[0].stamp = {
      size: st.size,
      mtimeMs: st.mtime!.getTime(),
      ctimeMs: st.ctime!.getTime(),
      ino: st.ino,
    };
    Deno.writeTextFileSync(manifestPath, JSON.stringify(manifest));

    const trusting = await spawnCli(["run", recipe]);
    assert.equal(trusting.code, 0);
    assert.deepEqual(
      ranStages(p),
      [],
      "without --verify, matching stamps are trusted (that is what makes no-op runs fast)",
    );
    const r = await spawnCli(["run", recipe, "--verify"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /text: cache entry is corrupt: .* changed \(expected sha256:/);
    assert.ok(ranStages(p).includes("text"));
    assert.equal(outputDigests(p)["text.text"], out.digest);
  } finally {
    await p.cleanup();
  }
});
