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
