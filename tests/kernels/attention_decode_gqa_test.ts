import assert from "node:assert/strict";
import {
  attentionDecodeGqa,
  DECODE_GQA_DEFAULT_STORAGE,
  decodeGqaConfig,
  decodeGqaSupported,
} from "../../kernels/attention_decode_gqa.ts";
import type { AttentionShape } from "../../kernels/attention.ts";
import {
  appendKv,
  DECODE_GQA_MAX_KEYS,
  decodeAttention,
  type DecodeKernel,
  KvCache,
  ropeAppendDecodeAttention,
} from "../../runtime/ops/attention.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Rng } from "../../util/rng.ts";
import {
  assertClose,
  gpuTestOptions,
  randn,
  roundF16,
  testRng,
  testRuntime,
  type Tolerance,
  withKernelKeys,
} from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";
import { refAttention } from "../reference/attention.ts";

// f32: the scores, the online softmax (one exp per rescale, per slice and at the merge) and the sums over at most
// a few hundred keys round in f32, a few ulps of the outputs (|o| < 3): the training forward's tolerance.
const F32 = { rtol: 3e-5, atol: 3e-6 };
// f16: q, K and V are drawn f16-exact so both sides see the same inputs, the math is f32 as above, and only the
// output is rounded to f16 (half an ulp: 2^-11 relative, 2.4e-4 absolute below 0.5): 1e-3 covers that with room
// for the f32 error, and is still far below what a wrong key, head or mask would move (about 1e-1).
const F16 = { rtol: 1e-3, atol: 1e-3 };

// Garbage in cache rows past kvLen. Keys: large (f16-representable), so a garbage score that joins a max or a sum
// (1e4 * |q|) moves the output far past any tolerance. Values: NaN, since a read row weighted by a probability of
// exactly 0 would hide a large finite value, and NaN survives the product.
const GARBAGE = 3e4;

interface Case {
  B: number;
  Hkv: number;
  G: number;
  hd: number;
  kvLen: number;
  maxT: number;
  window: number;
  /** Workgroup memory the launch may plan for (smaller values pick the 128- and 64-thread variants). */
  limit?: number;
}

/** q [B, 1, H, hd] and caches [B, maxT, Hkv, hd] with rows past kvLen garbage; the float64 output. */
function inputs(rng: Rng, c: Case, f16: boolean) {
  const H = c.G * c.Hkv, row = c.Hkv * c.hd;
  const r = (a: Float64Array) => f16 ? roundF16(a) : a;
  const q = r(randn(rng, c.B * H * c.hd));
  const kc = r(randn(rng, c.B * c.maxT * row)), vc = r(randn(rng, c.B * c.maxT * row));
  for (let b = 0; b < c.B; b++) {
    for (let i = (b * c.maxT + c.kvLen) * row; i < (b + 1) * c.maxT * row; i++) {
      kc[i] = i % 2 ? GARBAGE : -GARBAGE;
      vc[i] = NaN;
    }
  }
  // the reference sees the visible prefix as a plain [B, kvLen, Hkv, hd] tensor
  const prefix = (a: Float64Array) => {
    const out = new Float64Array(c.B * c.kvLen * row);
    for (let b = 0; b < c.B; b++) {
      out.set(a.subarray(b * c.maxT * row, (b * c.maxT + c.kvLen) * row), b * c.kvLen * row);
    }
    return out;
  };
  const want = refAttention(
    {
      B: c.B,
      T: 1,
      H,
      Hkv: c.Hkv,
      hd: c.hd,
      S: c.kvLen,
      qoff: c.kvLen - 1,
      window: c.window,
      scale: 1 / Math.sqrt(c.hd),
    },
    q,
    prefix(kc),
    prefix(vc),
  ).out;
  return { q, kc, vc, want };
}

function shapeOf(c: Case): AttentionShape {
  return {
    B: c.B,
    T: 1,
    H: c.G * c.Hkv,
    Hkv: c.Hkv,
    hd: c.hd,
    qoff: c.kvLen - 1,
    kvLen: c.kvLen,
    kvBatchStride: c.maxT * c.Hkv * c.hd,
    window: c.window,
    scale: 1 / Math.sqrt(c.hd),
  };
}

/** Runs the kernel directly on each case and checks it against float64. */
async function checkKernel(rt: Runtime, name: string, dtype: "f32" | "f16", cases: Case[]): Promise<void> {
  const rng = testRng(name);
  const tol: Tolerance = dtype === "f16" ? F16 : F32;
  await noGpuErrors(rt, () =>
    rt.scope(async () => {
      const runs = cases.map((c) => {
        const { q, kc, vc, want } = inputs(rng, c, dtype === "f16");
        const H = c.G * c.Hkv;
        const tq = rt.tensor(q, [c.B, 1, H, c.hd], dtype);
        const tk = rt.tensor(kc, [c.B, c.maxT, c.Hkv, c.hd], dtype);
        const tv = rt.tensor(vc, [c.B, c.maxT, c.Hkv, c.hd], dtype);
        const out = rt.empty([c.B, 1, H, c.hd], dtype);
        const l = attentionDecodeGqa(dtype, shapeOf(c), c.limit ?? DECODE_GQA_DEFAULT_STORAGE);
        rt.dev.dispatch(l.spec, [tq.binding, tk.binding, tv.binding, out.binding], l.workgroups, l.uniforms);
        return { c, got: out.read(), want, key: l.spec.key };
      });
      for (const r of runs) {
        assertClose(await r.got, r.want, tol, `${name} ${r.key} ${JSON.stringify(r.c)}`);
      }
    }));
}

// Chunks are 256 keys at 256 threads (hd 32 and 64 and 128 all divide 256 into slices), 128 and 64 keys in the
// smaller variants: kvLen 1, 37 and 300 leave tails of 1, 37 and 44 keys; 300 spans two chunks.
const MAIN: Case[] = [
  { B: 2, Hkv: 2, G: 1, hd: 32, kvLen: 1, maxT: 5, window: 0 },
  { B: 2, Hkv: 2, G: 4, hd: 64, kvLen: 37, maxT: 40, window: 0 },
  { B: 2, Hkv: 1, G: 8, hd: 128, kvLen: 300, maxT: 310, window: 0 },
  { B: 1, Hkv: 3, G: 4, hd: 32, kvLen: 300, maxT: 300, window: 0 },
  // windows: inside one chunk, across a chunk boundary (270 keys from 30), and one no smaller than the cache
  { B: 2, Hkv: 2, G: 4, hd: 64, kvLen: 300, maxT: 303, window: 100 },
  { B: 2, Hkv: 1, G: 1, hd: 32, kvLen: 300, maxT: 301, window: 270 },
  { B: 1, Hkv: 2, G: 8, hd: 64, kvLen: 37, maxT: 40, window: 37 },
  { B: 2, Hkv: 2, G: 1, hd: 128, kvLen: 37, maxT: 39, window: 5 },
  // the window's edge: kvLen = window + 1 drops exactly key 0; window 1 keeps only the query's own key. And a
  // cache filled to capacity (maxT = kvLen, no garbage rows)
  { B: 1, Hkv: 2, G: 4, hd: 32, kvLen: 37, maxT: 37, window: 36 },
  { B: 2, Hkv: 1, G: 4, hd: 64, kvLen: 300, maxT: 301, window: 1 },
  // hd 96: 24 rows a slice, loaded as a block of 16 and a partial block of 8 (chunks of 240 keys at 240 threads)
  { B: 1, Hkv: 2, G: 2, hd: 96, kvLen: 250, maxT: 251, window: 0 },
];

Deno.test(
  "decode GQA kernel (f32): G 1/2/4/8, hd 32/64/96/128, tails, windows, B = 2 over a padded cache",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    await checkKernel(rt, "gqa-f32", "f32", MAIN);
  },
);

Deno.test(
  "decode GQA kernel: the 128- and 64-thread variants of small workgroup memory",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    // 16 KiB: G = 8 at hd 64 takes 128 threads (chunks of 128 keys); 4 KiB: G = 4 at hd 64 takes 64 threads
    assert.equal(decodeGqaConfig(8, 64, 16384)?.wg, 128);
    assert.equal(decodeGqaConfig(4, 64, 4096)?.wg, 64);
    await checkKernel(rt, "gqa-small", "f32", [
      { B: 2, Hkv: 1, G: 8, hd: 64, kvLen: 300, maxT: 302, window: 0, limit: 16384 },
      { B: 1, Hkv: 2, G: 4, hd: 64, kvLen: 150, maxT: 151, window: 100, limit: 4096 },
    ]);
  },
);

Deno.test("decode GQA kernel (f16 storage, f32 math)", gpuTestOptions, async () => {
  const rt = await testRuntime();
  if (!rt.dev.features.f16) return console.warn("decode GQA f16: adapter has no shader-f16");
  await checkKernel(rt, "gqa-f16", "f16", [
    { B: 2, Hkv: 2, G: 4, hd: 64, kvLen: 37, maxT: 40, window: 0 },
    { B: 2, Hkv: 1, G: 8, hd: 128, kvLen: 300, maxT: 301, window: 270 },
    { B: 1, Hkv: 2, G: 1, hd: 32, kvLen: 1, maxT: 3, window: 0 },
  ]);
});

Deno.test("decode GQA kernel: unsupported shapes throw naming the function and the expectation", () => {
  const s = shapeOf({ B: 1, Hkv: 2, G: 4, hd: 64, kvLen: 10, maxT: 10, window: 0 });
  assert.throws(
    () => attentionDecodeGqa("f32", { ...s, T: 2, qoff: 8 }),
    /attentionDecodeGqa: expected one query/,
  );
  assert.throws(() => attentionDecodeGqa("f32", { ...s, qoff: 3 }), /position kvLen - 1 = 9/);
  assert.throws(
    () => attentionDecodeGqa("f32", { ...s, hd: 30 }),
    /attentionDecodeGqa: expected hd a multiple of 4/,
  );
  assert.throws(() => attentionDecodeGqa("f32", { ...s, hd: 260 }), /4\.\.256/);
  // more than 16 query heads per kv head: past the register budget however much workgroup memory there is
  assert.throws(() => attentionDecodeGqa("f32", { ...s, H: 34 }, 49152), /G = H \/ Hkv in 1\.\.16.*G = 17/);
  // 16 heads at hd 256 do not fit the default 16 KiB
  assert.throws(() => attentionDecodeGqa("f32", { ...s, H: 32, hd: 256 }), /16384 bytes .*G = 16/);
  assert.throws(() => attentionDecodeGqa("i32", s), /expected dtype f32 or f16/);
  assert.equal(decodeGqaSupported("f32", 17, 64, 49152), false);
  assert.equal(decodeGqaSupported("f16", 16, 256, 49152), true);
  assert.equal(decodeGqaSupported("f16", 4, 64), true);
});

/** A cache of random rows appended through appendKv (the rows past its length keep the test runtime's NaNs). */
async function viaDecode(
  rt: Runtime,
  name: string,
  c: Omit<Case, "G" | "limit"> & { H: number },
  kernels: (DecodeKernel | undefined)[],
): Promise<string[][]> {
  const rng = testRng(name);
  const { B, H, Hkv, hd, kvLen, maxT, window } = c;
  const cache = new KvCache(rt, B, maxT, Hkv, hd);
  const keys: string[][] = [];
  try {
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        const k = randn(rng, B * kvLen * Hkv * hd), v = randn(rng, B * kvLen * Hkv * hd);
        const q = randn(rng, B * H * hd);
        appendKv(cache, rt.tensor(k, [B, kvLen, Hkv, hd]), rt.tensor(v, [B, kvLen, Hkv, hd]));
        const want = refAttention(
          { B, T: 1, H, Hkv, hd, S: kvLen, qoff: kvLen - 1, window, scale: 1 / Math.sqrt(hd) },
          q,
          k,
          v,
        ).out;
        const tq = rt.tensor(q, [B, 1, H, hd]);
        for (const kernel of kernels) {
          const r = await withKernelKeys(rt, () => decodeAttention(tq, cache, { window, kernel }).read());
          keys.push(r.keys.filter((key) => !key.startsWith("fill_")));
          assertClose(await r.out, want, F32, `${name} kernel ${kernel ?? "default"}`);
        }
      }));
  } finally {
    cache.dispose();
  }
  return keys;
}

Deno.test(
  "decodeAttention: the GQA path and the forced split path agree with float64",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const shape = { B: 2, H: 8, Hkv: 2, hd: 32, kvLen: 70, maxT: 80, window: 0 };
    for (const window of [0, 20]) {
      const [auto, gqa, split] = await viaDecode(rt, `route-${window}`, { ...shape, window }, [
        undefined,
        "gqa",
        "split",
      ]);
      assert.deepEqual(auto, ["attn_decode_gqa_f32_g4_hd32_wg256"], "one dispatch by default");
      assert.deepEqual(gqa, auto);
      assert.ok(split.length >= 1 && split[0].startsWith("attn_fwd_f32_hd32_"), `${split}`);
    }
  },
);

Deno.test(
  "decodeAttention: past DECODE_GQA_MAX_KEYS visible keys the split path runs",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const base = { B: 1, H: 2, Hkv: 1, hd: 8, kvLen: DECODE_GQA_MAX_KEYS + 3, maxT: DECODE_GQA_MAX_KEYS + 4 };
    const [long] = await viaDecode(rt, "long", { ...base, window: 0 }, [undefined]);
    assert.ok(long.every((k) => !k.startsWith("attn_decode_gqa")) && long.length === 2, `${long}`);
    // a sliding window keeps the span short: the GQA kernel again
    const [windowed] = await viaDecode(rt, "long-window", { ...base, window: 64 }, [undefined]);
    assert.deepEqual(windowed, ["attn_decode_gqa_f32_g2_hd8_wg256"]);
  },
);

Deno.test(
  "decodeAttention: forcing the GQA kernel on several query tokens throws",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const cache = new KvCache(rt, 1, 8, 1, 8);
    try {
      rt.scope(() => {
        const kv = rt.tensor(new Float32Array(3 * 8).fill(0.5), [1, 3, 1, 8]);
        appendKv(cache, kv, kv);
        assert.throws(
          () => decodeAttention(rt.zeros([1, 2, 2, 8]), cache, { kernel: "gqa" }),
          /decodeAttention: kernel "gqa" expects n = 1/,
        );
      });
    } finally {
      cache.dispose();
    }
  },
);

Deno.test(
  "ropeAppendDecodeAttention: RoPE, cache append and attention in the one kernel equal the three steps apart",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("decode-gqa-rope");
    // [B, Hkv, G, hd, cached positions before the step, window, RoPE position]
    const cases: [number, number, number, number, number, number, number][] = [
      [2, 2, 4, 64, 37, 0, 37],
      [1, 1, 1, 8, 0, 0, 0], // the first token: the cache holds only what the kernel appends
      [1, 2, 4, 16, 50, 13, 1000], // a window, and a RoPE position unlike the cache position
    ];
    for (const dtype of (rt.dev.features.f16 ? ["f32", "f16"] : ["f32"]) as ("f32" | "f16")[]) {
      const r = (a: Float64Array) => dtype === "f16" ? roundF16(a) : a;
      for (const [B, Hkv, G, hd, len, window, start] of cases) {
        const H = G * Hkv, maxT = len + 3;
        const label = `${dtype} B=${B} G=${G} hd=${hd} len=${len} window=${window} start=${start}`;
        const q = r(randn(rng, B * H * hd)), k = r(randn(rng, B * Hkv * hd)), v = r(randn(rng, B * Hkv * hd));
        const old = r(randn(rng, B * len * Hkv * hd)), oldV = r(randn(rng, B * len * Hkv * hd));
        const invFreq = Float64Array.from({ length: hd / 2 }, (_, i) => Math.pow(10000, (-2 * i) / hd));
        const run = async (kernel: DecodeKernel) =>
          await rt.scope(async () => {
            const cache = new KvCache(rt, B, maxT, Hkv, hd, dtype);
            if (len > 0) {
              appendKv(
                cache,
                rt.tensor(old, [B, len, Hkv, hd], dtype),
                rt.tensor(oldV, [B, len, Hkv, hd], dtype),
              );
            }
            const keys = await withKernelKeys(rt, () =>
              ropeAppendDecodeAttention(
                rt.tensor(q, [B, 1, H, hd], dtype),
                rt.tensor(k, [B, 1, Hkv, hd], dtype),
                rt.tensor(v, [B, 1, Hkv, hd], dtype),
                rt.tensor(invFreq, [hd / 2]),
                cache,
                start,
                { window, kernel },
              ));
            assert.equal(cache.length, len + 1, `${label}: cache length`);
            const [o, kc, vc] = await Promise.all([keys.out.read(), cache.k.read(), cache.v.read()]);
            cache.dispose();
            // (the test runtime poisons new tensors with fill dispatches)
            return { o, kc, vc, keys: keys.keys.filter((x) => !x.startsWith("fill_")) };
          });
        const fused = await run("gqa"), apart = await run("split");
        assert.equal(fused.keys.length, 1, `${label}: one dispatch (${fused.keys})`);
        assert.ok(apart.keys.some((x) => x.startsWith("rope_kv_append")), `${label}: ${apart.keys}`);
        // the same f32 operations on the same inputs, each value rounded to the storage type once: the caches
        // agree to the rounding of the storage type; o differs only by the two kernels' summation orders
        const tol = dtype === "f16" ? F16 : F32;
        const used = (a: ArrayLike<number>) =>
          Array.from(
            { length: B },
            (_, b) => Array.from(a).slice(b * maxT * Hkv * hd, (b * maxT + len + 1) * Hkv * hd),
          )
            .flat();
        assertClose(used(fused.kc), used(apart.kc), tol, `${label}: k cache`);
        assertClose(used(fused.vc), used(apart.vc), { rtol: 0, atol: 0 }, `${label}: v cache`);
        assertClose(fused.o, apart.o, tol, `${label}: o`);
      }
    }
  },
);
