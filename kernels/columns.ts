/**
 * Column copies between row-major matrices: `out[r, j] = in[r, c0 + j]` (slicing a column range, e.g. the
 * z | xBC | dt parts of a Mamba2 in_proj output) and its transpose, writing a [rows, w] block into a column range
 * of a wider matrix (the backward, and concatenation).
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

function columnCopySpec(dtype: DType, direction: "gather" | "scatter"): KernelSpec {
  const key = `columns_${direction}_${dtype}`;
  let s = specs.get(key);
  if (s) return s;
  const T = wgslType(dtype);
  // gather: narrow[r, j] = wide[r, c0 + j]; scatter: wide[r, c0 + j] = narrow[r, j]
  const body = direction === "gather"
    ? "dst[r * p.width + j] = src[r * p.wide + p.c0 + j];"
    : "dst[r * p.wide + p.c0 + j] = src[r * p.width + j];";
  s = linearKernelSpec(
    key,
    dtype,
    [["src", "read", T], ["dst", "rw", T]],
    "rows: u32, wide: u32, c0: u32, width: u32",
    `if (i >= p.rows * p.width) { return; }
  let r = i / p.width;
  let j = i % p.width;
  ${body}`,
  );
  specs.set(key, s);
  return s;
}

/**
 * Copies columns [c0, c0 + width) of a [rows, wide] matrix into a [rows, width] one.
 * Bindings: wide (read), narrow (rw).
 */
export function gatherColumns(dtype: DType, rows: number, wide: number, c0: number, width: number): Launch {
  return {
    spec: columnCopySpec(dtype, "gather"),
    uniforms: new Uniforms(16).u32(rows).u32(wide).u32(c0).u32(width).buffer,
    workgroups: linearWorkgroups(rows * width),
  };
}

/**
 * Splits a [rows, wide] matrix into its column ranges [0, c1), [c1, c2) and [c2, wide) in one pass (three
 * outputs, e.g. Mamba2's z | xBC | dt), instead of one gather per part. Bindings: wide (read), three parts (rw).
 */
export function splitColumns3(dtype: DType, rows: number, wide: number, c1: number, c2: number): Launch {
  if (!(0 < c1 && c1 < c2 && c2 < wide)) throw new Error(`splitColumns3: need 0 < ${c1} < ${c2} < ${wide}`);
  const key = `columns_split3_${dtype}`;
  let spec = specs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    spec = linearKernelSpec(
      key,
      dtype,
      [["src", "read", T], ["d0", "rw", T], ["d1", "rw", T], ["d2", "rw", T]],
      "rows: u32, wide: u32, c1: u32, c2: u32",
      `if (i >= p.rows * p.wide) { return; }
  let r = i / p.wide;
  let c = i % p.wide;
  if (c < p.c1) {
    d0[r * p.c1 + c] = src[i];
  } else if (c < p.c2) {
    d1[r * (p.c2 - p.c1) + c - p.c1] = src[i];
  } else {
    d2[r * (p.wide - p.c2) + c - p.c2] = src[i];
  }`,
    );
    specs.set(key, spec);
  }
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(wide).u32(c1).u32(c2).buffer,
    workgroups: linearWorkgroups(rows * wide),
  };
}

/**
 * Writes a [rows, width] matrix into columns [c0, c0 + width) of a [rows, wide] one (other columns untouched).
 * Bindings: narrow (read), wide (rw).
 */
export function scatterColumns(dtype: DType, rows: number, wide: number, c0: number, width: number): Launch {
  return {
    spec: columnCopySpec(dtype, "scatter"),
    uniforms: new Uniforms(16).u32(rows).u32(wide).u32(c0).u32(width).buffer,
    workgroups: linearWorkgroups(rows * width),
  };
}

const repeatSpecs = new Map<string, KernelSpec>();

/**
 * Group repetition along the last dimension (repeat_kv / repeat_interleave of groups): x [rows, G*w] ->
 * out [rows, G*rep*w] where output group j is input group floor(j / rep). Forward gathers; the backward sums
 * the rep copies of each input group. Bindings: src (read), dst (rw).
 */
export function repeatGroups(
  dtype: DType,
  direction: "forward" | "backward",
  rows: number,
  groups: number,
  width: number,
  rep: number,
): Launch {
  const key = `repeat_groups_${direction}_${dtype}`;
  let spec = repeatSpecs.get(key);
  if (!spec) {
    const T = wgslType(dtype);
    // forward: one thread per output element; backward: one thread per input element summing its copies
    const body = direction === "forward"
      ? `let cols = p.groups * p.rep * p.width;
  if (i >= p.rows * cols) { return; }
  let r = i / cols;
  let c = i % cols;
  let g = (c / p.width) / p.rep;
  dst[i] = src[r * p.groups * p.width + g * p.width + c % p.width];`
      : `let cols = p.groups * p.width;
  if (i >= p.rows * cols) { return; }
  let r = i / cols;
  let c = i % cols;
  let g = c / p.width;
  var acc = 0.0;
  for (var k = 0u; k < p.rep; k++) {
    acc += f32(src[r * cols * p.rep + (g * p.rep + k) * p.width + c % p.width]);
  }
  dst[i] = ${T}(acc);`;
    spec = linearKernelSpec(
      key,
      dtype,
      [["src", "read", T], ["dst", "rw", T]],
      "rows: u32, groups: u32, width: u32, rep: u32",
      body,
    );
    repeatSpecs.set(key, spec);
  }
  const n = direction === "forward" ? rows * groups * rep * width : rows * groups * width;
  return {
    spec,
    uniforms: new Uniforms(16).u32(rows).u32(groups).u32(width).u32(rep).buffer,
    workgroups: linearWorkgroups(n),
  };
}
