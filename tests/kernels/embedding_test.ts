import assert from "node:assert/strict";
import { embedding } from "../../runtime/ops/embedding.ts";
import { buildEmbeddingCsr } from "../../kernels/embedding.ts";
import { UserError } from "../../util/errors.ts";
import {
  assertClose,
  dot,
  finiteDifference,
  gpuTestOptions,
  randn,
  sampleIndices,
  testRng,
  testRuntime,
} from "../helpers/gpu.ts";

function refGather(table: ArrayLike<number>, ids: ArrayLike<number>, d: number): Float64Array {
  const out = new Float64Array(ids.length * d);
  for (let t = 0; t < ids.length; t++) for (let j = 0; j < d; j++) out[t * d + j] = table[ids[t] * d + j];
  return out;
}

Deno.test("embedding CSR: stable counting sort groups positions by id", () => {
  const { data, unique } = buildEmbeddingCsr([3, 1, 3, 0, 3, 1], 5);
  assert.equal(unique, 3);
  assert.deepEqual([...data], [0, 1, 3, /* starts */ 0, 1, 3, 6, /* positions */ 3, 1, 5, 0, 2, 4]);
});

Deno.test(
  "embedding: exact gather; scatter-add backward vs finite differences, repeated ids",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("embedding");
    // d = 300: two column blocks; 40 ids over a vocabulary of 50 repeat several ids
    const [vocab, d, n] = [50, 300, 40];
    const table = randn(rng, vocab * d);
    const ids = Int32Array.from({ length: n }, () => rng.int(vocab));
    ids[5] = ids[17] = ids[39] = 7;
    const w = randn(rng, n * d);
    await rt.scope(async () => {
      const tt = rt.tensor(table, [vocab, d]);
      tt.requiresGrad = true;
      const out = embedding(tt, ids, { shape: [4, 10] });
      assert.deepEqual([...out.shape], [4, 10, d]);
      rt.backward(out, rt.tensor(w, [4, 10, d]));
      const [go, gt] = await Promise.all([out.read(), tt.grad!.read()]);
      assertClose(go, refGather(table, ids, d), { rtol: 0, atol: 0 }, "gather");
      // the gradient of sum(out * w): sampled entries by finite differences, plus rows of absent ids are 0
      const idx = sampleIndices(rng, vocab * d, 10).concat([7 * d, 7 * d + 299]);
      const fd = finiteDifference(() => dot(refGather(table, ids, d), w), table, idx);
      assertClose(idx.map((i) => gt[i]), fd, { rtol: 1e-5, atol: 1e-5 }, "table grad");
      const absent = [...Array(vocab).keys()].filter((v) => !ids.includes(v));
      assert.ok(absent.length > 0);
      for (const v of absent) {
        assert.ok(gt.slice(v * d, (v + 1) * d).every((x) => x === 0), `row ${v} is zero`);
      }
      tt.grad!.dispose();
    });
  },
);

Deno.test(
  "embedding: GPU ids with hostIds, grads accumulate into the leaf, frozen table needs none",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("embedding-acc");
    const [vocab, d] = [11, 6];
    const table = randn(rng, vocab * d);
    const ids = Int32Array.from([4, 4, 0, 10, 4]);
    await rt.scope(async () => {
      const tt = rt.tensor(table, [vocab, d]);
      tt.requiresGrad = true;
      const idT = rt.tensor(ids, [5], "i32");
      for (let i = 0; i < 2; i++) rt.scope(() => rt.backward(embedding(tt, idT, { hostIds: ids })));
      const g = await tt.grad!.read();
      const count = (v: number) => ids.filter((x) => x === v).length;
      assertClose(g, Array.from({ length: vocab * d }, (_, i) => 2 * count(Math.floor(i / d))), {
        rtol: 0,
        atol: 0,
      }, "2x counts");
      tt.grad!.dispose();
      tt.requiresGrad = false;
      // inference: GPU-only ids are fine
      const out = rt.noGrad(() => embedding(tt, idT));
      assertClose(await out.read(), refGather(table, ids, d), { rtol: 0, atol: 0 }, "no-grad gather");
    });
  },
);

Deno.test(
  "embedding: out-of-vocabulary ids are a UserError naming id and position; grad without host ids is refused",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    rt.scope(() => {
      const tt = rt.tensor(randn(testRng("e"), 12), [4, 3]);
      assert.throws(
        () => embedding(tt, Int32Array.from([1, 4]), { source: "data/train.jsonl" }),
        (e: unknown) =>
          e instanceof UserError && /data\/train\.jsonl: token id 4 at position 1 .*\[0, 4\)/.test(e.message),
      );
      tt.requiresGrad = true;
      assert.throws(() => embedding(tt, rt.tensor([1], [1], "i32")), /hostIds/);
    });
  },
);

Deno.test("embedding f16 table: exact gather and f32-summed gradient", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) return console.warn("embedding f16: adapter has no shader-f16");
  const rng = testRng("embedding-f16");
  const [vocab, d] = [9, 10];
  const table = Float64Array.from(new Float16Array(randn(rng, vocab * d)));
  const ids = Int32Array.from([2, 8, 2, 2, 5]);
  const w = Float64Array.from(new Float16Array(randn(rng, ids.length * d)));
  await rt.scope(async () => {
    const tt = rt.tensor(table, [vocab, d], "f16");
    tt.requiresGrad = true;
    const out = embedding(tt, ids);
    rt.backward(out, rt.tensor(w, [ids.length, d], "f16"));
    const [go, gt] = await Promise.all([out.read(), tt.grad!.read()]);
    assertClose(go, refGather(table, ids, d), { rtol: 0, atol: 0 }, "f16 gather");
    const ref = new Float64Array(vocab * d);
    ids.forEach((v, t) => {
      for (let j = 0; j < d; j++) ref[v * d + j] += w[t * d + j];
    });
    assertClose(gt, ref, { rtol: 1e-3, atol: 1e-3 }, "f16 table grad");
    tt.grad!.dispose();
  });
});
