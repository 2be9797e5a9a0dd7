import assert from "node:assert/strict";
import {
  checkDeviceLimits,
  distillDefaults,
  fitShape,
  memoryPlan,
  runDistillFit,
} from "../../bench/distill_fit.ts";
import { parseMemoryLine } from "../../bench/gpu_memory.ts";
import { sizeClass } from "../../runtime/pool.ts";
import { trainablePredicate } from "../../stages/shared/training.ts";
import { UserError } from "../../util/errors.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

const mamba = trainablePredicate("mamba");

Deno.test("distill_fit: the Zephyr-7B shape and its 50% hybrid have the published and mapped sizes", () => {
  const shape = fitShape("zephyr-7b");
  assert.deepEqual(shape.mamba.attnLayers, Array.from({ length: 16 }, (_, i) => 2 * i + 1));
  assert.equal(shape.teacher.headDim, 128);
  assert.equal(shape.teacher.tieWordEmbeddings, false);
  // method.md: d_inner = H hd, d_xb = Hkv hd, d_state = hd, ngroups = H
  assert.deepEqual(
    [shape.mamba.dInner, shape.mamba.dXb, shape.mamba.dState, shape.mamba.nHeads],
    [4096, 1024, 128, 32],
  );
  const plan = memoryPlan(shape, { batch: 1, seqLen: 2048, trainable: mamba });
  const params = (owner: string) =>
    plan.groups.filter((g) => g.owner === owner).reduce((a, g) => a + g.elements, 0);
  assert.equal(params("teacher"), 7_241_732_096, "Mistral-7B's parameter count");
  // per Mamba2 layer: in_proj (2*4096 + 2*1024 + 32) x 4096, conv 6144 x 4 + 6144, three [32], norm 4096, out_proj
  const perLayer = 10272 * 4096 + 6144 * 5 + 3 * 32 + 4096 + 4096 * 4096;
  assert.equal(plan.trainableParams, 16 * perLayer);
  assert.equal(params("student"), 7_241_732_096 - 16 * 4096 * 10240 + 16 * perLayer);
  assert.equal(plan.momentBytes, 2 * plan.gradBytes, "f32 gradients, two f32 moments");
  assert.equal(plan.staticBytes, plan.paramBytes + plan.gradBytes + plan.momentBytes);
  // everything the student does not train is the teacher's: 16 attention layers fewer than the teacher's 7.24 B
  assert.equal(plan.sharedParams, 7_241_732_096 - 16 * 4096 * 10240);
  const unshared = memoryPlan(shape, { batch: 1, seqLen: 2048, trainable: mamba, share: false });
  assert.equal(unshared.sharedParams, 0);
  assert.equal(
    plan.paramBytes,
    unshared.paramBytes - plan.sharedBytes,
    "the static plan drops by the shared bytes",
  );
  assert.equal(plan.estimatedPeakBytes, unshared.estimatedPeakBytes - plan.sharedBytes);
  // the paper budget of the module comment
  const gib = (b: number) => Math.round((b / 2 ** 30) * 10) / 10;
  assert.deepEqual(
    [gib(plan.paramBytes), gib(plan.staticBytes), gib(plan.estimatedPeakBytes), gib(plan.sharedBytes)],
    [31.0, 43.0, 67.3, 24.5],
  );
  assert.deepEqual(
    [gib(unshared.paramBytes), gib(unshared.staticBytes), gib(unshared.estimatedPeakBytes)],
    [55.5, 67.5, 91.8],
  );
  // trainable sets: mamba_mlp still shares norms, embeddings, lm_head and kept attention; all shares nothing
  const mlp = memoryPlan(shape, { batch: 1, seqLen: 2048, trainable: trainablePredicate("mamba_mlp") });
  assert.equal(mlp.sharedParams, 2 * 32000 * 4096 + 65 * 4096 + 16 * 4096 * 10240);
  const all = memoryPlan(shape, { batch: 1, seqLen: 2048, trainable: trainablePredicate("all") });
  assert.equal(all.sharedParams, 0);
  const f16 = memoryPlan(shape, { teacherDtype: "f16", batch: 1, seqLen: 2048, trainable: mamba });
  assert.equal(f16.sharedParams, 0, "the f32 student cannot borrow f16 tensors");
  // the teacher's matrices halve (13.5 GiB) and so do its 65 norm vectors (8 KiB each)
  assert.equal(
    unshared.paramBytes - f16.paramBytes,
    13.5 * 2 ** 30 + 65 * 8192,
    "an f16 teacher halves its 27 GiB",
  );
  assert.throws(() => fitShape("gpt-2"), UserError);
});

Deno.test("distill_fit: a tensor over the device's buffer or binding limit stops the run, naming it", () => {
  const plan = memoryPlan(fitShape("zephyr-7b"), { batch: 8, seqLen: 2048, trainable: mamba });
  const embed = sizeClass(32000 * 4096 * 4);
  assert.throws(
    () => checkDeviceLimits(plan, { maxBufferSize: embed - 1, maxStorageBufferBindingSize: 2 ** 40 }),
    (e: Error) =>
      e instanceof UserError && /teacher tensor model\.embed_tokens\.weight/.test(e.message) &&
      /maxBufferSize/.test(e.message),
  );
  assert.throws(
    () => checkDeviceLimits(plan, { maxBufferSize: 2 ** 40, maxStorageBufferBindingSize: 256 * 2 ** 20 }),
    (e: Error) =>
      e instanceof UserError && /model\.embed_tokens\.weight/.test(e.message) &&
      /maxStorageBufferBindingSize/.test(e.message),
  );
  // 8 x 2048 f32 logits are 1.95 GiB: over a 1 GiB binding, but the lm_head matmul and the loss split them
  checkDeviceLimits(plan, { maxBufferSize: 2 ** 40, maxStorageBufferBindingSize: 2 ** 30 });
  assert.throws(
    () => checkDeviceLimits(plan, { maxBufferSize: 2 ** 30, maxStorageBufferBindingSize: 2 ** 30 }),
    (e: Error) => e instanceof UserError && /activation tensor logits/.test(e.message),
  );
});

Deno.test(
  "distill_fit: distill steps of a tiny hybrid run end to end, with and without sharing; memory as planned",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const shape = fitShape("tiny");
    const allocated: number[] = [];
    let sharedBytes = 0;
    for (const share of [true, false]) {
      // no free buffers from an earlier run, so the high-water mark counts this run's allocations
      rt.pool.trim();
      const live0 = rt.pool.stats.liveBytes, held0 = live0 + rt.pool.stats.freeBytes;
      const rows: Record<string, unknown>[] = [];
      const r = await runDistillFit(rt, {
        shape,
        seqLen: 32,
        warmupSteps: 1,
        steps: 2,
        lr: 1e-3,
        share,
        log: (row) => rows.push(row),
      });
      const what = share ? "shared" : "unshared";
      assert.equal(r.steps.length, 3);
      assert.equal(r.stoppedEarly, false);
      assert.deepEqual(r.steps.map((s) => s.warmup), [true, false, false]);
      const losses = r.steps.map((s) => s.metrics.loss);
      assert.ok(losses.every(Number.isFinite) && r.steps.every((s) => s.metrics.kl > 0), `losses ${losses}`);
      assert.ok(losses[1] < losses[0] && losses[2] < losses[1], `${what}: loss did not fall: ${losses}`);
      assert.ok(r.medianStepMs! > 0 && r.tokensPerS! > 0);
      // the models and the optimizer took what the plan says, plus the optimizer's and RoPE's few small buffers
      const planned = r.plan.paramBytes + r.plan.momentBytes;
      assert.ok(
        r.allocatedBytes >= planned && r.allocatedBytes - planned <= 8 * 256,
        `${what}: allocated ${r.allocatedBytes}, planned ${planned}`,
      );
      allocated.push(r.allocatedBytes);
      if (share) sharedBytes = r.plan.sharedBytes;
      else assert.equal(r.plan.sharedBytes, 0);
      // at the peak every gradient existed beside the parameters and moments, plus the step's activations
      assert.ok(
        r.peakBytes >= held0 + r.plan.staticBytes,
        `peak ${r.peakBytes}, static ${r.plan.staticBytes}`,
      );
      const measured = r.peakBytes - held0 - r.plan.staticBytes;
      const estimated = r.plan.estimatedPeakBytes - r.plan.staticBytes;
      assert.ok(
        Math.abs(measured - estimated) <= 0.1 * estimated,
        `${what}: activations at peak: measured ${measured} bytes, estimated ${estimated}`,
      );
      assert.equal(rt.pool.stats.liveBytes, live0, "everything released");
      assert.ok(rows.some((x) => x.what === "tensor_group" && x.group === "mamba"));
      assert.equal(rows.some((x) => x.what === "tensor_group" && x.group === "shared"), share);
      assert.equal(rows.filter((x) => x.what === "step").length, 3);
    }
    // the student's frozen tensors (embeddings, lm_head, norms, MLPs, the kept attention layer) are the teacher's
    assert.ok(sharedBytes > 0);
    assert.equal(allocated[1] - allocated[0], sharedBytes, "sharing saves exactly the planned shared bytes");
  },
);

Deno.test("distill_fit: the stage's defaults; nvidia-smi lines", () => {
  const d = distillDefaults();
  assert.deepEqual(d.loss, { ceWeight: 1, klWeight: 0.1, temperature: 1 });
  assert.equal(d.adamw.maxGradNorm, 0.1);
  assert.equal(d.trainable, "mamba");
  assert.deepEqual(parseMemoryLine("81234, 143771"), { usedMiB: 81234, totalMiB: 143771 });
  assert.equal(parseMemoryLine("[N/A], 143771"), null);
  assert.equal(parseMemoryLine(""), null);
});
