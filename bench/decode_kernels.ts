/**
 * The small kernels of a batch-1 decode step at the Llama-3.2-1B hybrid's shapes, each timed alone with GPU
 * timestamps (`GpuDevice.timeDispatch`: back-to-back copies in one compute pass, caches warm), to tell a
 * kernel's own latency from what it costs in the stream (`bench/model.ts --profile`, `decode_step_in_stream`):
 *
 * - the one-token attention (kernels/attention_decode_gqa.ts) with and without RoPE and the cache append, at
 *   cache lengths from 16 to 2048 keys and at each workgroup size the kernel picks by workgroup memory;
 * - the Mamba2 state step (kernels/ssd_step.ts);
 * - a one-workgroup fill, the floor of a dispatch on this clock.
 *
 *   deno run -A bench/decode_kernels.ts --gpu dawn [--dtype f16] [--iters 200]
 *
 * One JSON row per kernel and shape: microseconds per dispatch.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { attentionDecodeGqa, decodeGqaConfig } from "../kernels/attention_decode_gqa.ts";
import { ssdStepContiguous, ssdStepKernel, ssdXbcWidth } from "../kernels/ssd_step.ts";
import { fillKernel } from "../kernels/fill.ts";
import type { DType } from "../kernels/kernel.ts";
import type { Launch } from "../kernels/fill.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { flag, hostCpu } from "./harness.ts";

const rt = new Runtime(await createDevice({ gpu: parseProviderPreference(flag("gpu") ?? "auto", "--gpu") }));
const dtype = (flag("dtype") ?? "f32") as DType;
const iters = Number(flag("iters") ?? 200);
const log = (row: Record<string, unknown>) =>
  console.log(JSON.stringify({ bench: "decode_kernels", provider: rt.dev.provider, dtype, ...row }));
log({ device: rt.dev.describe(), host: hostCpu(), date: new Date().toISOString() });

/** Values in [-1, 1) from a hash, without a CPU array the size of the tensor. */
function filled(shape: number[], dt: DType = dtype): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = ((Math.imul(i + 1, 2654435761) >>> 8) / 2 ** 24) * 2 - 1;
  return rt.tensor(data, shape, dt);
}

async function time(l: Launch, tensors: Tensor[]): Promise<number | undefined> {
  const ms = await rt.dev.timeDispatch(
    l.spec,
    tensors.map((t) => t.binding),
    l.workgroups,
    l.uniforms,
    iters,
  );
  return ms === undefined ? undefined : +(ms * 1000).toFixed(2);
}

await rt.scope(async () => {
  const one = rt.empty([1], "f32");
  log({ kernel: "fill_1", us: await time(fillKernel("f32", 1, 0), [one]) });

  // attention: 32 query heads over 8 kv heads of 64 dims (G = 4)
  const H = 32, Hkv = 8, hd = 64, maxT = 2048;
  const q = filled([1, 1, H, hd]), kn = filled([1, 1, Hkv, hd]), vn = filled([1, 1, Hkv, hd]);
  const invFreq = filled([hd / 2], "f32");
  const kc = filled([1, maxT, Hkv, hd]), vc = filled([1, maxT, Hkv, hd]), o = rt.empty([1, 1, H, hd], dtype);
  for (const limit of [49152, 16384, 8192]) {
    const wg = decodeGqaConfig(H / Hkv, hd, limit)?.wg;
    for (const kvLen of [16, 144, 400, 1040, 2048]) {
      const s = {
        B: 1,
        T: 1,
        H,
        Hkv,
        hd,
        qoff: kvLen - 1,
        kvLen,
        kvBatchStride: maxT * Hkv * hd,
        window: 0,
        scale: 0.125,
      };
      const plain = await time(attentionDecodeGqa(dtype, s, limit), [q, kc, vc, o]);
      const rope = await time(
        attentionDecodeGqa(dtype, s, limit, { start: kvLen - 1 }),
        [q, kn, vn, invFreq, kc, vc, o],
      );
      log({ kernel: "attn_decode_gqa", wg, kv_len: kvLen, us: plain, us_rope: rope });
    }
  }

  // the Mamba2 state step: 32 heads of 64 x 128, one token
  const shape = { batch: 1, heads: 32, headsX: 32, headsB: 1, headsC: 1, dimP: 64, dimN: 128 };
  const state = filled([1, 32, 64, 128], "f32"), xbc = filled([1, ssdXbcWidth(shape)]), dt = filled([1, 32]);
  const heads = filled([3, 32], "f32"), y = rt.empty([1, 32, 64], dtype);
  const l = ssdStepKernel(shape, ssdStepContiguous(shape, 1), true, dtype as "f32" | "f16");
  log({ kernel: "ssd_step", us: await time(l, [state, xbc, dt, heads, y]) });
});
rt.dev.destroy();
