import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { buildDraftModel } from "../../models/draft.ts";
import { DRAFT_STREAM, speculativeGenerate, speculativeSeed } from "../../models/spec_decode.ts";
import { sampleFrom, samplingDistribution, type SamplingOptions } from "../../models/sampling.ts";
import { verifySampled } from "../../models/speculative.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { sampleTokens } from "../../runtime/ops/sampling.ts";
import { Rng } from "../../util/rng.ts";
import { FIXTURE_MODELS, fixturePath } from "../reference/fixtures.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

// Sampled speculative decoding, in parts that together pin the output distribution:
// 1. the GPU pipeline draws exactly what a plain oracle of the algorithm draws from the same random streams
//    (the oracle recomputes every distribution with full forwards: no caches, no rollback; it draws each draft
//    token with the GPU sampler from its own logits at the documented (seed, stream, step), and computes q and p
//    in float64 with the CPU `samplingDistribution`, independently of the pipeline's f32 GPU distributions);
// 2. that algorithm, run on the real models' distributions for a fixed prefix, emits the first two tokens with
//    the target's joint distribution (chi-square over many draws), and visibly not the draft's;
// 3. end to end, the pipeline's first token over many rng seeds follows the target's distribution (this also
//    covers the GPU draws and the seed derivation, which part 2 does not use), and each pass reads once.

const SAMPLING: SamplingOptions = { temperature: 1.5, topK: 10, topP: 0.98 };

interface Fixture {
  target: CausalLM;
  draft: CausalLM;
  prompt: number[];
}

let fixture: Promise<Fixture> | null = null;
function load(): Promise<Fixture> {
  fixture ??= (async () => {
    const rt = await testRuntime();
    const hybrid = await loadModel(fixturePath(FIXTURE_MODELS.hybrid.dir));
    const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
    const tok = await Tokenizer.fromDir(fixturePath(FIXTURE_MODELS.llama.dir));
    return {
      target: CausalLM.fromModel(rt, hybrid),
      draft: CausalLM.fromModel(rt, buildDraftModel(teacher, [0, 4])),
      prompt: tok.encode("Once upon a time, there was a little"),
    };
  })();
  return fixture;
}

/** Last-position distributions of several sequences of one length, in one forward. */
async function lastDistributions(lm: CausalLM, seqs: number[][]): Promise<Float64Array[]> {
  const V = lm.config.vocabSize;
  const T = seqs[0].length;
  const logits = await lm.rt.scope(async () =>
    (await lm.forward(Int32Array.from(seqs.flat()), seqs.length, T).logits.read()) as Float32Array
  );
  return seqs.map((_, b) => samplingDistribution(logits, SAMPLING, (b * T + T - 1) * V, V));
}

/** Logits rows of the last `rows` positions of one sequence. */
async function tailLogits(lm: CausalLM, seq: number[], rows: number): Promise<Float32Array[]> {
  const V = lm.config.vocabSize;
  const logits = await lm.rt.scope(async () =>
    (await lm.forward(Int32Array.from(seq), 1, seq.length).logits.read()) as Float32Array
  );
  return Array.from(
    { length: rows },
    (_, j) => logits.slice((seq.length - rows + j) * V, (seq.length - rows + j + 1) * V),
  );
}

/** The GPU sampler's draw from one row of logits at `step` of the draft stream. */
async function gpuDraw(lm: CausalLM, row: Float32Array, seed: number, step: number): Promise<number> {
  const rt = lm.rt;
  return await rt.scope(async () => {
    const streams = rt.tensor(Uint32Array.of(DRAFT_STREAM), [1], "u32");
    const ids = sampleTokens(rt.tensor(row, [1, row.length]), SAMPLING, { seed, streams, step });
    return ((await ids.read()) as Int32Array)[0];
  });
}

/** Speculative sampling written plainly: full forwards for every distribution, no decode state. */
async function oracle(
  target: CausalLM,
  draft: CausalLM,
  prompt: number[],
  k: number,
  maxNew: number,
  rng: Rng,
  eos: number | null = null,
): Promise<number[]> {
  const seq = [...prompt];
  const out: number[] = [];
  // the documented derivation: one seed from the rng before anything else, draft token i of pass n at step nK+i
  const seed = speculativeSeed(rng);
  for (let pass = 0; out.length < maxNew && (eos === null || !out.includes(eos)); pass++) {
    const drafts: number[] = [];
    const q: Float64Array[] = [];
    for (let i = 0; i < k; i++) {
      const [row] = await tailLogits(draft, [...seq, ...drafts], 1);
      const dist = samplingDistribution(row, SAMPLING);
      const d = await gpuDraw(draft, row, seed, pass * k + i);
      assert.ok(dist[d] > 0, `the GPU drew token ${d}, outside the CPU's kept set`);
      q.push(dist);
      drafts.push(d);
    }
    const p = (await tailLogits(target, [...seq, ...drafts], k + 1)).map((row) =>
      samplingDistribution(row, SAMPLING)
    );
    const r = verifySampled(drafts, q, p, rng, null);
    let emitted = r.tokens.slice(0, maxNew - out.length);
    if (eos !== null && emitted.includes(eos)) emitted = emitted.slice(0, emitted.indexOf(eos) + 1);
    out.push(...emitted);
    seq.push(...emitted);
  }
  return out;
}

Deno.test(
  "sampled speculative decoding draws what the plain algorithm draws from the same random stream",
  gpuTestOptions,
  async () => {
    const { target, draft, prompt } = await load();
    for (const [k, seed, d] of [[3, 1, draft], [2, 2, draft], [3, 3, target]] as const) {
      const maxNew = 10;
      const expected = await oracle(target, d, prompt, k, maxNew, new Rng(seed));
      const reads = target.rt.dev.stats.reads;
      const got = await speculativeGenerate(target, d, prompt, {
        k,
        maxNewTokens: maxNew,
        sampling: SAMPLING,
        rng: new Rng(seed),
      });
      assert.deepEqual(
        got.tokens,
        expected,
        `K=${k} seed ${seed} ${d === target ? "self-draft" : "2-layer draft"}`,
      );
      if (d === target) assert.ok(got.histogram[k] > 0, "the self-draft accepts whole passes");
      // one read per pass (drafts, q and p together), plus the wait after the prefill
      assert.equal(target.rt.dev.stats.reads - reads, got.passes + 1, "reads");
    }
    // an end-of-sequence token ends the output wherever the pass emits it
    const free = await oracle(target, draft, prompt, 3, 10, new Rng(7));
    const eos = free[free.length - 3];
    const expected = await oracle(target, draft, prompt, 3, 10, new Rng(7), eos);
    const got = await speculativeGenerate(target, draft, prompt, {
      k: 3,
      maxNewTokens: 10,
      sampling: SAMPLING,
      rng: new Rng(7),
      eosIds: [eos],
    });
    assert.deepEqual(got.tokens, expected);
    assert.equal(got.tokens[got.tokens.length - 1], eos);
    assert.ok(got.finished);
  },
);

/** Upper 99.9% quantile of chi-square with `dof` degrees of freedom (Wilson-Hilferty; good for dof >= 3). */
function chiSquareCritical(dof: number): number {
  const z = 3.0902;
  const a = 2 / (9 * dof);
  return dof * (1 - a + z * Math.sqrt(a)) ** 3;
}

/** Chi-square statistic of counts against expected probabilities, bins with expectation < 5 merged. */
function chiSquare(counts: Map<string, number>, probs: Map<string, number>, n: number) {
  let stat = 0, bins = 0, restCount = 0, restProb = 0;
  for (const [key, p] of probs) {
    const c = counts.get(key) ?? 0;
    if (n * p >= 5) {
      stat += (c - n * p) ** 2 / (n * p);
      bins++;
    } else {
      restCount += c;
      restProb += p;
    }
  }
  for (const [key, c] of counts) if (!probs.has(key)) restCount += c; // outcomes of probability 0
  if (restProb > 0 || restCount > 0) {
    stat += restProb > 0 ? (restCount - n * restProb) ** 2 / (n * restProb) : Infinity;
    bins++;
  }
  return { stat, dof: bins - 1 };
}

function support(p: Float64Array): number[] {
  const s: number[] = [];
  p.forEach((v, i) => v > 0 && s.push(i));
  return s;
}

Deno.test(
  "sampled speculative decoding: the first two tokens follow the target's distribution (chi-square, K = 2)",
  gpuTestOptions,
  async () => {
    const { target, draft, prompt } = await load();
    const P = prompt;
    // Every distribution a draw can need, from the real models (top-k keeps the supports small):
    const [q1] = await lastDistributions(draft, [P]);
    const [p1] = await lastDistributions(target, [P]);
    const firstTokens = [...new Set([...support(q1), ...support(p1)])];
    const qAfter = new Map<number, Float64Array>(); // draft after P + t
    const pAfter = new Map<number, Float64Array>(); // target after P + t
    (await lastDistributions(draft, firstTokens.map((t) => [...P, t]))).forEach((d, i) =>
      qAfter.set(firstTokens[i], d)
    );
    (await lastDistributions(target, firstTokens.map((t) => [...P, t]))).forEach((d, i) =>
      pAfter.set(firstTokens[i], d)
    );
    const pairs: [number, number][] = firstTokens.flatMap((t) =>
      support(qAfter.get(t)!).map((u): [number, number] => [t, u])
    );
    const pAfter2 = new Map<string, Float64Array>(); // target after P + t + u
    (await lastDistributions(target, pairs.map(([t, u]) => [...P, t, u]))).forEach((d, i) =>
      pAfter2.set(`${pairs[i][0]},${pairs[i][1]}`, d)
    );

    // The draft must differ from the target, or the test could not tell them apart.
    let tv = 0;
    p1.forEach((v, i) => (tv += Math.abs(v - q1[i]) / 2));
    assert.ok(tv > 0.2, `draft and target too similar for a meaningful test (TV ${tv})`);

    // Draws: one K=2 pass; when it emits a single token (d_1 rejected), the second token comes from the next
    // pass, run here as a K=1 pass from P + t1 (its first token is what the test checks for the first pass).
    const rng = new Rng("spec-chi-square");
    const n = 20_000;
    const joint = new Map<string, number>();
    const first = new Map<string, number>();
    for (let i = 0; i < n; i++) {
      const d1 = sampleFrom(q1, rng);
      const q2 = qAfter.get(d1)!;
      const d2 = sampleFrom(q2, rng);
      const r = verifySampled([d1, d2], [q1, q2], [p1, pAfter.get(d1)!, pAfter2.get(`${d1},${d2}`)!], rng);
      const t1 = r.tokens[0];
      let t2 = r.tokens[1];
      if (t2 === undefined) {
        const q = qAfter.get(t1)!;
        const d = sampleFrom(q, rng);
        t2 = verifySampled([d], [q], [pAfter.get(t1)!, pAfter2.get(`${t1},${d}`)!], rng).tokens[0];
      }
      joint.set(`${t1},${t2}`, (joint.get(`${t1},${t2}`) ?? 0) + 1);
      first.set(`${t1}`, (first.get(`${t1}`) ?? 0) + 1);
    }
    const expectedJoint = new Map<string, number>();
    for (const t of support(p1)) {
      pAfter.get(t)!.forEach((v, u) => v > 0 && expectedJoint.set(`${t},${u}`, p1[t] * v));
    }
    const j = chiSquare(joint, expectedJoint, n);
    assert.ok(j.dof >= 10, `too few bins (${j.dof + 1})`);
    assert.ok(j.stat < chiSquareCritical(j.dof), `joint chi2 ${j.stat} with ${j.dof} dof`);
    const toMap = (p: Float64Array) => new Map(support(p).map((t) => [`${t}`, p[t]]));
    const f = chiSquare(first, toMap(p1), n);
    assert.ok(f.stat < chiSquareCritical(f.dof), `first-token chi2 ${f.stat} with ${f.dof} dof`);
    // power: the same counts are far from the draft's distribution
    const fq = chiSquare(first, toMap(q1), n);
    assert.ok(fq.stat > 10 * chiSquareCritical(fq.dof), `draft chi2 only ${fq.stat}`);
  },
);

Deno.test(
  "sampled speculative decoding reads the GPU once per pass, reproducibly",
  gpuTestOptions,
  async () => {
    const { target, draft, prompt } = await load();
    const rt = target.rt;
    for (const k of [1, 4]) {
      const opts = (maxNewTokens: number) => ({
        k,
        maxNewTokens,
        sampling: SAMPLING,
        rng: new Rng(`reads/${k}`),
      });
      // one new token: exactly one pass, whatever is accepted
      let reads = rt.dev.stats.reads;
      const one = await speculativeGenerate(target, draft, prompt, opts(1));
      assert.equal(one.passes, 1);
      // the pass's read plus the wait after the prefill
      assert.equal(rt.dev.stats.reads - reads, 2, `K=${k}: reads of one pass`);
      reads = rt.dev.stats.reads;
      const many = await speculativeGenerate(target, draft, prompt, opts(8));
      assert.ok(many.passes >= 2, `K=${k}: ${many.passes} passes`);
      assert.equal(rt.dev.stats.reads - reads, many.passes + 1, `K=${k}: reads of ${many.passes} passes`);
      // the GPU seed and steps come from the rng's state: the same state gives the same run
      assert.equal(many.tokens[0], one.tokens[0]);
      assert.deepEqual((await speculativeGenerate(target, draft, prompt, opts(8))).tokens, many.tokens);
    }
  },
);

Deno.test(
  "sampled speculative decoding, end to end: the first token over many rng seeds follows the target (chi-square)",
  gpuTestOptions,
  async () => {
    const { target, draft } = await load();
    // BOS alone: no prefill (the cheapest run), and there the 2-layer draft overlaps the target (TV about 0.65),
    // so first drafts are both accepted and rejected; after longer prompts the supports are disjoint.
    const prompt = [1];
    const [p1] = await lastDistributions(target, [prompt]);
    const [q1] = await lastDistributions(draft, [prompt]);
    const n = 100; // about 50 ms a run on the CPU adapter
    const counts = new Map<string, number>();
    let accepted = 0;
    const reads = target.rt.dev.stats.reads;
    for (let i = 0; i < n; i++) {
      const r = await speculativeGenerate(target, draft, prompt, {
        k: 2,
        maxNewTokens: 1,
        sampling: SAMPLING,
        rng: new Rng(`first-token/${i}`),
      });
      counts.set(`${r.tokens[0]}`, (counts.get(`${r.tokens[0]}`) ?? 0) + 1);
      if (r.histogram[0] === 0) accepted++;
    }
    assert.equal(target.rt.dev.stats.reads - reads, 2 * n, "one read per run's pass, one after its prefill");
    const toMap = (p: Float64Array) => new Map(support(p).map((t) => [`${t}`, p[t]]));
    // 99.9% quantile: the seeds are fixed, so this is a deterministic test that a correct sampler fails with
    // probability 1e-3 over the choice of seeds
    const f = chiSquare(counts, toMap(p1), n);
    assert.ok(f.dof >= 3, `too few bins (${f.dof + 1})`);
    assert.ok(f.stat < chiSquareCritical(f.dof), `first-token chi2 ${f.stat} with ${f.dof} dof`);
    // power: visibly not the draft's distribution (what accepting every draft would give)
    const fq = chiSquare(counts, toMap(q1), n);
    assert.ok(fq.stat > 3 * chiSquareCritical(fq.dof), `draft chi2 only ${fq.stat} with ${fq.dof} dof`);
    // both branches of the acceptance rule contributed
    assert.ok(accepted > 0 && accepted < n, `first draft accepted in ${accepted} of ${n} runs`);
  },
);
