/**
 * Log-likelihood scoring on the GPU, the two request types of lm-evaluation-harness:
 *
 * - {@linkcode scoreWindows} (`loglikelihood_rolling`, perplexity): windows of token ids (data/text_windows.ts)
 *   are batched as [B, T] full-sequence forwards, longest first, shorter windows right-padded; each window's
 *   targets are scored with `tokenLogprobs` and summed on the CPU in float64.
 * - {@linkcode scoreContinuations} (`loglikelihood`, multiple choice): a context and its candidate continuations.
 *   The model input for one continuation is `context + continuation[:-1]` and its log-likelihood is the sum of
 *   the log-probabilities of the continuation's tokens, as in lm-eval. The context is computed once per item:
 *   contexts of equal length are prefilled together (all but their last token) into a decoding state, the state
 *   is forked into one row per continuation ({@linkcode forkDecodeState}), and one decode step over
 *   `[last context token, continuation[:-1]]` scores every continuation of the batch. Continuations of
 *   different lengths are right-padded; padding only follows real tokens, so it never changes a scored position
 *   (attention and Mamba layers are causal).
 *
 * Both read one small array back per batch, and neither builds autograd state.
 *
 * @module
 */
import type { CausalLM, DecodeState } from "./causal_lm.ts";
import { forkDecodeState } from "./fork_state.ts";
import { tokenLogprobs } from "../runtime/ops/loss.ts";

/** A window to score: feed `input`; `targets[j]` is scored by the logits at position `scoreFrom + j`. */
export interface ScoringWindow {
  /** Model input ids. */
  input: readonly number[];
  /** Target ids. */
  targets: readonly number[];
  /** Input position whose logits predict `targets[0]`. */
  scoreFrom: number;
}

/** Options shared by the scoring functions. */
export interface ScoreOptions {
  /** Sequences per forward (windows, or continuation rows) at most (default 8). */
  batchSize?: number;
  /** Stops between batches when aborted. */
  signal?: AbortSignal;
  /** Called after each batch with the number of windows / requests finished so far. */
  onProgress?: (done: number) => void;
}

const IGNORE = -100;

function checkIds(ids: readonly number[], V: number, what: string): void {
  for (const id of ids) {
    if (!Number.isInteger(id) || id < 0 || id >= V) {
      throw new Error(`${what}: token id ${id} outside the vocabulary [0, ${V})`);
    }
  }
}

/** Indices of `items` grouped by `keyOf`, groups in increasing key order, items in their original order. */
function groupBy<T>(items: readonly T[], keyOf: (t: T) => number): number[][] {
  const groups = new Map<number, number[]>();
  items.forEach((t, i) => {
    const k = keyOf(t);
    const g = groups.get(k);
    if (g) g.push(i);
    else groups.set(k, [i]);
  });
  return [...groups].sort((a, b) => a[0] - b[0]).map(([, g]) => g);
}

/**
 * Summed target log-probability of every window (natural log, float64 sums of float32 per-token values), in
 * window order.
 */
export async function scoreWindows(
  lm: CausalLM,
  windows: readonly ScoringWindow[],
  opts: ScoreOptions = {},
): Promise<Float64Array> {
  const rt = lm.rt;
  const V = lm.config.vocabSize;
  const B = Math.max(1, opts.batchSize ?? 8);
  const out = new Float64Array(windows.length);
  windows.forEach((w, i) => {
    const T = w.input.length;
    if (T === 0 || w.targets.length === 0 || w.scoreFrom < 0 || w.scoreFrom + w.targets.length > T) {
      throw new Error(`scoreWindows: window ${i} scores positions outside its ${T} input tokens`);
    }
    checkIds(w.input, V, `scoreWindows: window ${i}`);
    checkIds(w.targets, V, `scoreWindows: window ${i}`);
  });
  // Longest first, so batches hold windows of similar length; shorter ones are right-padded, which never changes
  // a scored position (the model is causal).
  const order = windows.map((_, i) => i).sort((a, b) =>
    windows[b].input.length - windows[a].input.length || a - b
  );
  let done = 0;
  for (let s = 0; s < order.length; s += B) {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const batch = order.slice(s, s + B);
    const T = windows[batch[0]].input.length;
    const ids = new Int32Array(batch.length * T);
    const targets = new Int32Array(batch.length * T).fill(IGNORE);
    batch.forEach((wi, b) => {
      const w = windows[wi];
      ids.set(w.input, b * T);
      ids.fill(w.input[w.input.length - 1], b * T + w.input.length, (b + 1) * T);
      targets.set(w.targets, b * T + w.scoreFrom);
    });
    const lp = await rt.noGrad(() =>
      rt.scope(async () => {
        const { logits } = lm.forward(ids, batch.length, T);
        return await tokenLogprobs(logits, rt.tensor(targets, [targets.length], "i32")).read();
      })
    );
    batch.forEach((wi, b) => {
      const w = windows[wi];
      let sum = 0;
      for (let j = 0; j < w.targets.length; j++) sum += lp[b * T + w.scoreFrom + j];
      out[wi] = sum;
    });
    done += batch.length;
    opts.onProgress?.(done);
  }
  return out;
}

/** One multiple-choice request: a context and the continuations to score after it. */
export interface ContinuationRequest {
  /** Context ids (at least one: use BOS for an empty context). */
  context: readonly number[];
  /** Continuation ids, each at least one token. */
  continuations: readonly (readonly number[])[];
}

/**
 * Log-likelihood of every continuation of every request: `result[i][c] = sum_j log p(cont_c[j] | context,
 * cont_c[:j])`. Requests are batched by context length so each context is computed once (see the module doc);
 * `batchSize` bounds the continuation rows per decode step.
 */
export async function scoreContinuations(
  lm: CausalLM,
  requests: readonly ContinuationRequest[],
  opts: ScoreOptions = {},
): Promise<number[][]> {
  const V = lm.config.vocabSize;
  const maxRows = Math.max(1, opts.batchSize ?? 8);
  requests.forEach((r, i) => {
    if (r.context.length === 0) throw new Error(`scoreContinuations: request ${i} has an empty context`);
    if (r.continuations.length === 0) {
      throw new Error(`scoreContinuations: request ${i} has no continuations`);
    }
    checkIds(r.context, V, `scoreContinuations: request ${i}`);
    r.continuations.forEach((c, j) => {
      if (c.length === 0) throw new Error(`scoreContinuations: request ${i} continuation ${j} is empty`);
      checkIds(c, V, `scoreContinuations: request ${i}`);
    });
  });
  const out: number[][] = requests.map((r) => new Array(r.continuations.length).fill(0));
  let done = 0;
  for (const group of groupBy(requests, (r) => r.context.length)) {
    // Pack requests into batches of at most maxRows continuation rows (a request with more rows goes alone).
    const batches: number[][] = [];
    let cur: number[] = [], rows = 0;
    for (const ri of group) {
      const n = requests[ri].continuations.length;
      if (cur.length > 0 && rows + n > maxRows) {
        batches.push(cur);
        cur = [];
        rows = 0;
      }
      cur.push(ri);
      rows += n;
    }
    if (cur.length) batches.push(cur);
    for (const batch of batches) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      const lls = await scoreBatch(lm, batch.map((ri) => requests[ri]));
      batch.forEach((ri, b) => (out[ri] = lls[b]));
      done += batch.length;
      opts.onProgress?.(done);
    }
  }
  return out;
}

/** Scores requests whose contexts all have the same length. */
async function scoreBatch(lm: CausalLM, reqs: readonly ContinuationRequest[]): Promise<number[][]> {
  const rt = lm.rt;
  const L = reqs[0].context.length;
  const prefix = L - 1;
  const rowOf: number[] = []; // request index of each continuation row
  const conts: (readonly number[])[] = [];
  reqs.forEach((r, b) => {
    for (const c of r.continuations) {
      rowOf.push(b);
      conts.push(c);
    }
  });
  const R = conts.length;
  const n = Math.max(...conts.map((c) => c.length));
  // Step input of row r: the context's last token, then the continuation without its last token.
  const ids = new Int32Array(R * n);
  const targets = new Int32Array(R * n).fill(IGNORE);
  conts.forEach((c, r) => {
    const ctx = reqs[rowOf[r]].context;
    ids[r * n] = ctx[L - 1];
    for (let j = 0; j + 1 < c.length; j++) ids[r * n + j + 1] = c[j];
    // padding repeats the last real token: any valid id does, it is never scored
    for (let j = c.length; j < n; j++) ids[r * n + j] = ids[r * n + c.length - 1];
    targets.set(c, r * n);
  });
  let base = null as DecodeState | null;
  let rowsState = null as DecodeState | null;
  try {
    const lp = await rt.noGrad(() =>
      rt.scope(async () => {
        if (prefix > 0) {
          base = lm.newDecodeState(reqs.length, prefix + n);
          const ctxIds = new Int32Array(reqs.length * prefix);
          reqs.forEach((r, b) => ctxIds.set(r.context.slice(0, prefix), b * prefix));
          lm.step(base, ctxIds, prefix, { lastOnly: true });
          rowsState = forkDecodeState(lm, base, rowOf, prefix + n);
          lm.disposeState(base);
          base = null;
        } else {
          rowsState = lm.newDecodeState(R, n);
        }
        const logits = lm.step(rowsState, ids, n);
        return await tokenLogprobs(logits, rt.tensor(targets, [targets.length], "i32")).read();
      })
    );
    const out: number[][] = reqs.map(() => []);
    conts.forEach((c, r) => {
      let sum = 0;
      for (let j = 0; j < c.length; j++) sum += lp[r * n + j];
      out[rowOf[r]].push(sum);
    });
    return out;
  } finally {
    if (base) lm.disposeState(base);
    if (rowsState) lm.disposeState(rowsState);
  }
}
