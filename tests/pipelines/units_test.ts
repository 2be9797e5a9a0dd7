// Small pieces: the DAG, locks (released by kill -9), progress rendering and rates, key diffs.
import assert from "node:assert/strict";
import { join } from "node:path";
import { ancestorsOf, descendantsOf, findCycles, topoOrder } from "../../pipelines/dag.ts";
import { describeChange, diffKeyInputs } from "../../pipelines/keys.ts";
import { acquireLock } from "../../pipelines/locks.ts";
import { Console, memoryOutput, renderProgress, StageProgress } from "../../pipelines/progress.ts";
import { formatBytes, formatDuration } from "../../pipelines/format.ts";

const L = { file: "r.yaml", line: 1, col: 1 };
const dep = (stage: string) => ({ stage, loc: L });

Deno.test("topological order follows the recipe where it can; cycles are named; ancestors and descendants", () => {
  const nodes = [
    { name: "eval", deps: [dep("sft"), dep("teacher")] },
    { name: "teacher", deps: [] },
    { name: "sft", deps: [dep("teacher")] },
    { name: "report", deps: [dep("eval")] },
  ];
  assert.deepEqual(topoOrder(nodes), ["teacher", "sft", "eval", "report"]);
  assert.deepEqual([...descendantsOf("sft", nodes)].sort(), ["eval", "report"]);
  assert.deepEqual([...ancestorsOf("report", nodes)].sort(), ["eval", "sft", "teacher"]);
  assert.deepEqual(findCycles(nodes), []);
  const cyc = [
    { name: "a", deps: [dep("b")] },
    { name: "b", deps: [dep("c")] },
    { name: "c", deps: [dep("a")] },
    { name: "d", deps: [dep("d")] },
  ];
  assert.deepEqual(findCycles(cyc).map((c) => c.path.join(" -> ")), ["a -> b -> c -> a", "d -> d"]);
});

Deno.test("an exclusive lock is released when its holder is killed with SIGKILL", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = join(dir, "x.lck");
    const holder = new Deno.Command(Deno.execPath(), {
      args: [
        "eval",
        `const f = await Deno.open(${JSON.stringify(path)}, {read: true, write: true, create: true});
         await f.lock(true); console.log("locked"); setInterval(() => {}, 1000);`,
      ],
      stdout: "piped",
    }).spawn();
    const reader = holder.stdout.getReader();
    await reader.read(); // "locked"
    assert.equal(await acquireLock(path, { wait: false, purpose: "test" }), null, "busy while held");
    holder.kill("SIGKILL");
    await holder.status;
    reader.releaseLock();
    await holder.stdout.cancel();
    const held = await acquireLock(path, { wait: true, purpose: "test", pollMs: 10 });
    assert.ok(held, "free after the holder died");
    assert.match(Deno.readTextFileSync(path), new RegExp(`"pid":${Deno.pid}`));
    held.release();
    held.release();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("progress: rates from the first update, tokens/s, ETA; TTY redraws one line, plain output prints periodically", () => {
  let now = 0;
  const tty = { ...memoryOutput(), isTty: true };
  const snaps: number[] = [];
  const pr = new StageProgress({
    stage: "distill",
    prefix: "[2/5] ",
    console: new Console(tty),
    onSnapshot: (s) => snaps.push(s.done),
    now: () => now,
  });
  pr.start(100, "step");
  now = 1000;
  pr.update(50, { tokens: 5000, loss: 2.5 }); // a resumed stage starts at step 50: no rate yet
  now = 3000;
  pr.update(70, { tokens: 7000, loss: 2.25 });
  const s = pr.snapshot();
  assert.equal(s.rate, 10);
  assert.equal(s.tokensPerSecond, 1000);
  assert.equal(s.etaSeconds, 3);
  const line = renderProgress(s, "[2/5] ");
  assert.equal(
    line,
    "[2/5] distill  [##############------]  70/100 steps  70%  10 step/s  1.0k tok/s  ETA 3.0s  loss 2.25",
  );
  assert.ok(tty.stderr().includes("\r\x1b[2K[2/5] distill"), "the status line is redrawn in place");

  const plain = memoryOutput();
  const pp = new StageProgress({
    stage: "s",
    prefix: "",
    console: new Console(plain),
    onSnapshot: () => {},
    now: () => now,
    plainIntervalMs: 10_000,
  });
  now = 0;
  pp.start(10);
  for (let i = 1; i <= 10; i++) {
    now = i * 3000;
    pp.update(i);
  }
  pp.finish();
  const lines = plain.stderr().trim().split("\n");
  assert.ok(lines.length >= 3 && lines.length <= 5, lines.join("\n"));
  assert.match(lines[lines.length - 1], /10\/10 steps\s+100%/);
  assert.doesNotMatch(plain.stderr(), /\r/, "no carriage returns in CI logs");
});

Deno.test("key diffs describe parameter, input and runtime changes in words", () => {
  const before = {
    kind: "x",
    "params.lr": 0.1,
    "inputs.data": "sha256:" + "a".repeat(64),
    "runtime.dtype": "f32",
  };
  const after = {
    kind: "x",
    "params.lr": 0.2,
    "inputs.data": "sha256:" + "b".repeat(64),
    "params.new": true,
  };
  const changes = diffKeyInputs(before, after);
  assert.deepEqual(changes.map((c) => describeChange(c, { data: "${tok.data}" })), [
    "params.lr changed: 0.1 -> 0.2",
    "input data: output of ${tok.data} changed (sha256:aaaaaaaaaaaa -> sha256:bbbbbbbbbbbb)",
    "params.new is new: true",
    'runtime.dtype was removed (was "f32")',
  ]);
  assert.equal(formatBytes(1_234_567_890), "1.2 GB");
  assert.equal(formatDuration(252), "4m12s");
});
