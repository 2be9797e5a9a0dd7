/**
 * The run report: building {@linkcode RunReportData} from run directories (synthetic runs in `report_data/`, in
 * the runner's event format, and small ones written here in the brief's flatter format), the three output files,
 * and issue 8's acceptance test: the page opened in headless Chromium (driven over the DevTools protocol) has no
 * console errors, makes no network request, and every chart has drawn data; a screenshot is saved to
 * `tests/output/report.png`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  adaptEvent,
  buildRunReportData,
  detectResultKind,
  latestRunDir,
  parseEvalResults,
  parseSpecBenchResults,
  renderReportHtml,
  renderSummaryMarkdown,
  writeRunReport,
} from "../../pipelines/report/mod.ts";
import { layoutDag } from "../../pipelines/report/dag_svg.ts";
import { downsample, formatTicks, lineChart, niceTicks } from "../../pipelines/report/svg.ts";
import { isUserError } from "../../util/errors.ts";

const DATA = new URL("./report_data/", import.meta.url).pathname;
const RUN1 = "20251128-100000-000-tiny-a1b2";
const RUN2 = "20251128-103000-000-tiny-c3d4";

/** Copies the synthetic runs and cache to a temporary directory (outputs are relative, so they still resolve). */
async function copyData(): Promise<{ root: string; run1: string; run2: string }> {
  const root = await Deno.makeTempDir({ prefix: "report_test_" });
  const copy = async (from: string, to: string) => {
    await Deno.mkdir(to, { recursive: true });
    for await (const d of Deno.readDir(from)) {
      if (d.isDirectory) await copy(join(from, d.name), join(to, d.name));
      else if (d.isFile) await Deno.copyFile(join(from, d.name), join(to, d.name));
    }
  };
  await copy(join(DATA, "run_dirs"), join(root, "run_dirs"));
  await copy(join(DATA, "cache"), join(root, "cache"));
  return { root, run1: join(root, "run_dirs", RUN1), run2: join(root, "run_dirs", RUN2) };
}

/** A run directory from events in the brief's format; `files` are written relative to the run directory. */
async function makeRun(
  events: Record<string, unknown>[],
  files: Record<string, unknown> = {},
): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "report_run_" });
  await Deno.writeTextFile(join(dir, "events.jsonl"), events.map((e) => JSON.stringify(e)).join("\n") + "\n");
  for (const [path, value] of Object.entries(files)) {
    await Deno.mkdir(join(dir, path, ".."), { recursive: true });
    await Deno.writeTextFile(join(dir, path), typeof value === "string" ? value : JSON.stringify(value));
  }
  return dir;
}

const T0 = Date.parse("2025-06-01T12:00:00Z");
const at = (s: number) => new Date(T0 + s * 1000).toISOString();

function evalFile(name: string, fraction: number, ppl: number, acc: number) {
  return {
    results: {
      wiki: {
        "word_perplexity,none": ppl * 2,
        "byte_perplexity,none": 1.5,
        "bits_per_byte,none": 0.58,
        "token_perplexity,none": ppl,
      },
      cloze: {
        "acc,none": acc,
        "acc_stderr,none": 0.05,
        "acc_norm,none": acc + 0.02,
        "acc_norm_stderr,none": 0.05,
      },
    },
    config: { model: `/models/${name}`, model_name: name, attention_fraction: fraction, max_length: 128 },
    versions: { wiki: 1, cloze: 1 },
    "n-samples": { wiki: { original: 10, effective: 10 }, cloze: { original: 50, effective: 40 } },
    date: 1764366000,
  };
}

const SPEC = {
  model: "student",
  draft: "draft-2l",
  temperature: 0,
  results: [
    {
      k: 2,
      acceptance_rate_per_position: [0.75, 0.5],
      mean_accepted_per_pass: 1.25,
      tokens_per_s: 30,
      baseline_tokens_per_s: 20,
      speedup: 1.5,
      acceptance_histogram: [1, 1, 2],
    },
    {
      k: 3,
      acceptance_rate_per_position: [0.75, 0.5, 0.25],
      mean_accepted_per_pass: 1.5,
      tokens_per_s: 32,
      baseline_tokens_per_s: 20,
      speedup: 1.6,
      acceptance_histogram: [1, 1, 1, 1],
    },
  ],
};

/** A small run in the brief's event format: `time`, flat metric numbers, `stages: [{name, kind, deps}]`. */
function briefRun(): Record<string, unknown>[] {
  return [
    {
      time: at(0),
      type: "run_start",
      recipe: "recipes/small.yaml",
      recipe_name: "small",
      settings: { seed: 1, device: "test-gpu" },
      stages: [
        { name: "teacher", kind: "load_model", deps: [] },
        { name: "distill", kind: "distill", deps: ["teacher"] },
        { name: "eval_teacher", kind: "evaluate", deps: ["teacher"] },
        { name: "eval_student", kind: "evaluate", deps: ["distill"] },
        { name: "bench", kind: "spec_bench", deps: ["distill", "teacher"] },
        { name: "export", kind: "export", deps: ["distill"] },
      ],
    },
    { time: at(1), type: "stage_cached", stage: "teacher", outputs: { model: "objects/teacher" } },
    { time: at(1), type: "stage_start", stage: "distill", kind: "distill" },
    ...Array.from({ length: 50 }, (_, i) => ({
      time: at(2 + i),
      type: "metric",
      stage: "distill",
      step: i + 1,
      loss: 5 / (i + 1) + 1,
      ce: 4 / (i + 1) + 0.9,
      kl: i === 10 ? Infinity : 1 / (i + 1),
      lr: 1e-3,
      note: "strings are not metrics",
    })),
    { time: at(60), type: "progress", stage: "distill", done: 50, total: 50 },
    {
      time: at(61),
      type: "stage_finish",
      stage: "distill",
      metrics: { loss: 1.1 },
      outputs: { model: "objects/distill" },
    },
    {
      time: at(62),
      type: "stage_finish",
      stage: "eval_teacher",
      wall_s: 3,
      outputs: { results: "objects/eval_teacher.json" },
    },
    {
      time: at(63),
      type: "stage_finish",
      stage: "eval_student",
      wall_s: 4,
      outputs: { results: "objects/eval_student" },
    },
    {
      time: at(64),
      type: "stage_finish",
      stage: "bench",
      wall_s: 5,
      outputs: { results: "objects/bench.json" },
    },
    { time: at(65), type: "stage_start", stage: "export" },
    {
      time: at(66),
      type: "stage_failed",
      stage: "export",
      error: "disk full\nwhile writing model.safetensors",
    },
    { time: at(66), type: "log", stage: "export", level: "error", message: "write failed" },
    { time: at(66), type: "something_new", stage: "export", whatever: 1 },
    { time: at(67), type: "run_finish", status: "failed", wall_s: 67 },
  ];
}

function briefFiles(): Record<string, unknown> {
  return {
    "objects/eval_teacher.json": evalFile("teacher", 1, 3, 0.7),
    "objects/eval_student/results.json": evalFile("student", 0.5, 3.3, 0.66),
    "objects/eval_student/config.json": { hidden_size: 8 },
    "objects/bench.json": SPEC,
  };
}

Deno.test("report data: stages, statuses, times and dependencies from the brief's event format", async () => {
  const dir = await makeRun(briefRun(), briefFiles());
  try {
    const d = await buildRunReportData(dir);
    assert.equal(d.recipe, "small");
    assert.equal(d.recipe_path, "recipes/small.yaml");
    assert.equal(d.status, "failed");
    assert.equal(d.wall_s, 67);
    assert.deepEqual(d.devices, ["test-gpu"]);
    assert.equal(d.has_deps, true);
    const by = Object.fromEntries(d.stages.map((s) => [s.name, s]));
    assert.deepEqual(d.stages.map((s) => s.name), [
      "teacher",
      "distill",
      "eval_teacher",
      "eval_student",
      "bench",
      "export",
    ]);
    assert.equal(by.teacher.status, "cached");
    assert.equal(by.distill.status, "ran");
    assert.equal(
      by.distill.wall_s,
      60,
      "wall time from stage_start/stage_finish times when wall_s is absent",
    );
    assert.deepEqual(by.distill.metrics, { loss: 1.1 });
    assert.deepEqual(by.bench.deps, ["distill", "teacher"]);
    assert.equal(by.export.status, "failed");
    assert.equal(by.export.error, "disk full\nwhile writing model.safetensors");
    assert.deepEqual(d.logs.map((l) => l.message), ["write failed"]);
    assert.deepEqual(d.problems, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: training curves keep order, drop non-numbers and record non-finite values as gaps", async () => {
  const dir = await makeRun(briefRun(), briefFiles());
  try {
    const d = await buildRunReportData(dir);
    assert.equal(d.training.length, 1);
    const c = d.training[0];
    assert.equal(c.stage, "distill");
    assert.deepEqual(Object.keys(c.series).sort(), ["ce", "kl", "loss", "lr"]);
    assert.deepEqual(c.series.loss.steps, Array.from({ length: 50 }, (_, i) => i + 1));
    assert.equal(c.series.loss.values[0], 6);
    assert.equal(c.series.kl.values[10], null, "Infinity is a gap, not a point");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: evaluation rows (teacher first, stderr, n) and spec-bench results from result files", async () => {
  const dir = await makeRun(briefRun(), briefFiles());
  try {
    const d = await buildRunReportData(dir);
    assert.deepEqual(d.evaluation.map((r) => [r.model_name, r.role, r.attention_fraction]), [
      ["teacher", "teacher", 1],
      ["student", "student", 0.5],
    ]);
    assert.deepEqual(d.eval_tasks, ["wiki", "cloze"]);
    const student = d.evaluation[1];
    assert.equal(student.tasks.wiki.token_perplexity, 3.3);
    assert.equal(student.tasks.wiki.word_perplexity, 6.6);
    assert.equal(student.tasks.cloze.acc, 0.66);
    assert.equal(student.tasks.cloze.acc_stderr, 0.05);
    assert.equal(student.tasks.cloze.n, 40, "n is the effective sample count");
    assert.equal(student.max_length, 128);
    assert.equal(d.speculative.length, 1);
    assert.equal(d.speculative[0].stage, "bench");
    assert.deepEqual(d.speculative[0].results.results.map((r) => r.k), [2, 3]);

    const md = renderSummaryMarkdown(d);
    assert.match(md, /\| \*\*teacher\*\* \(teacher\) \| 100% \| 3 \| 6 \|/);
    assert.match(md, /\| student \| 50% \| 3\.3 \(×1\.10\) \|/);
    assert.match(md, /0\.66 ± 0\.05/);
    assert.match(md, /\| 2 \| 1\.25 \| 75% 50% \| 30 \| 20 \| \*\*1\.50×\*\* \|/);
    assert.match(md, /\| `teacher` \| load_model \| ♻️ cached \| yes \|/);
    assert.match(md, /Stage \*\*export\*\* \(export\) failed/);
    assert.match(md, /```\ndisk full\nwhile writing model.safetensors\n```/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: a failed stage is shown first, prominently, with its error", async () => {
  const dir = await makeRun(briefRun(), briefFiles());
  try {
    const html = renderReportHtml(await buildRunReportData(dir), at(100));
    const alert = html.indexOf(`role="alert"`);
    assert.ok(alert > 0 && alert < html.indexOf(`id="pipeline"`), "the failure comes before the pipeline");
    assert.match(html, /Stage export <span class="sub">\(export\)<\/span> failed/);
    assert.match(html, /<pre class="error">disk full\nwhile writing model.safetensors<\/pre>/);
    assert.match(html, /data-stage="export" data-status="failed"/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: missing sections are omitted with a note, and an empty run still renders", async () => {
  const dir = await makeRun([
    {
      time: at(0),
      type: "run_start",
      recipe_name: "bare",
      stages: [{ name: "a", kind: "k" }, { name: "b", kind: "k" }],
    },
    { time: at(1), type: "stage_finish", stage: "a", wall_s: 1, outputs: {} },
  ]);
  try {
    const d = await buildRunReportData(dir);
    assert.equal(d.status, "incomplete", "no run_finish: still running or killed");
    assert.equal(d.has_deps, false);
    assert.deepEqual(d.stages.map((s) => s.status), ["ran", "pending"]);
    assert.deepEqual([d.training, d.evaluation, d.speculative], [[], [], []]);
    const html = renderReportHtml(d, at(5));
    assert.match(html, /No stage logged training metrics/);
    assert.match(html, /No evaluation results in this run/);
    assert.match(html, /No speculative-decoding benchmark in this run/);
    assert.match(html, /does not record stage dependencies/);
    assert.doesNotMatch(html, /data-chart="(loss|ppl|spec)/);
    const md = renderSummaryMarkdown(d);
    assert.doesNotMatch(md, /### Evaluation|### Speculative/);
    assert.match(md, /⚠️ incomplete/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: a malformed result file is reported as a problem naming the file and field", async () => {
  const bad = evalFile("student", 0.5, 3, 0.5) as Record<string, unknown>;
  (bad.config as Record<string, unknown>).attention_fraction = 50;
  const badSpec = structuredClone(SPEC);
  badSpec.results[1].acceptance_histogram = [1, 2];
  const dir = await makeRun([], { "e.json": bad, "s.json": badSpec });
  const lines = [
    { time: at(0), type: "run_start", recipe_name: "x", stages: ["e", "s"] },
    { time: at(1), type: "stage_finish", stage: "e", outputs: { results: "e.json" } },
    { time: at(2), type: "stage_finish", stage: "s", outputs: { results: "s.json" } },
  ].map((e) => JSON.stringify(e));
  // One garbled line in the middle (counted), and a partial last line from a killed writer (not counted).
  lines.splice(1, 0, "not json");
  await Deno.writeTextFile(
    join(dir, "events.jsonl"),
    lines.join("\n") + `\n{"type": "log", "stage": "e", "lev`,
  );
  try {
    const d = await buildRunReportData(dir);
    assert.equal(d.evaluation.length, 0);
    assert.equal(d.speculative.length, 0);
    assert.equal(d.problems.length, 3, d.problems.join("\n"));
    assert.match(d.problems[0], /events\.jsonl: 1 line\(s\) are not JSON/);
    assert.match(d.problems[1], /stage e: .*e\.json: not a valid evaluation results file/s);
    assert.match(
      d.problems[1],
      /config\.attention_fraction: expected a number from 0 to 1, found the number 50/,
    );
    assert.match(d.problems[2], /results\[1\]\.acceptance_histogram: expected K \+ 1 = 4 entries/);
    const html = renderReportHtml(d);
    assert.match(html, /Problems reading this run/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("report data: a directory without events.jsonl is a UserError", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assert.rejects(
      () => buildRunReportData(dir),
      (e) => isUserError(e) && /no events\.jsonl/.test(String(e)),
    );
    await assert.rejects(() => latestRunDir(dir), (e) => isUserError(e) && /no runs yet/.test(String(e)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("result files: the validators accept the documented shapes and list every wrong field", () => {
  const ok = evalFile("m", 0.25, 4, 0.5);
  assert.equal(parseEvalResults(ok, "r.json"), ok);
  assert.equal(detectResultKind(ok), "eval");
  assert.equal(parseSpecBenchResults(SPEC, "s.json"), SPEC);
  assert.equal(detectResultKind(SPEC), "spec_bench");
  assert.equal(detectResultKind({ model_type: "llama" }), null);
  assert.throws(
    () =>
      parseEvalResults({
        results: { t: { "acc,none": "high" } },
        config: { model: "m" },
        versions: {},
        "n-samples": {},
        date: 1,
      }, "r.json"),
    (e) => {
      const m = String(e);
      return isUserError(e) && m.includes("r.json") &&
        m.includes(`results.t["acc,none"]: expected a number or null`) &&
        m.includes("config.model_name") && m.includes("config.attention_fraction");
    },
  );
  const bad = structuredClone(SPEC);
  bad.results[0].acceptance_rate_per_position = [0.5, 1.5];
  bad.results[1].k = 0;
  assert.throws(() => parseSpecBenchResults(bad, "s.json"), (e) => {
    const m = String(e);
    return m.includes("results[0].acceptance_rate_per_position: expected an array of rates in [0, 1]") &&
      m.includes("results[1].k: expected an integer >= 1");
  });
});

Deno.test("adapter: the runner's field names and the brief's map to the same events; unknown types are ignored", () => {
  const runner = adaptEvent({
    t: at(1),
    type: "metric",
    stage: "d",
    step: 3,
    values: { loss: 2, lr: null, tag: "x" },
  });
  const brief = adaptEvent({ time: at(1), type: "metric", stage: "d", step: 3, loss: 2, lr: null, tag: "x" });
  assert.deepEqual(runner, {
    type: "metric",
    time: at(1),
    stage: "d",
    step: 3,
    values: { loss: 2, lr: null },
  });
  assert.deepEqual(brief, runner);
  const a = adaptEvent({ type: "stage_finish", stage: "s", outputs: { m: { digest: "d", path: "/c/o/1" } } });
  const b = adaptEvent({ type: "stage_finish", stage: "s", outputs: { m: "/c/o/1" } });
  assert.deepEqual(a, b);
  const start = adaptEvent({
    type: "run_start",
    recipe: "tiny",
    stages: ["x", "y"],
    plan: [{ stage: "y", kind: "k", action: "run", reasons: ["new"], inputs: { m: "${x.model}" } }],
  });
  assert.ok(start?.type === "run_start");
  assert.equal(start.recipe, "tiny");
  assert.deepEqual(start.stages, [
    { name: "x", kind: null, deps: null, reasons: [] },
    { name: "y", kind: "k", deps: ["x"], reasons: ["new"] },
  ]);
  assert.equal(adaptEvent({ type: "progress", stage: "s" }), null);
  assert.equal(adaptEvent({ type: "stage_finish" }), null, "a stage event without a stage");
  assert.equal(adaptEvent("not an object"), null);
});

Deno.test("report data: cached and resumed stages get their curves from the earlier runs that computed them", async () => {
  const { root, run2 } = await copyData();
  try {
    const d = await buildRunReportData(run2);
    assert.equal(d.recipe, "tiny");
    assert.equal(d.status, "failed");
    const by = Object.fromEntries(d.stages.map((s) => [s.name, s]));
    assert.equal(by.distill_50.status, "cached");
    assert.equal(by.distill_50.cached_wall_s, 124.7, "time of the run that computed it");
    assert.equal(by.distill_25.status, "ran");
    assert.equal(by.distill_25.resumed_from_step, 120);
    assert.equal(by.export.status, "failed");
    assert.equal(by.export.user_error, true);
    assert.deepEqual(by.distill_50.deps, ["map_50", "pseudo_labels", "teacher"]);

    const curves = Object.fromEntries(d.training.map((c) => [c.stage, c]));
    assert.deepEqual(Object.keys(curves), ["distill_50", "distill_25", "sft_25", "dpo_25"]);
    assert.deepEqual(curves.distill_50.from_runs, [RUN1]);
    assert.equal(curves.distill_50.series.loss.steps.length, 300);
    // distill_25: steps 1..120 from run 1 (its checkpoint), 121..250 from run 2; run 1's steps 121..130 dropped.
    assert.deepEqual(curves.distill_25.from_runs, [RUN1, RUN2]);
    assert.deepEqual(curves.distill_25.series.loss.steps, Array.from({ length: 250 }, (_, i) => i + 1));
    const run1Events = (await Deno.readTextFile(join(root, "run_dirs", RUN1, "events.jsonl"))).trim().split(
      "\n",
    )
      .map((l) => JSON.parse(l));
    const step125 = run1Events.find((e) => e.type === "metric" && e.stage === "distill_25" && e.step === 125);
    assert.notEqual(curves.distill_25.series.loss.values[124], step125.values.loss);
    assert.ok("rewards/accuracies" in curves.dpo_25.series);

    assert.deepEqual(d.evaluation.map((r) => r.model_name), [
      "teacher",
      "hybrid-50",
      "hybrid-25",
      "hybrid-25-dpo",
    ]);
    assert.equal(
      d.evaluation.find((r) => r.stage === "eval_50")?.file.endsWith("eval_50/results.json"),
      true,
    );
    assert.equal(d.speculative.length, 1);
    assert.deepEqual(d.logs.map((l) => l.level), ["warn"]);
    assert.deepEqual(d.problems, []);

    // Without its history (a copied run directory), the cached stage simply has no curve.
    const alone = await buildRunReportData(run2, { historyRuns: 0 });
    assert.deepEqual(alone.training.map((c) => c.stage), ["distill_25", "sft_25", "dpo_25"]);
    assert.equal(await latestRunDir(join(root, "run_dirs")), run2);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("report files: written atomically into the run directory; results.json holds the tables", async () => {
  const { root, run2 } = await copyData();
  try {
    const w = await writeRunReport(run2, { generatedAt: at(0) });
    assert.equal(w.html, join(run2, "report.html"));
    const names = [];
    for await (const d of Deno.readDir(run2)) names.push(d.name);
    assert.deepEqual(
      names.sort(),
      ["events.jsonl", "report.html", "results.json", "summary.md"],
      "no temp files left",
    );
    const json = JSON.parse(await Deno.readTextFile(w.json));
    assert.equal(json.format, 1);
    assert.deepEqual(json.counts, { ran: 9, cached: 5, failed: 1, interrupted: 0, skipped: 0, pending: 0 });
    assert.equal(json.stages.find((s: { name: string }) => s.name === "distill_50").cached, true);
    assert.equal(json.training.find((c: { stage: string }) => c.stage === "distill_25").last_step, 250);
    assert.deepEqual(json.evaluation.tasks, ["tinystories", "tinystories_cloze"]);
    const h25 = json.evaluation.rows.find((r: { model_name: string }) => r.model_name === "hybrid-25");
    assert.ok(Math.abs(h25.perplexity_ratio.tinystories - 5.38 / 4.71) < 1e-12);
    assert.equal(json.speculative[0].results.length, 6);
    const html = await Deno.readTextFile(w.html);
    assert.match(
      html,
      new RegExp(`Curve from run <span class="mono">${RUN1}</span> \\(the stage was cached`),
    );
    assert.match(
      html,
      new RegExp(`Curve from runs <span class="mono">${RUN1}</span>, .*\\(the stage was resumed`),
    );
    assert.doesNotMatch(html, /<(link|img|script)[^>]+(src|href)=/i, "nothing loaded from outside the file");
    assert.doesNotMatch(
      html,
      /https?:\/\/(?!www\.w3\.org\/2000\/svg)/,
      "no URLs other than the SVG namespace",
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

// ---- headless Chromium over the DevTools protocol ------------------------------------------------------------

const CHROMIUM_CANDIDATES = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];

async function findChromium(): Promise<string | null> {
  const env = Deno.env.get("CHROMIUM");
  for (const p of env ? [env] : CHROMIUM_CANDIDATES) {
    try {
      if ((await Deno.stat(p)).isFile) return p;
    } catch {
      // try the next one
    }
  }
  return null;
}

/** A page in a headless Chromium, driven over the DevTools protocol with Deno's WebSocket. */
class HeadlessPage {
  #ws!: WebSocket;
  #id = 0;
  #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #listeners: ((method: string, params: Record<string, unknown>) => void)[] = [];
  #closed!: Promise<void>;

  private constructor(
    private proc: Deno.ChildProcess,
    private profile: string,
    private stderr: Promise<string>,
  ) {}

  /** Starts Chromium (no network, fresh profile) and connects to its first page. */
  static async launch(binary: string): Promise<HeadlessPage> {
    const profile = await Deno.makeTempDir({ prefix: "report_chromium_" });
    const proc = new Deno.Command(binary, {
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--remote-debugging-port=0",
        `--user-data-dir=${profile}`,
        "about:blank",
      ],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    // Chromium prints the DevTools address on stderr; keep reading it so the pipe never fills.
    let resolveUrl!: (u: string) => void;
    const url = new Promise<string>((r) => (resolveUrl = r));
    const stderr = (async () => {
      let text = "";
      for await (const chunk of proc.stderr.pipeThrough(new TextDecoderStream())) {
        text += chunk;
        const m = text.match(/DevTools listening on (ws:\/\/\S+)/);
        if (m) resolveUrl(m[1]);
      }
      resolveUrl("");
      return text;
    })();
    const page = new HeadlessPage(proc, profile, stderr);
    const browserUrl = await Promise.race([url, new Promise<string>((r) => setTimeout(() => r(""), 15000))]);
    if (!browserUrl) {
      await page.close();
      throw new Error(`chromium did not start its DevTools endpoint:\n${(await stderr).slice(-2000)}`);
    }
    const port = new URL(browserUrl).port;
    const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json() as {
      type: string;
      webSocketDebuggerUrl: string;
    }[];
    const target = targets.find((t) => t.type === "page");
    if (!target) throw new Error("chromium has no page target");
    page.#ws = new WebSocket(target.webSocketDebuggerUrl);
    page.#closed = new Promise((r) => page.#ws.addEventListener("close", () => r()));
    await new Promise<void>((resolve, reject) => {
      page.#ws.addEventListener("open", () => resolve());
      page.#ws.addEventListener("error", () => reject(new Error("could not connect to chromium's page")));
    });
    page.#ws.addEventListener("message", (ev) => {
      const msg = JSON.parse(ev.data as string);
      if (msg.id !== undefined) {
        const p = page.#pending.get(msg.id);
        page.#pending.delete(msg.id);
        if (msg.error) p?.reject(new Error(`${msg.error.message} (${msg.error.code})`));
        else p?.resolve(msg.result);
      } else if (msg.method) page.#listeners.forEach((l) => l(msg.method, msg.params ?? {}));
    });
    return page;
  }

  /** Sends a DevTools command and waits for its result. */
  send<T = Record<string, unknown>>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    const id = ++this.#id;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.#ws.send(JSON.stringify({ id, method, params }));
    });
  }

  /** Calls `fn` for every DevTools event. */
  on(fn: (method: string, params: Record<string, unknown>) => void): void {
    this.#listeners.push(fn);
  }

  /** Resolves at the next event named `method`. */
  once(method: string): Promise<Record<string, unknown>> {
    return new Promise((r) => this.on((m, p) => m === method && r(p)));
  }

  /** Closes the connection, stops Chromium and removes its profile. */
  async close(): Promise<void> {
    if (this.#ws) {
      this.#ws.close();
      await this.#closed;
    }
    try {
      this.proc.kill("SIGTERM");
    } catch {
      // already gone
    }
    await this.proc.status;
    await this.stderr;
    await Deno.remove(this.profile, { recursive: true }).catch(() => {});
  }
}

Deno.test("report in headless Chromium: no console errors, no network, every chart has drawn data; screenshot", async () => {
  const binary = await findChromium();
  if (!binary) {
    throw new Error(
      "chromium is not installed: the report test needs Debian's chromium (apt-get install -y chromium; .ci/run " +
        "installs it), or set CHROMIUM to a Chrome/Chromium binary",
    );
  }
  const { root, run2 } = await copyData();
  const page = await HeadlessPage.launch(binary);
  try {
    const { html } = await writeRunReport(run2, { generatedAt: at(0) });
    const errors: string[] = [];
    const requests: string[] = [];
    page.on((method, p) => {
      if (method === "Runtime.consoleAPICalled" && (p.type === "error" || p.type === "assert")) {
        errors.push(`console.${p.type}: ${JSON.stringify(p.args)}`);
      } else if (method === "Runtime.exceptionThrown") {
        errors.push(`exception: ${JSON.stringify(p.exceptionDetails)}`);
      } else if (method === "Log.entryAdded") {
        const entry = p.entry as { level: string; text: string; url?: string };
        if (entry.level === "error") errors.push(`log: ${entry.text} ${entry.url ?? ""}`);
      } else if (method === "Network.requestWillBeSent") {
        const url = (p.request as { url: string }).url;
        if (!url.startsWith("file:") && !url.startsWith("data:")) requests.push(url);
      }
    });
    await page.send("Runtime.enable");
    await page.send("Log.enable");
    await page.send("Network.enable");
    await page.send("Page.enable");
    await page.send("Emulation.setDeviceMetricsOverride", {
      width: 1280,
      height: 900,
      deviceScaleFactor: 1,
      mobile: false,
    });
    const loaded = page.once("Page.loadEventFired");
    const nav = await page.send<{ errorText?: string }>("Page.navigate", { url: `file://${html}` });
    assert.equal(nav.errorText, undefined, `navigation failed: ${nav.errorText}`);
    await loaded;

    const check = await page.send<{ result: { value: string } }>("Runtime.evaluate", {
      returnByValue: true,
      expression: `JSON.stringify([...document.querySelectorAll("[data-chart]")].map((svg) => ({
        id: svg.getAttribute("data-chart"),
        points: Number(svg.getAttribute("data-points")),
        marks: svg.querySelectorAll(".series polyline, .series circle, .series rect, .series path, .nodes rect").length,
        width: svg.getBoundingClientRect().width,
        height: svg.getBoundingClientRect().height,
      })))`,
    });
    const charts = JSON.parse(check.result.value) as {
      id: string;
      points: number;
      marks: number;
      width: number;
      height: number;
    }[];
    const ids = charts.map((c) => c.id);
    for (
      const expected of [
        "dag",
        "loss-distill-50",
        "loss-distill-25",
        "loss-sft-25",
        "loss-dpo-25",
        "lr-distill-50",
        "metric-dpo-25-rewards",
        "ppl-vs-attention",
        "spec-acceptance-spec-bench",
        "spec-speedup-spec-bench",
        "spec-histogram-spec-bench-k4",
      ]
    ) assert.ok(ids.includes(expected), `chart ${expected} is missing (charts: ${ids.join(", ")})`);
    assert.equal(new Set(ids).size, ids.length, "chart ids are unique");
    for (const c of charts) {
      assert.ok(c.points > 0, `chart ${c.id} has data-points=${c.points}`);
      assert.ok(c.marks > 0, `chart ${c.id} has no drawn marks`);
      assert.ok(c.width > 100 && c.height > 80, `chart ${c.id} is laid out (${c.width}x${c.height})`);
    }
    assert.equal(
      charts.find((c) => c.id === "loss-distill-25")?.points,
      250 * 3,
      "loss, ce and kl of distill_25 over its 250 steps",
    );

    const metrics = await page.send<{ cssContentSize: { height: number } }>("Page.getLayoutMetrics");
    const shot = await page.send<{ data: string }>("Page.captureScreenshot", {
      format: "png",
      captureBeyondViewport: true,
      clip: { x: 0, y: 0, width: 1280, height: Math.ceil(metrics.cssContentSize.height), scale: 1 },
    });
    const outDir = new URL("../output/", import.meta.url).pathname;
    await Deno.mkdir(outDir, { recursive: true });
    const png = Uint8Array.from(atob(shot.data), (c) => c.charCodeAt(0));
    assert.deepEqual([...png.subarray(1, 4)], [0x50, 0x4e, 0x47], "a PNG");
    await Deno.writeFile(join(outDir, "report.png"), png);

    assert.deepEqual(errors, [], "console errors");
    assert.deepEqual(requests, [], "the report loads nothing from the network");
  } finally {
    await page.close();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("charts: round ticks covering the data, one number format per axis, thinning keeps extremes", () => {
  const t = niceTicks(1.93, 4.1, 5);
  assert.deepEqual([t.min, t.max, t.step], [1.5, 4.5, 0.5]);
  assert.ok(t.values[0] <= 1.93 && t.values[t.values.length - 1] >= 4.1);
  assert.deepEqual(formatTicks([0, 5e-5, 1e-4, 1.5e-4], 5e-5), ["0", "5.0e-5", "1.0e-4", "1.5e-4"]);
  assert.deepEqual(formatTicks([0, 2500, 5000, 7500], 2500), ["0", "2.5k", "5.0k", "7.5k"]);
  assert.deepEqual(formatTicks([0.5, 0.75, 1], 0.25), ["0.50", "0.75", "1.00"]);
  const x = Array.from({ length: 10000 }, (_, i) => i);
  const y = x.map((i) => (i === 4321 ? 100 : i === 777 ? -100 : Math.sin(i / 50)));
  const d = downsample(x, y, 500);
  assert.ok(d.x.length <= 502, `${d.x.length} points`);
  assert.ok(d.y.includes(100) && d.y.includes(-100), "spikes survive thinning");
  assert.deepEqual([d.x[0], d.x[d.x.length - 1]], [0, 9999]);
  const svg = lineChart({
    id: "t",
    title: "t",
    xLabel: "x",
    yLabel: "y",
    series: [{ name: "a", x: [1, 2, 3], y: [1, null, 3] }],
  });
  assert.match(svg, /data-chart="t" data-points="2"/);
  assert.doesNotMatch(svg, /<polyline/, "a gap splits the line, and single points draw no segment");
});

Deno.test("DAG layout: layers by longest path, a waypoint in every layer an edge skips", () => {
  const layout = layoutDag([
    { name: "a", deps: [] },
    { name: "b", deps: ["a"] },
    { name: "c", deps: ["b"] },
    { name: "d", deps: ["a", "c"] },
    { name: "x", deps: ["missing"] },
  ]);
  assert.deepEqual(layout.layers.map((l) => l.filter((it) => !it.dummy).map((it) => it.id)), [
    ["a", "x"],
    ["b"],
    ["c"],
    ["d"],
  ]);
  const long = layout.edges.find((e) => e.from === "a" && e.to === "d")!;
  assert.deepEqual(long.via, ["a->d#1", "a->d#2"]);
  assert.equal(layout.edges.length, 4);
});
