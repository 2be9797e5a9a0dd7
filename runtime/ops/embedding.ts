/**
 * Token embedding as a differentiable op: a gather forward and a deterministic scatter-add backward (positions
 * grouped by id on the CPU; see `kernels/embedding.ts`).
 *
 * @module
 */
import { buildEmbeddingCsr, embeddingBackward, embeddingForward } from "../../kernels/embedding.ts";
import { UserError } from "../../util/errors.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Options of {@linkcode embedding}. */
export interface EmbeddingOptions {
  /** Shape of the ids (default: [n] for an Int32Array, the tensor's shape for a tensor). */
  shape?: readonly number[];
  /**
   * The ids on the CPU when `ids` is a tensor: needed for the table gradient (positions are grouped by id on the
   * CPU). Ignored when `ids` is an Int32Array.
   */
  hostIds?: Int32Array;
  /** Names the ids' source in error messages (e.g. the data file). */
  source?: string;
}

/** Throws a UserError naming the first id outside [0, vocab). */
function validateIds(ids: Int32Array, vocab: number, source: string): void {
  for (let t = 0; t < ids.length; t++) {
    const id = ids[t];
    if (id < 0 || id >= vocab) {
      throw new UserError(
        `${source}: token id ${id} at position ${t} is outside the vocabulary [0, ${vocab}); ` +
          "the tokenizer and the model's embedding table do not match",
      );
    }
  }
}

/**
 * `out[..., :] = table[ids[...], :]`: table [vocab, d], ids i32 (an Int32Array, uploaded here, or a GPU tensor),
 * out [...ids shape, d] in the table's dtype. Differentiable in the table; the gradient is written straight into
 * `table.grad` when the table is a parameter. Ids seen on the CPU are validated (a UserError names the first bad
 * one); ids only on the GPU that fall outside the table give zero rows.
 */
export function embedding(table: Tensor, ids: Tensor | Int32Array, opts: EmbeddingOptions = {}): Tensor {
  const rt = table.rt;
  if (table.shape.length !== 2) {
    throw new Error(`embedding: table must be [vocab, d], got ${shapeStr(table.shape)}`);
  }
  const [vocab, d] = table.shape;
  const source = opts.source ?? "embedding";
  const host = ids instanceof Int32Array ? ids : opts.hostIds;
  const idShape = opts.shape ?? (ids instanceof Int32Array ? [ids.length] : ids.shape);
  const n = ids instanceof Int32Array ? ids.length : ids.size;
  if (idShape.reduce((a, b) => a * b, 1) !== n) {
    throw new Error(`embedding: ids shape ${shapeStr(idShape)} does not hold ${n} ids`);
  }
  if (!(ids instanceof Int32Array) && ids.dtype !== "i32") {
    throw new Error(`embedding: ids must be i32, got ${ids}`);
  }
  if (host) {
    if (host.length !== n) throw new Error(`embedding: hostIds has ${host.length} ids, expected ${n}`);
    validateIds(host, vocab, source);
  }
  const needsGrad = rt.needsGrad(table);
  if (needsGrad && !host) {
    throw new Error(
      "embedding: the table needs a gradient, which groups positions by id on the CPU; pass the ids as an " +
        "Int32Array or give opts.hostIds",
    );
  }
  const idTensor = ids instanceof Int32Array ? rt.tensor(ids, [n], "i32") : ids;
  const out = rt.empty([...idShape, d], table.dtype);
  const f = embeddingForward(table.dtype, n, d, vocab);
  rt.dev.dispatch(f.spec, [idTensor.binding, table.binding, out.binding], f.workgroups, f.uniforms);
  if (ids instanceof Int32Array && !needsGrad) idTensor.dispose();
  if (!needsGrad) return out;
  rt.record("embedding", [table], [out], ([g]) => {
    const csr = buildEmbeddingCsr(host!, vocab);
    const csrT = rt.tensor(csr.data, [csr.data.length], "i32");
    const leaf = rt.leafGradTarget(table);
    const gt = leaf ? leaf.grad : rt.zeros(table.shape, table.dtype);
    // a fresh leaf gradient holds garbage: zero it so rows of absent ids read 0
    if (leaf && !leaf.accumulate) rt.dev.encoder().clearBuffer(gt.buffer, 0, gt.paddedByteLength);
    const k = embeddingBackward(table.dtype, csr.unique, d, true);
    rt.dev.dispatch(k.spec, [csrT.binding, g!.binding, gt.binding], k.workgroups, k.uniforms);
    csrT.dispose();
    return [leaf ? null : gt];
  });
  return out;
}
