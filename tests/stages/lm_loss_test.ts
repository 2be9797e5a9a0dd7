import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { makeMamba2Config } from "../../models/config.ts";
import { llamaConfig } from "../../models/random_init.ts";
import type { MicroBatch } from "../../data/batches.ts";
import { sizeClass } from "../../runtime/pool.ts";
import { distillLoss } from "../../runtime/ops/loss.ts";
import { lmMicroStep } from "../../stages/shared/lm_loss.ts";
import { nextTokenLabels } from "../../stages/shared/tokens.ts";
import { gpuTestOptions, testRng, testRuntime } from "../helpers/gpu.ts";

const CFG = llamaConfig({
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 16,
  vocab_size: 512,
  tie_word_embeddings: false,
  rms_norm_eps: 1e-5,
});

function microBatch(T: number, seed: string): MicroBatch {
  const rng = testRng(seed);
  const ids = Int32Array.from({ length: T }, () => rng.int(CFG.vocabSize));
  const mask = new Uint8Array(T).fill(1);
  mask[0] = 0;
  return {
    rows: 1,
    seqLen: T,
    ids,
    mask,
    lengths: Int32Array.of(T),
    positions: Int32Array.from({ length: T }, (_, i) => i),
    sequences: [0],
    tokens: T,
    targetTokens: T - 1,
  };
}

// The teacher's forward inside a micro-step keeps only its logits: at a 7B shape its per-layer activations are
// about 20 GiB, which must go back to the pool before the student's forward instead of living to the step's end.
Deno.test(
  "lmMicroStep: of the teacher's forward only its logits stay live, and the loss matches unfused logits",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const T = 16;
    const teacher = CausalLM.random(rt, CFG, null, { seed: 3, chunkSize: 8 });
    const student = CausalLM.random(rt, CFG, makeMamba2Config(CFG, [1]), {
      seed: 4,
      chunkSize: 8,
      trainable: (n) => n.includes(".mamba."),
    });
    const mb = microBatch(T, "lm-loss-live");
    const opts = { ceWeight: 1, klWeight: 0.5, temperature: 2 };
    try {
      // bytes still live when the micro-step returns (inside the step's scope, before it closes); gradients are
      // dropped afterwards so both calls create them alike
      const held = (withTeacher: boolean) =>
        rt.scope(() => {
          const before = rt.pool.stats.liveBytes;
          const [totals] = lmMicroStep(
            student,
            withTeacher ? teacher : null,
            mb,
            1,
            withTeacher ? opts : { ...opts, klWeight: 0 },
          );
          const bytes = rt.pool.stats.liveBytes - before;
          for (const p of student.trainableParams()) {
            p.grad?.dispose();
            p.grad = null;
          }
          return { bytes, totals: totals.keep() };
        });
      const without = held(false);
      const withT = held(true);
      const logitsBytes = sizeClass(T * CFG.vocabSize * 4), klBytes = sizeClass(T * 4);
      assert.equal(
        withT.bytes - without.bytes,
        logitsBytes + klBytes,
        "the teacher adds exactly its logits and the per-token KL to what stays live",
      );
      // the same loss from logits computed separately: the teacher's logits were not released early
      const ref = rt.scope(() =>
        rt.noGrad(() => {
          const labels = rt.tensor(nextTokenLabels(mb), [T], "i32");
          return distillLoss(student.forward(mb.ids, 1, T).logits, {
            labels,
            teacher: teacher.forward(mb.ids, 1, T).logits,
            alpha: opts.ceWeight,
            beta: opts.klWeight,
            temperature: opts.temperature,
          }).totals;
        })
      );
      const [got, want] = [await withT.totals.read(), await ref.read()];
      assert.ok(got[2] > 0 && Number.isFinite(got[0]), `KL ${got[2]}, loss ${got[0]}`);
      for (let i = 0; i < 4; i++) {
        assert.ok(Math.abs(got[i] - want[i]) <= 1e-5 * Math.abs(want[i]) + 1e-6, `totals ${got} vs ${want}`);
      }
      [without.totals, withT.totals, ref].forEach((t) => t.dispose());
    } finally {
      teacher.dispose();
      student.dispose();
    }
  },
);
