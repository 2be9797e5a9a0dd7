/**
 * Compiles every variant of the dense kernels with Dawn's WGSL compiler (Tint) on Dawn's null backend, which
 * executes nothing but parses, resolves and validates WGSL (uniformity analysis included) like the real one.
 * Prints one JSON line: `{ variants, failures: string[] }`, or `{ skipped: reason }` without Dawn.
 *
 * Run by `dense_tint_test.ts` in a subprocess: Dawn's Node binding does not get its callbacks pumped under the
 * test runner (popErrorScope never settles there), and a crash in the binding then fails one test instead of
 * killing the test process.
 *
 * @module
 */
import type { KernelSpec } from "../../kernels/kernel.ts";
import { compileFailure, dawnNullDevice } from "../helpers/tint.ts";
import { bindGroupLayoutEntries } from "../../runtime/device.ts";
import {
  MATMUL_MEDIUM,
  MATMUL_SMALL,
  MATMUL_SWEEP,
  type MatmulConfig,
  matmulKernel,
  matmulSharedBytes,
  splitKSumKernel,
} from "../../kernels/matmul.ts";
import { GEMV_SWIGLU_MAX_ROWS, gemvKernel, gemvQkvKernel, gemvSwigluKernel } from "../../kernels/gemv.ts";
import { reduceBackwardKernel, reducePass, reduceRowsKernel } from "../../kernels/reduce.ts";
import * as rms from "../../kernels/rmsnorm.ts";
import { ropeKernel } from "../../kernels/rope.ts";
import { embeddingBackward, embeddingForward } from "../../kernels/embedding.ts";
import { adamwKernel, gradNormKernel } from "../../kernels/adamw.ts";

function allVariants(f16: boolean): { spec: KernelSpec; sharedBytes: number }[] {
  const out = new Map<string, { spec: KernelSpec; sharedBytes: number }>();
  const add = (l: { spec: KernelSpec }, sharedBytes = 0) =>
    out.set(l.spec.key, { spec: l.spec, sharedBytes });
  const configs: MatmulConfig[] = [...MATMUL_SWEEP, MATMUL_SMALL, MATMUL_MEDIUM];
  for (const dtype of f16 ? (["f32", "f16"] as const) : (["f32"] as const)) {
    for (const config of configs) {
      for (const transA of [false, true]) {
        for (const transB of [false, true]) {
          for (const accumulate of [false, true]) {
            // multiples of 4 (vec4 everywhere) and odd sizes (scalar everywhere)
            for (const [m, n, k] of [[128, 128, 64], [37, 53, 29]]) {
              const shape = { m, n, k, batch: 1, strideA: 0, strideB: 0, strideC: 0 };
              add(
                matmulKernel(shape, { dtype, transA, transB, accumulate }, config),
                matmulSharedBytes(config),
              );
            }
          }
        }
      }
    }
    for (const rows of [1, 3, 8]) for (const k of [64, 67]) add(gemvKernel(dtype, rows, 10, k));
    // the decode fusions: norm prologue, gated norm prologue, residual epilogue, both; the SwiGLU and q/k/v GEMVs with the norm (the
    // q/k/v one binds eight storage buffers); 16 rows where the kernel takes them
    const normIn = { eps: 1e-5 };
    for (const rows of [1, 3, 8, 16]) {
      for (const k of [64, 67]) {
        add(gemvKernel(dtype, rows, 10, k, { normIn }));
        add(gemvKernel(dtype, rows, 10, k, { residual: true }));
        add(gemvKernel(dtype, rows, 10, k, { normIn, residual: true }));
        add(gemvQkvKernel(dtype, rows, 6, 2, k, { normIn }));
        if (rows <= GEMV_SWIGLU_MAX_ROWS) add(gemvSwigluKernel(dtype, rows, 10, k, { normIn }));
      }
      // Mamba2's gated norm prologue, with and without the residual: vector and scalar items, the split per-group
      // reduction (few units) and one thread per unit in several passes (16 rows x 64 groups)
      for (const [k, group] of [[64, 16], [67, 67], [1024, 16]]) {
        for (const residual of [false, true]) {
          add(gemvKernel(dtype, rows, 10, k, { gatedNormIn: { group, eps: 1e-5 }, residual }));
        }
      }
    }
    for (const accumulate of [false, true]) add(splitKSumKernel(10, 3, accumulate));
    for (const op of ["sum", "sumsq", "max"] as const) {
      add(reducePass(op, dtype, 10, 1));
      add(reduceRowsKernel(op, dtype, 2, 5));
    }
    add(reduceBackwardKernel("sum", dtype, 10, 5));
    add(reduceBackwardKernel("sumsq", dtype, 10, 5));
    add(rms.rmsNormForward(dtype, 2, 8, 1e-5));
    add(rms.addRmsNormForward(dtype, 2, 8, 1e-5));
    add(rms.rmsNormBackwardInput(dtype, 2, 8));
    add(rms.rmsNormBackwardInput(dtype, 2, 8, true));
    add(rms.rmsNormBackwardWeightPartial(dtype, 2, 8));
    add(rms.rmsNormBackwardWeightSum(dtype, 2, 8, false));
    add(rms.rmsNormBackwardWeightSum(dtype, 2, 8, true));
    add(ropeKernel(dtype, "tensor", 2, 2, 8));
    add(ropeKernel(dtype, "offset", 2, 2, 8));
    add(embeddingForward(dtype, 2, 8, 10));
    add(embeddingBackward(dtype, 2, 8, false));
    add(embeddingBackward(dtype, 2, 8, true));
    add(adamwKernel(dtype, 10, { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, step: 1 }));
    // f16 parameters with their f32 master copy
    const step = { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, step: 1 };
    if (dtype === "f16") add(adamwKernel(dtype, 10, step, true));
  }
  add(gradNormKernel(3, 1));
  return [...out.values()];
}

async function check(device: GPUDevice): Promise<{ variants: number; failures: string[] }> {
  const failures: string[] = [];
  const variants = allVariants(device.features.has("shader-f16"));
  for (const { spec, sharedBytes } of variants) {
    const entries = bindGroupLayoutEntries(spec);
    device.pushErrorScope("validation");
    const module = device.createShaderModule({ code: spec.code });
    // the null adapter allows 16 KB of workgroup storage: larger tiles are checked as modules only (the pipeline
    // step adds the storage limit and the layout match, which the smaller variants cover)
    if (sharedBytes <= device.limits.maxComputeWorkgroupStorageSize) {
      const layout = device.createBindGroupLayout({ entries });
      device.createComputePipeline({
        layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
        compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
      });
    }
    const failure = await compileFailure(spec.key, await device.popErrorScope(), module);
    if (failure) failures.push(failure);
  }
  return { variants: variants.length, failures };
}

if (import.meta.main) {
  const dev = await dawnNullDevice({ optional: ["shader-f16"] });
  console.log(JSON.stringify(typeof dev === "string" ? { skipped: dev } : await check(dev.device)));
  Deno.exit(0); // skip Dawn's teardown
}
