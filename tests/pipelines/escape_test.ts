// Stages that misbehave: outputs escaping the cache (symlinks, `..` names) are refused with a user error; internal
// errors keep their stack and exit 1; a stage that does not write its output is an internal error; runtime facts
// enter the key of device stages only.
import assert from "node:assert/strict";
import { join } from "node:path";
import { safeJoin } from "../../pipelines/paths.ts";
import { StageRegistry } from "../../pipelines/registry.ts";
import { defineStage } from "../../pipelines/stage.ts";
import { lastEvents, lastRun, ranStages, runCli, spawnCli, tempProject } from "./helpers.ts";

function misbehave(action: string, extra = "") {
  const p = tempProject();
  const recipe = p.write(
    "bad.yaml",
    `name: bad
stages:
  bad:
    kind: testing.misbehave
    params: { action: ${action}${extra} }
`,
  );
  return { p, recipe };
}

function storeIsEmpty(cacheDir: string): boolean {
  const objects = [...Deno.readDirSync(join(cacheDir, "objects"))];
  const tmp = [...Deno.readDirSync(join(cacheDir, "tmp"))];
  return objects.length === 0 && tmp.length === 0;
}

Deno.test("an output with a symbolic link leaving the artifact is refused (exit 2, nothing stored)", async () => {
  for (const action of ["symlink_out", "symlink_absolute"]) {
    const { p, recipe } = misbehave(action);
    try {
      const r = action === "symlink_out" ? await spawnCli(["run", recipe]) : await runCli(["run", recipe]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(
        r.stderr,
        /bad \(testing\.misbehave\) failed: output "out" of stage bad \(kind testing\.misbehave\): link is a symbolic link to .*, outside the artifact; outputs must be self-contained/,
      );
      assert.doesNotMatch(r.stderr, /^\s+at /m);
      assert.ok(storeIsEmpty(p.cacheDir), "nothing reaches the store");
      assert.equal(lastRun(p).stages[0].action, "failed");
    } finally {
      await p.cleanup();
    }
  }
});

Deno.test("a symbolic link inside the artifact is kept (and hashed as a link)", async () => {
  const { p, recipe } = misbehave("symlink_inside");
  try {
    const r = await runCli(["run", recipe]);
    assert.equal(r.code, 0, r.stderr);
    const out = lastRun(p).stages[0].outputs.out.path;
    assert.equal(Deno.readLinkSync(join(out, "alias.txt")), "real.txt");
    assert.equal(Deno.readTextFileSync(join(out, "alias.txt")), "real\n");
    assert.equal((await runCli(["run", recipe])).code, 0);
    assert.deepEqual(ranStages(p), [], "and verified on the next run");
  } finally {
    await p.cleanup();
  }
});

Deno.test("file names built from parameters cannot escape the output directory", async () => {
  for (const name of ["../escaped.txt", "/etc/evil", "a/../../b"]) {
    const { p, recipe } = misbehave("escape_name", `, name: "${name}"`);
    try {
      const r = await runCli(["run", recipe]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /failed: path ".*" (escapes|must be relative)/);
      assert.ok(storeIsEmpty(p.cacheDir));
    } finally {
      await p.cleanup();
    }
  }
  assert.equal(safeJoin("/out", "a/b/../c.txt"), "/out/a/c.txt");
  assert.throws(() => safeJoin("/out", "a\0b"), /NUL/);
});

Deno.test("user errors exit 2 without a stack; internal errors exit 1 with one; a missing output is a bug", async () => {
  const user = misbehave("user_error");
  try {
    const r = await spawnCli(["run", user.recipe]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /bad \(testing\.misbehave\) failed: the data has a problem the user must fix/);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
  } finally {
    await user.p.cleanup();
  }
  const internal = misbehave("internal_error");
  try {
    const r = await spawnCli(["run", internal.recipe]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /bad \(testing\.misbehave\) failed with an internal error:\nTypeError: a bug inside the stage\n\s+at /,
    );
    const failed = lastEvents(internal.p).find((e) => e.type === "stage_failed") as { user_error: boolean };
    assert.equal(failed.user_error, false);
    assert.match(Deno.readTextFileSync(internal.p.path("distillery.lock")), /status: failed/);
  } finally {
    await internal.p.cleanup();
  }
  const missing = misbehave("no_output");
  try {
    const r = await runCli(["run", missing.recipe]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /output "out" of stage bad \(kind testing\.misbehave\) was not written \(expected a directory at /,
    );
  } finally {
    await missing.p.cleanup();
  }
});

Deno.test("runtime facts enter the key of device stages only; --gpu and DISTILLERY_GPU change them", async () => {
  const p = tempProject();
  // the in-process runs below read DISTILLERY_GPU, which GPU test runs set (DISTILLERY_GPU=dawn deno test ...)
  const outerGpu = Deno.env.get("DISTILLERY_GPU");
  Deno.env.delete("DISTILLERY_GPU");
  try {
    const recipe = p.write(
      "dev.yaml",
      `name: dev
settings: { gpu: builtin }
stages:
  dev:
    kind: testing.device
  text:
    kind: testing.text
    params: { text: hi }
`,
    );
    const facts = (provider: string) => ({
      resolveRuntimeFacts: (s: { gpu: string; dtype: string }) =>
        Promise.resolve({
          provider: provider === "auto" ? s.gpu : provider,
          adapter: "test adapter",
          dtype: s.dtype,
        }),
    });
    assert.equal((await runCli(["run", recipe], facts("auto"))).code, 0);
    const out = lastRun(p).stages[0].outputs.facts.path;
    assert.deepEqual(JSON.parse(Deno.readTextFileSync(out)), {
      facts: { provider: "builtin", adapter: "test adapter", dtype: "f32" },
      dtype: "f32",
      gpu: "builtin",
    });
    assert.match(Deno.readTextFileSync(p.path("distillery.lock")), /device: "builtin: test adapter"/);
    assert.equal((await runCli(["run", recipe], facts("auto"))).code, 0);
    assert.deepEqual(ranStages(p), []);
    assert.equal((await runCli(["run", recipe, "--gpu", "dawn"], facts("auto"))).code, 0);
    assert.deepEqual(ranStages(p), ["dev"], "a different provider reruns the device stage only");
    // In a real process the facts come from probing the adapter: `auto` resolves to the provider that would run
    // (the built-in one by default), so it shares the recipe's `builtin` key. The environment's cases run in
    // subprocesses, each with its own DISTILLERY_GPU.
    const viaEnv = await spawnCli(["run", recipe], { env: { DISTILLERY_GPU: "auto" } });
    assert.equal(viaEnv.code, 0, viaEnv.stderr);
    const viaFlag = await spawnCli(["run", recipe, "--gpu", "auto"]);
    assert.equal(viaFlag.code, 0, viaFlag.stderr);
    assert.deepEqual(ranStages(p), [], "DISTILLERY_GPU=auto is the same as --gpu auto");
    // Dawn is only offered on hardware adapters: elsewhere asking for it is a clear user error.
    const dawn = await spawnCli(["run", recipe, "--gpu", "dawn"]);
    if (dawn.code !== 0) {
      assert.equal(dawn.code, 2);
      assert.match(dawn.stderr, /Dawn \(npm:webgpu\) found no adapter/);
    }
    const worse = await spawnCli(["run", recipe], { env: { DISTILLERY_GPU: "cuda" } });
    assert.equal(worse.code, 2);
    assert.match(worse.stderr, /DISTILLERY_GPU=cuda: expected one of auto, dawn, builtin/);
    assert.equal((await runCli(["run", recipe, "--set", "settings.dtype=f16"], facts("auto"))).code, 0);
    assert.deepEqual(ranStages(p), ["dev"]);
  } finally {
    if (outerGpu !== undefined) Deno.env.set("DISTILLERY_GPU", outerGpu);
    await p.cleanup();
  }
});

Deno.test("a stage reading a setting it did not declare fails loudly (its key would miss the value)", async () => {
  const sneaky = defineStage({
    kind: "sneaky",
    version: 1,
    doc: "reads the seed without declaring it",
    params: {},
    inputs: {},
    outputs: { out: { type: "file", doc: "x" } },
    async run(ctx) {
      await Deno.writeTextFile(ctx.outputs.out, String(ctx.settings.seed));
    },
  });
  const p = tempProject();
  try {
    const recipe = p.write("s.yaml", "name: s\nstages:\n  s:\n    kind: sneaky\n");
    const r = await runCli(["run", recipe], { registry: new StageRegistry([sneaky]) });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /stage kind sneaky reads ctx\.settings\.seed but does not declare usesSeed: true/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("a stage declared deterministic whose recompute differs gets a warning", async () => {
  const { p, recipe } = misbehave("random_output");
  try {
    assert.equal((await runCli(["run", recipe])).code, 0);
    const r = await runCli(["run", recipe, "--force", "bad"]);
    assert.equal(r.code, 0);
    assert.match(
      r.stderr,
      /warning: bad: stage kind testing\.misbehave is declared deterministic, but recomputing key \w+ changed output out/,
    );
    assert.ok(lastEvents(p).some((e) => e.type === "log" && e.level === "warn"));
  } finally {
    await p.cleanup();
  }
});

Deno.test("two recipes with one name in one directory are warned about (their lock records collide)", async () => {
  const p = tempProject();
  try {
    const a = p.write(
      "a.yaml",
      "name: same\nstages:\n  t:\n    kind: testing.text\n    params: { text: a }\n",
    );
    const b = p.write(
      "b.yaml",
      "name: same\nstages:\n  t:\n    kind: testing.text\n    params: { text: b }\n",
    );
    assert.equal((await runCli(["run", a])).code, 0);
    const r = await runCli(["run", b]);
    assert.match(
      r.stderr,
      /holds a record of recipe "same" from a\.yaml; two recipes in one directory share a name/,
    );
  } finally {
    await p.cleanup();
  }
});
