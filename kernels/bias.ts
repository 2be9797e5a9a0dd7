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
  LINEAR_WORKGROUP,
  linearWorkgroups,
  Uniforms,
  WGSL_LINEAR_INDEX,
  wgslHeader,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

const specs = new Map<string, KernelSpec>();

function spec(dtype: DType, which: "forward" | "columns"): KernelSpec {
  const key = `bias_${which}_${dtype}`;
  let s = specs.get(key);
  if (s) return s;
  const T = wgslType(dtype);
  const body = which === "forward"
    ? `if (i >= p.rows * p.cols) { return; }
  dst[i] = ${T}(f32(x[i]) + p.s * f32(b[i % p.cols]));`
    : `if (i >= p.cols) { return; }
  var acc = 0.0;
  for (var r = 0u; r < p.rows; r++) { acc += f32(x[r * p.cols + i]); }
  dst[i] = ${T}(p.s * acc);`;
  s = {
    key,
    bindings: which === "forward" ? ["read", "read", "rw"] : ["read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { rows: u32, cols: u32, s: f32, _a: u32 }
@group(0) @binding(0) var<storage, read> x: array<${T}>;
${
      which === "forward"
        ? `@group(0) @binding(1) var<storage, read> b: array<${T}>;
@group(0) @binding(2) var<storage, read_write> dst: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;`
        : `@group(0) @binding(1) var<storage, read_write> dst: array<${T}>;
@group(0) @binding(2) var<uniform> p: P;`
    }
${WGSL_LINEAR_INDEX}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);
  ${body}
}
`,
  };
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
