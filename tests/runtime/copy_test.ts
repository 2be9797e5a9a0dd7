// Copies between storage buffers run as a dispatch (kernels/copy.ts) so the open compute pass stays open; other
// copies (unaligned bytes, buffers that are not storage, such as readback staging) take the encoder's copy.
// Both must move exactly the bytes asked for and nothing around them.
import assert from "node:assert/strict";
import { gpuTestOptions, testRng, testRuntime } from "../helpers/gpu.ts";

Deno.test(
  "device copies: exact bytes at any 4-byte offsets, as a dispatch between storage buffers",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const dev = rt.dev;
    const rng = testRng("copy");
    const words = 1200;
    const storage = () =>
      dev.gpu.createBuffer({
        size: 4 * words,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      });
    // [src word, dst word, words]: 16-byte aligned (vec4 path), word-aligned, offsets past the 256-byte binding
    // alignment, lengths not a multiple of 4
    const cases: [number, number, number][] = [[0, 0, 1024], [4, 68, 400], [3, 70, 401], [65, 130, 7], [
      1,
      0,
      1,
    ]];
    for (const [at, to, n] of cases) {
      const src = storage(), dst = storage();
      const srcData = Uint32Array.from({ length: words }, () => Math.floor(rng.uniform() * 2 ** 32));
      const dstData = Uint32Array.from({ length: words }, () => Math.floor(rng.uniform() * 2 ** 32));
      dev.write(src, 0, srcData);
      dev.write(dst, 0, dstData);
      const before = dev.stats.dispatches;
      dev.copyBuffer(src, 4 * at, dst, 4 * to, 4 * n);
      assert.equal(dev.stats.dispatches, before + 1, `copy ${at} -> ${to} x ${n} ran as a dispatch`);
      const got = new Uint32Array(await dev.read(dst, 0, 4 * words));
      const want = Uint32Array.from(dstData);
      want.set(srcData.subarray(at, at + n), to);
      assert.deepEqual(got, want, `copy ${at} -> ${to} x ${n}`);
      src.destroy();
      dst.destroy();
    }
    // into a buffer that cannot be bound as storage: the encoder's copy
    const src = storage();
    const plain = dev.gpu.createBuffer({
      size: 4 * words,
      usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    const data = Uint32Array.from({ length: words }, (_, i) => i * 7 + 1);
    dev.write(src, 0, data);
    dev.write(plain, 0, new Uint32Array(words));
    const before = dev.stats.dispatches;
    dev.copyBuffer(src, 0, plain, 2048, 400);
    assert.equal(dev.stats.dispatches, before);
    const want = new Uint32Array(words);
    want.set(data.subarray(0, 100), 512);
    assert.deepEqual(new Uint32Array(await dev.read(plain, 0, 4 * words)), want);
    src.destroy();
    plain.destroy();
  },
);
