// Table-driven: every recipe in tests/pipelines/malformed/ states in its header comment the message it must
// produce and where (`file:line:col`, or the `--set` flag), and must make the CLI exit with code 2 without a stack
// trace.
//
//   # args: --set text.params.repeat=abc        (optional: extra CLI arguments)
//   # expect: <a substring of the problem line>
//   # at: <line>:<col> | <path relative to malformed/>:<line>:<col> | --set <flag>
import assert from "node:assert/strict";
import { join } from "node:path";
import { displayPath } from "../../pipelines/paths.ts";
import { runCli, spawnCli } from "./helpers.ts";

const DIR = new URL("./malformed/", import.meta.url).pathname;

interface Case {
  file: string;
  args: string[];
  expect: string;
  at: string;
}

function loadCases(): Case[] {
  const cases: Case[] = [];
  for (const e of [...Deno.readDirSync(DIR)].sort((a, b) => a.name.localeCompare(b.name))) {
    if (!e.isFile || !e.name.endsWith(".yaml")) continue;
    const file = join(DIR, e.name);
    const text = Deno.readTextFileSync(file);
    const header = (name: string) => new RegExp(`^# ${name}: (.*)$`, "m").exec(text)?.[1];
    const expect = header("expect"), at = header("at");
    if (!expect || !at) throw new Error(`${e.name}: missing "# expect:" or "# at:" header`);
    const args = header("args")?.split(" ") ?? [];
    cases.push({ file, args, expect, at });
  }
  return cases;
}

/** The location prefix the problem line must start with. */
function expectedPrefix(c: Case): string {
  if (c.at.startsWith("--set")) return `${c.at}: `;
  const m = /^(?:(.+):)?(\d+):(\d+)$/.exec(c.at);
  if (!m) throw new Error(`${c.file}: bad "# at:" ${c.at}`);
  const file = m[1] ? join(DIR, m[1]) : c.file;
  return `${displayPath(file)}:${m[2]}:${m[3]}: `;
}

const CASES = loadCases();

Deno.test("there are at least 30 malformed recipes", () => {
  assert.ok(CASES.length >= 30, `only ${CASES.length}`);
});

for (const c of CASES) {
  const name = c.file.slice(DIR.length);
  Deno.test(`malformed/${name}: exit 2, "${c.expect.slice(0, 50)}" at ${c.at}`, async () => {
    const r = await runCli(["plan", c.file, ...c.args]);
    assert.equal(r.code, 2, `exit code (stderr: ${r.stderr})`);
    assert.match(r.stderr, /^error: recipe .* has \d+ problems?:$/m, r.stderr);
    const prefix = expectedPrefix(c);
    const lines = r.stderr.split("\n").map((l) => l.trim());
    const hit = lines.find((l) => l.startsWith(prefix) && l.includes(c.expect));
    assert.ok(
      hit,
      `expected a line starting with\n  ${prefix}\ncontaining\n  ${c.expect}\ngot:\n${r.stderr}`,
    );
    assert.doesNotMatch(r.stderr, /^\s+at .*:\d+:\d+\)?$/m, "no stack trace");
    assert.equal(r.stdout, "", "nothing on stdout");
  });
}

Deno.test("malformed recipes exit with code 2 as real processes too, with every problem listed", async () => {
  const r = await spawnCli(["run", join(DIR, "unknown_top_level.yaml")]);
  assert.equal(r.code, 2);
  // Both problems at once: the misspelt field and the then-missing stages.
  assert.match(
    r.stderr,
    /unknown_top_level\.yaml:4:1: stage: unknown top-level field "stage" \(did you mean "stages"\?\)/,
  );
  assert.match(r.stderr, /unknown_top_level\.yaml:3:1: stages: missing required field "stages"/);
  assert.match(r.stderr, /has 2 problems/);
  assert.doesNotMatch(r.stderr, /^\s+at /m);
  const r2 = await spawnCli(["plan", join(DIR, "set_bad_value.yaml"), "--set", "text.params.repeat=abc"]);
  assert.equal(r2.code, 2);
  assert.match(
    r2.stderr,
    /--set text\.params\.repeat=abc: stages\.text\.params\.repeat: expected an integer/,
  );
});

Deno.test("all problems of a recipe are reported in one go, sorted by position", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const file = join(dir, "many.yaml");
    Deno.writeTextFileSync(
      file,
      `name: many
settngs: { seed: 1 }
stages:
  a:
    kind: testing.txt
  b:
    kind: testing.transform
    params: { mode: 3, prefx: x }
    inputs: { source: "\${c.text}", extra: missing.txt }
`,
    );
    const r = await runCli(["plan", file]);
    assert.equal(r.code, 2);
    const lines = r.stderr.split("\n").filter((l) => l.startsWith("  "));
    const d = displayPath(file);
    assert.deepEqual(lines.map((l) => l.trim().split(": ")[0]), [
      `${d}:2:1`,
      `${d}:5:11`,
      `${d}:8:21`,
      `${d}:8:24`,
      `${d}:9:23`,
      `${d}:9:43`,
    ]);
    assert.match(r.stderr, /has 6 problems/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
