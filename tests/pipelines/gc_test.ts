import assert from "node:assert/strict";
import { join } from "node:path";
import { CHAIN_RECIPE, lastRun, ranStages, runCli, spawnCli, tempProject } from "./helpers.ts";

function countObjects(cacheDir: string): number {
  let n = 0;
  for (const d of Deno.readDirSync(join(cacheDir, "objects"))) {
    for (const f of Deno.readDirSync(join(cacheDir, "objects", d.name))) if (!f.name.endsWith(".json")) n++;
  }
  return n;
}

Deno.test("gc removes what no lock file references, keeps what it does, and says how much it freed", async () => {
  const p = tempProject();
  try {
    p.write("data/extra.txt", "extra line\n");
    const recipe = p.write("chain.yaml", CHAIN_RECIPE);
    assert.equal((await runCli(["run", recipe])).code, 0);
    assert.equal((await runCli(["run", recipe, "--set", "text.params.repeat=9"])).code, 0);
    assert.equal(countObjects(p.cacheDir), 8, "two generations of four outputs");
    const lockFile = p.path("distillery.lock");

    const dry = await spawnCli(["gc", "--dry-run", lockFile, "--cache-dir", p.cacheDir], { cwd: p.dir });
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /would free [\d.]+ (B|kB): 4 cache entries, 4 objects/);
    assert.equal(countObjects(p.cacheDir), 8, "a dry run removes nothing");

    const r = await spawnCli(["gc", lockFile, "--cache-dir", p.cacheDir], { cwd: p.dir });
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      /freed [\d.]+ (B|kB): 4 cache entries, 4 objects, 0 temporary directories\nkept 4 entries and 4 objects/,
    );
    assert.equal(countObjects(p.cacheDir), 4);
    // What the lock file records is still cached...
    assert.equal((await runCli(["run", recipe, "--set", "text.params.repeat=9"])).code, 0);
    assert.deepEqual(ranStages(p), []);
    // ...and the older generation is gone.
    assert.equal((await runCli(["run", recipe])).code, 0);
    assert.deepEqual(ranStages(p).sort(), ["count", "text", "train", "upper"]);
    assert.ok(lastRun(p));
  } finally {
    await p.cleanup();
  }
});

Deno.test("gc finds lock files under the project, keeps checkpoints unless asked, and cleans temporary directories", async () => {
  const p = tempProject();
  try {
    const recipe = p.write(
      "sub/nan.yaml",
      "name: nan\nstages:\n  t:\n    kind: testing.train\n    params: { steps: 10, checkpoint_every: 2, fail_at_step: 5 }\n",
    );
    assert.equal((await runCli(["run", recipe, "--cache-dir", p.cacheDir])).code, 2);
    Deno.mkdirSync(join(p.cacheDir, "tmp", "deadbeef.1.x"), { recursive: true });
    Deno.writeTextFileSync(join(p.cacheDir, "tmp", "deadbeef.1.x", "junk"), "x".repeat(1000));
    const r = await spawnCli(["gc", "--cache-dir", p.cacheDir], { cwd: p.dir });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /keeping what .*sub\/distillery\.lock records/);
    assert.match(r.stdout, /1 temporary directories/);
    assert.match(r.stdout, /checkpoints [\d.]+ (B|kB) \(--checkpoints removes them\)/);
    const r2 = await spawnCli(["gc", "--checkpoints", "--cache-dir", p.cacheDir], { cwd: p.dir });
    assert.match(r2.stdout, /1 checkpoint directories/);
    assert.deepEqual([...Deno.readDirSync(join(p.cacheDir, "checkpoints"))], []);
  } finally {
    await p.cleanup();
  }
});
