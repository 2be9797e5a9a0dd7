import assert from "node:assert/strict";
import type { CausalLM } from "../../models/causal_lm.ts";
import { plainGenerate, speculativeGenerate } from "../../models/spec_decode.ts";
import type { VerifyMode } from "../../models/verify_state.ts";

/** What {@linkcode assertSpeculativeIsGreedy} checks. */
export interface GreedyCheck {
  /** Draft lengths to run. */
  ks: readonly number[];
  /** Verification mode (default fused). */
  mode?: VerifyMode;
  /** Tokens to generate. */
  maxNewTokens: number;
  /** Also pin one GPU->CPU read per pass (plus the wait after the prefill). */
  onePassOneRead?: boolean;
}

/**
 * Greedy speculative decoding of `target` with `draft` gives exactly plain greedy decoding of `target` for every
 * K of `c.ks` (the histogram covering every pass). Returns how many passes accepted every draft and how many
 * rejected one, so a caller can require that both rollback paths ran.
 */
export async function assertSpeculativeIsGreedy(
  target: CausalLM,
  draft: CausalLM,
  prompt: readonly number[],
  c: GreedyCheck,
): Promise<{ full: number; partial: number }> {
  const greedy = { temperature: 0 } as const;
  const ref = await plainGenerate(target, prompt, { maxNewTokens: c.maxNewTokens, sampling: greedy });
  assert.equal(ref.tokens.length, c.maxNewTokens);
  let full = 0, partial = 0;
  for (const k of c.ks) {
    const reads = target.rt.dev.stats.reads;
    const r = await speculativeGenerate(target, draft, prompt, {
      k,
      maxNewTokens: c.maxNewTokens,
      sampling: greedy,
      mode: c.mode,
    });
    const what = `${c.mode ?? "fused"} K=${k}`;
    assert.deepEqual(r.tokens, ref.tokens, what);
    assert.equal(r.histogram.length, k + 1, what);
    assert.equal(r.histogram.reduce((a, b) => a + b), r.passes, what);
    if (c.onePassOneRead) assert.equal(target.rt.dev.stats.reads - reads, r.passes + 1, `${what}: reads`);
    full += r.histogram[k];
    partial += r.passes - r.histogram[k];
  }
  return { full, partial };
}

/**
 * [start, tokens, keep] verification passes with K = 4: each starts at the kept length of the previous one;
 * partial (2 of 5), all (5 of 5), none (0 of 4), then short passes and one that keeps everything of 3.
 */
export const VERIFY_PLAN: readonly (readonly [number, number, number])[] = [
  [3, 5, 2],
  [5, 5, 5],
  [10, 4, 0],
  [10, 5, 1],
  [11, 3, 3],
  [14, 2, 2],
];

/** One verification pass's logits and where they sit in the sequence. */
export interface VerifiedPass {
  start: number;
  tokens: number;
  logits: Float32Array;
}

/**
 * Runs `plan` on `lm` over `ids` in `mode`: a verification state of capacity 32 and K = 4, the prefill of the
 * first `plan[0][0]` tokens, then per pass `verifyStep` and `verifyAccept(keep)`. Returns every pass's logits
 * for the caller to compare with a full forward of `ids`.
 */
export async function runVerifyPlan(
  lm: CausalLM,
  ids: Int32Array,
  mode: VerifyMode,
  plan: readonly (readonly [number, number, number])[] = VERIFY_PLAN,
): Promise<VerifiedPass[]> {
  const rt = lm.rt;
  const out: VerifiedPass[] = [];
  const s = lm.newVerifyState(32, 4, { mode });
  try {
    await rt.scope(async () => {
      lm.verifyPrefill(s, ids.slice(0, plan[0][0]), plan[0][0]);
      for (const [start, n, keep] of plan) {
        assert.equal(s.length, start, `${mode}: the pass at ${start} starts after the kept tokens`);
        const logits = (await lm.verifyStep(s, ids.slice(start, start + n), n).read()) as Float32Array;
        out.push({ start, tokens: n, logits });
        lm.verifyAccept(s, keep);
      }
    });
  } finally {
    lm.disposeVerifyState(s);
  }
  return out;
}
