/**
 * Compiles every variant of the subgroup-matrix matmul, and of the matrix-unit attention forward, (each config of the sweep, the op's configs, all four
 * transpose layouts, f32 and f16 output, accumulate, whole-block and bounds-checked shapes, direct and staged
 * epilogues; the attention kernels, forward, dQ and dK/dV, at every head dim and tile, in both forms of
 * `constOffsets`) with Dawn's WGSL compiler (Tint) on Dawn's null backend, which offers
 * `chromium-experimental-subgroup-matrix` (though no matrix configurations) and executes nothing.
 *
 * Every variant must create a shader module without errors or warnings (Tint parses, resolves and validates the
 * types, builtins, template arguments and uniformity there). A pipeline is also created where the null adapter's
 * limits allow it (16 KiB of workgroup memory, workgroup x size a multiple of its largest subgroup size, 128),
 * which adds Dawn's pipeline-level checks of the subgroup-matrix rules. Prints one JSON line:
 * `{ variants, pipelines, failures: string[] }`, or `{ skipped: reason }`.
 *
 * Run by `matmul_sgm_test.ts` in a subprocess (like dense_tint_check.ts, for the same reasons).
 *
 * @module
 */
import {
  pickSgmConfig,
  SGM_LARGE,
  SGM_SMALL,
  SGM_SWEEP,
  type SgmConfig,
  sgmConfigName,
  type SgmLayout,
  sgmSharedBytes,
  sgmThreads,
  sgmVariantWgsl,
} from "../../kernels/matmul_subgroup_matrix.ts";
import {
  sgmAttentionBackwardWgslFor,
  sgmAttentionSharedBytes,
  sgmAttentionWgslFor,
  sgmDkvSharedBytes,
} from "../../kernels/attention_sgm.ts";
import { compileFailure, dawnNullDevice } from "../helpers/tint.ts";

/** A config small enough for the null adapter's limits, so that one variant family also builds a pipeline. */
export const SGM_TINY: SgmConfig = {
  bm: 32,
  bn: 32,
  bk: 16,
  sgM: 2,
  sgN: 2,
  stage: "threads",
  vec: 4,
  pad: 8,
  buffers: 2,
  swizzle: 2,
};

interface Variant {
  name: string;
  code: string;
  sharedBytes: number;
  threads: number;
  /** Compile the module only (its bindings are not the matmul's). */
  moduleOnly?: boolean;
}

function allVariants(): Variant[] {
  const variants = new Map<string, Variant>();
  const configs: SgmConfig[] = [...SGM_SWEEP, SGM_TINY, { ...SGM_TINY, bk: 32, stage: "fragments" }];
  // the op's picks for unaligned widths
  for (const k of [4104, 4098]) {
    const c = pickSgmConfig({ m: 4096, n: 4096, k, batch: 1, strideA: 0, strideB: 0, strideC: 0 }, {
      transA: false,
      transB: true,
      out: "f16",
      accumulate: false,
    });
    if (c) configs.push(c);
  }
  // Layouts and outputs are generated per operand, independently of the config: every combination for the op's
  // configs and the tiny ones, and for the rest of the sweep what the benchmark runs (A B^T, plus the other
  // layouts with an f16 C).
  const full = new Set([SGM_LARGE, SGM_SMALL, SGM_TINY].map(sgmConfigName));
  for (const c of configs) {
    const all = full.has(sgmConfigName(c)) || c.bm === SGM_TINY.bm;
    for (const transA of [false, true]) {
      for (const transB of [false, true]) {
        for (const out of ["f32", "f16"] as const) {
          for (const accumulate of [false, true]) {
            if (!all && (accumulate || ((transA || !transB) && out === "f32"))) continue;
            const layout: SgmLayout = { transA, transB, out, accumulate };
            // [exact, direct, vecOut]
            const shapes: [boolean, boolean, boolean][] = c.stage === "threads"
              ? [[true, false, true], [false, false, true], [false, false, false]]
              : [[true, false, true]];
            if (out === "f32" && !accumulate) shapes.push([true, true, false]);
            for (const [exact, direct, vecOut] of shapes) {
              const code = sgmVariantWgsl(c, layout, exact, direct, vecOut);
              const name = `${sgmConfigName(c)} ${transA ? "t" : "n"}${transB ? "t" : "n"} ${out}` +
                `${accumulate ? " acc" : ""} ${exact ? "exact" : "checked"}${direct ? " direct" : ""}` +
                `${vecOut ? " vo" : ""}`;
              variants.set(name, {
                name,
                code,
                sharedBytes: sgmSharedBytes(c, layout, !direct),
                threads: sgmThreads(c),
              });
            }
          }
        }
      }
    }
  }
  // the matrix-unit attention kernels: every head dim and tile they accept, both forms (the per-subgroup copies
  // of `constOffsets` must keep barriers out of their branches on the subgroup id, which Tint's uniformity checks)
  for (const hd of [16, 32, 48, 64, 80, 96, 112, 128]) {
    for (const bc of [32, 64]) {
      for (const constOffsets of [false, true]) {
        const form = constOffsets ? " constOffsets" : "";
        const name = `attention hd${hd} bc${bc}${form}`;
        variants.set(name, {
          name,
          code: sgmAttentionWgslFor(hd, bc, constOffsets),
          sharedBytes: sgmAttentionSharedBytes(hd, bc),
          threads: 128,
          moduleOnly: true,
        });
        for (const kind of ["dq", "dkv"] as const) {
          const name = `attention ${kind} hd${hd} tile${bc}${form}`;
          variants.set(name, {
            name,
            code: sgmAttentionBackwardWgslFor(kind, hd, bc, constOffsets),
            sharedBytes: kind === "dq" ? sgmAttentionSharedBytes(hd, bc) : sgmDkvSharedBytes(hd, bc),
            threads: 128,
            moduleOnly: true,
          });
        }
      }
    }
  }
  return [...variants.values()];
}

async function check(
  device: GPUDevice,
  maxSubgroup: number,
): Promise<{ variants: number; pipelines: number; failures: string[] }> {
  const failures: string[] = [];
  const variants = allVariants();
  let pipelines = 0;
  const entries: GPUBindGroupLayoutEntry[] = [
    ...(["read-only-storage", "read-only-storage", "storage"] as const).map((type, binding) => ({
      binding,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type },
    })),
    {
      binding: 3,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: "uniform", hasDynamicOffset: true, minBindingSize: 48 },
    },
  ];
  for (const v of variants) {
    device.pushErrorScope("validation");
    const module = device.createShaderModule({ code: v.code });
    if (
      !v.moduleOnly && v.sharedBytes <= device.limits.maxComputeWorkgroupStorageSize &&
      v.threads % maxSubgroup === 0 &&
      v.threads <= device.limits.maxComputeInvocationsPerWorkgroup
    ) {
      const layout = device.createBindGroupLayout({ entries });
      device.createComputePipeline({
        layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
        compute: { module, entryPoint: "main" },
      });
      pipelines++;
    }
    const failure = await compileFailure(v.name, await device.popErrorScope(), module);
    if (failure) failures.push(failure);
  }
  return { variants: variants.length, pipelines, failures };
}

if (import.meta.main) {
  const dev = await dawnNullDevice({
    required: ["shader-f16", "subgroups", "chromium-experimental-subgroup-matrix"] as GPUFeatureName[],
  });
  if (typeof dev === "string") console.log(JSON.stringify({ skipped: dev }));
  else {
    const info = dev.adapter.info as GPUAdapterInfo & { subgroupMaxSize?: number };
    console.log(JSON.stringify(await check(dev.device, info.subgroupMaxSize ?? 128)));
  }
  Deno.exit(0); // skip Dawn's teardown
}
