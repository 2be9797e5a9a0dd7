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
  linearKernelSpec,
  linearWorkgroups,
  Uniforms,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

const specs = new Map<DType, KernelSpec>();

/** Uniform fill in [lo, hi). Bindings: out (rw). */
export function uniformFill(dtype: DType, n: number, lo: number, hi: number, seed: number): Launch {
  let spec = specs.get(dtype);
  if (!spec) {
    const T = wgslType(dtype);
    spec = linearKernelSpec(
      `uniform_fill_${dtype}`,
      dtype,
      [["out", "rw", T]],
      "n: u32, seed: u32, lo: f32, hi: f32",
      `if (i >= p.n) { return; }
  var h = (i * 0x9e3779b1u) ^ p.seed;
  h = (h ^ (h >> 16u)) * 0x85ebca6bu;
  h = (h ^ (h >> 13u)) * 0xc2b2ae35u;
  h = h ^ (h >> 16u);
  out[i] = ${T}(p.lo + (p.hi - p.lo) * (f32(h >> 8u) * (1.0 / 16777216.0)));`,
    );
    specs.set(dtype, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(16).u32(n).u32(seed).f32(lo).f32(hi).buffer,
    workgroups: linearWorkgroups(n),
  };
}
