// A student CausalLM borrowing its teacher's frozen GPU tensors (models/causal_lm.ts ShareFrom): what is
// borrowed and what is not, the pool bytes it saves, bit-identical forwards, and the lifetime of shared storage.
import assert from "node:assert/strict";
import { CausalLM, type CausalLMOptions, sameStoredValues } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { mapAttentionToMamba2 } from "../../models/mapping.ts";
import { EMBED, type HybridModel, LM_HEAD, type TransformerModel } from "../../models/weights.ts";
import { sizeClass } from "../../runtime/pool.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import { Rng } from "../../util/rng.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const ATTN = [1, 3];
const mambaOnly = (n: string) => n.includes(".mamba.");
const mambaMlp = (n: string) => n.includes(".mamba.") || n.includes(".mlp.");

async function models(): Promise<{ teacher: TransformerModel; student: HybridModel }> {
  const teacher = await loadModel(TEACHER) as TransformerModel;
  return { teacher, student: mapAttentionToMamba2(teacher.weights, teacher.config, ATTN, new Rng(3)) };
}

/** Pool bytes a model's own (not borrowed) parameters take: what building it adds to the pool's live bytes. */
function poolBytesOf(lm: CausalLM, names: Iterable<string>): number {
  let b = 0;
  for (const n of names) b += sizeClass(Math.max(4, lm.params.get(n)!.byteLength));
  return b;
}

/** Live pool bytes added by building a model. */
function built(rt: Runtime, make: () => CausalLM): { lm: CausalLM; bytes: number } {
  const before = rt.pool.stats.liveBytes;
  const lm = make();
  return { lm, bytes: rt.pool.stats.liveBytes - before };
}

/** The logits of a fixed 2 x 12 batch, read back. */
async function logitsOf(rt: Runtime, lm: CausalLM): Promise<Float32Array> {
  const ids = Int32Array.from({ length: 24 }, (_, i) => (i * 37 + 5) % lm.config.vocabSize);
  return await rt.scope(() => rt.noGrad(() => lm.forward(ids, 2, 12).logits).read()) as Float32Array;
}

Deno.test(
  "share: a mamba-trainable student borrows every frozen tensor, and the pool holds exactly their bytes less",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { teacher, student } = await models();
    const t = CausalLM.fromModel(rt, teacher);
    const opts: CausalLMOptions = { trainable: mambaOnly };
    try {
      const plain = built(rt, () => CausalLM.fromModel(rt, student, opts));
      assert.equal(plain.lm.borrowed.size, 0, "nothing borrowed without share");
      const plainLogits = await logitsOf(rt, plain.lm);
      plain.lm.dispose();
      const share = { owner: t, ownerWeights: teacher.weights };
      const shared = built(rt, () => CausalLM.fromModel(rt, student, { ...opts, share }));
      const s = shared.lm;
      try {
        // every frozen student parameter is the teacher's (tied: no separate lm_head); the Mamba ones are not
        const frozen = [...s.params.keys()].filter((n) => !mambaOnly(n));
        assert.ok(!s.params.has(LM_HEAD));
        assert.deepEqual([...s.borrowed].sort(), frozen.sort());
        assert.ok(frozen.length > 20 && s.trainableParams().length > 0);
        for (const n of s.borrowed) {
          assert.equal(s.params.get(n)!.buffer, t.params.get(n)!.buffer, `${n} shares the teacher's buffer`);
          assert.equal(s.params.get(n)!.requiresGrad, false);
        }
        assert.ok(s.trainableParams().every((p) => !s.borrowed.has(p.name!)));
        const saved = poolBytesOf(s, s.borrowed);
        assert.ok(saved > 0);
        assert.equal(plain.bytes - shared.bytes, saved, "live bytes drop by exactly the borrowed tensors'");
        // its own parameters and the RoPE frequencies (one 256-byte buffer)
        const own = [...s.params.keys()].filter((n) => !s.borrowed.has(n));
        assert.equal(shared.bytes, poolBytesOf(s, own) + 256);
        // the same numbers: a borrowed tensor holds the bytes an upload would have
        assert.deepEqual(await logitsOf(rt, s), plainLogits);
      } finally {
        s.dispose();
      }
    } finally {
      t.dispose();
    }
  },
);

Deno.test(
  "share: disposing the student leaves the teacher valid, and disposing the teacher first leaves the student valid",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { teacher, student } = await models();
    const live0 = rt.pool.stats.liveBytes;
    const share = (owner: CausalLM) => ({ owner, ownerWeights: teacher.weights });
    {
      const t = CausalLM.fromModel(rt, teacher);
      const before = await logitsOf(rt, t);
      const s = CausalLM.fromModel(rt, student, { trainable: mambaOnly, share: share(t) });
      assert.ok(s.borrowed.size > 0);
      await logitsOf(rt, s);
      s.dispose();
      assert.ok([...t.params.values()].every((p) => !p.disposed));
      // reused pool buffers would overwrite the teacher's weights if the student had freed them
      const filler = rt.full([64 * 1024], 7).keep();
      assert.deepEqual(await logitsOf(rt, t), before, "the teacher's forward after student.dispose()");
      filler.dispose();
      t.dispose();
    }
    {
      const t = CausalLM.fromModel(rt, teacher);
      const s = CausalLM.fromModel(rt, student, { trainable: mambaOnly, share: share(t) });
      const before = await logitsOf(rt, s);
      t.dispose();
      const filler = rt.full([64 * 1024], 7).keep();
      assert.deepEqual(await logitsOf(rt, s), before, "the student's forward after teacher.dispose()");
      filler.dispose();
      s.dispose();
    }
    assert.equal(rt.pool.stats.liveBytes, live0, "both models' storage went back to the pool, once");
  },
);

Deno.test(
  "share: trainable tensors are never borrowed; trainable all borrows nothing, mamba_mlp only non-MLP frozen ones",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { teacher, student } = await models();
    const t = CausalLM.fromModel(rt, teacher);
    const share = { owner: t, ownerWeights: teacher.weights };
    try {
      const all = CausalLM.fromModel(rt, student, { trainable: () => true, share });
      assert.equal(all.borrowed.size, 0);
      assert.equal(all.trainableParams().length, all.params.size);
      all.dispose();
      const mm = CausalLM.fromModel(rt, student, { trainable: mambaMlp, share });
      assert.deepEqual(
        [...mm.borrowed].sort(),
        [...mm.params.keys()].filter((n) => !mambaMlp(n)).sort(),
      );
      assert.ok([...mm.borrowed].every((n) => !n.includes(".mlp.")));
      mm.dispose();
      // an owner that trains a tensor does not lend it
      const trainingOwner = CausalLM.fromModel(rt, teacher, { trainable: (n) => n.includes(".mlp.") });
      const s = CausalLM.fromModel(rt, student, {
        trainable: mambaOnly,
        share: { owner: trainingOwner, ownerWeights: teacher.weights },
      });
      assert.ok(s.borrowed.size > 0 && [...s.borrowed].every((n) => !n.includes(".mlp.")));
      s.dispose();
      trainingOwner.dispose();
    } finally {
      t.dispose();
    }
  },
);

Deno.test(
  "share: a tensor whose values differ from the owner's is uploaded, not borrowed; misuse throws",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { teacher, student } = await models();
    const t = CausalLM.fromModel(rt, teacher);
    try {
      const name = "model.layers.2.mlp.up_proj.weight";
      const w = student.weights.get(name)!;
      const changed = { shape: [...w.shape], data: w.data.slice() };
      changed.data[17] = Math.fround(changed.data[17] * (1 + 2 ** -20));
      const other = "model.layers.0.mlp.down_proj.weight"; // equal bytes in another array
      const weights = new Map(student.weights).set(name, changed)
        .set(other, { ...student.weights.get(other)!, data: student.weights.get(other)!.data.slice() });
      const s = CausalLM.fromModel(rt, { ...student, weights }, {
        trainable: mambaOnly,
        share: { owner: t, ownerWeights: teacher.weights },
      });
      assert.ok(!s.borrowed.has(name), "changed values are uploaded");
      assert.ok(s.borrowed.has(other), "equal values in a copy are borrowed");
      assert.deepEqual(await s.params.get(name)!.read(), changed.data);
      s.dispose();
      assert.throws(
        () =>
          CausalLM.fromModel(rt, student, {
            dtype: "f16",
            share: { owner: t, ownerWeights: teacher.weights },
          }),
        /the owner stores f32, the new model f16/,
      );
      assert.throws(() => CausalLM.fromModel(rt, student, { share: { owner: t } }), /needs ownerWeights/);
    } finally {
      t.dispose();
    }
  },
);

Deno.test("share: sameStoredValues compares the bytes an upload in the dtype would write", () => {
  const x = { shape: [4], data: Float32Array.from([0.1, -2.5, 3e-3, 7]) };
  const widened = { shape: [4], data: Float32Array.from(Float16Array.from(x.data)) };
  assert.ok(sameStoredValues(x, x, "f32"));
  assert.ok(sameStoredValues(x, { shape: [4], data: x.data.slice() }, "f32"));
  assert.ok(!sameStoredValues(x, widened, "f32"), "f16-rounded values differ in f32");
  assert.ok(sameStoredValues(x, widened, "f16"), "but not once stored as f16");
  assert.ok(!sameStoredValues(x, { shape: [2, 2], data: x.data }, "f32"), "shapes must match");
  assert.ok(!sameStoredValues(x, undefined, "f32"));
  const zero = { shape: [1], data: Float32Array.from([0]) },
    negZero = { shape: [1], data: Float32Array.from([-0]) };
  assert.ok(
    !sameStoredValues(zero, negZero, "f32") && !sameStoredValues(zero, negZero, "f16"),
    "-0 is other bits",
  );
});

Deno.test(
  "share: a random hybrid borrows the random teacher's frozen tensors and keeps its own Mamba values",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { teacher, student } = await models();
    const t = CausalLM.random(rt, teacher.config, null, { seed: 4 });
    const plain = CausalLM.random(rt, teacher.config, student.mamba, { seed: 9, trainable: mambaOnly });
    const s = CausalLM.random(rt, teacher.config, student.mamba, {
      seed: 9,
      trainable: mambaOnly,
      share: { owner: t },
    });
    try {
      assert.deepEqual([...s.borrowed].sort(), [...s.params.keys()].filter((n) => !mambaOnly(n)).sort());
      assert.equal(s.params.get(EMBED)!.buffer, t.params.get(EMBED)!.buffer);
      const m = "model.layers.0.mamba.in_proj.weight";
      assert.deepEqual(await s.params.get(m)!.read(), await plain.params.get(m)!.read());
    } finally {
      s.dispose();
      plain.dispose();
      t.dispose();
    }
  },
);
