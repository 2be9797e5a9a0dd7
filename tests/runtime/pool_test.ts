import assert from "node:assert/strict";
import { sizeClass } from "../../runtime/pool.ts";
import { gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

// A step's tensors come back to the pool in whatever order the step frees them (scope ends, backward frees,
// early disposals). The next step must still get the same buffers for the same tensors, or every dispatch's
// bind group misses the device's cache and is created anew.
Deno.test(
  "buffer pool: acquisitions depend on which buffers are free, not the order they came back",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const pool = rt.pool;
    const bytes = 3000; // a size class no other test of this runtime holds
    const step = (releaseOrder: number[]) => {
      const bufs = [0, 1, 2, 3].map(() => pool.acquire(bytes));
      for (const i of releaseOrder) pool.release(bufs[i]);
      return bufs;
    };
    step([0, 1, 2, 3]); // creates the buffers
    const a = step([3, 1, 0, 2]);
    const b = step([2, 0, 3, 1]);
    const c = step([1, 2, 3, 0]);
    // identity, not structure: distinct GPUBuffers of one size look deep-equal
    const same = (x: GPUBuffer[], y: GPUBuffer[]) => x.every((buf, i) => buf === y[i]);
    assert.ok(same(b, a), "second step got different buffers for the same acquisitions");
    assert.ok(same(c, a), "third step got different buffers for the same acquisitions");
    assert.equal(new Set(a).size, 4);
    assert.ok(a.every((buf) => buf.size === sizeClass(bytes)));
  },
);

Deno.test(
  "buffer pool: peakBytes is the high-water mark of live + free bytes; resetPeak starts a new one",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const pool = rt.pool;
    const bytes = 5000; // a size class no other test of this runtime holds
    pool.resetPeak();
    const held = pool.stats.liveBytes + pool.stats.freeBytes;
    assert.equal(pool.stats.peakBytes, held);
    const a = pool.acquire(bytes), b = pool.acquire(bytes);
    assert.equal(pool.stats.peakBytes, held + 2 * sizeClass(bytes));
    pool.release(a);
    pool.release(b);
    // released buffers stay in the pool: still device memory, still in the mark
    assert.equal(pool.stats.peakBytes, held + 2 * sizeClass(bytes));
    const c = pool.acquire(bytes); // reuses a free buffer: no new memory, no new peak
    assert.equal(pool.stats.peakBytes, held + 2 * sizeClass(bytes));
    pool.release(c);
    pool.trim(); // destroys the free buffers; the old mark stands until reset
    assert.equal(pool.stats.peakBytes, held + 2 * sizeClass(bytes));
    pool.resetPeak();
    assert.equal(pool.stats.peakBytes, pool.stats.liveBytes + pool.stats.freeBytes);
    assert.ok(pool.stats.peakBytes < held + 2 * sizeClass(bytes));
  },
);
