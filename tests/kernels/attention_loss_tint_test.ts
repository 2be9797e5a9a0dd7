/**
 * Compiles every WGSL variant of the attention, decode (split and single-token GQA), loss, log-prob and sampling
 * (and split argmax) kernels, and the fused decode GEMVs, with Dawn's compiler (Tint), the compiler of the H200 provider, through
 * Dawn's null backend (no GPU needed). Tint is stricter than the built-in provider's compiler in places the CPU tests cannot see: e.g. a
 * constant expression that evaluates to NaN is a shader-creation error there and compiles fine here, and a
 * barrier after a branch on a workgroup variable read without workgroupUniformLoad is rejected there only.
 */
import * as attn from "../../kernels/attention.ts";
import * as attn2 from "../../kernels/attention_v2.ts";
import { kvCacheAppend, planDecodeAttention, ropeKvAppend } from "../../kernels/attention_decode.ts";
import { attentionDecodeGqa } from "../../kernels/attention_decode_gqa.ts";
import { gemvKernel, gemvQkvKernel, gemvSplit3Kernel, gemvSwigluKernel } from "../../kernels/gemv.ts";
import { splitColumns3 } from "../../kernels/columns.ts";
import * as ce from "../../kernels/cross_entropy.ts";
import * as lp from "../../kernels/logprobs.ts";
import * as hl from "../../kernels/head_loss.ts";
import { philoxKernel, sampleTokensKernel } from "../../kernels/sample_token.ts";
import { argmaxMerge, argmaxSlices } from "../../kernels/argmax_split.ts";
import type { DType, KernelSpec } from "../../kernels/kernel.ts";
import { gpuTestOptions } from "../helpers/gpu.ts";
import { dawnNullDevice } from "../helpers/tint.ts";

function allSpecs(): KernelSpec[] {
  const specs: KernelSpec[] = [];
  for (const dtype of ["f32", "f16"] as DType[]) {
    for (const hd of [6, 8, 16, 64, 128]) {
      const s = { B: 1, T: 8, H: 4, Hkv: 2, hd, qoff: 0, kvLen: 8, kvBatchStride: 0, window: 0, scale: 1 };
      // the tiles chosen on llvmpipe (32 KiB) and on the H200 (48 KiB)
      for (const limit of [32768, 49152]) {
        specs.push(attn.attentionForward(dtype, s, attn.chooseForwardTiles(hd, limit)).spec);
        specs.push(
          attn.attentionForward(dtype, s, attn.chooseForwardTiles(hd, limit), { nSplits: 2, splitLen: 64 })
            .spec,
        );
        specs.push(attn.attentionBackwardDq(dtype, s, attn.chooseDqTiles(hd, limit)).spec);
        specs.push(attn.attentionBackwardDkv(dtype, s, attn.chooseDkvTiles(hd, limit)).spec);
        // v2 backward: GQA ratios 1, 2 (here), 4 (the Llama shape) are separate compile-time variants
        for (const H of [2, 4, 8]) {
          const tiles = attn2.chooseBackwardTiles(hd, limit);
          specs.push(attn2.attentionBackwardDqV2(dtype, { ...s, H }, tiles).spec);
          specs.push(attn2.attentionBackwardDkvV2(dtype, { ...s, H }, tiles).spec);
          specs.push(
            attn2.attentionForwardV2(dtype, { ...s, H }, attn2.chooseForwardTilesV2(hd, limit)).spec,
          );
        }
        for (const rows of [1, 8, 20]) {
          const tiles = attn.chooseDecodeTiles(hd, rows, limit);
          specs.push(planDecodeAttention(dtype, { ...s, T: 1, qoff: 7 }, tiles, 1000).forward.spec);
        }
        // the single-token decode kernel (hd a multiple of 4 only): G 1, 4 and 8, and with 16 KiB (WebGPU's
        // default) the 128-thread variants of the larger groups
        for (const H of hd % 4 ? [] : [2, 8, 16]) {
          for (const l of [limit, 16384]) {
            specs.push(attentionDecodeGqa(dtype, { ...s, H, T: 1, qoff: 7 }, l).spec);
            // with RoPE and the cache append in the kernel (hd a multiple of 8)
            if (hd % 8 === 0) {
              specs.push(attentionDecodeGqa(dtype, { ...s, H, T: 1, qoff: 7 }, l, { start: 7 }).spec);
            }
          }
        }
      }
    }
    specs.push(attn.attentionCombineSplits(dtype, 4, 16, 2).spec);
    specs.push(attn.attentionBackwardDelta(dtype, 4, 16).spec);
    specs.push(kvCacheAppend(dtype, 1, 1, 16, 8, 0).spec);
    specs.push(ropeKvAppend(dtype, { B: 1, n: 2, H: 4, Hkv: 2, hd: 16, maxT: 8, pos: 3, start: 3 }).spec);
    // the decode GEMVs: vector and scalar K, the most rows each takes
    for (const k of [64, 66]) {
      specs.push(gemvKernel(dtype, 16, 8, k).spec, gemvSwigluKernel(dtype, 8, 8, k).spec);
      specs.push(gemvQkvKernel(dtype, 16, 8, 4, k).spec);
      specs.push(gemvSplit3Kernel(dtype, 16, [8, 12, 4], k, { normIn: { eps: 1e-5 } }).spec);
      specs.push(gemvSplit3Kernel(dtype, 2, [8, 12, 4], k, { conv: { width: 4, silu: true } }).spec);
      // subgroup sums (the H200's 32-lane subgroups): one subgroup a row, and four with the exchange in red
      for (const threadsPerRow of [32, 128]) {
        const o = { threadsPerRow, subgroupSize: 32 };
        const norm = { ...o, normIn: { eps: 1e-5 } };
        specs.push(
          gemvKernel(dtype, 16, 8, k, norm).spec,
          gemvKernel(dtype, 2, 8, k, { ...o, residual: true }).spec,
        );
        specs.push(gemvSwigluKernel(dtype, 8, 8, k, norm).spec, gemvQkvKernel(dtype, 16, 8, 4, k, norm).spec);
        specs.push(gemvSplit3Kernel(dtype, 16, [8, 12, 4], k, norm).spec);
        specs.push(
          gemvSplit3Kernel(dtype, 2, [8, 12, 4], k, { ...norm, conv: { width: 4, silu: true } }).spec,
        );
        specs.push(gemvKernel(dtype, 1, 8, k, { ...o, gatedNormIn: { group: 2, eps: 1e-5 } }).spec);
      }
    }
    specs.push(splitColumns3(dtype, 2, 10, 3, 7).spec);
    for (const teacherDtype of [null, "f32", "f16"] as (DType | null)[]) {
      const v = { dtype, teacherDtype };
      specs.push(ce.distillLossForward(v, 1, 0, 10, 1, true, true).spec);
      for (const inPlace of [false, true]) {
        specs.push(ce.distillLossBackward(v, 1, 0, 10, 1, 1, 1, true, inPlace).spec);
      }
    }
    specs.push(lp.tokenLogprobForward(dtype, 1, 0, 10).spec);
    specs.push(lp.tokenLogprobBackward(dtype, 1, 0, 10).spec);
    specs.push(lp.argmaxRows(dtype, 1, 0, 10).spec);
    const sampling = { temperature: 0.7, topK: 5, topP: 0.9, key: [1, 2] as [number, number], step: 0 };
    for (const V of [10, 128256]) {
      for (const withProbs of [false, true]) {
        specs.push(sampleTokensKernel(dtype, 1, 0, V, sampling, withProbs).spec);
      }
    }
    specs.push(hl.scaleByScalar(dtype, 10, false).spec, hl.scaleByScalar(dtype, 10, true).spec);
    specs.push(argmaxSlices(dtype, 2, 128256).spec, argmaxMerge(2, 128256).spec);
  }
  specs.push(
    ce.distillLossReduce(4, 1, 1, true).spec,
    lp.maskedRowSum(1, 4).spec,
    lp.maskedRowSumBackward(1, 4).spec,
    hl.tokenWeightTotal(4, true, true).spec,
    philoxKernel(4).spec,
  );
  return [...new Map(specs.map((s) => [s.key, s])).values()];
}

Deno.test(
  "attention/loss kernels: every WGSL variant compiles with Dawn's Tint",
  gpuTestOptions,
  async () => {
    const dev = await dawnNullDevice({ optional: ["shader-f16", "subgroups"] });
    if (typeof dev === "string") {
      console.warn(`Tint check skipped: ${dev}`);
      return;
    }
    const device = dev.device;
    // One error scope per module, all awaited together: awaiting Dawn after every call has crashed its binding
    // (see the Dawn stability notes of issue 3), batching the waits has not.
    const checks: Promise<string | null>[] = [];
    for (const spec of allSpecs()) {
      if (spec.code.includes("enable f16;") && !device.features.has("shader-f16")) continue;
      device.pushErrorScope("validation");
      device.createShaderModule({ label: spec.key, code: spec.code });
      checks.push(device.popErrorScope().then((err) => err ? `${spec.key}: ${err.message}` : null));
    }
    const failures = (await Promise.all(checks)).filter((f) => f !== null);
    device.destroy();
    if (failures.length) throw new Error(`Tint rejected ${failures.length} kernels:\n${failures.join("\n")}`);
  },
);
