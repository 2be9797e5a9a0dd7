// Pass timestamps for benchmarks (GpuDevice.startPassTiming / stopPassTiming, bench/harness.ts gpuTimeline):
// one [begin, end] per compute pass in submission order, passes beyond the capacity counted, one pass per
// dispatch on request (with each pass's kernel), and the busy / span / wall split ordered as it must be
// (busy <= span <= wall).
import assert from "node:assert/strict";
import { matmul } from "../../runtime/ops/matmul.ts";
import { gpuTimeline, profileInStream } from "../../bench/harness.ts";
import { add } from "../../runtime/ops/elementwise.ts";
import { gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";
import type { Runtime } from "../../runtime/runtime.ts";

/** The test runtime, or null (with a note) on an adapter without timestamp queries. */
async function timestampRuntime(): Promise<Runtime | null> {
  const rt = await testRuntime();
  if (rt.dev.features.timestamps) return rt;
  console.log("skipped: this adapter has no timestamp-query");
  return null;
}

Deno.test(
  "pass timing: one timestamp pair per compute pass, in order; passes past the capacity counted",
  gpuTestOptions,
  async () => {
    const rt = await timestampRuntime();
    if (!rt) return;
    const rng = testRng("pass-timing");
    const a = rt.tensor(Float32Array.from(randn(rng, 64 * 64)), [64, 64]).keep();
    try {
      assert.equal(await rt.dev.stopPassTiming(), undefined, "stop without start");
      assert.ok(rt.dev.startPassTiming());
      assert.equal(rt.dev.startPassTiming(), false, "a second start while timing");
      // three submits of one pass each (a flush ends the pass), each with real work
      for (let i = 0; i < 3; i++) {
        rt.scope(() => void matmul(matmul(a, a), a));
        rt.dev.flush();
      }
      const t = (await rt.dev.stopPassTiming())!;
      assert.equal(t.begin.length, 3);
      assert.equal(t.untimed, 0);
      assert.equal(t.begin[0], 0, "times are relative to the first pass");
      for (let i = 0; i < 3; i++) {
        assert.ok(t.end[i] >= t.begin[i], `pass ${i}: ${t.begin[i]} -> ${t.end[i]}`);
        if (i > 0) assert.ok(t.begin[i] >= t.end[i - 1] - 1e-3, `pass ${i} began before pass ${i - 1} ended`);
      }
      // capacity of one pass: the other two are counted, not timed
      assert.ok(rt.dev.startPassTiming(1));
      for (let i = 0; i < 3; i++) {
        rt.scope(() => void matmul(a, a));
        rt.dev.flush();
      }
      const capped = (await rt.dev.stopPassTiming())!;
      assert.deepEqual([capped.begin.length, capped.untimed], [1, 2]);

      // one pass per dispatch: a key per timed pass, in recording order, within one submit (the test runtime's
      // poison fills of new tensors are dispatches too)
      rt.poisonNewTensors = false;
      assert.ok(rt.dev.startPassTiming(2, { perDispatch: true }));
      rt.scope(() => void add(matmul(a, a), a));
      rt.scope(() => void matmul(a, a));
      const each = (await rt.dev.stopPassTiming())!;
      assert.equal(each.keys?.length, 2);
      assert.ok(each.keys[0].startsWith("matmul") && !each.keys[1].startsWith("matmul"), each.keys.join());
      assert.equal(each.untimed, 1);
      const prof = (await profileInStream(rt, async () => {
        for (let i = 0; i < 2; i++) rt.scope(() => void add(matmul(a, a), a));
        await rt.dev.sync();
      }))!;
      assert.deepEqual(prof.kernels.map((k) => k.dispatches), [2, 2], JSON.stringify(prof.kernels));
      // a 64x64 product can take less than the H200's timestamp step: 0 there, never negative
      assert.ok(prof.kernels.every((k) => k.ms >= 0 && Number.isFinite(k.ms)), JSON.stringify(prof.kernels));
      rt.poisonNewTensors = true;

      const tl = (await gpuTimeline(rt, async () => {
        for (let i = 0; i < 2; i++) {
          rt.scope(() => void matmul(matmul(a, a), a));
          await rt.dev.sync();
        }
      }))!;
      assert.equal(tl.passes, 2);
      // a few 64x64 products can take less than one step of the H200's timestamps: busy 0 there
      assert.ok(tl.busyMs >= 0, JSON.stringify(tl));
      assert.ok(tl.busyMs <= tl.spanMs + 1e-6, JSON.stringify(tl));
      // GPU and CPU clocks differ in resolution; the span cannot exceed the wall time by more than that
      assert.ok(tl.spanMs <= tl.wallMs * 1.05 + 1, JSON.stringify(tl));
    } finally {
      a.dispose();
    }
  },
);

Deno.test(
  "pass timing: more passes than one query set holds are all timed, in order, across sets",
  gpuTestOptions,
  async () => {
    const rt = await timestampRuntime();
    if (!rt) return;
    const x = rt.tensor(Float32Array.from({ length: 8 }, (_, i) => i + 1), [8]).keep();
    rt.poisonNewTensors = false;
    try {
      // 2,050 one-dispatch passes: past the 2,048 a query set of 4,096 timestamps holds
      const n = 2050;
      assert.ok(rt.dev.startPassTiming(n + 10, { perDispatch: true }));
      for (let i = 0; i < n; i++) rt.scope(() => void add(x, x));
      const t = (await rt.dev.stopPassTiming())!;
      assert.deepEqual([t.begin.length, t.keys?.length, t.untimed], [n, n, 0]);
      for (let i = 1; i < n; i++) {
        // passes of one queue run in order; the second set's times share the first's origin
        assert.ok(t.begin[i] >= t.begin[i - 1] - 1e-3, `pass ${i} began before pass ${i - 1}`);
        assert.ok(t.end[i] >= t.begin[i], `pass ${i}: ${t.begin[i]} -> ${t.end[i]}`);
      }
    } finally {
      rt.poisonNewTensors = true;
      x.dispose();
    }
  },
);
