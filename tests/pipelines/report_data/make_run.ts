/**
 * Writes the synthetic runs under `tests/pipelines/report_data/` (`run_dirs/` and `cache/`) that the report tests read. Run it again after
 * changing it: `deno run -A tests/pipelines/report_data/make_run.ts`.
 *
 * Two runs of the tiny recipe, in the event format of the runner (`t`, `metric.values`, `outputs: {port: {path}}`,
 * `plan`), plus the result files their evaluate and spec_bench stages wrote (in `cache/objects/`):
 * - run 1 computes the pseudo-labels and the 50% distillation, then is interrupted in the 25% distillation at step
 *   130, with a checkpoint at step 120;
 * - run 2 finds the first stages cached, resumes the 25% distillation from step 120, runs SFT, DPO, the evaluations
 *   (one of them cached from run 1) and the speculative-decoding benchmark, and fails in export.
 *
 * Output paths are relative to the run directory, so the folder can be copied anywhere.
 *
 * @module
 */
import { join } from "node:path";
import { Rng } from "../../../util/rng.ts";

const here = new URL(".", import.meta.url).pathname;
const rng = new Rng(20251128);

type Ev = Record<string, unknown>;

class Clock {
  constructor(public ms: number) {}
  tick(s: number): string {
    this.ms += s * 1000;
    return new Date(this.ms).toISOString();
  }
}

const STAGES: { stage: string; kind: string; deps: string[] }[] = [
  { stage: "teacher", kind: "load_model", deps: [] },
  { stage: "pseudo_labels", kind: "pseudo_label", deps: ["teacher"] },
  { stage: "map_50", kind: "map_weights", deps: ["teacher"] },
  { stage: "distill_50", kind: "distill", deps: ["map_50", "pseudo_labels", "teacher"] },
  { stage: "map_25", kind: "map_weights", deps: ["distill_50"] },
  { stage: "distill_25", kind: "distill", deps: ["map_25", "pseudo_labels", "teacher"] },
  { stage: "sft_25", kind: "sft", deps: ["distill_25"] },
  { stage: "dpo_25", kind: "dpo", deps: ["sft_25"] },
  { stage: "eval_teacher", kind: "evaluate", deps: ["teacher"] },
  { stage: "eval_50", kind: "evaluate", deps: ["distill_50"] },
  { stage: "eval_25", kind: "evaluate", deps: ["distill_25"] },
  { stage: "eval_25_dpo", kind: "evaluate", deps: ["dpo_25"] },
  { stage: "draft", kind: "make_draft", deps: ["teacher"] },
  { stage: "spec_bench", kind: "spec_bench", deps: ["dpo_25", "draft"] },
  { stage: "export", kind: "export", deps: ["dpo_25"] },
];

const key = (stage: string) => `sha256:${stage.padEnd(8, "0").replace(/[^a-f0-9]/g, "a")}${"0".repeat(56)}`;
const out = (name: string, file = "") => ({
  digest: key(name),
  type: file ? "file" : "dir",
  size: 1234,
  path: `../../cache/objects/${name}${file ? `/${file}` : ""}`,
});

function plan(actions: Record<string, string>) {
  return STAGES.map((s) => ({
    stage: s.stage,
    kind: s.kind,
    deps: s.deps,
    action: actions[s.stage] ?? "run",
    reasons: actions[s.stage] === "cached" ? [] : ["no cache entry for this key"],
  }));
}

/** Training metrics: a decaying loss (CE + 0.1 KL) with noise, warm-up then cosine learning rate. */
function trainMetrics(
  c: Clock,
  events: Ev[],
  stage: string,
  from: number,
  to: number,
  total: number,
  o: { start: number; end: number; lr: number; kl: boolean; dpo?: boolean },
) {
  const warm = Math.max(1, Math.round(total * 0.05));
  for (let step = from; step <= to; step++) {
    const p = step / total;
    const lr = step < warm
      ? (o.lr * step) / warm
      : o.lr * 0.5 * (1 + Math.cos(Math.PI * (step - warm) / (total - warm)));
    const base = o.end + (o.start - o.end) * Math.exp(-step / (total * 0.18));
    const values: Record<string, number | null> = {};
    if (o.dpo) {
      const margin = 0.9 * (1 - Math.exp(-step / 40)) + 0.08 * rng.normal();
      values.loss = Math.log1p(Math.exp(-margin * 2)) + 0.02 * rng.normal();
      values["rewards/chosen"] = 0.35 * p + 0.05 * rng.normal();
      values["rewards/rejected"] = -margin + 0.35 * p;
      values["rewards/margins"] = margin;
      values["rewards/accuracies"] = Math.min(
        1,
        0.5 + 0.45 * (1 - Math.exp(-step / 30)) + 0.05 * rng.normal(),
      );
    } else {
      const ce = base * (1 + 0.04 * rng.normal());
      const kl = o.kl ? (base - o.end + 0.05) * 0.9 * (1 + 0.08 * rng.normal()) : 0;
      values.loss = ce + 0.1 * kl;
      values.ce = ce;
      if (o.kl) values.kl = kl;
    }
    values.lr = lr;
    values.grad_norm = 0.2 + 2.5 * Math.exp(-step / 30) + 0.05 * Math.abs(rng.normal());
    values.tokens_per_s = 1850 + 60 * rng.normal();
    events.push({ t: c.tick(0.4), type: "metric", stage, step, values });
  }
}

function evalResults(name: string, frac: number, ppl: number, acc: number, accNorm: number) {
  const words = 1.92, bytes = 4.61; // tokens per word and bytes per token of the fixture text
  const n = 100;
  const se = (a: number) => Math.sqrt((a * (1 - a)) / (n - 1));
  return {
    results: {
      tinystories: {
        alias: "tinystories",
        "token_perplexity,none": ppl,
        "word_perplexity,none": ppl ** words,
        "byte_perplexity,none": ppl ** (1 / bytes),
        "bits_per_byte,none": Math.log2(ppl) / bytes,
      },
      tinystories_cloze: {
        alias: "tinystories_cloze",
        "acc,none": acc,
        "acc_stderr,none": se(acc),
        "acc_norm,none": accNorm,
        "acc_norm_stderr,none": se(accNorm),
      },
    },
    config: {
      model: `../../cache/objects/${name}`,
      model_name: name,
      attention_fraction: frac,
      max_length: 256,
      stride: 256,
      num_fewshot: 0,
      dtype: "f32",
    },
    versions: { tinystories: 1, tinystories_cloze: 1 },
    "n-samples": {
      tinystories: { original: 64, effective: 64 },
      tinystories_cloze: { original: n, effective: n },
    },
    date: 1764366000.25,
    generations: [
      {
        prompt: "Once upon a time, there was a little dog named",
        completion: " Max. Max liked to run in the park.",
      },
      { prompt: "Lily wanted to bake a cake", completion: " for her mom. She got flour and eggs." },
    ],
  };
}

function specResults() {
  const ks = [1, 2, 3, 4, 5, 6];
  const alpha = 0.78; // chance that a draft token is accepted given the previous ones were
  return {
    model: "dpo_25",
    draft: "draft (teacher layers 0 and 7)",
    temperature: 0,
    prompts: 16,
    max_new_tokens: 128,
    device: "llvmpipe (LLVM 15.0.7, 256 bits)",
    results: ks.map((k) => {
      const passes = 400;
      const hist = new Array(k + 1).fill(0);
      for (let i = 0; i < passes; i++) {
        let a = 0;
        while (a < k && rng.uniform() < alpha * (1 - 0.03 * a)) a++;
        hist[a]++;
      }
      const rates = Array.from(
        { length: k },
        (_, i) => hist.slice(i + 1).reduce((x, y) => x + y, 0) / passes,
      );
      const mean = rates.reduce((x, y) => x + y, 0);
      const baseline = 41.5;
      const tps = baseline * (mean + 1) / (1 + 0.16 * k + 0.1);
      return {
        k,
        acceptance_rate_per_position: rates,
        mean_accepted_per_pass: mean,
        tokens_per_s: tps,
        baseline_tokens_per_s: baseline,
        speedup: tps / baseline,
        acceptance_histogram: hist,
      };
    }),
  };
}

async function writeJson(path: string, value: unknown) {
  await Deno.mkdir(join(path, ".."), { recursive: true });
  await Deno.writeTextFile(path, JSON.stringify(value, null, 2) + "\n");
}

async function writeEvents(dir: string, events: Ev[]) {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(join(dir, "events.jsonl"), events.map((e) => JSON.stringify(e)).join("\n") + "\n");
}

const recipeStart = (c: Clock, runId: string, actions: Record<string, string>): Ev => ({
  t: c.tick(0),
  type: "run_start",
  schema: 1,
  run_id: runId,
  recipe: "tiny",
  recipe_path: "recipes/tiny.yaml",
  description: "The embedded demo: stories260K distilled to 50% then 25% attention, SFT, DPO, evaluation, " +
    "speculative decoding, export.",
  settings: { seed: 0, dtype: "f32", gpu: "auto" },
  device: "builtin: llvmpipe (LLVM 15.0.7, 256 bits)",
  stages: STAGES.map((s) => s.stage),
  plan: plan(actions),
});

function ran(
  c: Clock,
  events: Ev[],
  stage: string,
  wall: number,
  outputs: Ev,
  metrics: Ev = {},
  resume: number | null = null,
) {
  const kind = STAGES.find((s) => s.stage === stage)!.kind;
  events.push({
    t: c.tick(0.01),
    type: "stage_start",
    stage,
    kind,
    key: key(stage),
    index: 1,
    total: STAGES.length,
    resume_step: resume,
  });
  return () => {
    events.push({
      t: c.tick(wall),
      type: "stage_finish",
      stage,
      kind,
      key: key(stage),
      wall_s: wall,
      outputs,
      metrics,
    });
  };
}

function cached(c: Clock, events: Ev[], stage: string, outputs: Ev) {
  const kind = STAGES.find((s) => s.stage === stage)!.kind;
  events.push({ t: c.tick(0.02), type: "stage_cached", stage, kind, key: key(stage), outputs });
}

// ---- run 1: computes the first stages, interrupted in distill_25 -------------------------------------------
{
  const runId = "20251128-100000-000-tiny-a1b2";
  const c = new Clock(Date.parse("2025-11-28T10:00:00Z"));
  const ev: Ev[] = [recipeStart(c, runId, {})];
  ran(c, ev, "teacher", 0.8, { model: out("teacher") })();
  ran(c, ev, "pseudo_labels", 41.2, { data: out("pseudo_labels") }, { sequences: 256, tokens: 65536 })();
  ran(c, ev, "map_50", 0.6, { model: out("map_50") })();
  const d50 = ran(c, ev, "distill_50", 0, { model: out("distill_50") });
  trainMetrics(c, ev, "distill_50", 1, 300, 300, { start: 7.2, end: 1.62, lr: 8e-4, kl: true });
  d50();
  (ev[ev.length - 1] as Ev).wall_s = 124.7;
  (ev[ev.length - 1] as Ev).metrics = { loss: 1.71, ce: 1.65, kl: 0.58, tokens: 1228800 };
  ran(c, ev, "map_25", 0.5, { model: out("map_25") })();
  ran(c, ev, "eval_50", 18.3, { results: out("eval_50", "results.json") })();
  ev.push({
    t: c.tick(0.01),
    type: "stage_start",
    stage: "distill_25",
    kind: "distill",
    key: key("distill_25"),
    index: 6,
    total: 15,
    resume_step: null,
  });
  trainMetrics(c, ev, "distill_25", 1, 130, 250, { start: 3.1, end: 1.78, lr: 8e-4, kl: true });
  ev.push({ t: c.tick(0.2), type: "checkpoint", stage: "distill_25", step: 120 });
  ev.push({
    t: c.tick(0.1),
    type: "stage_failed",
    stage: "distill_25",
    kind: "distill",
    key: key("distill_25"),
    wall_s: 52.4,
    error: "interrupted",
    user_error: false,
    interrupted: true,
    checkpoint_step: 120,
  });
  ev.push({
    t: c.tick(0.1),
    type: "run_finish",
    status: "interrupted",
    wall_s: 240.5,
    ran: 6,
    cached: 0,
    failed: 1,
    skipped: 8,
  });
  await writeEvents(join(here, "run_dirs", runId), ev);
}

// ---- run 2: the reported run ------------------------------------------------------------------------------------
{
  const runId = "20251128-103000-000-tiny-c3d4";
  const c = new Clock(Date.parse("2025-11-28T10:30:00Z"));
  const ev: Ev[] = [recipeStart(c, runId, {
    teacher: "run",
    pseudo_labels: "cached",
    map_50: "cached",
    distill_50: "cached",
    map_25: "cached",
    eval_50: "cached",
  })];
  ran(c, ev, "teacher", 0.7, { model: out("teacher") })();
  cached(c, ev, "pseudo_labels", { data: out("pseudo_labels") });
  cached(c, ev, "map_50", { model: out("map_50") });
  cached(c, ev, "distill_50", { model: out("distill_50") });
  cached(c, ev, "map_25", { model: out("map_25") });
  ev.push({
    t: c.tick(0.01),
    type: "log",
    stage: "distill_25",
    level: "info",
    message: "resuming from checkpoint at step 120",
  });
  const d25 = ran(
    c,
    ev,
    "distill_25",
    61.8,
    { model: out("distill_25") },
    { loss: 1.86, ce: 1.8, kl: 0.61 },
    120,
  );
  trainMetrics(c, ev, "distill_25", 121, 250, 250, { start: 3.1, end: 1.78, lr: 8e-4, kl: true });
  d25();
  const sft = ran(c, ev, "sft_25", 38.9, { model: out("sft_25") }, { loss: 1.52 });
  trainMetrics(c, ev, "sft_25", 1, 150, 150, { start: 2.4, end: 1.45, lr: 2e-4, kl: false });
  sft();
  const dpo = ran(c, ev, "dpo_25", 27.3, { model: out("dpo_25") }, {
    loss: 0.41,
    "rewards/accuracies": 0.93,
  });
  trainMetrics(c, ev, "dpo_25", 1, 100, 100, { start: 0, end: 0, lr: 5e-6, kl: false, dpo: true });
  dpo();
  ev.push({
    t: c.tick(0.01),
    type: "log",
    stage: "dpo_25",
    level: "warn",
    message: "3 preference pairs longer than max_length 256 were truncated",
  });
  ran(c, ev, "eval_teacher", 9.1, { results: out("eval_teacher", "results.json") }, {
    tinystories_ppl: 4.71,
  })();
  cached(c, ev, "eval_50", { results: out("eval_50", "results.json") });
  ran(c, ev, "eval_25", 12.2, { results: out("eval_25", "results.json") }, { tinystories_ppl: 5.38 })();
  ran(c, ev, "eval_25_dpo", 12.4, { results: out("eval_25_dpo", "results.json") }, {
    tinystories_ppl: 5.44,
  })();
  ran(c, ev, "draft", 1.1, { model: out("draft") })();
  ran(c, ev, "spec_bench", 47.5, { results: out("spec_bench") }, { speedup_k4: 1.62 })();
  ev.push({
    t: c.tick(0.01),
    type: "stage_start",
    stage: "export",
    kind: "export",
    key: key("export"),
    index: 15,
    total: 15,
    resume_step: null,
  });
  ev.push({
    t: c.tick(0.4),
    type: "stage_failed",
    stage: "export",
    kind: "export",
    key: key("export"),
    wall_s: 0.4,
    error:
      "export: output directory /data/models/tiny-hybrid-25 is not writable (EACCES: permission denied)\n" +
      "  set params.dir to a writable directory, or run with --set export.params.dir=<dir>",
    user_error: true,
    interrupted: false,
    checkpoint_step: null,
  });
  ev.push({
    t: c.tick(0.1),
    type: "run_finish",
    status: "failed",
    wall_s: 276.2,
    ran: 9,
    cached: 5,
    failed: 1,
    skipped: 0,
  });
  await writeEvents(join(here, "run_dirs", runId), ev);
}

// ---- result files ----------------------------------------------------------------------------------------------
const objects = join(here, "cache", "objects");
await writeJson(join(objects, "eval_teacher", "results.json"), evalResults("teacher", 1, 4.71, 0.63, 0.66));
await writeJson(join(objects, "eval_50", "results.json"), evalResults("hybrid-50", 0.5, 4.93, 0.61, 0.64));
await writeJson(join(objects, "eval_25", "results.json"), evalResults("hybrid-25", 0.25, 5.38, 0.57, 0.6));
await writeJson(
  join(objects, "eval_25_dpo", "results.json"),
  evalResults("hybrid-25-dpo", 0.25, 5.44, 0.58, 0.62),
);
await writeJson(join(objects, "spec_bench", "spec_results.json"), specResults());
// A model directory among the outputs: its config.json must not be mistaken for a result file.
await writeJson(join(objects, "dpo_25", "config.json"), {
  model_type: "llama",
  hidden_size: 64,
  num_hidden_layers: 5,
});
console.log(`wrote ${here}`);
