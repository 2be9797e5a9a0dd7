/**
 * GPU log-likelihood scoring against the float64 reference model: windows of several lengths and offsets
 * (perplexity) and continuation requests whose contexts are shared through forked decoding states (multiple
 * choice), on the fixture teacher and the fixture Mamba2 hybrid.
 */
import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { forkDecodeState } from "../../models/fork_state.ts";
import { scoreContinuations, scoreWindows, type ScoringWindow } from "../../models/loglikelihood.ts";
import { logProbAt, refForward } from "../reference/model_f64.ts";
import { FIXTURE_MODELS, fixturePath, loadReferenceModel } from "../reference/fixtures.ts";
import { gpuTestOptions, testRng, testRuntime } from "../helpers/gpu.ts";

function randomIds(rng: { int(n: number): number }, n: number): number[] {
  return Array.from({ length: n }, () => 3 + rng.int(509));
}

// f32 per-token log-probs against float64: about 1e-5 relative each; sums of up to ~40 tokens of magnitude ~2.
const SUM_TOL = { llama: 2e-4, hybrid: 2e-3 } as const;

for (const name of ["llama", "hybrid"] as const) {
  Deno.test(
    `scoreWindows (${name}): window sums equal float64 sums over the same positions`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      const rng = testRng(`windows-${name}`);
      const ref = await loadReferenceModel(name);
      const lm = CausalLM.fromModel(rt, await loadModel(fixturePath(FIXTURE_MODELS[name].dir)));
      try {
        // three of length 24 (one batch of 2 and one of 1 with batchSize 2) and two of length 9
        const windows: ScoringWindow[] = [];
        for (const [T, from] of [[24, 0], [9, 0], [24, 10], [9, 8], [24, 23]]) {
          const input = randomIds(rng, T);
          windows.push({ input, targets: randomIds(rng, T - from), scoreFrom: from });
        }
        const got = await scoreWindows(lm, windows, { batchSize: 2 });
        windows.forEach((w, i) => {
          const { logits } = refForward(ref.cfg, ref.w, w.input);
          let want = 0;
          w.targets.forEach((t, j) => (want += logProbAt(logits, w.scoreFrom + j, ref.cfg.V, t)));
          assert.ok(
            Math.abs(got[i] - want) <= SUM_TOL[name],
            `window ${i}: ${got[i]} vs float64 ${want}`,
          );
        });
      } finally {
        lm.dispose();
      }
    },
  );

  Deno.test(
    `scoreContinuations (${name}): forked contexts give the float64 log-likelihood of context + continuation`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      const rng = testRng(`continuations-${name}`);
      const ref = await loadReferenceModel(name);
      const lm = CausalLM.fromModel(rt, await loadModel(fixturePath(FIXTURE_MODELS[name].dir)));
      try {
        // contexts of lengths 1 (no prefill), 7 (three requests: batched, then split by batchSize) and 12;
        // continuations of 1..6 tokens, 2 to 4 per request
        const requests = [1, 7, 12, 7, 7].map((L) => ({
          context: randomIds(rng, L),
          continuations: Array.from({ length: 2 + rng.int(3) }, () => randomIds(rng, 1 + rng.int(6))),
        }));
        const got = await scoreContinuations(lm, requests, { batchSize: 7 });
        requests.forEach((r, i) => {
          r.continuations.forEach((c, k) => {
            const input = [...r.context, ...c.slice(0, -1)];
            const { logits } = refForward(ref.cfg, ref.w, input);
            let want = 0;
            c.forEach((t, j) => (want += logProbAt(logits, r.context.length - 1 + j, ref.cfg.V, t)));
            assert.ok(
              Math.abs(got[i][k] - want) <= SUM_TOL[name],
              `request ${i} continuation ${k}: ${got[i][k]} vs float64 ${want}`,
            );
          });
        });
      } finally {
        lm.dispose();
      }
    },
  );
}

Deno.test(
  "forkDecodeState: forked rows continue exactly like their source rows",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const lm = CausalLM.fromModel(rt, await loadModel(fixturePath(FIXTURE_MODELS.hybrid.dir)));
    const rng = testRng("fork");
    const V = lm.config.vocabSize;
    const prompt = [randomIds(rng, 5), randomIds(rng, 5)];
    const last = randomIds(rng, 2);
    const next = randomIds(rng, 3);
    const src = lm.newDecodeState(2, 10);
    const direct = lm.newDecodeState(3, 10);
    try {
      await rt.scope(async () => {
        // a prompt, then a one-token step (whose Mamba layers cache their packed weights on the state: not rows)
        lm.step(src, Int32Array.from(prompt.flat()), 5, { lastOnly: true });
        lm.step(src, Int32Array.from(last), 1);
        // rows [1, 0, 1] of the source, each then fed one more token
        const forked = forkDecodeState(lm, src, [1, 0, 1], 10);
        lm.step(direct, Int32Array.from([...prompt[1], ...prompt[0], ...prompt[1]]), 5, { lastOnly: true });
        lm.step(direct, Int32Array.of(last[1], last[0], last[1]), 1);
        const a = await lm.step(forked, Int32Array.from(next), 1).read();
        const b = await lm.step(direct, Int32Array.from(next), 1).read();
        lm.disposeState(forked);
        assert.equal(a.length, 3 * V);
        // the same kernels on the same inputs: bit-identical
        assert.deepEqual(a, b);
      });
    } finally {
      lm.disposeState(src);
      lm.disposeState(direct);
      lm.dispose();
    }
  },
);
