/**
 * A float64 CPU reference of the models Distillery runs: HF Llama/Mistral decoder stacks and the Mamba2 hybrid of
 * method.md section 1.1, in plain loops. It is the independent oracle for tests (GPU model parity on
 * random-init models, float64 scoring of evaluation items); it is itself checked against the fixtures made by
 * Hugging Face transformers and the official MambaInLlama code.
 *
 * @module
 */

/** Shapes and constants of a reference model. */
export interface RefConfig {
  /** Hidden size. */
  D: number;
  /** Decoder layers. */
  nLayers: number;
  /** Attention heads. */
  H: number;
  /** Key/value heads. */
  Hkv: number;
  /** Head dimension. */
  hd: number;
  /** MLP intermediate size. */
  I: number;
  /** Vocabulary size. */
  V: number;
  /** RMSNorm epsilon of the decoder norms. */
  eps: number;
  /** RoPE inverse frequencies [hd/2]. */
  invFreq: Float64Array;
  /** Mistral sliding window (keys j with i - j < window), or null. */
  slidingWindow: number | null;
  /** Layers that keep attention; the rest are Mamba layers (all layers attention when undefined). */
  attnLayers?: number[];
  /** Mixer of the Mamba layers (default mamba2). */
  mixer?: "mamba2" | "mamba1";
}

/** Weight lookup by HF state-dict name. */
export type RefWeights = (name: string) => Float64Array;

/** Inverse RoPE frequencies of the default rope type: theta^(-2i/hd). */
export function defaultInvFreq(theta: number, hd: number): Float64Array {
  const out = new Float64Array(hd / 2);
  for (let i = 0; i < hd / 2; i++) out[i] = 1 / Math.pow(theta, (2 * i) / hd);
  return out;
}

/** y[t, o] = sum_i x[t, i] W[o, i] (PyTorch Linear layout). */
export function linear(x: Float64Array, W: Float64Array, T: number, inF: number, outF: number): Float64Array {
  const y = new Float64Array(T * outF);
  for (let t = 0; t < T; t++) {
    const xo = t * inF;
    for (let o = 0; o < outF; o++) {
      const wo = o * inF;
      let s = 0;
      for (let i = 0; i < inF; i++) s += x[xo + i] * W[wo + i];
      y[t * outF + o] = s;
    }
  }
  return y;
}

/** HF RMSNorm over rows of width `n`. */
export function rmsnorm(x: Float64Array, w: Float64Array, T: number, n: number, eps: number): Float64Array {
  const y = new Float64Array(T * n);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let i = 0; i < n; i++) ss += x[t * n + i] ** 2;
    const r = 1 / Math.sqrt(ss / n + eps);
    for (let i = 0; i < n; i++) y[t * n + i] = x[t * n + i] * r * w[i];
  }
  return y;
}

const silu = (v: number) => v / (1 + Math.exp(-v));
const softplus = (v: number) => (v > 20 ? v : Math.log1p(Math.exp(v)));

/** Applies HF rotate_half RoPE in place to [T, heads, hd] at positions pos0 + t. */
function rope(
  x: Float64Array,
  T: number,
  heads: number,
  hd: number,
  invFreq: Float64Array,
  pos0: number,
): void {
  const half = hd / 2;
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < heads; h++) {
      const o = (t * heads + h) * hd;
      for (let i = 0; i < half; i++) {
        const ang = (pos0 + t) * invFreq[i];
        const c = Math.cos(ang), s = Math.sin(ang);
        const a = x[o + i], b = x[o + i + half];
        x[o + i] = a * c - b * s;
        x[o + i + half] = b * c + a * s;
      }
    }
  }
}

function attention(cfg: RefConfig, w: RefWeights, p: string, u: Float64Array, T: number): Float64Array {
  const { D, H, Hkv, hd } = cfg;
  const q = linear(u, w(`${p}.self_attn.q_proj.weight`), T, D, H * hd);
  const k = linear(u, w(`${p}.self_attn.k_proj.weight`), T, D, Hkv * hd);
  const v = linear(u, w(`${p}.self_attn.v_proj.weight`), T, D, Hkv * hd);
  rope(q, T, H, hd, cfg.invFreq, 0);
  rope(k, T, Hkv, hd, cfg.invFreq, 0);
  const o = new Float64Array(T * H * hd);
  const scale = 1 / Math.sqrt(hd);
  const scores = new Float64Array(T);
  for (let h = 0; h < H; h++) {
    const g = Math.floor(h / (H / Hkv));
    for (let i = 0; i < T; i++) {
      const j0 = cfg.slidingWindow ? Math.max(0, i - cfg.slidingWindow + 1) : 0;
      let m = -Infinity;
      for (let j = j0; j <= i; j++) {
        let s = 0;
        for (let d = 0; d < hd; d++) s += q[(i * H + h) * hd + d] * k[(j * Hkv + g) * hd + d];
        scores[j] = s * scale;
        if (scores[j] > m) m = scores[j];
      }
      let z = 0;
      for (let j = j0; j <= i; j++) z += scores[j] = Math.exp(scores[j] - m);
      for (let d = 0; d < hd; d++) {
        let acc = 0;
        for (let j = j0; j <= i; j++) acc += scores[j] * v[(j * Hkv + g) * hd + d];
        o[(i * H + h) * hd + d] = acc / z;
      }
    }
  }
  return linear(o, w(`${p}.self_attn.o_proj.weight`), T, H * hd, D);
}

/** The Mamba2 mixer of method.md 1.1 for a normalised input u [T, D], sequential recurrence. */
export function mamba2Mixer(
  cfg: RefConfig,
  w: RefWeights,
  p: string,
  u: Float64Array,
  T: number,
): Float64Array {
  const { D, H, Hkv, hd } = cfg;
  const dInner = H * hd, dXb = Hkv * hd;
  const convC = 2 * dXb + dInner;
  const width = dInner + convC + H;
  const zxbcdt = linear(u, w(`${p}.mamba.in_proj.weight`), T, D, width);
  const cw = w(`${p}.mamba.conv1d.weight`), cb = w(`${p}.mamba.conv1d.bias`);
  const xBC = new Float64Array(T * convC);
  for (let t = 0; t < T; t++) {
    for (let c = 0; c < convC; c++) {
      let s = cb[c];
      for (let k = 0; k < 4; k++) {
        const tt = t - 3 + k;
        if (tt >= 0) s += cw[c * 4 + k] * zxbcdt[tt * width + dInner + c];
      }
      xBC[t * convC + c] = silu(s);
    }
  }
  const dtBias = w(`${p}.mamba.dt_bias`), Alog = w(`${p}.mamba.A_log`), Dp = w(`${p}.mamba.D`);
  const normW = w(`${p}.mamba.norm.weight`);
  const y = new Float64Array(T * dInner);
  const rep = H / Hkv;
  for (let h = 0; h < H; h++) {
    const g = Math.floor(h / rep);
    const A = -Math.exp(Alog[h]);
    const S = new Float64Array(hd * hd); // [p, n]
    for (let t = 0; t < T; t++) {
      const delta = softplus(zxbcdt[t * width + dInner + convC + h] + dtBias[h]);
      const a = Math.exp(delta * A);
      const xo = t * convC + g * hd, bo = t * convC + dXb + g * hd, co = t * convC + 2 * dXb + h * hd;
      for (let pp = 0; pp < hd; pp++) {
        const xv = xBC[xo + pp];
        let acc = 0;
        for (let n = 0; n < hd; n++) {
          const sv = a * S[pp * hd + n] + delta * xv * xBC[bo + n];
          S[pp * hd + n] = sv;
          acc += sv * xBC[co + n];
        }
        y[t * dInner + h * hd + pp] = acc + Dp[h] * xv;
      }
    }
  }
  // gate, then grouped RMSNorm (group = head_dim, eps 1e-5 as in the reference)
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < H; h++) {
      let ss = 0;
      for (let i = 0; i < hd; i++) {
        const j = t * dInner + h * hd + i;
        y[j] *= silu(zxbcdt[t * width + h * hd + i]);
        ss += y[j] * y[j];
      }
      const r = 1 / Math.sqrt(ss / hd + 1e-5);
      for (let i = 0; i < hd; i++) y[t * dInner + h * hd + i] *= r * normW[h * hd + i];
    }
  }
  return linear(y, w(`${p}.mamba.out_proj.weight`), T, dInner, D);
}

/**
 * The Mamba1 mixer of method.md 1.2 (d_state 16, groups of 16 channels, x and B repeated to d_inner, the
 * official double dt bias), sequential recurrence.
 */
export function mamba1Mixer(
  cfg: RefConfig,
  w: RefWeights,
  p: string,
  u: Float64Array,
  T: number,
): Float64Array {
  const { D, H, Hkv, hd } = cfg;
  const dInner = H * hd, dXb = Hkv * hd, N = 16;
  const rep = dInner / dXb;
  const dtRank = Math.ceil(D / 16);
  const xs = linear(u, w(`${p}.mamba.in_proj_x.weight`), T, D, dXb);
  const Bs = linear(u, w(`${p}.mamba.B_proj.weight`), T, D, dXb);
  const Cs = linear(u, w(`${p}.mamba.C_proj.weight`), T, D, dInner);
  const z = linear(u, w(`${p}.mamba.in_proj_z.weight`), T, D, dInner);
  const dtLow = linear(u, w(`${p}.mamba.dt_proj_down.weight`), T, D, dtRank);
  const dt = linear(dtLow, w(`${p}.mamba.dt_proj.weight`), T, dtRank, dInner);
  const dtB = w(`${p}.mamba.dt_proj.bias`);
  const cw = w(`${p}.mamba.conv1d.weight`), cb = w(`${p}.mamba.conv1d.bias`);
  const Alog = w(`${p}.mamba.A_log`), Dp = w(`${p}.mamba.D`);
  // channel c of the repeated x / B reads group floor((c/16) / rep) of the originals
  const src = (c: number) => Math.floor(Math.floor(c / N) / rep) * N + (c % N);
  const xc = new Float64Array(T * dInner);
  for (let t = 0; t < T; t++) {
    for (let c = 0; c < dInner; c++) {
      let s = cb[c];
      for (let k = 0; k < 4; k++) {
        const tt = t - 3 + k;
        if (tt >= 0) s += cw[c * 4 + k] * xs[tt * dXb + src(c)];
      }
      xc[t * dInner + c] = silu(s);
    }
  }
  const y = new Float64Array(T * dInner);
  for (let c = 0; c < dInner; c++) {
    const h = new Float64Array(N);
    const g = Math.floor(c / N);
    for (let t = 0; t < T; t++) {
      const delta = softplus(dt[t * dInner + c] + 2 * dtB[c]);
      const xv = xc[t * dInner + c];
      let acc = 0;
      for (let n = 0; n < N; n++) {
        h[n] = Math.exp(delta * -Math.exp(Alog[c * N + n])) * h[n] +
          delta * Bs[t * dXb + src(g * N + n)] * xv;
        acc += Cs[t * dInner + g * N + n] * h[n];
      }
      y[t * dInner + c] = (acc + Dp[c] * xv) * silu(z[t * dInner + c]);
    }
  }
  return linear(y, w(`${p}.mamba.out_proj.weight`), T, dInner, D);
}

/** Output of {@linkcode refForward}. */
export interface RefOutput {
  /** Logits [T, V]. */
  logits: Float64Array;
  /** Output of each decoder layer [T, D] (residual included, before the final norm). */
  layerOut: Float64Array[];
}

/** Full-sequence forward of a teacher (all attention) or a Mamba2 hybrid. */
export function refForward(cfg: RefConfig, w: RefWeights, ids: readonly number[]): RefOutput {
  const { D, I, V } = cfg;
  const T = ids.length;
  const emb = w("model.embed_tokens.weight");
  let x = new Float64Array(T * D);
  for (let t = 0; t < T; t++) x.set(emb.subarray(ids[t] * D, ids[t] * D + D), t * D);
  const layerOut: Float64Array[] = [];
  for (let l = 0; l < cfg.nLayers; l++) {
    const p = `model.layers.${l}`;
    const u = rmsnorm(x, w(`${p}.input_layernorm.weight`), T, D, cfg.eps);
    const isAttn = cfg.attnLayers === undefined || cfg.attnLayers.includes(l);
    const mix = isAttn
      ? attention(cfg, w, p, u, T)
      : cfg.mixer === "mamba1"
      ? mamba1Mixer(cfg, w, p, u, T)
      : mamba2Mixer(cfg, w, p, u, T);
    const h = x.map((v, i) => v + mix[i]);
    const u2 = rmsnorm(h, w(`${p}.post_attention_layernorm.weight`), T, D, cfg.eps);
    const gate = linear(u2, w(`${p}.mlp.gate_proj.weight`), T, D, I);
    const up = linear(u2, w(`${p}.mlp.up_proj.weight`), T, D, I);
    for (let i = 0; i < gate.length; i++) gate[i] = silu(gate[i]) * up[i];
    const down = linear(gate, w(`${p}.mlp.down_proj.weight`), T, I, D);
    x = h.map((v, i) => v + down[i]);
    layerOut.push(x);
  }
  const fin = rmsnorm(x, w("model.norm.weight"), T, D, cfg.eps);
  const logits = linear(fin, w("lm_head.weight"), T, D, V);
  return { logits, layerOut };
}

/** log_softmax(row)[target] in float64. */
export function logProbAt(logits: Float64Array, row: number, V: number, target: number): number {
  let m = -Infinity;
  for (let v = 0; v < V; v++) m = Math.max(m, logits[row * V + v]);
  let z = 0;
  for (let v = 0; v < V; v++) z += Math.exp(logits[row * V + v] - m);
  return logits[row * V + target] - m - Math.log(z);
}
