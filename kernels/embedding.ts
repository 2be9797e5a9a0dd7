/**
 * Embedding gather (`out[t, :] = table[ids[t], :]`) and its backward, a deterministic scatter-add without float
 * atomics.
 *
 * The backward groups token positions by id on the CPU (the caller holds the ids there anyway: they came from a
 * tokenizer or a data loader): {@linkcode buildEmbeddingCsr} sorts positions by id with a stable counting sort
 * into a CSR list (unique ids, row starts, positions). The kernel then gives each (unique id, block of 256
 * columns) one workgroup, whose threads sum that id's gradient rows in position order and write (or add to) one
 * row of the table gradient. Every row is written by one thread in a fixed order, so the result is bitwise
 * reproducible; rows of ids that do not occur are not touched (the op zero-fills a fresh gradient).
 *
 * @module
 */
import { cachedSpec, ceilDiv, type DType, grid2d, Uniforms, wgslHeader, wgslType } from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** Threads per workgroup of the embedding kernels. */
export const EMBEDDING_WORKGROUP = 256;

/** Positions grouped by id, packed into one i32 array: `[ids (u) | starts (u + 1) | positions (n)]`. */
export interface EmbeddingCsr {
  /** The packed array. */
  data: Int32Array;
  /** Number of distinct ids. */
  unique: number;
}

/**
 * Groups positions by id with a stable counting sort (positions of one id stay in increasing order). Ids must be
 * in [0, vocab); the caller validates them.
 */
export function buildEmbeddingCsr(ids: ArrayLike<number>, vocab: number): EmbeddingCsr {
  const n = ids.length;
  const count = new Int32Array(vocab + 1);
  for (let t = 0; t < n; t++) count[ids[t] + 1]++;
  let unique = 0;
  for (let v = 1; v <= vocab; v++) if (count[v] > 0) unique++;
  for (let v = 1; v <= vocab; v++) count[v] += count[v - 1]; // count[v] = first slot of id v
  const data = new Int32Array(unique + unique + 1 + n);
  const posBase = 2 * unique + 1;
  const cursor = count.slice(0, vocab);
  for (let t = 0; t < n; t++) data[posBase + cursor[ids[t]]++] = t;
  let u = 0;
  for (let v = 0; v < vocab; v++) {
    if (count[v + 1] > count[v]) {
      data[u] = v;
      data[unique + u] = count[v];
      u++;
    }
  }
  data[2 * unique] = n;
  return { data, unique };
}

/**
 * Gather: `out[t, j] = table[ids[t], j]`; an id outside [0, vocab) yields a zero row (the op validates ids it
 * can see on the CPU). Bindings: ids (read, i32), table (read), out (rw).
 */
export function embeddingForward(dtype: DType, n: number, d: number, vocab: number): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`embedding_fwd_${dtype}`, () => ({
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { total: u32, d: u32, vocab: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> IDS: array<i32>;
@group(0) @binding(1) var<storage, read> TABLE: array<${T}>;
@group(0) @binding(2) var<storage, read_write> OUT: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(${EMBEDDING_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.y * nwg.x + wid.x) * ${EMBEDDING_WORKGROUP}u + lid;
  if (i >= p.total) { return; }
  let t = i / p.d;
  let j = i % p.d;
  let id = IDS[t];
  var v = ${T}(0.0);
  if (id >= 0 && u32(id) < p.vocab) { v = TABLE[u32(id) * p.d + j]; }
  OUT[i] = v;
}
`,
  }));
  return {
    spec,
    uniforms: new Uniforms(16).u32(n * d).u32(d).u32(vocab).buffer,
    workgroups: grid2d(ceilDiv(n * d, EMBEDDING_WORKGROUP)),
  };
}

/**
 * Scatter-add backward: for each distinct id, `gtable[id, :] (+)= sum over its positions t of g[t, :]`, in
 * position order. Bindings: csr (read, i32, {@linkcode EmbeddingCsr.data}), g (read), gtable (rw).
 */
export function embeddingBackward(dtype: DType, unique: number, d: number, accumulate: boolean): Launch {
  const T = wgslType(dtype);
  const spec = cachedSpec(`embedding_bwd_${dtype}${accumulate ? "_acc" : ""}`, () => ({
    bindings: ["read", "read", "rw"],
    uniformBytes: 16,
    code: `${wgslHeader(dtype)}
struct P { unique: u32, d: u32, colBlocks: u32, _a: u32 }
@group(0) @binding(0) var<storage, read> CSR: array<i32>;
@group(0) @binding(1) var<storage, read> G: array<${T}>;
@group(0) @binding(2) var<storage, read_write> GT: array<${T}>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(${EMBEDDING_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let block = wid.y * nwg.x + wid.x;   // (distinct id, column block), column block fastest
  let u = block / p.colBlocks;
  let j = (block % p.colBlocks) * ${EMBEDDING_WORKGROUP}u + lid;
  if (u >= p.unique || j >= p.d) { return; }
  let id = u32(CSR[u]);
  let s0 = u32(CSR[p.unique + u]);
  let s1 = u32(CSR[p.unique + u + 1u]);
  let posBase = 2u * p.unique + 1u;
  var acc = 0.0;
  for (var s = s0; s < s1; s++) { acc += f32(G[u32(CSR[posBase + s]) * p.d + j]); }
  GT[id * p.d + j] = ${T}(${accumulate ? "f32(GT[id * p.d + j]) + " : ""}acc);
}
`,
  }));
  const colBlocks = ceilDiv(d, EMBEDDING_WORKGROUP);
  return {
    spec,
    uniforms: new Uniforms(16).u32(unique).u32(d).u32(colBlocks).buffer,
    workgroups: grid2d(unique * colBlocks),
  };
}
