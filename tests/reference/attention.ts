/**
 * Float64 reference of causal GQA attention (HF Llama/Mistral eager semantics), forward and backward, written
 * plainly: materialise the scores, softmax, weighted sum.
 *
 * @module
 */

/** Shapes of a reference attention call. q/out: [B, T, H, hd]; k/v: [B, S, Hkv, hd] with S >= qoff + T. */
export interface RefAttentionShape {
  /** Batch. */
  B: number;
  /** Query tokens. */
  T: number;
  /** Query heads. */
  H: number;
  /** Key/value heads. */
  Hkv: number;
  /** Head dimension. */
  hd: number;
  /** Positions stored in k/v per batch entry (the S of [B, S, Hkv, hd]). */
  S: number;
  /** Position of query token 0. */
  qoff: number;
  /** Sliding window (0 = none). */
  window: number;
  /** Softmax scale. */
  scale: number;
}

function visible(j: number, pos: number, window: number): boolean {
  return j <= pos && (window === 0 || j > pos - window);
}

/** Forward: out [B, T, H, hd] and lse [B, T, H]. */
export function refAttention(
  s: RefAttentionShape,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
): { out: Float64Array; lse: Float64Array } {
  const { B, T, H, Hkv, hd, S, qoff, window, scale } = s;
  const G = H / Hkv;
  const out = new Float64Array(B * T * H * hd);
  const lse = new Float64Array(B * T * H);
  const sc = new Float64Array(S);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const pos = qoff + t;
      for (let h = 0; h < H; h++) {
        const hk = Math.floor(h / G);
        const qb = ((b * T + t) * H + h) * hd;
        let mx = -Infinity;
        for (let j = 0; j < S; j++) {
          if (!visible(j, pos, window)) continue;
          const kb = ((b * S + j) * Hkv + hk) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qb + d] * k[kb + d];
          sc[j] = dot * scale;
          if (sc[j] > mx) mx = sc[j];
        }
        let sum = 0;
        for (let j = 0; j < S; j++) if (visible(j, pos, window)) sum += Math.exp(sc[j] - mx);
        lse[(b * T + t) * H + h] = mx + Math.log(sum);
        for (let j = 0; j < S; j++) {
          if (!visible(j, pos, window)) continue;
          const pr = Math.exp(sc[j] - mx) / sum;
          const vb = ((b * S + j) * Hkv + hk) * hd;
          for (let d = 0; d < hd; d++) out[qb + d] += pr * v[vb + d];
        }
      }
    }
  }
  return { out, lse };
}

/** Backward of `sum(out * gOut)`: dq, dk, dv (analytic, float64). */
export function refAttentionBackward(
  s: RefAttentionShape,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  gOut: Float64Array,
): { dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  const { B, T, H, Hkv, hd, S, qoff, window, scale } = s;
  const G = H / Hkv;
  const { out, lse } = refAttention(s, q, k, v);
  const dq = new Float64Array(q.length);
  const dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const pos = qoff + t;
      for (let h = 0; h < H; h++) {
        const hk = Math.floor(h / G);
        const qb = ((b * T + t) * H + h) * hd;
        let D = 0;
        for (let d = 0; d < hd; d++) D += gOut[qb + d] * out[qb + d];
        const L = lse[(b * T + t) * H + h];
        for (let j = 0; j < S; j++) {
          if (!visible(j, pos, window)) continue;
          const kb = ((b * S + j) * Hkv + hk) * hd;
          let dot = 0, dp = 0;
          for (let d = 0; d < hd; d++) {
            dot += q[qb + d] * k[kb + d];
            dp += gOut[qb + d] * v[kb + d];
          }
          const pr = Math.exp(dot * scale - L);
          const ds = pr * (dp - D);
          for (let d = 0; d < hd; d++) {
            dv[kb + d] += pr * gOut[qb + d];
            dq[qb + d] += scale * ds * k[kb + d];
            dk[kb + d] += scale * ds * q[qb + d];
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}
