/**
 * The evaluate stage through the real runner: the teacher's windowed loss against the Hugging Face reference,
 * cloze accuracy against an independent float64 scoring, rolling perplexity of the hybrid against float64,
 * generation, task files (YAML folders, few-shot) and malformed inputs.
 *
 * `DISTILLERY_FULL_EVAL=1` scores all 1,600 cloze items (minutes on a software adapter) instead of the first
 * `CLOZE_SUBSET`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseEvalResults } from "../../pipelines/report/results.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { logProbAt, refForward } from "../reference/model_f64.ts";
import { loadReferenceModel } from "../reference/fixtures.ts";
import { countBytes, countWords, rollingWindows } from "../../data/text_windows.ts";
import { fixture, HYBRID_DIR, TEACHER_DIR, withEnv, withRecipe, writeHubSnapshot } from "./recipe_run.ts";
import { gpuTestOptions } from "../helpers/gpu.ts";
import { lastEvents, startCli, waitFor } from "../pipelines/helpers.ts";

const CLOZE = fixture("eval/tinystories_cloze.jsonl");
const FULL = Deno.env.get("DISTILLERY_FULL_EVAL") === "1";
const CLOZE_SUBSET = 32;

function readResults(dir: string) {
  const file = join(dir, "results.json");
  return parseEvalResults(JSON.parse(Deno.readTextFileSync(file)), file);
}

function readJsonl(path: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(path).trim().split("\n").map((l) => JSON.parse(l));
}

Deno.test(
  "evaluate: the teacher's mean loss on the reference windows matches transformers (1e-4 relative)",
  gpuTestOptions,
  async () => {
    const ref = JSON.parse(Deno.readTextFileSync(fixture("reference/llama_stories260k/ce_tinystories.json")));
    // the reference text: the first 65,536 bytes of the validation file (a clean ASCII cut)
    const bytes = Deno.readFileSync(fixture("text/tinystories_valid.txt")).subarray(0, 65536);
    const text = new TextDecoder().decode(bytes);
    await withRecipe(
      `name: ev
settings: { gpu: builtin }
stages:
  eval_teacher:
    kind: evaluate
    params: { window_mode: bos_each, max_length: 256, text_mode: file, batch_size: 16 }
    inputs: { model: ${TEACHER_DIR}, text: [valid64k.txt] }
`,
      { "valid64k.txt": text },
      async (run) => {
        const r = await run();
        assert.equal(r.code, 0, r.stderr);
        const res = readResults(r.outputs["eval_teacher.results"]);
        const s = res.results.valid64k;
        const task = (res.config.tasks as Record<string, Record<string, number>>).valid64k;
        assert.equal(task.scored_tokens, ref.n_windows * ref.text_tokens_per_window);
        assert.equal(task.dropped_tokens, ref.dropped_tail_tokens);
        assert.equal(task.windows, ref.n_windows);
        const meanNll = s["mean_nll,none"] as number;
        const rel = Math.abs(meanNll - ref.mean_ce) / ref.mean_ce;
        assert.ok(rel <= 1e-4, `mean loss ${meanNll} vs transformers ${ref.mean_ce}: relative error ${rel}`);
        // the other figures follow lm-eval's formulas from the same summed NLL
        const nll = meanNll * task.scored_tokens;
        assert.ok(Math.abs((s["token_perplexity,none"] as number) - Math.exp(meanNll)) < 1e-9);
        assert.ok(Math.abs((s["word_perplexity,none"] as number) - Math.exp(nll / countWords(text))) < 1e-9);
        assert.ok(Math.abs((s["byte_perplexity,none"] as number) - Math.exp(nll / countBytes(text))) < 1e-9);
        assert.ok(Math.abs((s["bits_per_byte,none"] as number) - nll / countBytes(text) / Math.LN2) < 1e-9);
        assert.equal(res.config.max_length, 256);
        assert.equal(res.config.stride, 255);
        assert.equal(res.config.attention_fraction, 1);
        assert.equal(res.config.role, "teacher");
        assert.equal(res.config.model_name, "eval_teacher");
        assert.deepEqual(res["n-samples"].valid64k, { original: 1, effective: 1 });
      },
    );
  },
);

/** lm-eval's multiple-choice scoring, written independently in float64: (ctx, " " + ending), tail tokens. */
async function float64Cloze(items: { ctx: string; endings: string[]; label: number }[]) {
  const tok = await Tokenizer.fromDir(TEACHER_DIR);
  const ref = await loadReferenceModel("llama");
  const enc = (s: string) => tok.encode(s, { addSpecialTokens: false });
  return items.map((it) => {
    const ctx = enc(it.ctx);
    const lls = it.endings.map((e) => {
      const cont = enc(it.ctx + " " + e).slice(ctx.length);
      const { logits } = refForward(ref.cfg, ref.w, [...ctx, ...cont.slice(0, -1)]);
      let ll = 0;
      cont.forEach((t, j) => (ll += logProbAt(logits, ctx.length - 1 + j, ref.cfg.V, t)));
      return ll;
    });
    const argmax = (xs: number[]) => xs.reduce((b, x, i) => (x > xs[b] ? i : b), 0);
    return { lls, pred: argmax(lls), predNorm: argmax(lls.map((l, i) => l / [...it.endings[i]].length)) };
  });
}

Deno.test(
  `evaluate: cloze acc_norm equals an independent float64 scoring exactly (${
    FULL ? "all 1,600 items" : `first ${CLOZE_SUBSET} items`
  })`,
  gpuTestOptions,
  async () => {
    const all = Deno.readTextFileSync(CLOZE).trim().split("\n").map((l) => JSON.parse(l));
    const items = FULL ? all : all.slice(0, CLOZE_SUBSET);
    await withRecipe(
      `name: ev
settings: { gpu: builtin }
stages:
  cloze:
    kind: evaluate
    params: { batch_size: 64, ${FULL ? "" : `limit: ${CLOZE_SUBSET}`} }
    inputs: { model: ${TEACHER_DIR}, tasks: [${CLOZE}] }
`,
      {},
      async (run) => {
        let t0 = performance.now();
        const r = await run();
        const gpuSeconds = (performance.now() - t0) / 1000;
        assert.equal(r.code, 0, r.stderr);
        const res = readResults(r.outputs["cloze.results"]);
        const s = res.results.tinystories_cloze;
        const samples = readJsonl(join(r.outputs["cloze.results"], "samples_tinystories_cloze.jsonl"));
        assert.equal(samples.length, items.length);
        assert.deepEqual(res["n-samples"].tinystories_cloze, { original: 1600, effective: items.length });
        t0 = performance.now();
        const want = await float64Cloze(items);
        const f64Seconds = (performance.now() - t0) / 1000;
        let accNorm = 0, acc = 0;
        want.forEach((w, i) => {
          const got = samples[i] as { loglikelihoods: number[]; pred: number; pred_norm: number };
          got.loglikelihoods.forEach((ll, c) => {
            // f32 against float64 sums of up to ~40 log-probabilities of magnitude up to ~10
            assert.ok(Math.abs(ll - w.lls[c]) <= 1e-3, `item ${i} choice ${c}: ${ll} vs float64 ${w.lls[c]}`);
          });
          assert.equal(got.pred_norm, w.predNorm, `item ${i}: acc_norm prediction differs from float64`);
          assert.equal(got.pred, w.pred, `item ${i}: acc prediction differs from float64`);
          accNorm += +(w.predNorm === items[i].label);
          acc += +(w.pred === items[i].label);
        });
        const n = items.length;
        assert.equal(s["acc_norm,none"], accNorm / n);
        assert.equal(s["acc,none"], acc / n);
        const p = accNorm / n;
        const stderr = Math.sqrt((p * (1 - p) * n) / (n - 1)) / Math.sqrt(n);
        assert.ok(Math.abs((s["acc_norm_stderr,none"] as number) - stderr) < 1e-12);
        if (FULL) {
          console.log(
            `full cloze: acc ${acc / n}, acc_norm ${accNorm / n}; GPU stage ${gpuSeconds.toFixed(1)} s, ` +
              `float64 reference ${f64Seconds.toFixed(1)} s`,
          );
        }
      },
    );
  },
);

Deno.test(
  "evaluate: the hybrid's rolling perplexity equals float64; role and attention fraction come from its config",
  gpuTestOptions,
  async () => {
    const paragraphs = Deno.readTextFileSync(fixture("text/tinystories_valid.txt")).split(/\n\s*\n/)
      .filter((p) => p.trim()).slice(0, 3);
    await withRecipe(
      `name: ev
settings: { gpu: builtin }
stages:
  eval_hybrid:
    kind: evaluate
    params: { max_length: 48, limit: 2, batch_size: 4, model_name: hybrid-40 }
    inputs: { model: ${HYBRID_DIR}, tokenizer: ${TEACHER_DIR}, text: [docs.txt] }
`,
      { "docs.txt": paragraphs.join("\n\n") + "\n" },
      async (run) => {
        const r = await run();
        assert.equal(r.code, 0, r.stderr);
        const res = readResults(r.outputs["eval_hybrid.results"]);
        assert.equal(res.config.attention_fraction, 2 / 5);
        assert.equal(res.config.role, "student");
        assert.equal(res.config.model_name, "hybrid-40");
        assert.equal(res.config.stride, 48);
        assert.deepEqual(res["n-samples"].docs, { original: 3, effective: 2 });
        const tok = await Tokenizer.fromDir(TEACHER_DIR);
        const ref = await loadReferenceModel("hybrid");
        let nll = 0, tokens = 0, words = 0;
        for (const doc of paragraphs.slice(0, 2)) {
          const ids = tok.encode(doc, { addSpecialTokens: false });
          assert.ok(ids.length > 48, "each document spans several windows");
          for (const w of rollingWindows(ids, 48, 1)) {
            const { logits } = refForward(ref.cfg, ref.w, w.input);
            w.targets.forEach((t, j) => (nll -= logProbAt(logits, w.scoreFrom + j, ref.cfg.V, t)));
            tokens += w.targets.length;
          }
          words += countWords(doc);
        }
        const s = res.results.docs;
        const rel = Math.abs((s["mean_nll,none"] as number) - nll / tokens) / (nll / tokens);
        assert.ok(rel < 1e-5, `mean NLL ${s["mean_nll,none"]} vs float64 ${nll / tokens}`);
        const wp = Math.exp(nll / words);
        assert.ok(Math.abs((s["word_perplexity,none"] as number) - wp) / wp < 1e-4);
      },
    );
  },
);

Deno.test(
  "evaluate: hf://datasets text offline from the Hub cache, empty documents skipped, limit",
  gpuTestOptions,
  async () => {
    const cache = await Deno.makeTempDir({ prefix: "hf-cache-" });
    const commit = "d".repeat(40);
    const docs = ["Tom had a red ball.", "", "Sue saw a big dog. The dog was happy.", "Ben ran home."];
    try {
      await writeHubSnapshot(cache, "dataset", "org/stories", commit, {
        "data/train.jsonl": docs.map((text) => JSON.stringify({ text })).join("\n") + "\n",
        "data/test.jsonl": JSON.stringify({ text: "unused" }) + "\n",
      });
      await withEnv({ HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" }, () =>
        withRecipe(
          `name: ev
settings: { gpu: builtin }
stages:
  hub:
    kind: evaluate
    params: { limit: 2, max_length: 8 }
    inputs: { model: ${TEACHER_DIR}, text: ["hf://datasets/org/stories@${commit}"] }
`,
          {},
          async (run) => {
            const r = await run();
            assert.equal(r.code, 0, r.stderr);
            const res = readResults(r.outputs["hub.results"]);
            assert.deepEqual(res["n-samples"].stories, { original: 3, effective: 2 });
            const samples = readJsonl(join(r.outputs["hub.results"], "samples_stories.jsonl"));
            assert.deepEqual(samples.map((x) => x.words), [5, 9]);
            assert.ok(String(samples[1].source).includes("data/train.jsonl"), String(samples[1].source));
            assert.ok((samples[1].windows as number) > 1, "max_length 8 splits the second document");
          },
        ));
    } finally {
      await Deno.remove(cache, { recursive: true });
    }
  },
);

Deno.test("evaluate: generations from the prompts are saved with the results", gpuTestOptions, async () => {
  await withRecipe(
    `name: ev
settings: { gpu: builtin }
stages:
  gen:
    kind: evaluate
    params: { generation: { max_new_tokens: 20, chat_template: false } }
    inputs: { model: ${TEACHER_DIR}, prompts: prompts.jsonl }
  chat:
    kind: evaluate
    params: { generation: { max_new_tokens: 8, temperature: 0.8, top_k: 10, seed: 3 } }
    inputs: { model: ${TEACHER_DIR}, prompts: prompts.jsonl }
`,
    { "prompts.jsonl": '{"prompt": ""}\n{"prompt": "The cat sat on the mat. It was"}\n' },
    async (run) => {
      const r = await run();
      assert.equal(r.code, 0, r.stderr);
      const res = readResults(r.outputs["gen.results"]);
      const g = res.generations!;
      assert.equal(g.length, 2);
      // the fixture teacher's known greedy start from BOS alone
      assert.ok(
        g[0].completion.startsWith("Once upon a time, there was a little girl named Lily."),
        JSON.stringify(g[0].completion),
      );
      assert.equal(g[0].completion_tokens, 20);
      assert.equal(g[0].finish_reason, "length");
      const lines = readJsonl(join(r.outputs["gen.results"], "generations.jsonl"));
      assert.deepEqual(lines, JSON.parse(JSON.stringify(g)));
      const chat = readResults(r.outputs["chat.results"]).generations!;
      assert.equal(chat[1].prompt, "The cat sat on the mat. It was");
      assert.equal(chat[1].chat_template, true);
      assert.ok(
        (chat[1].prompt_tokens as number) > (g[1].prompt_tokens as number),
        "the template adds tokens",
      );
    },
  );
});

Deno.test("evaluate: a folder of task YAMLs with their data, few-shot contexts", gpuTestOptions, async () => {
  const items = Deno.readTextFileSync(CLOZE).trim().split("\n").slice(0, 6);
  await withRecipe(
    `name: ev
settings: { gpu: builtin }
stages:
  tasks:
    kind: evaluate
    params: { limit: 3, num_fewshot: 2 }
    inputs: { model: ${TEACHER_DIR}, tasks: [tasks] }
`,
    {
      "tasks/data/cloze6.jsonl": items.join("\n") + "\n",
      "tasks/story.yaml": [
        "task: story",
        "dataset_path: json",
        "dataset_kwargs: { data_files: { test: data/cloze6.jsonl } }",
        "test_split: test",
        "doc_to_text: ctx",
        "doc_to_choice: endings",
        "doc_to_target: label",
        'description: "Stories.\\n\\n"',
        "metadata: { version: 2 }",
      ].join("\n") + "\n",
    },
    async (run) => {
      const r = await run();
      assert.equal(r.code, 0, r.stderr);
      const res = readResults(r.outputs["tasks.results"]);
      assert.equal(res.versions.story, 2);
      assert.deepEqual(res["n-samples"].story, { original: 6, effective: 3 });
      const samples = readJsonl(join(r.outputs["tasks.results"], "samples_story.jsonl"));
      const all = items.map((l) => JSON.parse(l));
      samples.forEach((s, i) => {
        const ctx = s.context as string;
        assert.ok(ctx.startsWith("Stories.\n\n"));
        assert.ok(ctx.endsWith(all[i].ctx), "the item's own context comes last");
        // two solved examples from the other items, never the item itself
        const shots = all.filter((x, j) =>
          j !== i && ctx.includes(x.ctx + " " + x.endings[x.label] + "\n\n")
        );
        assert.equal(shots.length, 2, ctx);
      });
    },
  );
});

Deno.test(
  "evaluate: killed after its first task, a rerun resumes with the next one",
  gpuTestOptions,
  async () => {
    await withRecipe(
      `name: ev
settings: { gpu: builtin }
stages:
  both:
    kind: evaluate
    params: { limit: 24, batch_size: 8 }
    inputs: { model: ${TEACHER_DIR}, text: [one.txt], tasks: [${CLOZE}] }
`,
      { "one.txt": "Tom had a red ball. He liked to play with it every day.\n" },
      async (run, p) => {
        const child = startCli(["run", p.path("recipe.yaml")], { cwd: p.dir });
        try {
          await waitFor(
            () => {
              try {
                return lastEvents(p).some((e) => e.type === "checkpoint" && e.stage === "both");
              } catch {
                return false;
              }
            },
            60000,
            "the first task's checkpoint",
          );
        } finally {
          child.kill("SIGKILL");
          await child.output();
        }
        const r = await run();
        assert.equal(r.code, 0, r.stderr);
        const logs = lastEvents(p).map((e) => (e as { message?: string }).message ?? "");
        assert.ok(logs.includes("resuming: 1 task(s) already evaluated"), logs.join("\n"));
        const res = readResults(r.outputs["both.results"]);
        assert.deepEqual(Object.keys(res.results), ["one", "tinystories_cloze"]);
        assert.ok((res.results.one["token_perplexity,none"] as number) > 1);
        assert.equal(res["n-samples"].tinystories_cloze.effective, 24);
      },
    );
  },
);

Deno.test("evaluate: malformed task files and task data outside the key are refused (exit 2)", async () => {
  await withRecipe(
    `name: ev
settings: { gpu: builtin }
stages:
  bad:
    kind: evaluate
    inputs: { model: ${TEACHER_DIR}, tasks: [bad.jsonl] }
  loose:
    kind: evaluate
    inputs: { model: ${TEACHER_DIR}, tasks: [t.yaml] }
`,
    {
      "bad.jsonl": [
        '{"ctx": "a", "endings": ["x", "y"], "label": 0}',
        '{"ctx": "b", "endings": ["x", "y"]}',
        '{"ctx": "c", "endings": ["x", "y"], "label": 7}',
        '{"ctx": "d", "endings": [], "label": 0}',
      ].join("\n") + "\n",
      "t.yaml": "dataset_path: d.jsonl\ndoc_to_text: ctx\ndoc_to_choice: endings\ndoc_to_target: label\n",
      "d.jsonl": '{"ctx": "a", "endings": ["x", "y"], "label": 0}\n',
    },
    async (run) => {
      const bad = await run(["bad"]);
      assert.equal(bad.code, 2, bad.stderr);
      for (
        const part of [
          `bad.jsonl:2 (record 1): field "label"`,
          `bad.jsonl:3 (record 2): field "label": expected an index from 0 to 1, found 7`,
          `bad.jsonl:4 (record 3): field "endings": expected a non-empty list of strings`,
        ]
      ) assert.ok(bad.stderr.includes(part), `missing ${JSON.stringify(part)} in:\n${bad.stderr}`);
      assert.ok(!bad.stderr.includes("internal error"), bad.stderr);
      const loose = await run(["loose"]);
      assert.equal(loose.code, 2, loose.stderr);
      assert.match(loose.stderr, /t\.yaml reads .*d\.jsonl, which is not part of the input/);
    },
  );
});
