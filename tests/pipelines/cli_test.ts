// The CLI in-process: plan/explain/status/stages output, selection flags, the run-finished hook and events.
import assert from "node:assert/strict";
import { join } from "node:path";
import type { RunRecord } from "../../pipelines/runs.ts";
import { CHAIN_RECIPE, lastEvents, lastRun, ranStages, runCli, tempProject } from "./helpers.ts";

function project() {
  const p = tempProject();
  p.write("data/extra.txt", "extra line\n");
  const recipe = p.write("chain.yaml", CHAIN_RECIPE);
  return { p, recipe };
}

Deno.test("plan lists stages in DAG order with reasons; --dry-run and --json agree; nothing runs", async () => {
  const { p, recipe } = project();
  try {
    const r = await runCli(["plan", recipe]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      /text\s+testing\.text\s+will run\s+new: never run, no record in distillery\.lock/,
    );
    assert.match(r.stdout, /upper\s+testing\.transform\s+will run\s+upstream text will run first/);
    assert.match(r.stdout, /4 to run, 0 cached/);
    const json = JSON.parse((await runCli(["plan", recipe, "--json"])).stdout);
    assert.deepEqual(json.map((s: { stage: string; action: string }) => [s.stage, s.action]), [
      ["text", "run"],
      ["upper", "run"],
      ["count", "run"],
      ["train", "run"],
    ]);
    assert.equal(json[0].key.length, 71, "the first stage's key is known");
    assert.equal(json[1].key, null, "downstream keys wait for upstream outputs");
    const dry = await runCli(["run", recipe, "--dry-run"]);
    assert.equal(dry.stdout, r.stdout);
    assert.throws(() => lastRun(p), /no finished run/, "plan and --dry-run run nothing");
  } finally {
    await p.cleanup();
  }
});

Deno.test("--only, --from, --force, --force-all and positional targets select stages", async () => {
  const { p, recipe } = project();
  try {
    // Targets: a stage and what it needs.
    assert.equal((await runCli(["run", recipe, "upper"])).code, 0);
    assert.deepEqual(ranStages(p), ["text", "upper"]);
    assert.deepEqual(lastRun(p).stages.map((s) => s.action), ["ran", "ran", "skipped", "skipped"]);
    // --only needs cached inputs.
    const only = await runCli(["run", recipe, "--only", "train", "--set", "text.params.repeat=5"]);
    assert.equal(only.code, 2);
    assert.match(
      only.stderr,
      /stage text must run first: train needs its outputs, which are not cached\. Run without --only, or use --from text/,
    );
    assert.equal((await runCli(["run", recipe, "--only", "count,train"])).code, 0);
    assert.deepEqual(ranStages(p).sort(), ["count", "train"]);
    // Everything cached now; --force recomputes just that stage (its output is identical, so nothing downstream).
    assert.equal((await runCli(["run", recipe, "--force", "upper"])).code, 0);
    assert.deepEqual(ranStages(p), ["upper"]);
    // --from reruns a stage and everything downstream.
    assert.equal((await runCli(["run", recipe, "--from", "upper"])).code, 0);
    assert.deepEqual(ranStages(p), ["upper", "count"]);
    assert.equal((await runCli(["run", recipe, "--force-all"])).code, 0);
    assert.deepEqual(ranStages(p), ["text", "upper", "count", "train"]);
    // Unknown names are user errors with a suggestion.
    const bad = await runCli(["run", recipe, "--force", "uper"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--force uper: recipe chain has no stage "uper" \(did you mean "upper"\?\)/);
    const both = await runCli(["run", recipe, "--only", "text", "--from", "text"]);
    assert.match(both.stderr, /--only and --from cannot be combined/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("explain prints every key input and marks what differs from the recorded run", async () => {
  const { p, recipe } = project();
  try {
    assert.equal((await runCli(["run", recipe])).code, 0);
    const same = await runCli(["explain", recipe, "count"]);
    assert.equal(same.code, 0, same.stderr);
    assert.match(same.stdout, /status: cached/);
    assert.match(same.stdout, /no key input differs from the recorded run/);
    for (const name of ["scheme", "kind", "kind_version", "params.min_length", "inputs.source"]) {
      assert.match(same.stdout, new RegExp(`^\\s+${name.replace(".", "\\.")}\\s`, "m"), name);
    }
    const diff = await runCli(["explain", recipe, "upper", "--set", "upper.params.mode=lower"]);
    assert.match(diff.stdout, /^\*\s+params\.mode\s+"lower"\s+"upper"/m);
    assert.match(diff.stdout, /1 key input\(s\) differ/);
    const unknown = await runCli(["explain", recipe, "count", "--set", "upper.params.mode=lower", "--json"]);
    const x = JSON.parse(unknown.stdout);
    assert.equal(x.key, null);
    assert.deepEqual(x.unknown_upstream, ["upper"]);
    const missing = await runCli(["explain", recipe, "cont"]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /has no stage "cont" \(did you mean "count"\?\)/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("status summarises the last run; stages documents every kind", async () => {
  const { p, recipe } = project();
  try {
    assert.match((await runCli(["status", recipe])).stdout, /no runs recorded for recipe chain/);
    assert.equal((await runCli(["run", recipe])).code, 0);
    const s = await runCli(["status", recipe]);
    assert.match(
      s.stdout,
      /run \d{8}-\d{6}-\d{3}-chain-[0-9a-f]{4} \(recipe chain\) started .*: finished in/,
    );
    assert.match(s.stdout, /count\s+testing\.count\s+ran\s+\S+\s+words=6 lines=3/);
    const json = JSON.parse((await runCli(["status", recipe, "--json"])).stdout);
    assert.equal(json.status, "ok");

    const list = await runCli(["stages", "--all"]);
    assert.match(list.stdout, /testing\.train\s+Test-only: a deterministic toy training loop/);
    const doc = await runCli(["stages", "testing.transform"]);
    assert.match(doc.stdout, /mode: one of "upper", "lower", "reverse"; default: "upper"/);
    assert.match(doc.stdout, /source: one or more references to a file; required/);
    const unknown = await runCli(["stages", "testing.transfrom"]);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /did you mean "testing\.transform"/);
    assert.match(
      (await runCli(["stages", "--settings"])).stdout,
      /keep_checkpoints: an integer >= 1; default: 2/,
    );
    assert.match(
      (await runCli(["run", recipe, "--help-stage", "testing.count"])).stdout,
      /counts: directory/,
    );
  } finally {
    await p.cleanup();
  }
});

Deno.test("the run-finished hook gets the run directory and record; events describe the run", async () => {
  const { p, recipe } = project();
  try {
    let seen: { dir: string; record: RunRecord } | null = null;
    const r = await runCli(["run", recipe], {
      onRunFinished: (dir, record) => void (seen = { dir, record }),
    });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(seen);
    const { dir, record } = seen as { dir: string; record: RunRecord };
    assert.equal(record.status, "ok");
    assert.equal(dir, record.run_dir);
    assert.deepEqual(JSON.parse(Deno.readTextFileSync(join(dir, "run.json"))), record);
    assert.match(r.stdout, /run directory: /);
    assert.match(r.stdout, /count\s+testing\.count\s+ran/);

    const ev = lastEvents(p);
    assert.equal(ev[0].type, "run_start");
    assert.equal(ev[ev.length - 1].type, "run_finish");
    const types = ev.map((e) => e.type);
    assert.equal(types.filter((t) => t === "stage_start").length, 4);
    assert.equal(types.filter((t) => t === "stage_finish").length, 4);
    const metrics = ev.filter((e) => e.type === "metric");
    assert.equal(metrics.length, 6, "testing.train logs one loss per step");
    assert.deepEqual(metrics.map((m) => (m as { step: number }).step), [1, 2, 3, 4, 5, 6]);
    assert.ok(ev.some((e) => e.type === "checkpoint"));
    for (const e of ev) assert.ok(typeof e.t === "string" && !Number.isNaN(Date.parse(e.t)));

    // A failing hook is a warning, not a failed run.
    const r2 = await runCli(["run", recipe], {
      onRunFinished: () => Promise.reject(new Error("report broke")),
    });
    assert.equal(r2.code, 0);
    assert.match(r2.stderr, /warning: the run-finished hook failed: report broke/);
  } finally {
    await p.cleanup();
  }
});

Deno.test("CLI usage errors exit 2; --help exits 0; report of a missing run is a user error", async () => {
  assert.equal((await runCli(["run"])).code, 2);
  assert.equal((await runCli(["frobnicate"])).code, 2);
  assert.equal((await runCli(["run", "x.yaml", "--gpu", "cuda"])).code, 2);
  const help = await runCli(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /explain/);
  const report = await runCli(["report", "/nonexistent/run-dir"]);
  assert.equal(report.code, 2);
  assert.match(report.stderr, /nonexistent\/run-dir/);
});
