// The device's bind-group cache (GpuDevice.dispatch): one bind group per distinct (kernel, buffers, offsets,
// sizes), found again by a numeric hash checked exactly, so that a steady-state step creates none; forgetting a
// buffer drops its bind groups.
import assert from "node:assert/strict";
import { fillKernel } from "../../kernels/fill.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

Deno.test(
  "bind-group cache: reused for the same bindings, distinct per buffer and offset, forgotten with its buffer",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const poison = rt.poisonNewTensors;
    rt.poisonNewTensors = false;
    const a = rt.empty([64], "f32").keep(), b = rt.empty([64], "f32").keep();
    const big = rt.empty([128], "f32").keep(); // two 256-byte halves
    try {
      const created = () => rt.dev.stats.bindGroups;
      const fill = (value: number, slice: { buffer: GPUBuffer; offset?: number; size?: number }) => {
        const l = fillKernel("f32", 64, value);
        rt.dev.dispatch(l.spec, [slice], l.workgroups, l.uniforms);
      };
      const n0 = created();
      fill(1, a.binding);
      fill(2, a.binding);
      assert.equal(created() - n0, 1, "the same buffer twice: one bind group");
      fill(3, b.binding);
      assert.equal(created() - n0, 2, "another buffer: another bind group");
      fill(4, { buffer: big.buffer, offset: 0, size: 256 });
      fill(5, { buffer: big.buffer, offset: 256, size: 256 });
      fill(6, { buffer: big.buffer, offset: 0, size: 256 });
      assert.equal(created() - n0, 4, "two offsets of one buffer: two bind groups, the first found again");
      // each dispatch wrote where its bindings said
      assert.deepEqual([...await a.read()].slice(0, 2), [2, 2]);
      assert.deepEqual([...await b.read()].slice(0, 2), [3, 3]);
      const halves = await big.read();
      assert.deepEqual([halves[0], halves[63], halves[64], halves[127]], [6, 6, 5, 5]);
      rt.dev.forgetBuffer(a.buffer);
      fill(7, a.binding);
      assert.equal(created() - n0, 5, "a forgotten buffer's bind group is made again");
      fill(8, b.binding);
      assert.equal(created() - n0, 5, "other buffers' bind groups stay");
      assert.deepEqual([...await a.read()].slice(0, 1), [7]);
    } finally {
      rt.poisonNewTensors = poison;
      for (const t of [a, b, big]) t.dispose();
    }
  },
);
