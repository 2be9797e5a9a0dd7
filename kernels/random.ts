/**
 * Counter-based random fill on the GPU: `out[i] = lo + (hi - lo) * u(i, seed)` with u a 24-bit hash of the index
 * (no state, no CPU upload), for initialising benchmark-size models without generating gigabytes on the CPU.
 * Not for training-quality initialisation of real runs (those use util/rng.ts on the CPU, reproducibly).
 *
 * @module
 */
import {
  type DType,
  type KernelSpec,
  LINEAR_WORKGROUP,
  linearWorkgroups,
  Uniforms,
  WGSL_LINEAR_INDEX,
  wgslHeader,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

const specs = new Map<DType, KernelSpec>();

/** Uniform fill in [lo, hi). Bindings: out (rw). */
export function uniformFill(dtype: DType, n: number, lo: number, hi: number, seed: number): Launch {
  let spec = specs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = {
      key: `uniform_fill_${dtype}`,
      bindings: ["rw"],
      uniformBytes: 16,
      code: `${wgslHeader(dtype)}
struct P { n: u32, seed: u32, lo: f32, hi: f32 }
@group(0) @binding(0) var<storage, read_write> out: array<${T}>;
@group(0) @binding(1) var<uniform> p: P;
${WGSL_LINEAR_INDEX}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);
  if (i >= p.n) { return; }
  var h = (i * 0x9e3779b1u) ^ p.seed;
  h = (h ^ (h >> 16u)) * 0x85ebca6bu;
  h = (h ^ (h >> 13u)) * 0xc2b2ae35u;
  h = h ^ (h >> 16u);
  out[i] = ${T}(p.lo + (p.hi - p.lo) * (f32(h >> 8u) * (1.0 / 16777216.0)));
}
`,
    };
    specs.set(dtype, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(seed).f32(lo).f32(hi).buffer,
    workgroups: linearWorkgroups(n),
  };
}
