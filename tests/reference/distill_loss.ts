/**
 * Float64 reference of the distillation loss over rows of logits, exactly as documented in
 * `kernels/cross_entropy.ts` (weights `w_t = mask_t * [label_t != -100]`, means weighted by w, KL scaled by
 * tau^2), its analytic gradient with respect to the logits, and the lm_head product `h W^T`.
 *
 * @module
 */

/** Inputs of {@linkcode refDistillLoss}: row-major `[N, V]` logits. */
export interface RefLossInput {
  /** Student logits. */
  s: Float64Array;
  /** Teacher logits, or null for cross-entropy only. */
  t: Float64Array | null;
  /** Labels (-100 ignored), or null (every token weight 1 before the mask). */
  labels: Int32Array | null;
  /** Per-token weights, or null. */
  mask: Float64Array | null;
  /** Tokens. */
  N: number;
  /** Vocabulary. */
  V: number;
  /** CE weight. */
  alpha: number;
  /** KL weight. */
  beta: number;
  /** Temperature. */
  tau: number;
}

function tokenWeight(x: RefLossInput, r: number): number {
  return (x.labels && x.labels[r] === -100 ? 0 : 1) * (x.mask ? x.mask[r] : 1);
}

function logSumExp(x: Float64Array, off: number, V: number, f: number): number {
  let m = -Infinity;
  for (let i = 0; i < V; i++) m = Math.max(m, x[off + i] * f);
  let z = 0;
  for (let i = 0; i < V; i++) z += Math.exp(x[off + i] * f - m);
  return m + Math.log(z);
}

/** Per-token CE and KL (0 at ignored tokens), the weighted means, the loss and the weight total. */
export function refDistillLoss(x: RefLossInput): {
  ce: Float64Array;
  kl: Float64Array;
  loss: number;
  ceMean: number;
  klMean: number;
  W: number;
} {
  const { s, t, labels, N, V, tau } = x;
  const ce = new Float64Array(N), kl = new Float64Array(N);
  let W = 0, sc = 0, sk = 0;
  for (let r = 0; r < N; r++) {
    const w = tokenWeight(x, r);
    W += w;
    if (w === 0) continue;
    const o = r * V;
    if (labels) ce[r] = logSumExp(s, o, V, 1) - s[o + labels[r]];
    if (t) {
      const la = logSumExp(t, o, V, 1 / tau), lb = logSumExp(s, o, V, 1 / tau);
      let k = 0;
      for (let i = 0; i < V; i++) {
        const lp = t[o + i] / tau - la, lq = s[o + i] / tau - lb;
        k += Math.exp(lp) * (lp - lq);
      }
      kl[r] = tau * tau * k;
    }
    sc += w * ce[r];
    sk += w * kl[r];
  }
  const ceMean = W ? sc / W : 0, klMean = W ? sk / W : 0;
  return { ce, kl, loss: x.alpha * ceMean + x.beta * klMean, ceMean, klMean, W };
}

/** d loss / d s, `[N, V]`. */
export function refDistillLossGrad(x: RefLossInput): Float64Array {
  const { s, t, labels, N, V, alpha, beta, tau } = x;
  const { W } = refDistillLoss(x);
  const g = new Float64Array(N * V);
  const softmax = (a: Float64Array, o: number, f: number) => {
    const l = logSumExp(a, o, V, f);
    return Array.from({ length: V }, (_, i) => Math.exp(a[o + i] * f - l));
  };
  for (let r = 0; r < N; r++) {
    const w = tokenWeight(x, r);
    if (w === 0 || W === 0) continue;
    const o = r * V;
    const ps = softmax(s, o, 1), q = softmax(s, o, 1 / tau), p = t ? softmax(t, o, 1 / tau) : null;
    for (let i = 0; i < V; i++) {
      let gi = labels ? alpha * (ps[i] - (i === labels[r] ? 1 : 0)) : 0;
      if (p) gi += beta * tau * (q[i] - p[i]);
      g[o + i] = (w / W) * gi;
    }
  }
  return g;
}

/** `h W^T`: h `[N, D]`, W `[V, D]` -> `[N, V]`. */
export function refHeadLogits(
  h: Float64Array,
  w: Float64Array,
  N: number,
  D: number,
  V: number,
): Float64Array {
  const out = new Float64Array(N * V);
  for (let r = 0; r < N; r++) {
    for (let v = 0; v < V; v++) {
      let acc = 0;
      for (let d = 0; d < D; d++) acc += h[r * D + d] * w[v * D + d];
      out[r * V + v] = acc;
    }
  }
  return out;
}
