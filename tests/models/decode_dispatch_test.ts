/**
 * Batch-1 decoding is bound by how many kernels a token dispatches (tens of microseconds of CPU each on Dawn),
 * so the decode path fuses what training keeps separate. This pins the count per layer, and checks that the
 * fused step still gives the full forward's logits.
 */
import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { mapAttentionToMamba2 } from "../../models/mapping.ts";
import { llamaConfig, randomTransformer, TINY_LLAMA_CONFIG } from "../../models/random_init.ts";
import type { Model } from "../../models/weights.ts";
import { Rng } from "../../util/rng.ts";
import { assertClose, gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

// Per attention layer: input norm fused with the previous residual add, q/k/v in one GEMV, RoPE on q and k with
// the KV append, decode attention, o_proj, post-attention add+norm, gate/up/SiLU in one GEMV, down_proj. Per
// Mamba2 layer: the same norms and MLP (4) plus in_proj, the one-pass 3-way split, conv step, ssdStep, gated norm,
// out_proj.
// Plus the embedding gather, the first layer's input norm and lm_head.
const PER_ATTENTION = 8, PER_MAMBA2 = 11, FIXED = 3;

Deno.test(
  "decode step: dispatches per layer stay at the fused count, logits equal the full forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const cfg = llamaConfig(TINY_LLAMA_CONFIG);
    const rng = new Rng("decode-dispatch");
    const teacher = randomTransformer(cfg, rng.fork("teacher"));
    const hybrid: Model = mapAttentionToMamba2(teacher.weights, cfg, [1, 3], rng.fork("mamba"));
    const ids = [1, 17, 33, 250, 7, 91, 402, 5, 64, 300];
    for (const [name, model, attn] of [["teacher", teacher, 4], ["hybrid", hybrid, 2]] as const) {
      const lm = CausalLM.fromModel(rt, model);
      const poison = rt.poisonNewTensors;
      rt.poisonNewTensors = false; // the test runtime's poison fills are dispatches too
      try {
        const s = lm.newDecodeState(1, 16);
        const rows: Float32Array[] = [];
        rows.push(
          await rt.scope(async () =>
            (await lm.step(s, Int32Array.from(ids.slice(0, 4)), 4, { lastOnly: true }).read()) as Float32Array
          ),
        );
        const counts: number[] = [], bindGroups: number[] = [];
        for (const id of ids.slice(4)) {
          await rt.dev.sync();
          const before = rt.dev.stats.dispatches, bgBefore = rt.dev.stats.bindGroups;
          rows.push(
            await rt.scope(async () => (await lm.step(s, Int32Array.of(id), 1).read()) as Float32Array),
          );
          counts.push(rt.dev.stats.dispatches - before);
          bindGroups.push(rt.dev.stats.bindGroups - bgBefore);
        }
        // after three steps (the first builds the Mamba2 head scalars) every buffer assignment repeats, so every
        // bind group comes from the device's cache
        assert.ok(
          bindGroups.slice(3).every((n) => n === 0),
          `${name}: bind groups created per step ${bindGroups}`,
        );
        // the second single-token step is steady state (the first builds the Mamba2 head scalars once)
        const bound = FIXED + PER_ATTENTION * attn + PER_MAMBA2 * (4 - attn);
        assert.ok(
          counts[1] <= bound,
          `${name}: ${counts[1]} dispatches per decode step, expected at most ${bound}`,
        );
        const full = await rt.scope(async () =>
          (await rt.noGrad(() => lm.forward(Int32Array.from(ids), 1, ids.length)).logits
            .read()) as Float32Array
        );
        const V = cfg.vocabSize;
        rows.forEach((row, i) => {
          const pos = 3 + i;
          assertClose(
            row,
            full.subarray(pos * V, (pos + 1) * V),
            { rtol: 1e-4, atol: 1e-4 },
            `${name} position ${pos}`,
          );
        });
        lm.disposeState(s);
      } finally {
        rt.poisonNewTensors = poison;
        lm.dispose();
      }
    }
  },
);
