// Sampled generation with the GPU-resident loop on the fixture teacher (stories260K): reproducible whatever the
// batch and chunk sizes, stopping at EOS exactly where the unstopped sample has it, every token within the
// top-k of its position, and the first token distributed as the CPU samplingDistribution of the same logits.
import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { generate, greedyResident } from "../../models/generate.ts";
import { samplingDistribution, type SamplingOptions } from "../../models/sampling.ts";
import { FIXTURE_MODELS, fixturePath, openOracle } from "../reference/fixtures.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

async function teacher(): Promise<CausalLM> {
  return CausalLM.fromModel(await testRuntime(), await loadModel(fixturePath(FIXTURE_MODELS.llama.dir)));
}

Deno.test(
  "generate (sampled): reproducible across batch and chunk sizes, EOS cuts the same sample, tokens within top-k",
  gpuTestOptions,
  async () => {
    const lm = await teacher();
    const rt = lm.rt;
    const V = lm.config.vocabSize;
    try {
      const p0 = [...await (await openOracle("llama")).readInt32("p0.input_ids")];
      const prompts = [p0, [1], p0.slice(0, 5), p0, [1, 403], [1]];
      const sampling: SamplingOptions = { temperature: 1.2, topK: 3, topP: 0.95 };
      const opts = { maxNewTokens: 16, sampling, seed: 17 };
      const reads0 = rt.dev.stats.reads;
      const a = await generate(lm, prompts, { ...opts, chunk: 8 });
      // 4 length groups, 16 tokens in chunks of 8 (the first step's ids ride with the first chunk): 2 reads each
      assert.ok(rt.dev.stats.reads - reads0 <= 4 * 2, `reads: ${rt.dev.stats.reads - reads0}`);
      // a second identical call is steady state: it compiles nothing and creates no bind group or buffer (each
      // is a call into the provider that a long pseudo-labelling run would pay per batch)
      const created = () => [rt.dev.stats.pipelines, rt.dev.stats.bindGroups, rt.pool.stats.created];
      const before = created();
      assert.deepEqual(await generate(lm, prompts, { ...opts, chunk: 8 }), a, "the same call again");
      assert.deepEqual(created(), before, "pipelines, bind groups and pool buffers created by the repeat");
      // streaming: each read hands every prompt the tokens it gained; together they are its completion
      const streamed: number[][] = prompts.map(() => []);
      const reads1 = rt.dev.stats.reads;
      const viaStream = await generate(lm, prompts, {
        ...opts,
        chunk: 4,
        onTokens: (i, tokens) => {
          assert.ok(
            tokens.length > 0 && tokens.length <= 5,
            `prompt ${i}: ${tokens.length} tokens in one read`,
          );
          streamed[i].push(...tokens);
        },
      });
      assert.deepEqual(viaStream, a);
      assert.deepEqual(streamed, a, "the streamed pieces");
      assert.ok(rt.dev.stats.reads - reads1 <= 4 * 4, "one read per chunk of 4");
      // one chunk ahead: when a chunk's ids are handed out, the next chunk is recorded and its read queued, so
      // the GPU has work while the CPU waits (16 tokens in chunks of 4 = reads of 5, 4, 4 and 3 ids)
      const queuedAtHandout: number[] = [];
      const reads2 = rt.dev.stats.reads;
      const alone = await generate(lm, [p0], {
        ...opts,
        chunk: 4,
        onTokens: () => void queuedAtHandout.push(rt.dev.stats.reads - reads2),
      });
      assert.deepEqual(alone[0], a[0], "prompt 0 alone");
      assert.deepEqual(queuedAtHandout, [2, 3, 4, 4], "reads queued when each chunk's ids were handed out");
      const b = await generate(lm, prompts, { ...opts, batchSize: 1, chunk: 5 });
      const c = await generate(lm, prompts, { ...opts, batchSize: 2, chunk: 1 });
      assert.deepEqual(b, a, "batch size 1, chunk 5");
      assert.deepEqual(c, a, "batch size 2, chunk 1");
      for (const comp of a) {
        assert.equal(comp.length, 16);
        assert.ok(comp.every((t) => Number.isInteger(t) && t >= 0 && t < V), JSON.stringify(comp));
      }
      // equal prompts sample from their own streams; another seed samples differently
      assert.notDeepEqual(a[0], a[3]);
      assert.notDeepEqual(a[1], a[5]);
      const other = await generate(lm, prompts.slice(0, 2), { ...opts, seed: 18 });
      assert.ok(other.some((comp, i) => comp.join() !== a[i].join()), "seed 18 sampled what seed 17 did");
      // explicit streams: prompt 3 given prompt 0's stream samples prompt 0's completion
      const restreamed = await generate(lm, [p0], { ...opts, streams: [0] });
      assert.deepEqual(restreamed[0], a[0]);
      const third = await generate(lm, [p0], { ...opts, streams: [3] });
      assert.deepEqual(third[0], a[3]);

      // a token of the sample declared EOS: each row stops at its first occurrence, the tokens before unchanged
      const eos = a[0][9];
      const stopped = await generate(lm, prompts, { ...opts, eosIds: [eos], chunk: 8 });
      const dropped = await generate(lm, prompts.slice(0, 3), {
        ...opts,
        eosIds: [eos],
        dropEos: true,
        chunk: 8,
      });
      a.forEach((comp, i) => {
        const at = comp.indexOf(eos);
        assert.deepEqual(stopped[i], at < 0 ? comp : comp.slice(0, at + 1), `prompt ${i} with EOS ${eos}`);
        if (i < 3) {
          assert.deepEqual(dropped[i], at < 0 ? comp : comp.slice(0, at), `prompt ${i} dropping EOS`);
        }
      });
      assert.ok(stopped[0].length <= 10);

      // every sampled token is among the 3 most likely at its position (teacher-forced logits of the full
      // sequence; they equal the decode steps' to about 1e-4, hence the 1e-3 slack at the k-th value)
      for (const [i, comp] of a.entries()) {
        const seq = [...prompts[i], ...comp];
        const logits = await rt.scope(async () =>
          await rt.noGrad(() => lm.forward(Int32Array.from(seq), 1, seq.length).logits).read()
        );
        comp.forEach((tok, t) => {
          const row = logits.subarray((prompts[i].length - 1 + t) * V, (prompts[i].length + t) * V);
          const third = [...row].sort((x, y) => y - x)[2];
          assert.ok(row[tok] >= third - 1e-3, `prompt ${i} position ${t}: token ${tok} is outside the top 3`);
        });
      }
    } finally {
      lm.dispose();
    }
  },
);

/** Chi-square statistic and degrees of freedom, bins with an expected count below 5 pooled. */
function chiSquare(counts: Map<number, number>, p: Float64Array, n: number): { chi2: number; dof: number } {
  let chi2 = 0, bins = 0, poolC = 0, poolE = 0;
  for (let i = 0; i < p.length; i++) {
    const e = n * p[i], c = counts.get(i) ?? 0;
    if (e === 0) continue;
    if (e < 5) {
      poolC += c;
      poolE += e;
    } else {
      chi2 += (c - e) ** 2 / e;
      bins++;
    }
  }
  if (poolE > 0) {
    chi2 += (poolC - poolE) ** 2 / poolE;
    bins++;
  }
  return { chi2, dof: bins - 1 };
}

Deno.test(
  "generate (sampled): the first token is distributed as the CPU samplingDistribution (chi-square, 99.9%)",
  gpuTestOptions,
  async () => {
    const lm = await teacher();
    const rt = lm.rt;
    try {
      // from BOS alone the fixture's next-token distribution at T = 1.5 after top-k 20 / top-p 0.9 keeps six
      // tokens (about 0.64, 0.22, 0.05, 0.04, 0.03, 0.03)
      const sampling: SamplingOptions = { temperature: 1.5, topK: 20, topP: 0.9 };
      const state = lm.newDecodeState(1, 1);
      const logits = await rt.scope(async () =>
        await lm.step(state, Int32Array.of(1), 1, { lastOnly: true }).read()
      );
      lm.disposeState(state);
      const p = samplingDistribution(logits, sampling);
      const kept = [...p].filter((v) => v > 0).length;
      assert.ok(kept >= 4, `only ${kept} tokens kept: the test would have no power`);
      // and the nucleus boundary is clear of top_p, so f32 and float64 keep the same tokens
      const ranked = [...samplingDistribution(logits, { ...sampling, topP: 1 })].sort((x, y) => y - x);
      const mass = (k: number) => ranked.slice(0, k).reduce((s, v) => s + v, 0);
      assert.ok(mass(kept - 1) < 0.9 - 1e-4 && mass(kept) > 0.9 + 1e-4, `${mass(kept - 1)}, ${mass(kept)}`);
      const n = 1500;
      const firsts = await generate(lm, Array.from({ length: n }, () => [1]), {
        maxNewTokens: 1,
        sampling,
        seed: 4,
        batchSize: n,
      });
      const counts = new Map<number, number>();
      for (const [t] of firsts) counts.set(t, (counts.get(t) ?? 0) + 1);
      for (const t of counts.keys()) assert.ok(p[t] > 0, `token ${t} drawn but filtered out by top-k/top-p`);
      const { chi2, dof } = chiSquare(counts, p, n);
      // 99.9% quantiles of chi-square: 13.8 (2 dof) ... 20.5 (5 dof)
      const q999 = [NaN, 10.83, 13.82, 16.27, 18.47, 20.52][dof];
      assert.ok(dof >= 3 && chi2 < q999, `chi2 ${chi2.toFixed(2)} with ${dof} dof`);
    } finally {
      lm.dispose();
    }
  },
);

Deno.test(
  "greedyResident: decode steps reuse their bind groups (steady state within one long call)",
  gpuTestOptions,
  async () => {
    const lm = await teacher();
    const rt = lm.rt;
    try {
      const prompt = Int32Array.from([1, 403, 9, 27]);
      await greedyResident(lm, prompt, { maxNewTokens: 40, chunk: 16 }); // compiles every kernel
      const d0 = rt.dev.stats.dispatches, b0 = rt.dev.stats.bindGroups;
      await greedyResident(lm, prompt, { maxNewTokens: 160, chunk: 16 });
      const dispatches = rt.dev.stats.dispatches - d0, created = rt.dev.stats.bindGroups - b0;
      // Bind groups depend on which pool buffers each step gets. Steps that kept their tokens and intermediates
      // alive until the chunk's read shifted the pool's order every step: 6% of the dispatches created one here,
      // 25-40% at other widths.
      // Now only new cache lengths (the attention's split plan, a larger size class) may add a few.
      assert.ok(created <= 0.03 * dispatches, `${created} bind groups created for ${dispatches} dispatches`);
    } finally {
      lm.dispose();
    }
  },
);
