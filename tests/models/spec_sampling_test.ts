import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { buildDraftModel } from "../../models/draft.ts";
import { speculativeGenerate } from "../../models/spec_decode.ts";
import { sampleFrom, samplingDistribution, type SamplingOptions } from "../../models/sampling.ts";
import { verifySampled } from "../../models/speculative.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { Rng } from "../../util/rng.ts";
import { FIXTURE_MODELS, fixturePath } from "../reference/fixtures.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

// Sampled speculative decoding, in two parts that together pin the output distribution:
// 1. the GPU pipeline draws exactly what a plain CPU oracle of the algorithm draws from the same random stream
//    (the oracle recomputes every distribution with full forwards: no caches, no rollback);
// 2. that algorithm, run on the real models' distributions for a fixed prefix, emits the first two tokens with
//    the target's joint distribution (chi-square over many draws), and visibly not the draft's.

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

/** Distributions after each of the last `rows` positions of one sequence. */
async function tailDistributions(lm: CausalLM, seq: number[], rows: number): Promise<Float64Array[]> {
  const V = lm.config.vocabSize;
  const logits = await lm.rt.scope(async () =>
    (await lm.forward(Int32Array.from(seq), 1, seq.length).logits.read()) as Float32Array
  );
  return Array.from(
    { length: rows },
    (_, j) => samplingDistribution(logits, SAMPLING, (seq.length - rows + j) * V, V),
  );
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
  while (out.length < maxNew && (eos === null || !out.includes(eos))) {
    const drafts: number[] = [];
    const q: Float64Array[] = [];
    for (let i = 0; i < k; i++) {
      const [dist] = await tailDistributions(draft, [...seq, ...drafts], 1);
      q.push(dist);
      drafts.push(sampleFrom(dist, rng));
    }
    const p = await tailDistributions(target, [...seq, ...drafts], k + 1);
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
      // one read per draft token and one of the target's K+1 rows per pass, plus the wait after the prefill
      assert.equal(target.rt.dev.stats.reads - reads, got.passes * (k + 1) + 1, "reads");
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
