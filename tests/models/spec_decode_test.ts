import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { buildDraftModel } from "../../models/draft.ts";
import { dampLayers } from "../../models/random_init.ts";
import { plainGenerate, speculativeGenerate } from "../../models/spec_decode.ts";
import { generate } from "../../models/generate.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import type { Model } from "../../models/weights.ts";
import { FIXTURE_MODELS, fixturePath } from "../reference/fixtures.ts";
import { assertSpeculativeIsGreedy, runVerifyPlan } from "../helpers/speculative.ts";
import { assertClose, gpuTestOptions, maxAbsDiff, testRuntime } from "../helpers/gpu.ts";

// The fixture hybrid (Mamba2 on layers 0, 2, 4; attention on 1, 3) is the target throughout. Drafts:
// - "teacher": a 2-layer Transformer from layers [0, 4] of the stories260K teacher (low acceptance: the fixture
//   hybrid was never distilled, so it disagrees with its teacher often);
// - "agree": the target with layers 2..4 damped (x0.2) and a draft of its own layers [0, 1] (a hybrid draft:
//   layer 0 is Mamba2), which agrees most of the time, so full acceptance, the bonus token and the draft's
//   snapshot-and-recompute rollback all occur;
// - "self": the target as its own draft (every draft accepted).

interface Fixture {
  target: CausalLM;
  teacherDraft: CausalLM;
  agreeTarget: CausalLM;
  agreeDraft: CausalLM;
  prompt: number[];
  eos: number;
}

let fixture: Promise<Fixture> | null = null;
function load(): Promise<Fixture> {
  fixture ??= (async () => {
    const rt = await testRuntime();
    const hybrid = await loadModel(fixturePath(FIXTURE_MODELS.hybrid.dir));
    const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
    const damped: Model = dampLayers(hybrid, [2, 3, 4], 0.2);
    const tok = await Tokenizer.fromDir(fixturePath(FIXTURE_MODELS.llama.dir));
    return {
      target: CausalLM.fromModel(rt, hybrid),
      teacherDraft: CausalLM.fromModel(rt, buildDraftModel(teacher, [0, 4])),
      agreeTarget: CausalLM.fromModel(rt, damped),
      agreeDraft: CausalLM.fromModel(rt, buildDraftModel(damped, [0, 1])),
      prompt: tok.encode("Once upon a time, there was a little"),
      eos: teacher.config.eosTokenIds[0],
    };
  })();
  return fixture;
}

const GREEDY = { temperature: 0 } as const;
const NEW_TOKENS = 12;
const K_ALL = [1, 2, 3, 4, 5, 6, 7, 8];

Deno.test(
  "verify state: fused and unfused passes give the full forward's logits through partial, full and zero acceptance",
  gpuTestOptions,
  async () => {
    const { target: lm } = await load();
    const rt = lm.rt;
    const V = lm.config.vocabSize;
    const ids = Int32Array.from([1, 20, 33, 45, 100, 7, 9, 300, 12, 40, 41, 42, 43, 44, 45, 46]);
    const full = await rt.scope(async () => await lm.forward(ids, 1, ids.length).logits.read());
    const got: Record<string, Float32Array[]> = {};
    for (const mode of ["fused", "unfused"] as const) {
      const passes = await runVerifyPlan(lm, ids, mode);
      got[mode] = passes.map((p) => p.logits);
      for (const { start, tokens: n, logits } of passes) {
        // the f32 paths sum in different orders: 1e-4 is about 10x the observed difference
        assertClose(
          logits,
          full.slice(start * V, (start + n) * V),
          { rtol: 0, atol: 1e-4 },
          `${mode} @${start}`,
        );
      }
    }
    // the fused kernel does the step kernel's arithmetic in the same order
    got.fused.forEach((f, i) =>
      assert.ok(maxAbsDiff(f, got.unfused[i]) <= 1e-6, `pass ${i}: fused != unfused`)
    );
  },
);

Deno.test("verify state: misuse is refused", gpuTestOptions, async () => {
  const { target: lm } = await load();
  const s = lm.newVerifyState(16, 2);
  try {
    assert.throws(() => lm.verifyAccept(s, 1), /no verification pass is pending/);
    assert.throws(() => lm.verifyStep(s, Int32Array.of(1, 2, 3, 4), 4), /1\.\.3 per pass/);
    lm.rt.scope(() => lm.verifyStep(s, Int32Array.of(1, 2), 2));
    assert.throws(() => lm.verifyStep(s, Int32Array.of(1), 1), /verifyAccept/);
    assert.throws(() => lm.verifyAccept(s, 3), /keep must be in 0\.\.2/);
    lm.verifyAccept(s, 2);
    assert.throws(() => lm.verifyPrefill(s, Int32Array.of(1), 1), /already verified/);
  } finally {
    lm.disposeVerifyState(s);
  }
});

Deno.test(
  "plain decoding: the GPU-resident greedy loop equals per-token reads and models/generate",
  gpuTestOptions,
  async () => {
    const { target, prompt } = await load();
    const a = await plainGenerate(target, prompt, { maxNewTokens: NEW_TOKENS, sampling: GREEDY });
    const b = await plainGenerate(target, prompt, {
      maxNewTokens: NEW_TOKENS,
      sampling: GREEDY,
      greedyChunk: 1,
    });
    const [c] = await generate(target, [prompt], { maxNewTokens: NEW_TOKENS, sampling: GREEDY, seed: 0 });
    assert.deepEqual(a.tokens, b.tokens);
    assert.deepEqual(a.tokens, c);
    assert.equal(a.tokens.length, NEW_TOKENS);
    assert.equal(a.margins!.length, NEW_TOKENS);
  },
);

Deno.test(
  "greedy speculative decoding reproduces plain greedy decoding of the target for K = 1..8 (2-layer teacher draft)",
  gpuTestOptions,
  async () => {
    const { target, teacherDraft, prompt } = await load();
    // one GPU->CPU read per pass: drafts and target argmaxes together
    await assertSpeculativeIsGreedy(target, teacherDraft, prompt, {
      ks: K_ALL,
      maxNewTokens: NEW_TOKENS,
      onePassOneRead: true,
    });
  },
);

Deno.test(
  "greedy speculative decoding reproduces plain greedy decoding for K = 1..8 with a high-acceptance hybrid draft",
  gpuTestOptions,
  async () => {
    const { agreeTarget, agreeDraft, prompt } = await load();
    const { full, partial } = await assertSpeculativeIsGreedy(agreeTarget, agreeDraft, prompt, {
      ks: K_ALL,
      maxNewTokens: NEW_TOKENS,
    });
    // both rollback paths ran: passes accepting every draft and passes rejecting one
    assert.ok(full > 0 && partial > 0, `full ${full}, partial ${partial}`);
  },
);

Deno.test(
  "greedy speculative decoding: the unfused verification gives the same tokens",
  gpuTestOptions,
  async () => {
    const { agreeTarget, agreeDraft, target, teacherDraft, prompt } = await load();
    for (const [t, d] of [[agreeTarget, agreeDraft], [target, teacherDraft]]) {
      await assertSpeculativeIsGreedy(t, d, prompt, {
        ks: [2, 5],
        mode: "unfused",
        maxNewTokens: NEW_TOKENS,
      });
    }
  },
);

Deno.test(
  "greedy speculative decoding stops at the end-of-sequence token wherever it falls in a pass",
  gpuTestOptions,
  async () => {
    const { target, teacherDraft, agreeTarget, agreeDraft, prompt } = await load();
    for (
      const [t, d, name] of [[target, teacherDraft, "correction"], [
        agreeTarget,
        agreeDraft,
        "accepted",
      ]] as const
    ) {
      const ref = await plainGenerate(t, prompt, { maxNewTokens: NEW_TOKENS, sampling: GREEDY });
      // declare a token of the reference output the end token: output must stop at its first occurrence
      for (const j of [0, 4, 9]) {
        const eos = ref.tokens[j];
        const stop = ref.tokens.indexOf(eos);
        const plain = await plainGenerate(t, prompt, {
          maxNewTokens: NEW_TOKENS,
          sampling: GREEDY,
          eosIds: [eos],
        });
        assert.deepEqual(plain.tokens, ref.tokens.slice(0, stop + 1));
        assert.ok(plain.finished);
        for (const k of [1, 4]) {
          const r = await speculativeGenerate(t, d, prompt, {
            k,
            maxNewTokens: NEW_TOKENS,
            sampling: GREEDY,
            eosIds: [eos],
          });
          assert.deepEqual(r.tokens, plain.tokens, `${name} K=${k} eos at ${stop}`);
          assert.ok(r.finished);
        }
      }
    }
  },
);

Deno.test("speculative decoding refuses mismatched models and bad arguments", gpuTestOptions, async () => {
  const { target, teacherDraft, prompt } = await load();
  await assert.rejects(
    () => speculativeGenerate(target, teacherDraft, prompt, { k: 0, maxNewTokens: 4, sampling: GREEDY }),
    /k must be an integer >= 1/,
  );
  await assert.rejects(
    () => speculativeGenerate(target, teacherDraft, [], { k: 2, maxNewTokens: 4, sampling: GREEDY }),
    /prompt is empty/,
  );
  await assert.rejects(
    () =>
      speculativeGenerate(target, teacherDraft, prompt, {
        k: 2,
        maxNewTokens: 4,
        sampling: { temperature: 1 },
      }),
    /needs an rng/,
  );
});
