import assert from "node:assert/strict";
import { join } from "node:path";
import { Rng } from "../../util/rng.ts";
import { isUserError } from "../../util/errors.ts";
import {
  describeModel,
  exportModel,
  loadHybridModel,
  loadModel,
  loadTransformerModel,
} from "../../models/checkpoint.ts";
import { mapAttentionToMamba1, mapAttentionToMamba2 } from "../../models/mapping.ts";
import { openSafetensors, writeSafetensors } from "../../models/safetensors.ts";
import { bf16BitsToF32, f32ToBf16Bits } from "../../models/dtype.ts";
import { countParameters, type Model, weightsToWrite } from "../../models/weights.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const HYBRID = new URL("../../fixtures/reference/hybrid_mamba2_stories260k/model", import.meta.url).pathname;
const MISTRAL = new URL("../../fixtures/reference/mini_mistral/model", import.meta.url).pathname;

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "distillery-ckpt-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function assertSameModel(a: Model, b: Model): void {
  assert.equal(a.kind, b.kind);
  assert.deepEqual([...a.weights.keys()].sort(), [...b.weights.keys()].sort());
  for (const [k, t] of a.weights) {
    const u = b.weights.get(k)!;
    assert.deepEqual(u.shape, t.shape, k);
    // Bit-exact: compare the raw bits, so -0 vs 0 or NaN payloads would show.
    assert.deepEqual(
      new Uint32Array(u.data.buffer, u.data.byteOffset, u.data.length),
      new Uint32Array(t.data.buffer, t.data.byteOffset, t.data.length),
      k,
    );
  }
  assert.deepEqual(a.config.raw, b.config.raw);
  if (a.kind === "hybrid" && b.kind === "hybrid") assert.deepEqual(a.mamba, b.mamba);
}

Deno.test("checkpoint: loads the fixture teacher and the official fixture hybrid", async () => {
  const t = await loadModel(TEACHER);
  assert.equal(t.kind, "transformer");
  assert.equal(t.weights.get("lm_head.weight"), t.weights.get("model.embed_tokens.weight"));
  assert.equal(countParameters(t.weights), 512 * 64 + 64 + 5 * (4 * 64 * 64 / 4 * 3 + 3 * 64 * 172 + 2 * 64));
  const h = await loadModel(HYBRID);
  assert.equal(h.kind, "hybrid");
  if (h.kind !== "hybrid") return;
  assert.equal(h.mamba.mixer, "mamba2");
  assert.deepEqual(h.mamba.attnLayers, [1, 3]);
  assert.equal(h.weights.get("model.layers.0.mamba.in_proj.weight")!.shape.join(), "200,64");
  assert.match(describeModel(h), /hybrid mamba2 of LlamaForCausalLM, 5 layers \(attention on 1,3\)/);
  const m = await loadModel(MISTRAL);
  assert.equal(m.kind, "transformer");
  assert.notEqual(m.weights.get("lm_head.weight"), m.weights.get("model.embed_tokens.weight"));
});

Deno.test("checkpoint: export then import round-trips bit-exactly (mapped Mamba2 and Mamba1 hybrids, teacher)", async () => {
  const teacher = await loadTransformerModel(TEACHER);
  await withTempDir(async (dir) => {
    for (
      const [name, model] of [
        ["m2", mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(1))],
        ["m1", mapAttentionToMamba1(teacher.weights, teacher.config, [2], new Rng(2))],
        ["teacher", teacher],
      ] as const
    ) {
      const out = join(dir, name);
      await exportModel(out, model, { tokenizerDir: TEACHER });
      const files = [...Deno.readDirSync(out)].map((e) => e.name).sort();
      const expected = [
        "config.json",
        "generation_config.json",
        ...(model.kind === "hybrid" ? ["mamba_config.json"] : []),
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
      ];
      assert.deepEqual(files, expected);
      const back = await loadModel(out);
      assertSameModel(model, back);
      // lm_head is stored (the official strict loader needs it) and equals the embedding.
      const st = await openSafetensors(join(out, "model.safetensors"));
      assert.deepEqual(
        await st.readFloat32("lm_head.weight"),
        await st.readFloat32("model.embed_tokens.weight"),
      );
      assert.equal(st.metadata.format, "pt");
    }
    // Deterministic bytes: exporting the same model again gives the same file.
    const again = join(dir, "m2-again");
    await exportModel(again, mapAttentionToMamba2(teacher.weights, teacher.config, [1, 3], new Rng(1)));
    assert.deepEqual(
      await Deno.readFile(join(again, "model.safetensors")),
      await Deno.readFile(join(dir, "m2", "model.safetensors")),
    );
  });
});

Deno.test("checkpoint: the official hybrid re-exported and re-imported is unchanged; config files kept", async () => {
  const official = await loadHybridModel(HYBRID);
  await withTempDir(async (dir) => {
    const out = join(dir, "h");
    await exportModel(out, official);
    assertSameModel(official, await loadHybridModel(out));
    assert.deepEqual(
      JSON.parse(await Deno.readTextFile(join(out, "mamba_config.json"))),
      JSON.parse(await Deno.readTextFile(join(HYBRID, "mamba_config.json"))),
    );
    assert.deepEqual(
      JSON.parse(await Deno.readTextFile(join(out, "config.json"))),
      JSON.parse(await Deno.readTextFile(join(HYBRID, "config.json"))),
    );
    // Every tensor equals the official file's tensor (its lm_head is a copy of the embedding).
    const src = await openSafetensors(join(HYBRID, "model.safetensors"));
    const dst = await openSafetensors(join(out, "model.safetensors"));
    assert.deepEqual(dst.names(), src.names());
    for (const n of src.names()) assert.deepEqual(await dst.readFloat32(n), await src.readFloat32(n), n);
  });
});

Deno.test("checkpoint: BF16 export stores rounded values; untied Mistral round-trips", async () => {
  const mistral = await loadTransformerModel(MISTRAL);
  await withTempDir(async (dir) => {
    await exportModel(join(dir, "m"), mistral);
    assertSameModel(mistral, await loadModel(join(dir, "m")));
    await exportModel(join(dir, "b"), mistral, { dtype: "BF16" });
    const b = await loadTransformerModel(join(dir, "b"));
    const k = "model.layers.0.self_attn.q_proj.weight";
    assert.equal(b.weights.get(k)!.storedDtype, "BF16");
    assert.equal(b.config.torchDtype, "bfloat16"); // config.json says what is stored
    assert.equal(b.config.raw.dtype, "bfloat16");
    assert.deepEqual(b.weights.get(k)!.data, bf16BitsToF32(f32ToBf16Bits(mistral.weights.get(k)!.data)));
  });
});

Deno.test("checkpoint: a failed export leaves the existing directory untouched", async () => {
  const teacher = await loadTransformerModel(TEACHER);
  await withTempDir(async (dir) => {
    const out = join(dir, "m");
    await exportModel(out, teacher);
    const before = await Deno.readFile(join(out, "model.safetensors"));
    await assert.rejects(exportModel(out, teacher, { metadata: { bad: 1 as unknown as string } }));
    assert.deepEqual(await Deno.readFile(join(out, "model.safetensors")), before);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["m"]);
  });
});

Deno.test("checkpoint: mismatched weights are refused listing missing, unexpected and wrong-shape tensors", async () => {
  const teacher = await loadTransformerModel(TEACHER);
  await withTempDir(async (dir) => {
    const write = async (
      name: string,
      mutate: (m: Map<string, unknown>) => void,
      extraFiles: Record<string, string> = {},
    ) => {
      const d = join(dir, name);
      await Deno.mkdir(d);
      await Deno.copyFile(join(TEACHER, "config.json"), join(d, "config.json"));
      for (const [f, text] of Object.entries(extraFiles)) await Deno.writeTextFile(join(d, f), text);
      const t = weightsToWrite(teacher.weights);
      mutate(t as Map<string, unknown>);
      await writeSafetensors(join(d, "model.safetensors"), t);
      return d;
    };
    const refused = async (d: string, ...fragments: string[]) => {
      await assert.rejects(loadModel(d), (e: Error) => {
        assert.ok(isUserError(e), String(e));
        for (const f of fragments) assert.ok(e.message.includes(f), `"${f}" missing from: ${e.message}`);
        return true;
      });
    };
    await refused(
      await write("missing", (m) => m.delete("model.layers.2.mlp.up_proj.weight")),
      "model.safetensors",
      "missing 1 tensor(s): model.layers.2.mlp.up_proj.weight",
    );
    await refused(
      await write("extra", (m) => m.set("model.layers.9.foo", { shape: [1], data: new Float32Array(1) })),
      "unexpected 1 tensor(s): model.layers.9.foo",
    );
    await refused(
      await write("shape", (m) => m.set("model.norm.weight", { shape: [63], data: new Float32Array(63) })),
      "wrong shape: model.norm.weight is [63], expected [64]",
    );
    // Tied checkpoints may omit lm_head.weight; HF's saved rotary buffers are ignored.
    const noHead = await write("nohead", (m) => {
      m.delete("lm_head.weight");
      m.set("model.layers.0.self_attn.rotary_emb.inv_freq", { shape: [4], data: new Float32Array(4) });
    });
    const t = await loadTransformerModel(noHead);
    assert.equal(t.weights.get("lm_head.weight"), t.weights.get("model.embed_tokens.weight"));
    // A hybrid whose mamba_config says mamba2 while its weights are Mamba1 layers.
    const m1 = mapAttentionToMamba1(teacher.weights, teacher.config, [1, 3], new Rng(1));
    const wrongMixer = join(dir, "wrong-mixer");
    await exportModel(wrongMixer, m1);
    await Deno.copyFile(join(HYBRID, "mamba_config.json"), join(wrongMixer, "mamba_config.json"));
    await refused(wrongMixer, "mamba_config.json", "mamba2", "mamba1 layers");
    await refused(join(dir, "nope"), "not found");
    const noWeights = join(dir, "noweights");
    await Deno.mkdir(noWeights);
    await Deno.copyFile(join(TEACHER, "config.json"), join(noWeights, "config.json"));
    await refused(noWeights, "no weights");
  });
});

Deno.test("checkpoint: sharded teacher loads like the single file", async () => {
  const teacher = await loadTransformerModel(TEACHER);
  await withTempDir(async (dir) => {
    await Deno.copyFile(join(TEACHER, "config.json"), join(dir, "config.json"));
    const all = weightsToWrite(teacher.weights);
    const names = [...all.keys()].sort();
    const half = Math.ceil(names.length / 2);
    const shards = [names.slice(0, half), names.slice(half)];
    const weightMap: Record<string, string> = {};
    for (let s = 0; s < 2; s++) {
      const file = `model-0000${s + 1}-of-00002.safetensors`;
      await writeSafetensors(join(dir, file), new Map(shards[s].map((n) => [n, all.get(n)!])));
      for (const n of shards[s]) weightMap[n] = file;
    }
    await Deno.writeTextFile(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify({ metadata: {}, weight_map: weightMap }),
    );
    assertSameModel(teacher, await loadModel(dir));
  });
});
