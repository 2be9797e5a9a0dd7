import assert from "node:assert/strict";
import { isUserError } from "../../util/errors.ts";
import {
  checkAttnLayers,
  checkHybridConfig,
  loadMambaConfig,
  loadTransformerConfig,
  makeMamba1Config,
  makeMamba2Config,
  mambaConfigToJson,
  mixerOf,
  parseMambaConfig,
  parseTransformerConfig,
  ropeInverseFrequencies,
} from "../../models/config.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const HYBRID = new URL("../../fixtures/reference/hybrid_mamba2_stories260k/model", import.meta.url).pathname;
const MISTRAL = new URL("../../fixtures/reference/mini_mistral/model", import.meta.url).pathname;

/** Llama-3.2-1B's config.json as published (transformers 4.45 layout). */
const LLAMA_32_1B = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  bos_token_id: 128000,
  eos_token_id: 128001,
  head_dim: 64,
  hidden_act: "silu",
  hidden_size: 2048,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-05,
  rope_scaling: {
    factor: 32.0,
    high_freq_factor: 4.0,
    low_freq_factor: 1.0,
    original_max_position_embeddings: 8192,
    rope_type: "llama3",
  },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  vocab_size: 128256,
};

function refused(fn: () => unknown, ...fragments: string[]): void {
  assert.throws(fn, (e: Error) => {
    assert.ok(isUserError(e), `expected a UserError, got ${e}`);
    for (const f of fragments) assert.ok(e.message.includes(f), `"${f}" missing from: ${e.message}`);
    return true;
  });
}

Deno.test("config: the fixture teacher (stories260K)", async () => {
  const c = await loadTransformerConfig(TEACHER);
  assert.equal(c.architecture, "LlamaForCausalLM");
  assert.equal(c.hiddenSize, 64);
  assert.equal(c.numLayers, 5);
  assert.equal(c.numHeads, 8);
  assert.equal(c.numKvHeads, 4);
  assert.equal(c.headDim, 8);
  assert.equal(c.intermediateSize, 172);
  assert.equal(c.vocabSize, 512);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.ropeScaling, null);
  assert.equal(c.slidingWindow, null);
  assert.equal(c.rmsNormEps, 1e-5);
  assert.equal(c.tieWordEmbeddings, true);
  assert.equal(c.bosTokenId, 1);
  assert.deepEqual(c.eosTokenIds, [2]);
  assert.equal(c.maxPositionEmbeddings, 512);
  assert.equal(c.torchDtype, "float32");
});

Deno.test("config: mini Mistral with transformers-5 rope_parameters and sliding_window null", async () => {
  const c = await loadTransformerConfig(MISTRAL);
  assert.equal(c.architecture, "MistralForCausalLM");
  assert.equal(c.headDim, 16);
  assert.equal(c.numKvHeads, 2);
  assert.equal(c.ropeTheta, 1e6);
  assert.equal(c.slidingWindow, null);
  assert.equal(c.tieWordEmbeddings, false);
  assert.equal(c.rmsNormEps, 1e-6);
  assert.equal(c.torchDtype, "float32"); // transformers 5 writes "dtype"
  // rope_parameters alone (no legacy key) is read as well.
  const raw = JSON.parse(await Deno.readTextFile(`${MISTRAL}/config.json`));
  delete raw.rope_theta;
  raw.rope_parameters.rope_theta = 5e5;
  assert.equal(parseTransformerConfig(raw).ropeTheta, 5e5);
});

Deno.test("config: Mistral defaults (head_dim from hidden/heads, sliding window 4096 when absent)", () => {
  const c = parseTransformerConfig({
    architectures: ["MistralForCausalLM"],
    model_type: "mistral",
    hidden_size: 4096,
    intermediate_size: 14336,
    num_attention_heads: 32,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    vocab_size: 32000,
  });
  assert.equal(c.headDim, 128);
  assert.equal(c.slidingWindow, 4096);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.rmsNormEps, 1e-6);
  assert.equal(c.maxPositionEmbeddings, 131072);
  assert.equal(parseTransformerConfig({ ...c.raw, sliding_window: 1024 }).slidingWindow, 1024);
});

Deno.test("config: Llama 3.2 with llama3 rope scaling", () => {
  const c = parseTransformerConfig(LLAMA_32_1B);
  assert.deepEqual(c.ropeScaling, {
    type: "llama3",
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  assert.equal(c.ropeTheta, 5e5);
  assert.equal(c.numKvHeads, 8);
  // transformers-5 spelling of the same thing.
  const v5 = { ...LLAMA_32_1B, rope_scaling: undefined, rope_theta: undefined } as Record<string, unknown>;
  v5.rope_parameters = { ...LLAMA_32_1B.rope_scaling, rope_theta: 500000.0 };
  assert.deepEqual(parseTransformerConfig(v5).ropeScaling, c.ropeScaling);
  assert.equal(parseTransformerConfig(v5).ropeTheta, 5e5);
});

Deno.test("config: unsupported or broken teacher configs are refused naming the file and field", () => {
  const base = JSON.parse(Deno.readTextFileSync(`${TEACHER}/config.json`));
  refused(
    () =>
      parseTransformerConfig(
        { ...base, model_type: "qwen2", architectures: ["Qwen2ForCausalLM"] },
        "x/config.json",
      ),
    "x/config.json",
    "qwen2",
    "unsupported architecture",
  );
  refused(
    () => parseTransformerConfig({ ...base, architectures: ["LlavaForConditionalGeneration"] }),
    "Llava",
  );
  const noHidden = { ...base };
  delete noHidden.hidden_size;
  refused(
    () => parseTransformerConfig(noHidden, "m/config.json"),
    "m/config.json",
    '"hidden_size"',
    "missing",
  );
  refused(
    () => parseTransformerConfig({ ...base, num_key_value_heads: 3 }),
    '"num_key_value_heads"',
    "divide",
  );
  refused(() => parseTransformerConfig({ ...base, attention_bias: true }), '"attention_bias"');
  refused(() => parseTransformerConfig({ ...base, hidden_act: "gelu" }), '"hidden_act"', "gelu");
  refused(() => parseTransformerConfig({ ...base, vocab_size: -1 }), '"vocab_size"');
  refused(
    () => parseTransformerConfig({ ...base, rope_scaling: { rope_type: "yarn", factor: 4 } }),
    '"rope_scaling.rope_type"',
    "yarn",
  );
  refused(
    () => parseTransformerConfig({ ...base, rope_scaling: { rope_type: "llama3", factor: 8 } }),
    '"rope_scaling.low_freq_factor"',
  );
  refused(() => parseTransformerConfig({ ...base, sliding_window: 128 }), '"sliding_window"');
  refused(() => parseTransformerConfig([1]), "expected a JSON object");
});

Deno.test("config: RoPE inverse frequencies, default and linear", () => {
  const f = ropeInverseFrequencies({ headDim: 8, ropeTheta: 10000, ropeScaling: null });
  assert.deepEqual([...f], [1, 0.1, 0.01, 0.001].map(Math.fround));
  const l = ropeInverseFrequencies({
    headDim: 8,
    ropeTheta: 10000,
    ropeScaling: { type: "linear", factor: 4 },
  });
  assert.deepEqual([...l], [0.25, 0.025, 0.0025, 0.00025].map(Math.fround));
});

Deno.test("config: RoPE inverse frequencies are bit-identical to transformers (default, linear, llama3)", async () => {
  const oracle = JSON.parse(
    await Deno.readTextFile(new URL("./testdata/transformers_oracle.json", import.meta.url)),
  );
  const bits = (name: string) => new Float32Array(new Int32Array(oracle.rope_inv_freq_f32_bits[name]).buffer);
  const cases = {
    llama3: parseTransformerConfig(LLAMA_32_1B),
    linear: { headDim: 8, ropeTheta: 1e4, ropeScaling: { type: "linear" as const, factor: 4 } },
    default: { headDim: 16, ropeTheta: 1e6, ropeScaling: null },
  };
  for (const [name, cfg] of Object.entries(cases)) {
    const ref = bits(name);
    const mine = ropeInverseFrequencies(cfg);
    assert.equal(mine.length, ref.length);
    for (let i = 0; i < ref.length; i++) assert.equal(mine[i], ref[i], `${name} inv_freq[${i}]`);
    assert.equal(oracle.rope_attention_scaling[name], 1);
  }
  // The three llama3 bands: high frequencies unchanged, low ones divided by the factor, the middle blended.
  const plain = ropeInverseFrequencies({ ...cases.llama3, ropeScaling: null });
  const l3 = ropeInverseFrequencies(cases.llama3);
  assert.equal(l3[0], plain[0]);
  assert.equal(l3[31], Math.fround(plain[31] / 32));
  for (const i of [15, 16, 17]) assert.ok(l3[i] < plain[i] && l3[i] > plain[i] / 32, `band ${i}`);
  assert.equal(l3[14], plain[14]);
  assert.equal(l3[18], Math.fround(plain[18] / 32));
});

Deno.test("config: the fixture hybrid's mamba_config is a Mamba2 config", async () => {
  const m = await loadMambaConfig(HYBRID);
  assert.equal(m.mixer, "mamba2");
  assert.equal(m.dModel, 64);
  assert.equal(m.dInner, 64);
  assert.equal(m.dXb, 32);
  assert.equal(m.dState, 8);
  assert.equal(m.nHeads, 8);
  assert.equal(m.headDim, 8);
  assert.equal(m.chunkSize, 256);
  assert.deepEqual(m.attnLayers, [1, 3]);
  assert.equal(m.vocabSize, null);
  const teacher = await loadTransformerConfig(HYBRID);
  checkHybridConfig(teacher, m);
  // makeMamba2Config reproduces the file the official code wrote.
  const made = mambaConfigToJson(makeMamba2Config(teacher, [1, 3]));
  assert.deepEqual(made, JSON.parse(await Deno.readTextFile(`${HYBRID}/mamba_config.json`)));
  assert.deepEqual(
    Object.keys(made),
    Object.keys(JSON.parse(await Deno.readTextFile(`${HYBRID}/mamba_config.json`))),
  );
});

Deno.test("config: mixer rule and Mamba1 configs", () => {
  assert.equal(mixerOf({ expand: 1, ngroups: 8, d_state: 8 }), "mamba2");
  assert.equal(mixerOf({ expand: 1 }), "mamba1");
  assert.equal(mixerOf({}), "mamba1");
  refused(() => mixerOf({ ngroups: 2, dt_rank: 4 }), "ssm_cfg", "mixes");
  const m1 = parseMambaConfig({
    d_model: 64,
    ssm_cfg: { expand: 1 },
    rms_norm_eps: 1e-5,
    vocab_size: null,
    d_inner: 64,
    d_xb: 32,
    intermediate_size: 172,
    hidden_act: "silu",
    n_layer: 5,
    attn_layers: [1, 3],
  });
  assert.equal(m1.mixer, "mamba1");
  assert.equal(m1.dState, 16);
  assert.equal(m1.dtRank, 4);
  assert.equal(m1.nHeads, 4);
  assert.equal(
    parseMambaConfig({ ...mambaConfigToJson(m1), ssm_cfg: { expand: 1 } }, "m", "mamba1").dInner,
    64,
  );
  // A Mamba1 config without d_inner (older official files) uses expand * d_model.
  const { d_inner: _, ...noInner } = mambaConfigToJson(m1);
  assert.equal(parseMambaConfig(noInner).dInner, 64);
  const t = parseTransformerConfig(JSON.parse(Deno.readTextFileSync(`${TEACHER}/config.json`)));
  const made = makeMamba1Config(t, [1, 3]);
  assert.deepEqual(mambaConfigToJson(made), mambaConfigToJson(m1));
});

Deno.test("config: makeMamba2Config adds headdim when d_inner is not a multiple of 64", () => {
  const t = parseTransformerConfig({
    ...LLAMA_32_1B,
    num_attention_heads: 6,
    head_dim: 16,
    num_key_value_heads: 2,
  });
  const m = makeMamba2Config(t, []);
  assert.deepEqual(m.ssmCfg, { expand: 1, ngroups: 6, d_state: 16, headdim: 16 });
  assert.deepEqual(parseMambaConfig(mambaConfigToJson(m)), m);
});

Deno.test("config: broken mamba configs and attn_layers are refused naming the field", () => {
  const good = JSON.parse(Deno.readTextFileSync(`${HYBRID}/mamba_config.json`));
  refused(
    () => parseMambaConfig({ ...good, attn_layers: [3, 1] }, "h/mamba_config.json"),
    "h/mamba_config.json",
    "sorted",
  );
  refused(() => parseMambaConfig({ ...good, attn_layers: [1, 1] }), "sorted");
  refused(() => parseMambaConfig({ ...good, attn_layers: [1, 5] }), "attn_layers[1] = 5", "[0, 5)");
  refused(() => parseMambaConfig({ ...good, attn_layers: "1,3" }), "attn_layers");
  refused(
    () => parseMambaConfig({ ...good, ssm_cfg: { ...good.ssm_cfg, ngroups: 4 } }),
    '"ssm_cfg.ngroups"',
    "d_inner",
  );
  refused(() => parseMambaConfig({ ...good, ssm_cfg: { ...good.ssm_cfg, foo: 1 } }), '"ssm_cfg.foo"');
  refused(
    () => parseMambaConfig({ ...good, ssm_cfg: { ...good.ssm_cfg, D_has_hdim: true } }),
    '"ssm_cfg.D_has_hdim"',
  );
  refused(() => parseMambaConfig({ ...good, ssm_cfg: { ...good.ssm_cfg, d_conv: 3 } }), '"ssm_cfg.d_conv"');
  refused(() => parseMambaConfig({ ...good, d_xb: 24 }), '"d_xb"', "must divide d_inner");
  refused(() => parseMambaConfig({ ...good, d_xb: 20 }), '"ssm_cfg.d_state"', "must divide d_xb");
  const { d_model: _, ...noModel } = good;
  refused(() => parseMambaConfig(noModel), '"d_model"', "missing");
  const t = parseTransformerConfig(JSON.parse(Deno.readTextFileSync(`${TEACHER}/config.json`)));
  refused(
    () => checkHybridConfig(t, parseMambaConfig({ ...good, n_layer: 6 })),
    '"n_layer"',
    "num_hidden_layers",
  );
  refused(() => checkHybridConfig(t, parseMambaConfig({ ...good, d_model: 128, d_inner: 64 })), '"d_model"');
  refused(() => checkAttnLayers([0, 2.5], 4, "recipe.yaml"), "recipe.yaml", "attn_layers[1]");
  assert.deepEqual(checkAttnLayers([], 4, "x"), []);
});

Deno.test("config: missing files are UserErrors naming the path", async () => {
  await assert.rejects(loadTransformerConfig("/nonexistent-model"), (e: Error) => {
    return isUserError(e) && e.message.includes("/nonexistent-model/config.json") &&
      e.message.includes("not found");
  });
  await assert.rejects(
    loadMambaConfig(TEACHER),
    (e: Error) => isUserError(e) && e.message.includes("mamba_config.json"),
  );
});
