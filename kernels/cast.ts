/**
 * Element-type conversion between the float storage types: `out[i] = To(x[i])`. f16 -> f32 is exact; f32 -> f16
 * rounds to a nearest binary16 value (WGSL leaves the direction of a tie to the implementation). The backward of
 * a cast is the cast of the gradient the other way, so the same kernel serves both directions.
 *
 * @module
 */
import {
  type DType,
  type KernelSpec,
  linearKernelSpec,
  linearLanes,
  linearWorkgroups,
  Uniforms,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** The float types a cast converts between. */
export type FloatDType = "f32" | "f16";

const specs = new Map<string, KernelSpec>();

/**
 * Converts `n` elements of type `from` to type `to`. Bindings: x (read), out (rw). Four elements a thread when
 * `n` is a multiple of 4 (one f16 per thread stores 2 bytes at a time).
 */
export function castKernel(from: FloatDType, to: FloatDType, n: number): Launch {
  const vec = linearLanes(n) === 4;
  const key = `cast_${from}_${to}${vec ? "_v4" : ""}`;
  let spec = specs.get(key);
  if (!spec) {
    // the `enable f16` header is needed whenever either side is f16
    const header: DType = from === "f16" || to === "f16" ? "f16" : "f32";
    const el = (t: FloatDType) => (vec ? `vec4<${wgslType(t)}>` : wgslType(t));
    spec = linearKernelSpec(
      key,
      header,
      [["xs", "read", el(from)], ["out", "rw", el(to)]],
      "n: u32, _a: u32, _b: u32, _c: u32",
      `if (i >= p.n) { return; }\n  out[i] = ${el(to)}(xs[i]);`,
    );
    specs.set(key, spec);
  }
  const threads = n / linearLanes(n);
  return { spec, uniforms: new Uniforms(16).u32(threads).buffer, workgroups: linearWorkgroups(threads) };
}
