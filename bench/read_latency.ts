/**
 * GPU -> CPU round-trip latency of one provider: how long a 4-byte read takes after a tiny dispatch, measured
 * three ways so that a slow read can be pinned on our device layer or on the provider. Batch-1 decoding with a
 * read per token and speculative decoding (one read per verification pass) pay this once per step.
 *
 *   deno run -A bench/read_latency.ts --gpu dawn [--n 100]
 *
 * Rows (milliseconds, median / p10 / p90 over `n` round trips):
 * - `device_read`: a 1-element fill dispatch then `GpuDevice.read` of 4 bytes (our path: flush, copy to a
 *   staging buffer, submit, mapAsync, error check);
 * - `raw_map`: a raw copy into a staging buffer, submit, `mapAsync`, unmap (no dispatch, no device layer);
 * - `raw_done`: an empty submit and `queue.onSubmittedWorkDone()`.
 *
 * @module
 */
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { fillKernel } from "../kernels/fill.ts";
import { flag } from "./harness.ts";

function stats(ms: number[]): { median: number; p10: number; p90: number; mean: number } {
  const s = [...ms].sort((a, b) => a - b);
  const q = (f: number) => +s[Math.min(s.length - 1, Math.floor(f * s.length))].toFixed(3);
  return {
    median: q(0.5),
    p10: q(0.1),
    p90: q(0.9),
    mean: +(ms.reduce((a, b) => a + b, 0) / ms.length).toFixed(3),
  };
}

if (import.meta.main) {
  const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
  const n = Number(flag("n") ?? 100);
  const dev = await createDevice({ gpu });
  console.log(
    JSON.stringify({ row: "device", device: dev.describe(), date: new Date().toISOString().slice(0, 10) }),
  );
  const buf = dev.gpu.createBuffer({
    size: 256,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const fill = fillKernel("f32", 1, 1.5);
  const time = async (name: string, body: () => Promise<void>) => {
    for (let i = 0; i < 5; i++) await body(); // warm-up: pipelines, staging buffers
    const ms: number[] = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      await body();
      ms.push(performance.now() - t0);
    }
    console.log(JSON.stringify({ row: name, n, ...stats(ms) }));
  };
  await time("device_read", async () => {
    dev.dispatch(fill.spec, [{ buffer: buf, offset: 0, size: 256 }], fill.workgroups, fill.uniforms);
    await dev.read(buf, 0, 4);
  });
  const staging = dev.gpu.createBuffer({
    size: 256,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  await time("raw_map", async () => {
    const enc = dev.gpu.createCommandEncoder();
    enc.copyBufferToBuffer(buf, 0, staging, 0, 4);
    dev.gpu.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ, 0, 4);
    staging.unmap();
  });
  await time("raw_done", async () => {
    dev.gpu.queue.submit([]);
    await dev.gpu.queue.onSubmittedWorkDone();
  });
  dev.destroy();
}
