/**
 * Batch-1 decoding is bound by how many kernels a token dispatches (tens of microseconds of CPU each on Dawn),
 * so the decode path fuses what training keeps separate. This pins the count per layer, checks which kernels a
 * step runs, and checks that the fused steps (and the unfused path of a long prefill) give the full forward's
 * logits.
 */
import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { mapAttentionToMamba2 } from "../../models/mapping.ts";
import { llamaConfig, randomTransformer, TINY_LLAMA_CONFIG } from "../../models/random_init.ts";
import type { Model } from "../../models/weights.ts";
import { Rng } from "../../util/rng.ts";
import { assertClose, gpuTestOptions, testRuntime, withKernelKeys } from "../helpers/gpu.ts";

// Per attention layer: q/k/v in one GEMV with the input norm inside it, one kernel for RoPE on q and k, the KV
// append and the decode attention, o_proj with the residual add inside it, gate/up/SiLU in one GEMV with the post-attention
// norm inside it, down_proj with the residual add inside it. Per Mamba2 layer: the same two MLP GEMVs plus
// in_proj (with the norm, writing z, xBC and dt as three tensors, and the conv step on xBC, which shifts the conv
// state in place), ssdStep, and out_proj with the gated norm inside it and the residual add after it. Plus the
// embedding gather and lm_head (with the final norm). Before the norm/residual fusions: 8, 11 and 3; before the
// gated norm's fusion, 9 per Mamba2 layer; before the in-place conv step, 8; before in_proj wrote three tensors,
// 7; before the conv step ran inside in_proj, 6. Before the attention kernel took RoPE and the append, 6 per
// attention layer.
const PER_ATTENTION = 5, PER_MAMBA2 = 5, FIXED = 2;

const count = (keys: string[], prefix: string) => keys.filter((k) => k.startsWith(prefix)).length;

Deno.test(
  "decode step: dispatches per layer stay at the fused count, logits equal the full forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const cfg = llamaConfig(TINY_LLAMA_CONFIG);
    const rng = new Rng("decode-dispatch");
    const teacher = randomTransformer(cfg, rng.fork("teacher"));
    const hybrid: Model = mapAttentionToMamba2(teacher.weights, cfg, [1, 3], rng.fork("mamba"));
    const ids = [1, 17, 33, 250, 7, 91, 402, 5, 64, 300, 12, 480, 77, 3, 9, 150, 222, 41, 66, 199, 8, 310];
    const V = cfg.vocabSize;
    for (const [name, model, attn] of [["teacher", teacher, 4], ["hybrid", hybrid, 2]] as const) {
      const lm = CausalLM.fromModel(rt, model);
      const poison = rt.poisonNewTensors;
      rt.poisonNewTensors = false; // the test runtime's poison fills are dispatches too
      const s = lm.newDecodeState(1, 16);
      const long = lm.newDecodeState(1, ids.length);
      try {
        // positions and logits of every row the decode produced
        const rows: [number, Float32Array][] = [];
        const read = async (t: () => import("../../runtime/tensor.ts").Tensor) =>
          await rt.scope(async () => (await t().read()) as Float32Array);
        rows.push([3, await read(() => lm.step(s, Int32Array.from(ids.slice(0, 4)), 4, { lastOnly: true }))]);
        const counts: number[] = [], bindGroups: number[] = [];
        let steady: string[] = [];
        for (let pos = 4; pos < 10; pos++) {
          await rt.dev.sync();
          const before = rt.dev.stats.dispatches, bgBefore = rt.dev.stats.bindGroups;
          const { out, keys } = await withKernelKeys(
            rt,
            () => read(() => lm.step(s, Int32Array.of(ids[pos]), 1)),
          );
          rows.push([pos, out]);
          counts.push(rt.dev.stats.dispatches - before);
          bindGroups.push(rt.dev.stats.bindGroups - bgBefore);
          if (pos === 5) steady = keys;
        }
        // three tokens in one step: the fused path on several rows (Mamba2 takes the chunked scan here)
        const three = await read(() => lm.step(s, Int32Array.from(ids.slice(10, 13)), 3));
        for (let i = 0; i < 3; i++) rows.push([10 + i, three.subarray(i * V, (i + 1) * V)]);
        // after three steps (the first builds the Mamba2 head scalars) every buffer assignment repeats, so every
        // bind group comes from the device's cache
        assert.ok(
          bindGroups.slice(3).every((n) => n === 0),
          `${name}: bind groups created per step ${bindGroups}`,
        );
        // the second single-token step is steady state (the first builds the Mamba2 head scalars once)
        const expected = FIXED + PER_ATTENTION * attn + PER_MAMBA2 * (4 - attn);
        assert.equal(
          counts[1],
          expected,
          `${name}: ${counts[1]} dispatches per decode step: ${steady.join(" ")}`,
        );
        // every norm and residual add runs inside a GEMV: the first projection of each block normalises, the last
        // adds the residual
        assert.equal(count(steady, "gemv_qkv_norm_"), attn, `${name}: ${steady}`);
        // the attention kernel rotates q and k and appends to the cache itself
        assert.equal(count(steady, "rope_kv_append"), 0, `${name}: ${steady}`);
        assert.equal(count(steady, "attn_decode_gqa_"), attn, `${name}: ${steady}`);
        assert.equal(count(steady, "gemv_norm_"), 1, `${name}: lm_head`);
        assert.equal(count(steady, "gemv_split3_norm_"), 4 - attn, `${name}: in_proj per Mamba2 layer`);
        assert.equal(count(steady, "columns_split3"), 0, `${name}: in_proj writes z, xBC and dt itself`);
        // in_proj convolves xBC itself
        assert.equal(count(steady, "gemv_split3_norm_conv4_silu_"), 4 - attn, `${name}: ${steady}`);
        assert.equal(count(steady, "conv1d_"), 0, `${name}: ${steady}`);
        assert.equal(count(steady, "gemv_swiglu_norm_"), 4, `${name}: ${steady}`);
        // the residual adds: both of every attention layer and the MLP's of every Mamba2 layer in plain GEMVs, the
        // Mamba2 mixer's in the out_proj GEMV with the gated norm
        assert.equal(count(steady, "gemv_res_"), 8 - (4 - attn), `${name}: ${steady}`);
        assert.equal(count(steady, "gemv_gnorm"), 4 - attn, `${name}: ${steady}`);
        assert.ok(
          steady.filter((k) => k.startsWith("gemv_gnorm")).every((k) => k.includes("_res_")),
          `${steady}`,
        );
        assert.equal(count(steady, "rmsnorm") + count(steady, "add_rmsnorm") + count(steady, "binary"), 0);
        assert.equal(count(steady, "gated_rmsnorm"), 0, `${name}: ${steady}`);

        // a 20-token prefill takes the unfused path (one norm up front, the residual adds fused with the norms)
        const pre = await withKernelKeys(
          rt,
          () => read(() => lm.step(long, Int32Array.from(ids.slice(0, 20)), 20)),
        );
        assert.equal(count(pre.keys, "add_rmsnorm_fwd"), 8, `${name} prefill: ${pre.keys}`);
        assert.equal(count(pre.keys, "gemv_"), 0, `${name} prefill: ${pre.keys}`);
        for (let i = 0; i < 20; i++) rows.push([i, pre.out.subarray(i * V, (i + 1) * V)]);
        for (let pos = 20; pos < ids.length; pos++) {
          rows.push([pos, await read(() => lm.step(long, Int32Array.of(ids[pos]), 1))]);
        }

        const full = await rt.scope(async () =>
          (await rt.noGrad(() => lm.forward(Int32Array.from(ids), 1, ids.length)).logits
            .read()) as Float32Array
        );
        for (const [pos, row] of rows) {
          assertClose(
            row,
            full.subarray(pos * V, (pos + 1) * V),
            { rtol: 1e-4, atol: 1e-4 },
            `${name} position ${pos}`,
          );
        }
      } finally {
        lm.disposeState(s);
        lm.disposeState(long);
        rt.poisonNewTensors = poison;
        lm.dispose();
      }
    }
  },
);

Deno.test(
  "decode step in f16: the fused GEMVs keep the unfused roundings, logits equal the f16 full forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) return console.warn("decode f16: adapter has no shader-f16");
    const cfg = llamaConfig(TINY_LLAMA_CONFIG);
    const rng = new Rng("decode-f16");
    // the teacher only: f16 hybrids (the scan runs in f32 islands) are checked in causal_lm_f16_test.ts
    const teacher = randomTransformer(cfg, rng.fork("teacher"));
    const ids = [1, 17, 33, 250, 7, 91, 402, 5, 64, 300];
    const V = cfg.vocabSize;
    for (const [name, model] of [["teacher", teacher]] as const) {
      const lm = CausalLM.fromModel(rt, model, { dtype: "f16" });
      const s = lm.newDecodeState(1, ids.length);
      try {
        await rt.scope(async () => {
          const { out: steps, keys } = await withKernelKeys(rt, () => {
            const out = [lm.step(s, Int32Array.from(ids.slice(0, 5)), 5)];
            for (let pos = 5; pos < ids.length; pos++) out.push(lm.step(s, Int32Array.of(ids[pos]), 1));
            return out;
          });
          for (const k of ["gemv_qkv_norm_f16", "gemv_swiglu_norm_f16", "gemv_res_f16", "gemv_norm_f16"]) {
            assert.ok(keys.some((key) => key.startsWith(k)), `${name}: no ${k} in ${keys}`);
          }
          const full = rt.noGrad(() => lm.forward(Int32Array.from(ids), 1, ids.length)).logits;
          const [f, ...got] = await Promise.all([full.read(), ...steps.map((t) => t.read())]);
          const dec = new Float32Array(ids.length * V);
          let off = 0;
          for (const g of got) {
            dec.set(g, off);
            off += g.length;
          }
          // the same f16 roundings in both paths; sums in another order can move a stored value by one f16 ulp
          // (2^-11 relative), which the later layers carry into the logits (|logits| < 1 here; 5e-4 seen)
          assertClose(dec, f, { rtol: 4e-3, atol: 2e-3 }, `${name} f16 decode`);
        });
      } finally {
        lm.disposeState(s);
        lm.dispose();
      }
    }
  },
);

Deno.test(
  "decode of two sequences: the fused path's last-position logits (lastOnly) and steps equal the full forward",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const cfg = llamaConfig(TINY_LLAMA_CONFIG);
    const rng = new Rng("decode-batch");
    const teacher = randomTransformer(cfg, rng.fork("teacher"));
    const hybrid: Model = mapAttentionToMamba2(teacher.weights, cfg, [1, 3], rng.fork("mamba"));
    // [B = 2, T = 6]: a 4-token prefill of both (8 rows: fused), then two single steps (2 rows each)
    const ids = [[5, 99, 310, 42, 7, 250], [1, 64, 33, 480, 12, 3]];
    const V = cfg.vocabSize, T = ids[0].length;
    for (const [name, model] of [["teacher", teacher], ["hybrid", hybrid]] as const) {
      const lm = CausalLM.fromModel(rt, model);
      const s = lm.newDecodeState(2, T);
      try {
        await rt.scope(async () => {
          const { out: steps, keys } = await withKernelKeys(rt, () => [
            lm.step(s, Int32Array.from([...ids[0].slice(0, 4), ...ids[1].slice(0, 4)]), 4, {
              lastOnly: true,
            }),
            lm.step(s, Int32Array.of(ids[0][4], ids[1][4]), 1),
            lm.step(s, Int32Array.of(ids[0][5], ids[1][5]), 1),
          ]);
          assert.ok(!keys.some((k) => k.startsWith("rmsnorm_fwd") || k.startsWith("add_rmsnorm")), `${keys}`);
          const full = rt.noGrad(() => lm.forward(Int32Array.from(ids.flat()), 2, T)).logits;
          const [f, ...got] = await Promise.all([full.read(), ...steps.map((t) => t.read())]);
          // each step gives [2, V]: sequence b's row at position 3, 4 and 5
          got.forEach((g, i) => {
            for (let b = 0; b < 2; b++) {
              const at = (b * T + 3 + i) * V;
              assertClose(
                g.subarray(b * V, (b + 1) * V),
                f.subarray(at, at + V),
                { rtol: 1e-4, atol: 1e-4 },
                `${name} sequence ${b} position ${3 + i}`,
              );
            }
          });
        });
      } finally {
        lm.disposeState(s);
        lm.dispose();
      }
    }
  },
);

Deno.test(
  "decode step on f16 storage: the same fused count as f32 (no casts around the Mamba2 step)",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) {
      console.warn("decode f16: adapter has no shader-f16");
      return;
    }
    const cfg = llamaConfig(TINY_LLAMA_CONFIG);
    const rng = new Rng("decode-dispatch-f16");
    const teacher = randomTransformer(cfg, rng.fork("teacher"));
    const hybrid: Model = mapAttentionToMamba2(teacher.weights, cfg, [1, 3], rng.fork("mamba"));
    const lm = CausalLM.fromModel(rt, hybrid, { dtype: "f16" });
    const poison = rt.poisonNewTensors;
    rt.poisonNewTensors = false;
    const s = lm.newDecodeState(1, 8);
    try {
      await rt.scope(async () =>
        void await lm.step(s, Int32Array.of(1, 17, 33), 3, { lastOnly: true }).read()
      );
      const counts: number[] = [];
      let keys: string[] = [];
      for (const id of [250, 7]) {
        const before = rt.dev.stats.dispatches;
        const r = await withKernelKeys(
          rt,
          () => rt.scope(async () => void await lm.step(s, Int32Array.of(id), 1).read()),
        );
        counts.push(rt.dev.stats.dispatches - before);
        keys = r.keys;
      }
      // 2 attention and 2 Mamba2 layers; the second step is steady state (the first builds the head scalars)
      assert.equal(counts[1], FIXED + PER_ATTENTION * 2 + PER_MAMBA2 * 2, keys.join(" "));
      assert.equal(count(keys, "cast_"), 0, keys.join(" "));
    } finally {
      rt.poisonNewTensors = poison;
      lm.disposeState(s);
      lm.dispose();
    }
  },
);
