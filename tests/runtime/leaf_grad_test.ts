import assert from "node:assert/strict";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";
import { scale } from "../../runtime/ops/elementwise.ts";

Deno.test(
  "runtime.isLeaf and leafGradTarget: leaves get a kept grad to write, then to accumulate into",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const w = rt.parameter([1, 2, 3], [3], "w");
    const frozen = rt.parameter([1, 2, 3], [3], "f", false);
    rt.scope(() => {
      const y = scale(w, 2);
      assert.ok(rt.isLeaf(w));
      assert.ok(!rt.isLeaf(y), "op outputs are not leaves");
      assert.equal(rt.leafGradTarget(y), null);
      assert.equal(rt.leafGradTarget(frozen), null, "no grad target for a frozen parameter");
      const first = rt.leafGradTarget(w)!;
      assert.equal(first.accumulate, false);
      assert.equal(w.grad, first.grad);
      assert.equal(first.grad.name, "w.grad");
      const second = rt.leafGradTarget(w)!;
      assert.equal(second.accumulate, true);
      assert.equal(second.grad, first.grad);
      rt.clearTape();
    });
    assert.ok(!w.grad!.disposed, "the grad outlives the scope");
    w.grad!.dispose();
    w.dispose();
    frozen.dispose();
  },
);
