import assert from "node:assert/strict";
import { linear } from "../../runtime/ops/matmul.ts";
import { silu, sub } from "../../runtime/ops/elementwise.ts";
import { meanSquares } from "../../runtime/ops/reduce.ts";
import { AdamW, warmupCosineSchedule } from "../../runtime/optim.ts";
import { gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";

// Issue 3 acceptance: 1,000 training steps of a small MLP allocate no new GPU memory after warm-up, and learn.
// The same loop also creates no bind groups after warm-up: the pool hands the same buffers to the same tensors in
// every step, so each dispatch's bind group comes from the device's cache.
Deno.test(
  "1,000-step MLP training loop: pool memory and bind groups flat after warm-up, loss decreases",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("train-memory");
    const [batch, nIn, hidden, nOut] = [16, 8, 32, 4];
    const steps = 1000;
    const x = randn(rng, batch * nIn);
    // a smooth target the MLP can fit
    const target = Array.from(
      { length: batch * nOut },
      (_, i) => Math.sin(x[(i * 3) % x.length] + 0.5 * (i % nOut)),
    );
    const w1 = rt.parameter(randn(rng, hidden * nIn, 1 / Math.sqrt(nIn)), [hidden, nIn], "w1");
    const w2 = rt.parameter(randn(rng, nOut * hidden, 1 / Math.sqrt(hidden)), [nOut, hidden], "w2");
    const tx = rt.tensor(x, [batch, nIn]).keep();
    const tt = rt.tensor(target, [batch, nOut]).keep();
    const opt = new AdamW(rt, [w1, w2], { lr: 1e-2, weightDecay: 0.01, maxGradNorm: 1 });
    const schedule = warmupCosineSchedule({ lr: 1e-2, warmupSteps: 50, totalSteps: steps, minRatio: 0.1 });

    const losses: number[] = [];
    let warm: { created: number; liveBytes: number; freeBytes: number } | null = null;
    let warmBindGroups = 0;
    for (let step = 0; step < steps; step++) {
      const loss = rt.scope(() => {
        const y = linear(silu(linear(tx, w1)), w2);
        const l = meanSquares(sub(y, tt));
        rt.backward(l);
        opt.step(schedule(step));
        opt.zeroGrad();
        return l;
      });
      if (step % 100 === 0 || step === steps - 1) losses.push(await loss.item());
      loss.dispose();
      if (step === 100) {
        warm = { ...rt.pool.stats };
        warmBindGroups = rt.dev.stats.bindGroups;
      }
    }
    const end = rt.pool.stats;
    assert.ok(warm);
    assert.equal(end.created, warm.created, `buffers created after warm-up: ${end.created - warm.created}`);
    assert.equal(end.liveBytes, warm.liveBytes, "live bytes stable");
    assert.equal(
      rt.dev.stats.bindGroups - warmBindGroups,
      0,
      "bind groups created after warm-up (the pool should reuse the same buffers for the same tensors)",
    );
    assert.equal(end.liveBytes + end.freeBytes, warm.liveBytes + warm.freeBytes, "pooled bytes stable");
    assert.ok(losses.every(Number.isFinite), `losses ${losses}`);
    assert.ok(
      losses[losses.length - 1] < 0.2 * losses[0],
      `loss did not decrease enough: ${losses.join(", ")}`,
    );
    opt.dispose();
    [w1, w2, tx, tt].forEach((t) => t.dispose());
  },
);
