/**
 * Float64 references of the Mamba2 state-space recurrence (the SSD "selective state update"): the plain sequential
 * forward, written exactly as method.md section 1.1 states it, and its hand-derived reverse-mode backward. The
 * GPU's chunked scan, its backward, the decode step and the fused verification kernel are all checked against
 * these; the backward reference is itself checked against finite differences of the forward in the tests.
 *
 * Layouts (row-major, contiguous): x [B, L, Hx, P], Bm [B, L, Hb, N], C [B, L, Hc, N], delta [B, L, H], A [H],
 * D [H], state [B, H, P, N], y [B, L, H, P]. Head h reads group floor(h / (H / Hg)) of a grouped input.
 *
 * @module
 */

/** Sizes of an SSD problem. */
export interface SsdRefShape {
  /** Batch. */
  batch: number;
  /** Sequence length. */
  seqlen: number;
  /** Heads of the recurrence (and of y, delta, A, D). */
  heads: number;
  /** Groups of x (divides heads). */
  headsX: number;
  /** Groups of B (divides heads). */
  headsB: number;
  /** Groups of C (divides heads). */
  headsC: number;
  /** Head dim of x and y. */
  dimP: number;
  /** State dim of B and C. */
  dimN: number;
}

/** Inputs of the recurrence, float64. `delta` is already positive (after softplus). */
export interface SsdRefInputs {
  /** [B, L, Hx, P]. */
  x: Float64Array;
  /** [B, L, H], positive. */
  delta: Float64Array;
  /** [H], negative. */
  A: Float64Array;
  /** [B, L, Hb, N]. */
  Bm: Float64Array;
  /** [B, L, Hc, N]. */
  C: Float64Array;
  /** [H]. */
  D: Float64Array;
  /** [B, H, P, N] or undefined for a zero initial state. */
  init?: Float64Array;
}

/** Output of the float64 forward, plus the per-step states the backward needs. */
export interface SsdRefForward {
  /** [B, L, H, P]. */
  y: Float64Array;
  /** [B, H, P, N]. */
  final: Float64Array;
  /** States after each step, [B, H, L, P, N]. */
  states: Float64Array;
}

/** PyTorch's softplus (threshold 20) in float64. */
export function softplusRef(v: number): number {
  return v > 20 ? v : Math.log1p(Math.exp(v));
}

/** The sequential recurrence S_t = exp(delta_t A) S_{t-1} + delta_t x_t B_t^T, y_t = S_t C_t + D x_t. */
export function ssdForwardRef(s: SsdRefShape, inp: SsdRefInputs): SsdRefForward {
  const { batch, seqlen: L, heads: H, headsX, headsB, headsC, dimP: P, dimN: N } = s;
  const y = new Float64Array(batch * L * H * P);
  const final = new Float64Array(batch * H * P * N);
  const states = new Float64Array(batch * H * L * P * N);
  const S = new Float64Array(P * N);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < H; h++) {
      const gx = Math.floor(h / (H / headsX)),
        gb = Math.floor(h / (H / headsB)),
        gc = Math.floor(h / (H / headsC));
      if (inp.init) S.set(inp.init.subarray((b * H + h) * P * N, (b * H + h + 1) * P * N));
      else S.fill(0);
      for (let t = 0; t < L; t++) {
        const dt = inp.delta[(b * L + t) * H + h];
        const a = Math.exp(dt * inp.A[h]);
        const xo = ((b * L + t) * headsX + gx) * P,
          bo = ((b * L + t) * headsB + gb) * N,
          co = ((b * L + t) * headsC + gc) * N;
        for (let p = 0; p < P; p++) {
          let acc = 0;
          for (let n = 0; n < N; n++) {
            const v = a * S[p * N + n] + dt * inp.x[xo + p] * inp.Bm[bo + n];
            S[p * N + n] = v;
            acc += v * inp.C[co + n];
          }
          y[((b * L + t) * H + h) * P + p] = acc + inp.D[h] * inp.x[xo + p];
        }
        states.set(S, ((b * H + h) * L + t) * P * N);
      }
      final.set(S, (b * H + h) * P * N);
    }
  }
  return { y, final, states };
}

/** Gradients of the recurrence's inputs. */
export interface SsdRefGrads {
  /** [B, L, Hx, P]. */
  x: Float64Array;
  /** [B, L, H]. */
  delta: Float64Array;
  /** [H]. */
  A: Float64Array;
  /** [B, L, Hb, N]. */
  Bm: Float64Array;
  /** [B, L, Hc, N]. */
  C: Float64Array;
  /** [H]. */
  D: Float64Array;
  /** [B, H, P, N]. */
  init: Float64Array;
}

/**
 * Reverse mode through the sequential recurrence, for upstream gradients `dy` [B, L, H, P] and `dfinal`
 * [B, H, P, N] (either may be absent = zero). G is the gradient of the current state; walking back in time:
 *   G += dy_t C_t^T;  dC_t = S_t^T dy_t;  dx_t = D dy_t + delta_t G B_t;  dB_t = delta_t G^T x_t;
 *   d(delta_t) = <G, x_t B_t^T> + A a_t <G, S_{t-1}>;  dA += delta_t a_t <G, S_{t-1}>;  G <- a_t G.
 */
export function ssdBackwardRef(
  s: SsdRefShape,
  inp: SsdRefInputs,
  fwd: SsdRefForward,
  dy: Float64Array | undefined,
  dfinal: Float64Array | undefined,
): SsdRefGrads {
  const { batch, seqlen: L, heads: H, headsX, headsB, headsC, dimP: P, dimN: N } = s;
  const g: SsdRefGrads = {
    x: new Float64Array(inp.x.length),
    delta: new Float64Array(inp.delta.length),
    A: new Float64Array(H),
    Bm: new Float64Array(inp.Bm.length),
    C: new Float64Array(inp.C.length),
    D: new Float64Array(H),
    init: new Float64Array(batch * H * P * N),
  };
  const G = new Float64Array(P * N);
  const zero = new Float64Array(P * N);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < H; h++) {
      const gx = Math.floor(h / (H / headsX)),
        gb = Math.floor(h / (H / headsB)),
        gc = Math.floor(h / (H / headsC));
      if (dfinal) G.set(dfinal.subarray((b * H + h) * P * N, (b * H + h + 1) * P * N));
      else G.fill(0);
      for (let t = L - 1; t >= 0; t--) {
        const dt = inp.delta[(b * L + t) * H + h];
        const a = Math.exp(dt * inp.A[h]);
        const xo = ((b * L + t) * headsX + gx) * P,
          bo = ((b * L + t) * headsB + gb) * N,
          co = ((b * L + t) * headsC + gc) * N,
          yo = ((b * L + t) * H + h) * P;
        const St = fwd.states.subarray(((b * H + h) * L + t) * P * N, ((b * H + h) * L + t + 1) * P * N);
        const Sprev = t > 0
          ? fwd.states.subarray(((b * H + h) * L + t - 1) * P * N, ((b * H + h) * L + t) * P * N)
          : inp.init
          ? inp.init.subarray((b * H + h) * P * N, (b * H + h + 1) * P * N)
          : zero;
        if (dy) {
          for (let p = 0; p < P; p++) {
            const d = dy[yo + p];
            g.D[h] += d * inp.x[xo + p];
            g.x[xo + p] += inp.D[h] * d;
            for (let n = 0; n < N; n++) {
              G[p * N + n] += d * inp.C[co + n];
              g.C[co + n] += St[p * N + n] * d;
            }
          }
        }
        let gxb = 0, gs = 0;
        for (let p = 0; p < P; p++) {
          for (let n = 0; n < N; n++) {
            const gv = G[p * N + n];
            g.x[xo + p] += dt * gv * inp.Bm[bo + n];
            g.Bm[bo + n] += dt * gv * inp.x[xo + p];
            gxb += gv * inp.x[xo + p] * inp.Bm[bo + n];
            gs += gv * Sprev[p * N + n];
          }
        }
        g.delta[(b * L + t) * H + h] += gxb + inp.A[h] * a * gs;
        g.A[h] += dt * a * gs;
        for (let i = 0; i < P * N; i++) G[i] *= a;
      }
      g.init.set(G, (b * H + h) * P * N);
    }
  }
  return g;
}

// ---- one row product of the chunked scan ------------------------------------------------------------------------

/** A grouped operand of {@linkcode ssdRowsRef}: element (b, t, g, k) at `offset + (b L + t) stride + g dim + k`. */
export interface SsdRowsRefOperand {
  /** The buffer. */
  data: Float64Array;
  /** Element offset of (0, 0, 0, 0). */
  offset: number;
  /** Elements from one token to the next. */
  stride: number;
  /** Groups (divides the heads). */
  heads: number;
  /** Elements per group. */
  dim: number;
}

/** Sizes of a chunked row product. */
export interface SsdRowsRefShape {
  /** Batch. */
  batch: number;
  /** Sequence length. */
  seqlen: number;
  /** Heads. */
  heads: number;
  /** Chunk length. */
  chunk: number;
  /** Head dim P (of the states). */
  dimP: number;
  /** State dim N (of the states). */
  dimN: number;
}

/**
 * One row product of the chunked scan in float64, as `ssdChunkRows` in kernels/ssd.ts defines it: per batch b,
 * chunk c (positions t0 + [0, clen)), head h, row r and column col,
 *   acc = rowScale_r sum_k U_r[k] S(k, col) + sum_{k in mask(r)} (U_r . V_k) decay(r, k) Z_k[col],
 * with S(k, col) = S[b, c, h, col, k] for `y` and `dx` (the transposed state), S[b, c, h, k, col] for `dB`
 * and `dC`; lower variants (`y`, `dC`): mask k <= r, decay exp(cs_r - cs_k) delta_k, rowScale exp(cs_r); upper
 * (`dx`, `dB`): mask k >= r, decay exp(cs_k - cs_r), rowScale exp(T - cs_r) with T the chunk's last cs. Then
 * `y` = acc + D x (x = Z); `dx` = delta_r acc + D dy (dy = Z) with row partials x . acc (slot 0) and x . dy
 * (slot 1), x = E; `dB` = delta_r acc with -B . dB (slot 2); `dC` = acc with C . dC (slot 3).
 * `cs` and `delta` are [B, H, L], `S` [B, nc, H, P, N]. Returns out [B, L, H, Z.dim] and the row partials
 * [4, B, L, H] (summed over the kernel's column tiles).
 */
export function ssdRowsRef(
  variant: "y" | "dx" | "dB" | "dC",
  s: SsdRowsRefShape,
  ops: { U: SsdRowsRefOperand; V: SsdRowsRefOperand; Z: SsdRowsRefOperand; E?: SsdRowsRefOperand },
  S: Float64Array,
  cs: Float64Array,
  delta: Float64Array,
  D: Float64Array,
): { out: Float64Array; partials: Float64Array } {
  const { batch, seqlen: L, heads: H, chunk: Q, dimP: P, dimN: N } = s;
  const { U, V, Z, E } = ops;
  const lower = variant === "y" || variant === "dC";
  const transposed = variant === "y" || variant === "dx";
  const nc = Math.ceil(L / Q), kdim = U.dim, ncols = Z.dim;
  const out = new Float64Array(batch * L * H * ncols);
  const partials = new Float64Array(4 * batch * L * H);
  const at = (o: SsdRowsRefOperand, b: number, t: number, h: number, k: number) =>
    o.data[o.offset + (b * L + t) * o.stride + Math.floor(h / (H / o.heads)) * o.dim + k];
  const slot = (k: number, b: number, t: number, h: number) => ((k * batch + b) * L + t) * H + h;
  for (let b = 0; b < batch; b++) {
    for (let c = 0; c < nc; c++) {
      const t0 = c * Q, clen = Math.min(Q, L - t0);
      for (let h = 0; h < H; h++) {
        const bh = (b * H + h) * L;
        const T = cs[bh + t0 + clen - 1];
        const sBase = ((b * nc + c) * H + h) * P * N;
        const state = (k: number, col: number) => S[sBase + (transposed ? col * N + k : k * N + col)];
        for (let r = 0; r < clen; r++) {
          const t = t0 + r, csr = cs[bh + t], dr = delta[bh + t];
          const rowScale = Math.exp(lower ? csr : T - csr);
          // W_r over the chunk's positions: masked, decayed dot products of U_r with V_k
          const w = new Float64Array(clen);
          for (let k = lower ? 0 : r; k <= (lower ? r : clen - 1); k++) {
            let dotUV = 0;
            for (let i = 0; i < kdim; i++) dotUV += at(U, b, t, h, i) * at(V, b, t0 + k, h, i);
            const csk = cs[bh + t0 + k];
            w[k] = dotUV * (lower ? Math.exp(csr - csk) * delta[bh + t0 + k] : Math.exp(csk - csr));
          }
          for (let col = 0; col < ncols; col++) {
            let inter = 0, intra = 0;
            for (let i = 0; i < kdim; i++) inter += at(U, b, t, h, i) * state(i, col);
            for (let k = 0; k < clen; k++) if (w[k]) intra += w[k] * at(Z, b, t0 + k, h, col);
            const acc = rowScale * inter + intra;
            const o = ((b * L + t) * H + h) * ncols + col;
            if (variant === "y") out[o] = acc + D[h] * at(Z, b, t, h, col);
            else if (variant === "dx") {
              const dy = at(Z, b, t, h, col), x = at(E!, b, t, h, col);
              out[o] = dr * acc + D[h] * dy;
              partials[slot(0, b, t, h)] += x * acc;
              partials[slot(1, b, t, h)] += x * dy;
            } else if (variant === "dB") {
              out[o] = dr * acc;
              partials[slot(2, b, t, h)] -= at(E!, b, t, h, col) * out[o];
            } else {
              out[o] = acc;
              partials[slot(3, b, t, h)] += at(E!, b, t, h, col) * acc;
            }
          }
        }
      }
    }
  }
  return { out, partials };
}
