/**
 * The contract between a kernel file and the runtime.
 *
 * A kernel file in `kernels/` holds WGSL source and small pure functions that turn shapes into a
 * {@linkcode KernelSpec} (which WGSL variant, which bindings) plus the uniform values and workgroup counts of a
 * dispatch. It touches no GPU objects and no tensors: the runtime (`runtime/`) compiles specs, binds buffers and
 * records dispatches. This keeps the data flow one way (runtime -> kernels) and every kernel readable on a page.
 *
 * Binding convention in the WGSL: storage buffers at `@group(0) @binding(0..n-1)` in the order of `bindings`;
 * if `uniformBytes > 0`, a `var<uniform>` struct at `@binding(n)`.
 *
 * @module
 */

/** How a kernel accesses a storage binding. */
export type BindingAccess = "read" | "rw";

/** Everything needed to compile a kernel variant. */
export interface KernelSpec {
  /** Unique key of this variant (name + specialisation), e.g. `matmul_f32_nt_64x64`. Pipelines cache by it. */
  key: string;
  /** WGSL source. */
  code: string;
  /** Entry point (default `main`). */
  entryPoint?: string;
  /** Storage bindings in order. */
  bindings: readonly BindingAccess[];
  /** Size of the uniform struct in bytes (0 or absent: no uniform). */
  uniformBytes?: number;
  /** Pipeline-overridable constants. */
  constants?: Record<string, number>;
}

const specCache = new Map<string, KernelSpec>();

/**
 * The spec of `key`, built by `make` the first time it is asked for. Keys are unique across all kernels (the
 * device caches pipelines by them), so one cache serves every kernel module.
 */
export function cachedSpec(key: string, make: () => Omit<KernelSpec, "key">): KernelSpec {
  let s = specCache.get(key);
  if (!s) specCache.set(key, s = { key, ...make() });
  return s;
}

/** Element types a tensor can be stored in. */
export type DType = "f32" | "f16" | "i32" | "u32";

/** Bytes per element of a dtype. */
export function dtypeBytes(dtype: DType): number {
  return dtype === "f16" ? 2 : 4;
}

/** Ceiling division, for workgroup counts. */
export function ceilDiv(a: number, b: number): number {
  return Math.floor((a + b - 1) / b);
}

/**
 * Packs uniform values in WGSL struct order. Use u32 for sizes and flags, f32 for scalars; all fields are 4 bytes,
 * so keep the WGSL struct to scalar `u32`/`i32`/`f32` fields (no vec3 padding surprises).
 */
export class Uniforms {
  #view: DataView;
  #offset = 0;
  /** Creates a packer for up to `bytes` bytes (rounded up to 16). */
  constructor(bytes: number) {
    this.#view = new DataView(new ArrayBuffer(Math.ceil(bytes / 16) * 16));
  }
  /** Appends an unsigned 32-bit integer. */
  u32(v: number): this {
    this.#view.setUint32(this.#offset, v >>> 0, true);
    this.#offset += 4;
    return this;
  }
  /** Appends a signed 32-bit integer. */
  i32(v: number): this {
    this.#view.setInt32(this.#offset, v | 0, true);
    this.#offset += 4;
    return this;
  }
  /** Appends a 32-bit float. */
  f32(v: number): this {
    this.#view.setFloat32(this.#offset, v, true);
    this.#offset += 4;
    return this;
  }
  /** The packed bytes. */
  get buffer(): ArrayBuffer {
    return this.#view.buffer as ArrayBuffer;
  }
}

/** Splits a workgroup count that may exceed the per-dimension limit (65535) into x*y. */
export function grid2d(workgroups: number, maxPerDim = 65535): [number, number] {
  if (workgroups <= maxPerDim) return [workgroups, 1];
  const y = ceilDiv(workgroups, maxPerDim);
  return [ceilDiv(workgroups, y), y];
}

/** WGSL storage type for a dtype (`f16` needs the `enable f16;` directive from {@linkcode wgslHeader}). */
export function wgslType(dtype: DType): string {
  return dtype;
}

/** Directives a kernel's source must start with for a dtype. */
export function wgslHeader(dtype: DType): string {
  return dtype === "f16" ? "enable f16;\n" : "";
}

/** Threads per workgroup of the simple one-dimensional kernels. */
export const LINEAR_WORKGROUP = 256;

/**
 * Elements each thread of a one-thread-per-lane map over `n` elements takes: 4 (`vec4` loads and stores) when `n`
 * is a multiple of 4, else 1. A thread storing one f16 writes 2 bytes at a time: SwiGLU's forward moved 1.6 TB/s
 * on the H200 that way, about 40% of its copy bandwidth.
 */
export function linearLanes(n: number): 1 | 4 {
  return n % 4 === 0 ? 4 : 1;
}

/**
 * Workgroup counts for `n` threads in workgroups of `size`, spread over x and y when x alone would exceed the
 * per-dimension limit. Pair with {@linkcode WGSL_LINEAR_INDEX} in the shader.
 */
export function linearWorkgroups(n: number, size = LINEAR_WORKGROUP): [number, number] {
  return grid2d(ceilDiv(n, size));
}

/**
 * WGSL snippet: declares `fn linear_index(wid, nwg, lid) -> u32` computing the flat thread index of a
 * {@linkcode linearWorkgroups} dispatch with workgroup size `WG`.
 */
export const WGSL_LINEAR_INDEX = `
fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, wg: u32) -> u32 {
  return (wid.y * nwg.x + wid.x) * wg + lid.x;
}
`;

/** A storage binding of {@linkcode linearKernelSpec}: WGSL name, access, element type. */
export type LinearBinding = [name: string, access: BindingAccess, element: string];

/**
 * A one-thread-per-element kernel (dispatched with {@linkcode linearWorkgroups}): the storage `buffers` at
 * bindings 0..n-1, a 16-byte uniform struct `P` with `fields` (four 4-byte scalars) bound as `p`, optional
 * helper functions, and a `body` that runs with `i`, the flat thread index, and does its own bounds check.
 * Every elementwise-style kernel shares this shell, so only its fields and body differ.
 */
export function linearKernelSpec(
  key: string,
  dtype: DType,
  buffers: readonly LinearBinding[],
  fields: string,
  body: string,
  helpers = "",
): KernelSpec {
  const decls = buffers.map(([name, access, el], b) =>
    `@group(0) @binding(${b}) var<storage, ${
      access === "read" ? "read" : "read_write"
    }> ${name}: array<${el}>;`
  ).join("\n");
  return {
    key,
    bindings: buffers.map(([, access]) => access),
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { ${fields} }
${decls}
@group(0) @binding(${buffers.length}) var<uniform> p: P;
${WGSL_LINEAR_INDEX}${helpers}
@compute @workgroup_size(${LINEAR_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_index(wid, nwg, lid, ${LINEAR_WORKGROUP}u);
  ${body}
}
`,
  };
}
