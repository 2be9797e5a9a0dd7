import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { buildDraftModel } from "../../models/draft.ts";
import { mapAttentionToMamba1 } from "../../models/mapping.ts";
import { dampLayers } from "../../models/random_init.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import type { HybridModel, Model } from "../../models/weights.ts";
import { Rng } from "../../util/rng.ts";
import { FIXTURE_MODELS, fixturePath } from "../reference/fixtures.ts";
import { assertSpeculativeIsGreedy, runVerifyPlan } from "../helpers/speculative.ts";
import { gpuTestOptions, maxAbsDiff, testRuntime } from "../helpers/gpu.ts";

// Speculative verification of a Mamba1 hybrid (method.md 1.2 and 3). Mamba1 has no official fixture, so the
// target is the stories260K teacher mapped with mapAttentionToMamba1 (Mamba1 on layers 0, 2, 4; attention on 1,
// 3), as tests/models/causal_lm_test.ts checks its forward against the float64 reference. Drafts, as in
// spec_decode_test.ts:
// - "teacher": a 2-layer Transformer from layers [0, 4] of the teacher (the mapped hybrid was never distilled, so
//   acceptance is low and most passes roll back);
// - "agree": the target with layers 2..4 damped (x0.2) and a draft of its own layers [0, 1] (a hybrid draft whose
//   layer 0 is Mamba1), so full acceptance, the bonus token and partial rejections all occur.

interface Fixture {
  target: CausalLM;
  teacherDraft: CausalLM;
  agreeTarget: CausalLM;
  agreeDraft: CausalLM;
  hybrid: HybridModel;
  prompt: number[];
}

let fixture: Promise<Fixture> | null = null;
function load(): Promise<Fixture> {
  fixture ??= (async () => {
    const rt = await testRuntime();
    const teacher = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
    const hybrid = mapAttentionToMamba1(teacher.weights, teacher.config, [1, 3], new Rng("spec-mamba1"));
    const damped: Model = dampLayers(hybrid, [2, 3, 4], 0.2);
    const tok = await Tokenizer.fromDir(fixturePath(FIXTURE_MODELS.llama.dir));
    return {
      target: CausalLM.fromModel(rt, hybrid),
      teacherDraft: CausalLM.fromModel(rt, buildDraftModel(teacher, [0, 4])),
      agreeTarget: CausalLM.fromModel(rt, damped),
      agreeDraft: CausalLM.fromModel(rt, buildDraftModel(damped, [0, 1])),
      hybrid,
      prompt: tok.encode("Once upon a time, there was a little"),
    };
  })();
  return fixture;
}

const K_ALL = [1, 2, 3, 4, 5, 6, 7, 8];
const NEW_TOKENS = 12;

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

// Verification and the full forward run the same selective-scan step arithmetic (an f32 state, the same
// exp/multiply-add order), but the projections are GEMVs over a few rows against the forward's tiled GEMM and
// the residual adds and norms are fused differently, so the f32 logits differ by summation order only: measured
// 2.6e-7 of max|logit| (18.1). The bound, 1e-4 of max|logit|, leaves ~400x for other adapters' rounding and
// sits ~100x below the rollback bugs it is for: replaying every verified step instead of the kept ones moves the
// next pass's logits by 1.3e-2 of max|logit| (7e-3 for a single rejected token), a conv ring advanced past the
// rejected inputs by 1.7e-2.
const REL_TOL = 1e-4;

Deno.test(
  "Mamba1 verify state: fused and unfused passes give the full forward's logits through partial, full and zero acceptance",
  gpuTestOptions,
  async () => {
    const { target: lm } = await load();
    const rt = lm.rt;
    const V = lm.config.vocabSize;
    const ids = Int32Array.from([1, 20, 33, 45, 100, 7, 9, 300, 12, 40, 41, 42, 43, 44, 45, 46]);
    const full = await rt.scope(async () => await lm.forward(ids, 1, ids.length).logits.read());
    const scale = maxAbs(full);
    const got: Record<string, Float32Array[]> = {};
    for (const mode of ["fused", "unfused"] as const) {
      const passes = await runVerifyPlan(lm, ids, mode);
      got[mode] = passes.map((p) => p.logits);
      for (const { start, tokens: n, logits } of passes) {
        const err = maxAbsDiff(logits, full.slice(start * V, (start + n) * V)) / scale;
        assert.ok(err <= REL_TOL, `${mode} @${start}: max|diff| ${err} of max|logit| ${scale}`);
      }
    }
    // Both modes run the same scan_step arithmetic on the same inputs with an f32 state in between: equal on the
    // CI adapter, 1.9e-6 apart (1e-7 of max|logit|) on the H200, whose compiler may contract multiply-adds
    // differently in the two kernels. 1e-6 of max|logit| is 10x that and 10^4 below the rollback bugs above.
    got.fused.forEach((f, i) => {
      const err = maxAbsDiff(f, got.unfused[i]) / scale;
      assert.ok(err <= 1e-6, `pass ${i}: fused and unfused logits differ by ${err} of max|logit|`);
    });
  },
);

Deno.test(
  "Mamba1 verify state: a prompt of one token, passes of one token, and misuse is refused",
  gpuTestOptions,
  async () => {
    const { target: lm } = await load();
    const rt = lm.rt;
    const V = lm.config.vocabSize;
    const ids = Int32Array.from([1, 403, 407, 261, 378, 29]);
    const full = await rt.scope(async () => await lm.forward(ids, 1, ids.length).logits.read());
    const scale = maxAbs(full);
    const s = lm.newVerifyState(16, 2);
    try {
      await rt.scope(async () => {
        lm.verifyPrefill(s, ids.slice(0, 1), 1);
        // one-token passes: a rejected single token (keep 0) must leave the state as it was
        for (const [start, n, keep] of [[1, 1, 0], [1, 1, 1], [2, 3, 1], [3, 2, 2], [5, 1, 1]]) {
          const logits = await lm.verifyStep(s, ids.slice(start, start + n), n).read();
          const err = maxAbsDiff(logits, full.slice(start * V, (start + n) * V)) / scale;
          assert.ok(err <= REL_TOL, `@${start} x${n}: ${err}`);
          lm.verifyAccept(s, keep);
        }
      });
      assert.throws(() => lm.verifyStep(s, Int32Array.of(1, 2, 3, 4), 4), /1\.\.3 per pass/);
      assert.throws(() => lm.verifyPrefill(s, Int32Array.of(1), 1), /already verified/);
    } finally {
      lm.disposeVerifyState(s);
    }
  },
);

Deno.test(
  "verify state: a mixer without verification kernels is refused by name",
  gpuTestOptions,
  async () => {
    const { hybrid } = await load();
    const rt = await testRuntime();
    // a mixer name no code path knows (as a config from a newer version could carry)
    const odd = { ...hybrid, mamba: { ...hybrid.mamba, mixer: "mamba3" } } as unknown as Model;
    const lm = CausalLM.fromModel(rt, odd);
    try {
      assert.throws(() => lm.newVerifyState(16, 2), /supports Mamba2 and Mamba1 layers, not mamba3/);
    } finally {
      lm.dispose();
    }
  },
);

Deno.test(
  "greedy speculative decoding of a Mamba1 hybrid reproduces plain greedy decoding for K = 1..8 (teacher draft)",
  gpuTestOptions,
  async () => {
    const { target, teacherDraft, prompt } = await load();
    await assertSpeculativeIsGreedy(target, teacherDraft, prompt, { ks: K_ALL, maxNewTokens: NEW_TOKENS });
    // this pair rejects often, so it is the one whose tokens catch a broken unfused state restore
    await assertSpeculativeIsGreedy(target, teacherDraft, prompt, {
      ks: [2, 5],
      mode: "unfused",
      maxNewTokens: NEW_TOKENS,
    });
  },
);

Deno.test(
  "greedy speculative decoding of a Mamba1 hybrid with a high-acceptance Mamba1 draft, fused and unfused",
  gpuTestOptions,
  async () => {
    const { agreeTarget, agreeDraft, prompt } = await load();
    const { full, partial } = await assertSpeculativeIsGreedy(agreeTarget, agreeDraft, prompt, {
      ks: K_ALL,
      maxNewTokens: NEW_TOKENS,
    });
    // both rollback paths ran: passes accepting every draft and passes rejecting one
    assert.ok(full > 0 && partial > 0, `full ${full}, partial ${partial}`);
    await assertSpeculativeIsGreedy(agreeTarget, agreeDraft, prompt, {
      ks: [2, 5],
      mode: "unfused",
      maxNewTokens: NEW_TOKENS,
    });
  },
);
