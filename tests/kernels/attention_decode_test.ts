import assert from "node:assert/strict";
import {
  appendKv,
  attention,
  decodeAttention,
  type DecodeKernel,
  KvCache,
  ropeAppendKv,
} from "../../runtime/ops/attention.ts";
import { rope, ropeInverseFrequencies } from "../../runtime/ops/rope.ts";
import { refRope } from "../reference/dense.ts";
import { assertClose, gpuTestOptions, randn, roundF16, testRng, testRuntime } from "../helpers/gpu.ts";
import { noGpuErrors } from "../helpers/gpu_errors.ts";
import { refAttention } from "../reference/attention.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import type { RowTiles } from "../../kernels/attention.ts";
import { planDecodeAttention } from "../../kernels/attention_decode.ts";

// same reductions as the forward kernel, plus the split combine (one more exp/log per split)
const TOL = { rtol: 3e-5, atol: 3e-6 };

interface Cfg {
  B: number;
  H: number;
  Hkv: number;
  hd: number;
  window: number;
  maxT: number;
  dtype?: "f32" | "f16";
  targetWorkgroups?: number;
  tiles?: RowTiles;
  /** The decode kernel (default: decodeAttention's choice, the GQA kernel for the single-token steps). */
  kernel?: DecodeKernel;
}

/**
 * A decoding session: a sequence grows by chunks (prefill, single steps, K+1-token verification chunks) and is
 * truncated as a speculative decoder would. Each decode output is checked against the float64 attention of the
 * current sequence; at the end the rows of the last chunk are checked against the GPU's full-sequence forward.
 */
async function runSession(name: string, cfg: Cfg, chunks: (number | { truncate: number })[]): Promise<void> {
  const rt = await testRuntime();
  const rng = testRng(name);
  const { B, H, Hkv, hd, window } = cfg;
  const dtype = cfg.dtype ?? "f32";
  // f16 storage: inputs are drawn f16-exact, outputs are rounded to f16 (about 5e-4 relative)
  const tol = dtype === "f16" ? { rtol: 2e-3, atol: 2e-3 } : TOL;
  const r16 = (a: Float64Array) => dtype === "f16" ? roundF16(a) : a;
  const cache = new KvCache(rt, B, cfg.maxT, Hkv, hd, dtype);
  // the current sequence, per batch entry, as [pos][head][d] flattened per position
  let qs: Float64Array[][] = Array.from({ length: B }, () => []);
  let ks: Float64Array[][] = Array.from({ length: B }, () => []);
  let vs: Float64Array[][] = Array.from({ length: B }, () => []);
  const checks: { got: Promise<ArrayLike<number>>; want: Float64Array; what: string }[] = [];
  try {
    await noGpuErrors(rt, () =>
      rt.scope(async () => {
        for (const chunk of chunks) {
          if (typeof chunk !== "number") {
            cache.truncate(chunk.truncate);
            qs = qs.map((a) => a.slice(0, chunk.truncate));
            ks = ks.map((a) => a.slice(0, chunk.truncate));
            vs = vs.map((a) => a.slice(0, chunk.truncate));
            continue;
          }
          const n = chunk;
          const q = r16(randn(rng, B * n * H * hd)),
            k = r16(randn(rng, B * n * Hkv * hd)),
            v = r16(randn(rng, B * n * Hkv * hd));
          for (let b = 0; b < B; b++) {
            for (let t = 0; t < n; t++) {
              qs[b].push(q.slice((b * n + t) * H * hd, (b * n + t + 1) * H * hd));
              ks[b].push(k.slice((b * n + t) * Hkv * hd, (b * n + t + 1) * Hkv * hd));
              vs[b].push(v.slice((b * n + t) * Hkv * hd, (b * n + t + 1) * Hkv * hd));
            }
          }
          appendKv(cache, rt.tensor(k, [B, n, Hkv, hd], dtype), rt.tensor(v, [B, n, Hkv, hd], dtype));
          const out = decodeAttention(rt.tensor(q, [B, n, H, hd], dtype), cache, {
            window,
            targetWorkgroups: cfg.targetWorkgroups,
            tiles: cfg.tiles,
            kernel: cfg.kernel,
          });
          const S = cache.length;
          const flat = (a: Float64Array[][]) => {
            const r = new Float64Array(B * S * a[0][0].length);
            a.forEach((rows, b) => rows.forEach((x, t) => r.set(x, (b * S + t) * x.length)));
            return r;
          };
          const ref = refAttention(
            { B, T: n, H, Hkv, hd, S, qoff: S - n, window, scale: 1 / Math.sqrt(hd) },
            q,
            flat(ks),
            flat(vs),
          );
          const step = `len ${S} n ${n}`;
          checks.push({ got: out.read(), want: ref.out, what: `decode ${name} ${step}` });
        }
        // decode rows == rows of the full-sequence forward on the GPU
        const S = cache.length;
        const flat = (a: Float64Array[][], heads: number) => {
          const r = new Float64Array(B * S * heads * hd);
          a.forEach((rows, b) => rows.forEach((x, t) => r.set(x, (b * S + t) * heads * hd)));
          return r;
        };
        const full = attention(
          rt.tensor(flat(qs, H), [B, S, H, hd], dtype),
          rt.tensor(flat(ks, Hkv), [B, S, Hkv, hd], dtype),
          rt.tensor(flat(vs, Hkv), [B, S, Hkv, hd], dtype),
          { window },
        );
        const last = chunks[chunks.length - 1] as number;
        const q = flat(qs, H);
        const tail = new Float64Array(B * last * H * hd);
        for (let b = 0; b < B; b++) {
          tail.set(q.subarray((b * S + S - last) * H * hd, (b * S + S) * H * hd), b * last * H * hd);
        }
        const dec = decodeAttention(rt.tensor(tail, [B, last, H, hd], dtype), cache, {
          window,
          targetWorkgroups: cfg.targetWorkgroups,
          tiles: cfg.tiles,
          kernel: cfg.kernel,
        });
        const [fo, dOut] = await Promise.all([full.read(), dec.read()]);
        const rows = new Float64Array(B * last * H * hd);
        for (let b = 0; b < B; b++) {
          rows.set(fo.subarray((b * S + S - last) * H * hd, (b * S + S) * H * hd), b * last * H * hd);
        }
        assertClose(dOut, rows, tol, `decode ${name}: last chunk vs full forward rows`);
        const got = await Promise.all(checks.map((c) => c.got));
        checks.forEach((c, i) => assertClose(got[i], c.want, tol, c.what));
      }));
  } finally {
    cache.dispose();
  }
}

Deno.test(
  "decode attention: prefill, steps, K+1 verification and truncation match float64 and the full forward",
  gpuTestOptions,
  async () => {
    // Split-K forced on (a high workgroup target) and off (a target of one workgroup).
    const chunks = [9, 1, 1, 5, { truncate: 13 }, 5, { truncate: 16 }, 1, 3];
    // small key tiles so that even these short caches split into several pieces
    const small: RowTiles = { br: 8, bc: 8, tm: 1, tn: 4 };
    const shape = {
      B: 1,
      T: 1,
      H: 8,
      Hkv: 2,
      hd: 16,
      qoff: 20,
      kvLen: 21,
      kvBatchStride: 0,
      window: 0,
      scale: 1,
    };
    assert.equal(
      planDecodeAttention("f32", shape, small, 4096).nSplits,
      3,
      "the split session really splits",
    );
    assert.equal(planDecodeAttention("f32", shape, small, 1).nSplits, 1);
    // the split path even for the single-token steps, which would otherwise take the GQA kernel
    const cfg = { B: 1, H: 8, Hkv: 2, hd: 16, window: 0, maxT: 40, tiles: small, kernel: "split" as const };
    await runSession("split", { ...cfg, targetWorkgroups: 4096 }, chunks);
    await runSession("split-window", { ...cfg, window: 6, targetWorkgroups: 4096 }, chunks);
    await runSession(
      "nosplit",
      { B: 1, H: 4, Hkv: 4, hd: 16, window: 0, maxT: 40, targetWorkgroups: 1 },
      chunks,
    );
  },
);

Deno.test(
  "decode attention: batch 2, GQA 4, long cache over many splits, sliding window",
  gpuTestOptions,
  async () => {
    const split = "split" as const;
    await runSession("long", {
      B: 2,
      H: 8,
      Hkv: 2,
      hd: 16,
      window: 0,
      maxT: 300,
      targetWorkgroups: 64,
      kernel: split,
    }, [
      257,
      1,
      5,
      { truncate: 259 },
      2,
    ]);
    await runSession("window", {
      B: 2,
      H: 4,
      Hkv: 1,
      hd: 16,
      window: 7,
      maxT: 120,
      targetWorkgroups: 512,
      kernel: split,
    }, [
      100,
      1,
      5,
      { truncate: 102 },
      3,
    ]);
    // the same session on decodeAttention's own choice: the single-token step takes the GQA kernel
    await runSession("window-default", { B: 2, H: 4, Hkv: 1, hd: 16, window: 7, maxT: 120 }, [
      100,
      1,
      5,
      { truncate: 102 },
      1,
    ]);
  },
);

// (head dim 128 shares this code path; the attention tests cover its tiles)
Deno.test("decode attention: head dim 64", gpuTestOptions, async () => {
  await runSession("hd64", { B: 1, H: 4, Hkv: 1, hd: 64, window: 0, maxT: 80, targetWorkgroups: 256 }, [
    70,
    1,
    5,
  ]);
});

Deno.test(
  "decode attention: f16 cache and queries (f32 math, f32 split partials)",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) return;
    await runSession("f16", {
      B: 1,
      H: 4,
      Hkv: 2,
      hd: 16,
      window: 0,
      maxT: 300,
      targetWorkgroups: 64,
      dtype: "f16",
      kernel: "split",
    }, [
      200,
      1,
      5,
      { truncate: 202 },
      3,
    ]);
  },
);

Deno.test("KV cache: capacity, truncation and shape errors", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const cache = new KvCache(rt, 1, 4, 2, 8);
  try {
    rt.scope(() => {
      const kv: Tensor = rt.zeros([1, 3, 2, 8]);
      appendKv(cache, kv, kv);
      assert.equal(cache.length, 3);
      assert.throws(() => appendKv(cache, kv, kv), /exceed the cache capacity 4/);
      assert.throws(() => cache.truncate(5), /outside 0..3/);
      cache.truncate(1);
      assert.equal(cache.length, 1);
      assert.throws(
        () => appendKv(cache, rt.zeros([1, 1, 3, 8]), rt.zeros([1, 1, 3, 8])),
        /do not fit cache/,
      );
      assert.throws(() => decodeAttention(rt.zeros([1, 2, 4, 8]), cache), /only 1 cached/);
    });
  } finally {
    cache.dispose();
  }
});

Deno.test(
  "ropeAppendKv: RoPE on q and k plus the cache append in one dispatch equals float64 RoPE and the unfused ops",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("rope-append");
    const [H, Hkv, hd, maxT] = [4, 2, 12, 24];
    const invFreq = ropeInverseFrequencies(hd, 10000);
    // f32 angle as the kernel forms it: one rounding of position x inv_freq
    const angleAt = (start: number, n: number) => (t: number, i: number) =>
      Math.fround(Math.fround(start + (t % n)) * invFreq[i]);
    for (const [B, prefill, n] of [[1, 5, 1], [2, 3, 4], [1, 0, 7]]) {
      await rt.scope(async () => {
        const freq = rt.tensor(invFreq, [hd / 2]);
        const fused = new KvCache(rt, B, maxT, Hkv, hd), plain = new KvCache(rt, B, maxT, Hkv, hd);
        const fill = randn(rng, B * prefill * Hkv * hd);
        if (prefill > 0) {
          for (const c of [fused, plain]) {
            const t = rt.tensor(fill, [B, prefill, Hkv, hd]);
            appendKv(c, t, t);
          }
        }
        const q = randn(rng, B * n * H * hd),
          k = randn(rng, B * n * Hkv * hd),
          v = randn(rng, B * n * Hkv * hd);
        const tq = rt.tensor(q, [B, n, H, hd]), tk = rt.tensor(k, [B, n, Hkv, hd]);
        const tv = rt.tensor(v, [B, n, Hkv, hd]);
        const before = rt.dev.stats.dispatches;
        const qRot = ropeAppendKv(tq, tk, tv, freq, fused, prefill);
        assert.ok(rt.dev.stats.dispatches - before <= 2, "one dispatch (+ the poison fill of q_out)");
        assert.equal(fused.length, prefill + n);
        appendKv(plain, rope(tk, freq, { start: prefill }), tv);
        const qPlain = rope(tq, freq, { start: prefill });
        const [gotQ, gotK, gotV, wantQ, plainK, plainV] = await Promise.all([
          qRot.read(),
          fused.k.read(),
          fused.v.read(),
          qPlain.read(),
          plain.k.read(),
          plain.v.read(),
        ]);
        const angle = angleAt(prefill, n);
        // sincos_accurate is within about 1e-7 of cos/sin of the f32 angle; the rotation adds f32 rounding
        const tol = { rtol: 1e-6, atol: 1e-6 };
        assertClose(gotQ, refRope(q, B * n, H, hd, angle), tol, `q B=${B} n=${n}`);
        assertClose(gotQ, wantQ, { rtol: 1e-7, atol: 1e-7 }, `q vs rope B=${B} n=${n}`);
        const refK = refRope(k, B * n, Hkv, hd, angle);
        const row = Hkv * hd;
        for (let b = 0; b < B; b++) {
          const at = (b * maxT + prefill) * row, len = n * row;
          assertClose(gotK.subarray(at, at + len), refK.subarray(b * len, (b + 1) * len), tol, `k b=${b}`);
          assert.deepEqual([...gotV.subarray(at, at + len)], [
            ...Float32Array.from(v.subarray(b * len, (b + 1) * len)),
          ]);
          // the earlier positions keep what was there
          assertClose(gotK.subarray(b * maxT * row, at), plainK.subarray(b * maxT * row, at), {
            rtol: 0,
            atol: 0,
          }, "prefix");
        }
        assertClose(
          gotK.subarray(0, B * maxT * row).filter((_, i) => (i % (maxT * row)) < (prefill + n) * row),
          plainK.filter((_, i) => i < B * maxT * row && (i % (maxT * row)) < (prefill + n) * row),
          { rtol: 1e-7, atol: 1e-7 },
          "k vs unfused",
        );
        assertClose(
          gotV.filter((_, i) => (i % (maxT * row)) < (prefill + n) * row),
          plainV.filter((_, i) => (i % (maxT * row)) < (prefill + n) * row),
          { rtol: 0, atol: 0 },
          "v vs unfused",
        );
        fused.dispose();
        plain.dispose();
      });
    }
  },
);
