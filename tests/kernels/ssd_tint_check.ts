/**
 * Builds a compute pipeline for every kernel of the Mamba2 scan (chunked forward and backward, both row-product
 * tilings, decode step and verification) on a Dawn null-backend device, whose adapter offers only WebGPU's
 * default 16 KiB of workgroup memory (the test checks the limit it ran under): the pipeline step is where Dawn
 * enforces that limit, which the kernel tests on llvmpipe (32 KiB) cannot see. The `wide` row products must be refused there (the control that the limit is
 * checked at all); everything else must compile. The matrix-unit (`sgm`) row products, every variant and U dim
 * class, are compiled as shader modules on a second null device that offers subgroup matrices (their 36 KB of
 * workgroup memory exceed its 16 KiB, so no pipeline). Prints one JSON line:
 * `{ limit, kernels, failures: string[], wideRefused: string[], sgm: { modules, failures } | { skipped } }`, or
 * `{ skipped: reason }`.
 *
 * Run by `ssd_tint_test.ts` in a subprocess (like dense_tint_check.ts, for the same reasons).
 *
 * @module
 */
import type { KernelSpec } from "../../kernels/kernel.ts";
import {
  SSD_SGM_MAX_DIM,
  ssdChunkCumsum,
  ssdChunkRows,
  ssdChunkState,
  ssdDecayGrad,
  ssdGroupSum,
  ssdHeadReduce,
  type SsdOperand,
  type SsdRowsTiling,
  type SsdRowsVariant,
  type SsdShape,
  ssdStateDecayGrad,
  ssdStatePass,
  ssdStatePassBackward,
} from "../../kernels/ssd.ts";
import { ssdStepContiguous, ssdStepKernel, ssdVerifyKernel } from "../../kernels/ssd_step.ts";
import { compileFailure, dawnNullDevice } from "../helpers/tint.ts";
import { bindGroupLayoutEntries } from "../../runtime/device.ts";

function allSpecs(): { spec: KernelSpec; tiling?: SsdRowsTiling }[] {
  const s: SsdShape = { batch: 1, seqlen: 37, heads: 4, dimP: 6, dimN: 10, chunk: 16 };
  const op = (dim: number): SsdOperand => ({ offset: 0, stride: 4 * dim, heads: 4, dim });
  const out = { offset: 0, stride: 24 };
  const specs: { spec: KernelSpec; tiling?: SsdRowsTiling }[] = [];
  for (const softplus of [false, true]) {
    specs.push({ spec: ssdChunkCumsum(s, { offset: 0, stride: 4 }, softplus).spec });
    specs.push({ spec: ssdDecayGrad(s, { offset: 0, stride: 4 }, softplus).spec });
    specs.push({ spec: ssdHeadReduce(s, softplus).spec });
  }
  for (const mode of ["state", "output"] as const) {
    specs.push({ spec: ssdChunkState(s, op(6), op(10), mode).spec });
  }
  specs.push({ spec: ssdStatePass(s, true).spec }, { spec: ssdStatePassBackward(s, true, true).spec }, {
    spec: ssdStateDecayGrad(s).spec,
  });
  specs.push({ spec: ssdGroupSum(s, 2, 6, out).spec });
  for (const tiling of ["wide", "narrow"] as const) {
    for (const v of ["y", "dx", "dB", "dC"] as SsdRowsVariant[]) {
      const [U, V, Z] = v === "y" || v === "dB" ? [op(10), op(10), op(6)] : [op(6), op(6), op(10)];
      specs.push({ spec: ssdChunkRows(v, s, U, V, Z, v === "y" ? null : Z, out, tiling).spec, tiling });
    }
  }
  const step = { batch: 1, heads: 4, headsX: 4, headsB: 1, headsC: 1, dimP: 6, dimN: 10 };
  for (const softplus of [false, true]) {
    specs.push({ spec: ssdStepKernel(step, ssdStepContiguous(step, 1), softplus).spec });
    specs.push({ spec: ssdStepKernel(step, ssdStepContiguous(step, 1), softplus, "f16").spec });
    specs.push({ spec: ssdVerifyKernel(step, ssdStepContiguous(step, 3), softplus, 3, 3, 0).spec });
    specs.push({ spec: ssdVerifyKernel(step, ssdStepContiguous(step, 3), softplus, 3, 3, 0, "f16").spec });
  }
  return [...new Map(specs.map((e) => [e.spec.key, e])).values()];
}

async function check(device: GPUDevice) {
  const failures: string[] = [];
  const wideRefused: string[] = [];
  const specs = allSpecs();
  for (const { spec, tiling } of specs) {
    const entries = bindGroupLayoutEntries(spec);
    device.pushErrorScope("validation");
    const module = device.createShaderModule({ code: spec.code });
    device.createComputePipeline({
      layout: device.createPipelineLayout({ bindGroupLayouts: [device.createBindGroupLayout({ entries })] }),
      compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
    });
    const failure = await compileFailure(spec.key, await device.popErrorScope(), module);
    if (tiling === "wide") {
      if (failure?.includes("workgroup storage")) wideRefused.push(spec.key);
      else failures.push(`${spec.key}: expected a workgroup storage error, got ${failure ?? "none"}`);
    } else if (failure) failures.push(failure);
  }
  return {
    limit: device.limits.maxComputeWorkgroupStorageSize,
    kernels: specs.length,
    failures,
    wideRefused,
  };
}

/** The `sgm` row products: each variant with U dims of 1 to 4 fragments (one kernel per class). */
function sgmSpecs(): KernelSpec[] {
  const s: SsdShape = { batch: 1, seqlen: 37, heads: 4, dimP: 40, dimN: 40, chunk: 64 };
  const op = (dim: number): SsdOperand => ({ offset: 0, stride: 4 * dim, heads: 4, dim });
  const out = { offset: 0, stride: 160 };
  const specs: KernelSpec[] = [];
  for (const v of ["y", "dx", "dB", "dC"] as SsdRowsVariant[]) {
    for (let dim = 16; dim <= SSD_SGM_MAX_DIM; dim += 16) {
      specs.push(ssdChunkRows(v, s, op(dim), op(dim), op(40), v === "y" ? null : op(40), out, "sgm").spec);
    }
  }
  return specs;
}

/** Compiles the `sgm` row products as modules (the validation Tint does: types, builtins, uniformity). */
async function checkSgm(device: GPUDevice): Promise<{ modules: number; failures: string[] }> {
  const failures: string[] = [];
  const specs = sgmSpecs();
  for (const spec of specs) {
    device.pushErrorScope("validation");
    const module = device.createShaderModule({ code: spec.code });
    const failure = await compileFailure(spec.key, await device.popErrorScope(), module);
    if (failure) failures.push(failure);
  }
  return { modules: specs.length, failures };
}

if (import.meta.main) {
  const dev = await dawnNullDevice({ optional: ["shader-f16"] });
  if (typeof dev === "string") console.log(JSON.stringify({ skipped: dev }));
  else {
    const result = await check(dev.device);
    const sgmDev = await dawnNullDevice({
      required: ["shader-f16", "subgroups", "chromium-experimental-subgroup-matrix"] as GPUFeatureName[],
    });
    const sgm = typeof sgmDev === "string" ? { skipped: sgmDev } : await checkSgm(sgmDev.device);
    console.log(JSON.stringify({ ...result, sgm }));
  }
  Deno.exit(0); // skip Dawn's teardown
}
