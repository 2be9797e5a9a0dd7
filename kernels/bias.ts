/**
 * Row-broadcast bias: `out[r, c] = x[r, c] + s * b[c]`, and its backward, whose bias gradient is the column sum
 * `s * sum_r g[r, c]` (one thread per column walking the rows: adjacent threads read adjacent columns, so the
 * loads coalesce, and the sum order is fixed, so results are deterministic).
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

const specs = new Map<string, KernelSpec>();
const FIELDS = "rows: u32, cols: u32, s: f32, _a: u32";

function spec(dtype: DType, which: "forward" | "columns"): KernelSpec {
  const key = `bias_${which}_${dtype}`;
  let s = specs.get(key);
  if (s) return s;
  const T = wgslType(dtype);
  s = which === "forward"
    ? linearKernelSpec(
      key,
      dtype,
      [["x", "read", T], ["b", "read", T], ["dst", "rw", T]],
      FIELDS,
      `if (i >= p.rows * p.cols) { return; }
  dst[i] = ${T}(f32(x[i]) + p.s * f32(b[i % p.cols]));`,
    )
    : linearKernelSpec(
      key,
      dtype,
      [["x", "read", T], ["dst", "rw", T]],
      FIELDS,
      `if (i >= p.cols) { return; }
  var acc = 0.0;
  for (var r = 0u; r < p.rows; r++) { acc += f32(x[r * p.cols + i]); }
  dst[i] = ${T}(p.s * acc);`,
    );
  specs.set(key, s);
  return s;
}

/** Forward: bindings x (read), b (read), out (rw). */
export function biasForward(dtype: DType, rows: number, cols: number, s: number): Launch {
  return {
    spec: spec(dtype, "forward"),
    uniforms: new Uniforms(16).u32(rows).u32(cols).f32(s).buffer,
    workgroups: linearWorkgroups(rows * cols),
  };
}

/** Bias gradient `s * column sums of g`: bindings g (read), gb (rw). */
export function biasColumnSums(dtype: DType, rows: number, cols: number, s: number): Launch {
  return {
    spec: spec(dtype, "columns"),
    uniforms: new Uniforms(16).u32(rows).u32(cols).f32(s).buffer,
    workgroups: linearWorkgroups(cols),
  };
}
