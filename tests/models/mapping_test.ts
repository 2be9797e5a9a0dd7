import assert from "node:assert/strict";
import { Rng } from "../../util/rng.ts";
import { isUserError } from "../../util/errors.ts";
import { loadHybridModel, loadTransformerModel } from "../../models/checkpoint.ts";
import {
  everyKthAttentionLayer,
  mapAttentionToMamba1,
  mapAttentionToMamba2,
  mapAttentionToMambaProgressive,
  randomInitMamba,
} from "../../models/mapping.ts";
import { mambaConfigToJson } from "../../models/config.ts";
import { hybridWeightShapes, mambaMixerShapes, type WeightMap } from "../../models/weights.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const HYBRID_DIR = new URL("../../fixtures/reference/hybrid_mamba2_stories260k", import.meta.url).pathname;

const teacher = await loadTransformerModel(TEACHER);
const D = 64;

function rows(w: Float32Array, from: number, to: number, cols = D): Float32Array {
  return w.subarray(from * cols, to * cols);
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function softplus(x: number): number {
  return Math.log1p(Math.exp(x));
}

function w(map: WeightMap, name: string): Float32Array {
  const t = map.get(name);
  assert.ok(t, `missing ${name}`);
  return t.data;
}

Deno.test("mapping: Mamba2 hybrid from the fixture teacher matches the official code's mapping", async () => {
  const official = await loadHybridModel(`${HYBRID_DIR}/model`);
  const meta = JSON.parse(await Deno.readTextFile(`${HYBRID_DIR}/meta.json`));
  const h = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(1234));

  // Same keys and shapes as the official state dict (meta.json state_dict_keys) and the official file.
  const shapes = Object.fromEntries([...h.weights].map(([k, t]) => [k, t.shape]));
  assert.deepEqual(shapes, meta.state_dict_keys);
  assert.deepEqual(
    Object.fromEntries([...official.weights].map(([k, t]) => [k, t.shape])),
    meta.state_dict_keys,
  );
  assert.deepEqual(mambaConfigToJson(h.mamba), meta.mamba_config);

  const blocks: Record<string, number[]> = meta.mapping_check.layer0.row_blocks;
  assert.deepEqual(blocks, { z: [0, 64], x: [64, 96], B: [96, 128], C: [128, 192], dt: [192, 200] });
  for (const i of [0, 2, 4]) {
    const p = `model.layers.${i}.`;
    const inProj = w(h.weights, `${p}mamba.in_proj.weight`);
    const offInProj = w(official.weights, `${p}mamba.in_proj.weight`);
    // x <- v_proj, B <- k_proj, C <- q_proj, out_proj <- o_proj: exactly, and equal to the official rows.
    for (const [blk, proj] of [["x", "v_proj"], ["B", "k_proj"], ["C", "q_proj"]] as const) {
      const [a, b]: number[] = blocks[blk];
      assert.equal(
        maxAbsDiff(rows(inProj, a, b), w(teacher.weights, `${p}self_attn.${proj}.weight`)),
        0,
        `${i} ${blk}`,
      );
      assert.equal(maxAbsDiff(rows(inProj, a, b), rows(offInProj, a, b)), 0, `${i} ${blk} vs official`);
    }
    assert.equal(
      maxAbsDiff(
        w(h.weights, `${p}mamba.out_proj.weight`),
        w(teacher.weights, `${p}self_attn.o_proj.weight`),
      ),
      0,
    );
    assert.equal(
      maxAbsDiff(w(h.weights, `${p}mamba.out_proj.weight`), w(official.weights, `${p}mamba.out_proj.weight`)),
      0,
    );
    for (
      const n of [
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
      ]
    ) {
      assert.equal(
        maxAbsDiff(w(h.weights, `${p}${n}.weight`), w(official.weights, `${p}${n}.weight`)),
        0,
        `${i} ${n}`,
      );
      assert.equal(
        maxAbsDiff(w(h.weights, `${p}${n}.weight`), w(teacher.weights, `${p}${n}.weight`)),
        0,
        `${i} ${n}`,
      );
    }
    // New parameters: inside their init ranges, not zero, D and norm ones.
    const z = rows(inProj, 0, 64), dt = rows(inProj, 192, 200);
    for (const v of [...z, ...dt]) assert.ok(Math.abs(v) <= 1 / 8 && v !== 0);
    for (const v of w(h.weights, `${p}mamba.conv1d.weight`)) assert.ok(Math.abs(v) <= 0.5);
    for (const v of w(h.weights, `${p}mamba.conv1d.bias`)) assert.ok(Math.abs(v) <= 0.5);
    for (const v of w(h.weights, `${p}mamba.dt_bias`)) {
      const d = softplus(v);
      assert.ok(d >= 1e-3 * (1 - 1e-5) && d <= 1e-1 * (1 + 1e-5), `softplus(dt_bias) = ${d}`);
    }
    for (const v of w(h.weights, `${p}mamba.A_log`)) assert.ok(v >= 0 && v <= Math.log(16) + 1e-6);
    assert.ok(w(h.weights, `${p}mamba.D`).every((v) => v === 1));
    assert.ok(w(h.weights, `${p}mamba.norm.weight`).every((v) => v === 1));
  }
  for (const i of [1, 3]) {
    for (const n of ["q_proj", "k_proj", "v_proj", "o_proj"]) {
      const k = `model.layers.${i}.self_attn.${n}.weight`;
      assert.equal(maxAbsDiff(w(h.weights, k), w(official.weights, k)), 0, k);
    }
  }
  assert.equal(
    maxAbsDiff(w(h.weights, "model.embed_tokens.weight"), w(official.weights, "model.embed_tokens.weight")),
    0,
  );
  assert.equal(maxAbsDiff(w(h.weights, "model.norm.weight"), w(official.weights, "model.norm.weight")), 0);
  // Tied: lm_head is the embedding itself.
  assert.equal(h.weights.get("lm_head.weight"), h.weights.get("model.embed_tokens.weight"));
});

Deno.test("mapping: the seed reproduces the model; a layer's init does not depend on the other layers", () => {
  const a = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(7));
  const b = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(7));
  const c = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(8));
  const d = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 2, 3, 4], new Rng(7));
  for (const [k, t] of a.weights) assert.deepEqual(t.data, b.weights.get(k)!.data, k);
  const k0 = "model.layers.0.mamba.in_proj.weight";
  assert.notDeepEqual(a.weights.get(k0)!.data, c.weights.get(k0)!.data);
  for (const k of mambaMixerShapes(a.mamba, 0).keys()) {
    assert.deepEqual(a.weights.get(k)!.data, d.weights.get(k)!.data, k);
  }
});

Deno.test("mapping: Mamba1 hybrid (method.md 1.2)", () => {
  const h = mapAttentionToMamba1(teacher.weights, teacher.config, [1, 3], new Rng(3));
  assert.equal(h.mamba.mixer, "mamba1");
  assert.equal(h.mamba.dState, 16);
  assert.equal(h.mamba.dtRank, 4);
  const expected = hybridWeightShapes({ teacher: h.config, mamba: h.mamba });
  assert.deepEqual(new Map([...h.weights].map(([k, t]) => [k, t.shape])), expected);
  const p = "model.layers.2.";
  const t = (n: string) => w(teacher.weights, `${p}self_attn.${n}.weight`);
  assert.deepEqual(w(h.weights, `${p}mamba.in_proj_x.weight`), t("v_proj"));
  assert.deepEqual(w(h.weights, `${p}mamba.B_proj.weight`), t("k_proj"));
  assert.deepEqual(w(h.weights, `${p}mamba.C_proj.weight`), t("q_proj"));
  assert.deepEqual(w(h.weights, `${p}mamba.out_proj.weight`), t("o_proj"));
  assert.deepEqual(h.weights.get(`${p}mamba.A_log`)!.shape, [64, 16]);
  const aLog = w(h.weights, `${p}mamba.A_log`);
  for (let c = 0; c < 64; c++) {
    for (let n = 0; n < 16; n++) assert.equal(aLog[c * 16 + n], Math.fround(Math.log(n + 1)));
  }
  assert.ok(w(h.weights, `${p}mamba.D`).every((v) => v === 1));
  for (const v of w(h.weights, `${p}mamba.dt_proj.bias`)) {
    const d = softplus(v);
    assert.ok(d >= 1e-3 * (1 - 1e-5) && d <= 1e-1 * (1 + 1e-5));
  }
  for (const v of w(h.weights, `${p}mamba.dt_proj.weight`)) assert.ok(Math.abs(v) <= 0.5); // 1/sqrt(dt_rank 4)
  for (const v of w(h.weights, `${p}mamba.in_proj_z.weight`)) assert.ok(Math.abs(v) <= 1 / 8);
});

Deno.test("mapping: random-init ablation draws the x/B/C/out projections too", () => {
  const h = randomInitMamba(teacher.weights, teacher.config, [1, 3], new Rng(5));
  const p = "model.layers.0.";
  const inProj = w(h.weights, `${p}mamba.in_proj.weight`);
  assert.ok(maxAbsDiff(rows(inProj, 64, 96), w(teacher.weights, `${p}self_attn.v_proj.weight`)) > 0);
  for (const v of inProj) assert.ok(Math.abs(v) <= 1 / 8);
  for (const v of w(h.weights, `${p}mamba.out_proj.weight`)) assert.ok(Math.abs(v) <= 1 / 8);
  assert.deepEqual(w(h.weights, `${p}mlp.up_proj.weight`), w(teacher.weights, `${p}mlp.up_proj.weight`));
  const m1 = randomInitMamba(teacher.weights, teacher.config, [], new Rng(5), "mamba1");
  assert.ok(
    maxAbsDiff(w(m1.weights, `${p}mamba.C_proj.weight`), w(teacher.weights, `${p}self_attn.q_proj.weight`)) >
      0,
  );
});

Deno.test("mapping: progressive step keeps the previous Mamba layers and converts the new ones", () => {
  const prev = mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(11));
  // Pretend stage 1 trained the previous hybrid: change one of its Mamba layers and an MLP of a Mamba layer.
  const trained = new Map(prev.weights);
  const k = "model.layers.2.mamba.in_proj.weight";
  trained.set(k, { shape: prev.weights.get(k)!.shape, data: prev.weights.get(k)!.data.map((v) => v + 1) });
  const mlp = "model.layers.4.mlp.up_proj.weight";
  trained.set(mlp, {
    shape: prev.weights.get(mlp)!.shape,
    data: prev.weights.get(mlp)!.data.map((v) => v * 2),
  });
  const previous = { ...prev, weights: trained };

  const next = mapAttentionToMambaProgressive(previous, teacher, [3], new Rng(12));
  assert.deepEqual(next.mamba.attnLayers, [3]);
  assert.equal(next.mamba.mixer, "mamba2");
  assert.deepEqual(
    new Map([...next.weights].map(([n, t]) => [n, t.shape])),
    hybridWeightShapes({ teacher: next.config, mamba: next.mamba }),
  );
  assert.equal(next.weights.get(k), trained.get(k)); // previous Mamba layers: whole layer copied
  assert.equal(next.weights.get(mlp), trained.get(mlp));
  // Layer 1 is newly converted from the teacher's attention, with the same init a one-shot mapping would draw.
  const oneShot = mapAttentionToMamba2(teacher.weights, teacher.config, [3], new Rng(12));
  const p = "model.layers.1.";
  assert.deepEqual(
    rows(w(next.weights, `${p}mamba.in_proj.weight`), 64, 96),
    w(teacher.weights, `${p}self_attn.v_proj.weight`),
  );
  for (const n of mambaMixerShapes(next.mamba, 1).keys()) {
    assert.deepEqual(w(next.weights, n), w(oneShot.weights, n), n);
  }
  assert.deepEqual(
    w(next.weights, "model.layers.3.self_attn.q_proj.weight"),
    w(teacher.weights, "model.layers.3.self_attn.q_proj.weight"),
  );
  assert.equal(next.weights.get("model.layers.1.self_attn.q_proj.weight"), undefined);

  // Using the previous hybrid itself as the source of the attention to convert gives the same layer 1.
  const self = mapAttentionToMambaProgressive(previous, previous, [3], new Rng(12));
  assert.deepEqual(w(self.weights, `${p}mamba.in_proj.weight`), w(next.weights, `${p}mamba.in_proj.weight`));

  const refused = (fn: () => unknown, fragment: string) =>
    assert.throws(fn, (e: Error) => isUserError(e) && e.message.includes(fragment));
  refused(() => mapAttentionToMambaProgressive(previous, teacher, [1, 2, 3], new Rng(1)), "subset");
  refused(() => mapAttentionToMambaProgressive(previous, teacher, [3, 1], new Rng(1)), "sorted");
  // A source without attention on a layer to convert (layer 1 is Mamba in `next`).
  refused(() => mapAttentionToMambaProgressive(previous, next, [], new Rng(1)), "model.layers.1.self_attn");
});

Deno.test("mapping: attn_layers are validated with clear errors", () => {
  const refused = (attn: number[], fragment: string) =>
    assert.throws(
      () => mapAttentionToMamba2(teacher.weights, teacher.config, attn, new Rng(1)),
      (e: Error) => isUserError(e) && e.message.includes(fragment),
    );
  refused([1, 5], "attn_layers[1] = 5");
  refused([-1], "attn_layers[0] = -1");
  refused([3, 1], "sorted");
  refused([1, 1], "sorted");
  // A teacher map missing a tensor is refused before anything is built.
  const broken = new Map(teacher.weights);
  broken.delete("model.layers.2.self_attn.k_proj.weight");
  assert.throws(
    () => mapAttentionToMamba2(broken, teacher.config, [1, 3], new Rng(1)),
    (e: Error) => isUserError(e) && e.message.includes("model.layers.2.self_attn.k_proj.weight"),
  );
});

Deno.test("mapping: which layers keep attention for a fraction", () => {
  assert.deepEqual(everyKthAttentionLayer(32, 2), Array.from({ length: 16 }, (_, i) => 2 * i + 1));
  assert.deepEqual(everyKthAttentionLayer(32, 4), [3, 7, 11, 15, 19, 23, 27, 31]);
  assert.deepEqual(everyKthAttentionLayer(32, 8), [7, 15, 23, 31]);
  assert.deepEqual(everyKthAttentionLayer(32, Infinity), []);
  assert.deepEqual(everyKthAttentionLayer(5, 2), [1, 3]);
});
