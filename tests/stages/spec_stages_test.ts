import assert from "node:assert/strict";
import { join } from "node:path";
import { lastRun, runCli, tempProject } from "../pipelines/helpers.ts";
import { parseSpecBenchResults } from "../../pipelines/report/results.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { gpuTestOptions } from "../helpers/gpu.ts";

const fixture = (rel: string) => new URL(`../../fixtures/${rel}`, import.meta.url).pathname;
const TEACHER = fixture("models/stories260K-hf");
const HYBRID = fixture("reference/hybrid_mamba2_stories260k/model");

function outputPath(stage: string, port: string, p: ReturnType<typeof tempProject>): string {
  const s = lastRun(p).stages.find((x) => x.stage === stage);
  assert.ok(s, `stage ${stage} in the run record`);
  return s.outputs[port].path;
}

Deno.test(
  "make_draft and spec_bench through the runner: a 2-layer draft, greedy and sampled benchmarks, valid results",
  gpuTestOptions,
  async () => {
    const p = tempProject();
    try {
      p.write("prompts.txt", "Once upon a time\nThe little dog\nA girl named Lily\n");
      const recipe = p.write(
        "spec.yaml",
        `name: spec
settings: { seed: 3, gpu: builtin }
stages:
  draft:
    kind: make_draft
    params: { layers: [0, 4] }
    inputs: { teacher: ${TEACHER} }
  greedy:
    kind: spec_bench
    params: { k: [3, 1], max_new_tokens: 6, warmup: 0, ignore_eos: true, prompts: ["Once upon a time", "The cat"] }
    inputs: { target: ${HYBRID}, draft: "\${draft.model}" }
  sampled:
    kind: spec_bench
    params:
      k: [2]
      max_new_tokens: 5
      warmup: 1
      temperature: 1.0
      top_k: 20
      verify: unfused
      num_prompts: 2
      target_name: hybrid-fixture
      draft_name: draft-2l
    inputs: { target: ${HYBRID}, draft: "\${draft.model}", prompts: prompts.txt }
`,
      );
      const r = await runCli(["run", recipe]);
      assert.equal(r.code, 0, r.stdout + r.stderr);

      const draftDir = outputPath("draft", "model", p);
      const draft = await loadModel(draftDir);
      assert.equal(draft.config.numLayers, 2);
      assert.ok((await Deno.stat(join(draftDir, "tokenizer.json"))).isFile, "tokenizer files copied");

      const greedy = parseSpecBenchResults(
        JSON.parse(await Deno.readTextFile(join(outputPath("greedy", "results", p), "results.json"))),
        "greedy results.json",
      );
      assert.deepEqual(greedy.results.map((e) => e.k), [1, 3]);
      assert.equal(greedy.prompts, 2);
      assert.deepEqual(greedy.greedy_mismatches, []);
      for (const e of greedy.results) {
        const passes = e.acceptance_histogram.reduce((a, b) => a + b, 0);
        assert.ok(passes >= 2, "at least one pass per prompt");
        assert.equal((e as unknown as { tokens: number }).tokens, 12, "ignore_eos: 6 tokens per prompt");
        assert.ok(e.tokens_per_s > 0 && e.baseline_tokens_per_s > 0);
        assert.ok(Math.abs(e.speedup - e.tokens_per_s / e.baseline_tokens_per_s) < 1e-9);
      }

      const sampled = parseSpecBenchResults(
        JSON.parse(await Deno.readTextFile(join(outputPath("sampled", "results", p), "results.json"))),
        "sampled results.json",
      );
      assert.equal(sampled.model, "hybrid-fixture");
      assert.equal(sampled.draft, "draft-2l");
      assert.equal(sampled.prompts, 2);
      assert.equal(sampled.temperature, 1);
      assert.equal(sampled.verify, "unfused");

      // the report found both result files
      const report = JSON.parse(
        await Deno.readTextFile(join(p.runsDir, lastRun(p).run_id, "results.json")),
      );
      assert.equal(JSON.stringify(report).includes("hybrid-fixture"), true);
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test(
  "spec_bench on a Mamba1 hybrid from map_weights: fused and unfused verification, no greedy mismatch",
  gpuTestOptions,
  async () => {
    const p = tempProject();
    try {
      const recipe = p.write(
        "spec.yaml",
        `name: spec-mamba1
settings: { seed: 5, gpu: builtin }
stages:
  hybrid:
    kind: map_weights
    params: { attn_layers: [1, 3], mixer: mamba1 }
    inputs: { teacher: ${TEACHER} }
  draft:
    kind: make_draft
    params: { layers: [0, 4] }
    inputs: { teacher: ${TEACHER} }
  fused:
    kind: spec_bench
    params: { k: [2], max_new_tokens: 5, warmup: 0, ignore_eos: true, prompts: ["Once upon a time"] }
    inputs: { target: "\${hybrid.model}", draft: "\${draft.model}" }
  unfused:
    kind: spec_bench
    params: { k: [3], max_new_tokens: 5, warmup: 0, ignore_eos: true, verify: unfused, prompts: ["The cat"] }
    inputs: { target: "\${hybrid.model}", draft: "\${draft.model}" }
`,
      );
      const r = await runCli(["run", recipe]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const hybrid = await loadModel(outputPath("hybrid", "model", p));
      assert.ok(
        hybrid.kind === "hybrid" && hybrid.mamba.mixer === "mamba1",
        "map_weights made a Mamba1 hybrid",
      );
      for (const stage of ["fused", "unfused"]) {
        const res = parseSpecBenchResults(
          JSON.parse(await Deno.readTextFile(join(outputPath(stage, "results", p), "results.json"))),
          `${stage} results.json`,
        );
        assert.deepEqual(res.greedy_mismatches, [], stage);
        assert.equal(res.verify, stage);
        assert.ok(res.results[0].acceptance_histogram.reduce((a, b) => a + b, 0) >= 1, `${stage}: passes`);
      }
    } finally {
      await p.cleanup();
    }
  },
);

Deno.test("spec_bench without prompts is a user error naming the fix", gpuTestOptions, async () => {
  const p = tempProject();
  try {
    const recipe = p.write(
      "spec.yaml",
      `name: spec
settings: { gpu: builtin }
stages:
  bench:
    kind: spec_bench
    params: { k: [1], max_new_tokens: 2 }
    inputs: { target: ${HYBRID}, draft: ${TEACHER} }
`,
    );
    const r = await runCli(["run", recipe]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stdout + r.stderr, /no prompts: wire the prompts input or set params\.prompts/);
  } finally {
    await p.cleanup();
  }
});
