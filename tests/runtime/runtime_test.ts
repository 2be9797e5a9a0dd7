import assert from "node:assert/strict";
import { assertClose, F32_TOL, gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";
import {
  DAWN_FLUSH_EVERY,
  earlySubmitAfter,
  FLUSH_EVERY_ENV_VAR,
  flushEveryFor,
} from "../../runtime/device.ts";

Deno.test("runtime: upload, read back, fill, axpy and clone on f32/i32/f16", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("upload");
  const x = randn(rng, 1000);
  const y = randn(rng, 1000);
  await rt.scope(async () => {
    const tx = rt.tensor(x, [10, 100]);
    const ty = rt.tensor(y, [1000]);
    rt.axpyInPlace(ty, tx, 0.5);
    const c = rt.clone(ty);
    const ones = rt.full([3], 7, "i32");
    const h = rt.tensor([1.5, -2.25, 3], [3], "f16");
    const [gy, gc, gi, gh] = await Promise.all([ty.read(), c.read(), ones.read(), h.read()]);
    assertClose(gy, x.map((v, i) => y[i] + 0.5 * v), F32_TOL, "axpy");
    assertClose(gc, gy, { rtol: 0, atol: 0 }, "clone");
    assert.deepEqual([...gi], [7, 7, 7]);
    assert.deepEqual([...gh], [1.5, -2.25, 3]);
  });
});

Deno.test("runtime: axpy on f32 and f16, four elements a thread and one", gpuTestOptions, async () => {
  const rt = await testRuntime();
  const rng = testRng("axpy-sizes");
  for (const n of [1000, 999]) {
    for (const dtype of ["f32", "f16"] as const) {
      if (dtype === "f16" && !rt.dev.features.f16) continue;
      const half = (v: Float64Array) => (dtype === "f16" ? Float64Array.from(Float16Array.from(v)) : v);
      const x = half(randn(rng, n)), y = half(randn(rng, n));
      await rt.scope(async () => {
        const ty = rt.tensor(y, [n], dtype);
        rt.axpyInPlace(ty, rt.tensor(x, [n], dtype), -1.5);
        const tol = dtype === "f16" ? { rtol: 2e-3, atol: 2e-3 } : F32_TOL;
        assertClose(await ty.read(), x.map((v, i) => y[i] - 1.5 * v), tol, `axpy ${dtype} n=${n}`);
      });
    }
  }
});

Deno.test(
  "runtime: poisoned tensors read NaN until written, and scopes release what they made",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const before = rt.pool.stats.liveBytes;
    const kept = await rt.scope(async () => {
      const t = rt.empty([5]);
      const v = await t.read();
      assert.ok([...v].every(Number.isNaN), "new tensors are poisoned");
      rt.empty([1000]);
      return rt.zeros([4]);
    });
    assert.deepEqual([...await kept.read()], [0, 0, 0, 0]);
    kept.dispose();
    assert.equal(rt.pool.stats.liveBytes, before);
  },
);

Deno.test("runtime: many dispatches batch into one submit per read", gpuTestOptions, async () => {
  const rt = await testRuntime();
  await rt.scope(async () => {
    const t = rt.zeros([64]);
    const one = rt.full([64], 1);
    const s0 = rt.dev.stats.submits;
    for (let i = 0; i < 50; i++) rt.axpyInPlace(t, one, 1);
    const v = await t.read();
    assert.equal(v[0], 50);
    // the read's submit, and on Dawn the early submits of the ramp (after 8 and 24 dispatches at most)
    const early = rt.dev.provider === "dawn" ? 2 : 0;
    assert.ok(rt.dev.stats.submits - s0 <= 2 + early, `submits: ${rt.dev.stats.submits - s0}`);
  });
});

Deno.test(
  "runtime: an invalid dispatch makes the next read throw instead of returning stale memory",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const { axpyKernel } = await import("../../kernels/fill.ts");
    await rt.scope(async () => {
      const t = rt.zeros([64]);
      const l = axpyKernel("f32", 64, 1);
      // the same buffer bound read-only and writable is a validation error
      rt.dev.dispatch(l.spec, [t.binding, t.binding], l.workgroups, l.uniforms);
      await assert.rejects(() => t.read(), /WebGPU error/);
      // the whole invalid submit was dropped; later work runs normally
      assert.deepEqual([...await rt.full([2], 3).read()], [3, 3], "later reads work again");
    });
  },
);

/** Submits of `iterations` axpy dispatches after a read, and their sum, in a child process with the setting. */
async function earlySubmits(
  flushEvery: number,
  iterations: number,
): Promise<{ sum: number; submits: number }> {
  // the setting is read once per process, so the check runs in a child process
  const script = `
    import { testRuntime } from "${new URL("../helpers/gpu.ts", import.meta.url).href}";
    const rt = await testRuntime();
    await rt.scope(async () => {
      const t = rt.zeros([64]);
      const one = rt.full([64], 1);
      await t.read(); // a wait: the ramp of early submits starts over
      const s0 = rt.dev.stats.submits;
      // uniforms differ per dispatch, so an early submit that lost or reordered them shows in the sum
      for (let i = 1; i <= ${iterations}; i++) rt.axpyInPlace(t, one, i);
      const v = await t.read();
      console.log(JSON.stringify({ sum: v[0], submits: rt.dev.stats.submits - s0 }));
    });`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", script],
    env: { DISTILLERY_FLUSH_EVERY: String(flushEvery) },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1)!);
}

Deno.test(
  "runtime: DISTILLERY_FLUSH_EVERY submits every N dispatches, sooner after a wait, and keeps program order",
  async () => {
    const every3 = await earlySubmits(3, 50);
    assert.equal(every3.sum, (50 * 51) / 2);
    assert.equal(every3.submits, 17, "50 dispatches at 3 per submit: 16 early submits and the read's");
    // at 128 per submit, the first early submits after a wait come after 8, 16 and 32 more dispatches
    const ramp = await earlySubmits(128, 60);
    assert.equal(ramp.sum, (60 * 61) / 2);
    assert.equal(ramp.submits, 4, "60 dispatches after a wait: submits after 8, 24 and 56, then the read's");
  },
);

Deno.test("runtime: early submits after a wait start at 8 dispatches and double up to the setting", () => {
  assert.deepEqual([0, 1, 2, 3, 4, 5, 40].map((k) => earlySubmitAfter(128, k)), [
    8,
    16,
    32,
    64,
    128,
    128,
    128,
  ]);
  assert.equal(earlySubmitAfter(3, 0), 3);
  assert.equal(earlySubmitAfter(0, 2), 0);
});

Deno.test("runtime: early submits are on by default on Dawn only; the environment overrides both", () => {
  const saved = Deno.env.get(FLUSH_EVERY_ENV_VAR);
  try {
    Deno.env.delete(FLUSH_EVERY_ENV_VAR);
    assert.equal(flushEveryFor("dawn"), DAWN_FLUSH_EVERY);
    assert.equal(flushEveryFor("builtin"), 0);
    Deno.env.set(FLUSH_EVERY_ENV_VAR, "0");
    assert.equal(flushEveryFor("dawn"), 0);
    Deno.env.set(FLUSH_EVERY_ENV_VAR, "40");
    assert.equal(flushEveryFor("builtin"), 40);
    Deno.env.set(FLUSH_EVERY_ENV_VAR, "many");
    assert.equal(flushEveryFor("dawn"), 0);
  } finally {
    if (saved === undefined) Deno.env.delete(FLUSH_EVERY_ENV_VAR);
    else Deno.env.set(FLUSH_EVERY_ENV_VAR, saved);
  }
});
