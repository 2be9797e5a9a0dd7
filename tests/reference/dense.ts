/**
 * Float64 CPU references for the dense kernels (matmul, GEMV, RMSNorm, RoPE, embedding), written as plain loops.
 *
 * @module
 */

/** A stored matrix operand: data, whether it is batched, whether it is stored transposed. */
export interface RefOperand {
  /** Row-major data, [batch?, rows, cols] as stored. */
  data: ArrayLike<number>;
  /** True when it has a leading batch dimension. */
  batched: boolean;
  /** True when stored transposed. */
  trans: boolean;
}

/** `alpha op(A) op(B)` in float64; op(A) [M, K], op(B) [K, N]; returns [batch, M, N] flattened. */
export function refMatmul(
  a: RefOperand,
  b: RefOperand,
  batch: number,
  m: number,
  n: number,
  k: number,
  alpha = 1,
): Float64Array {
  const out = new Float64Array(batch * m * n);
  for (let z = 0; z < batch; z++) {
    const ao = a.batched ? z * m * k : 0, bo = b.batched ? z * k * n : 0;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) {
          const av = a.data[ao + (a.trans ? p * m + i : i * k + p)];
          const bv = b.data[bo + (b.trans ? j * k + p : p * n + j)];
          s += av * bv;
        }
        out[z * m * n + i * n + j] = alpha * s;
      }
    }
  }
  return out;
}

/** RMSNorm over the last dimension (HF Llama): `x / sqrt(mean(x^2) + eps) * w`. */
export function refRmsNorm(x: ArrayLike<number>, w: ArrayLike<number>, d: number, eps: number): Float64Array {
  const rows = x.length / d;
  const y = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < d; j++) ss += x[r * d + j] ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = x[r * d + j] * inv * w[j];
  }
  return y;
}

/**
 * RoPE with HF's `rotate_half` pairing (i, i + hd/2) on [T, H, hd]; `angle(t, i)` gives the angle of token t and
 * frequency i. `sign` -1 rotates backwards (the backward pass).
 */
export function refRope(
  x: ArrayLike<number>,
  tokens: number,
  heads: number,
  hd: number,
  angle: (t: number, i: number) => number,
  sign = 1,
): Float64Array {
  const y = new Float64Array(x.length);
  const half = hd / 2;
  for (let t = 0; t < tokens; t++) {
    for (let h = 0; h < heads; h++) {
      const o = (t * heads + h) * hd;
      for (let i = 0; i < half; i++) {
        const a = angle(t, i);
        const c = Math.cos(a), s = sign * Math.sin(a);
        const x1 = x[o + i], x2 = x[o + i + half];
        y[o + i] = x1 * c - x2 * s;
        y[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
  return y;
}
