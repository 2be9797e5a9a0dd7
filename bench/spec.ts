/**
 * Speculative decoding on a random-init Llama-3.2-1B-shape 50% Mamba2 hybrid (attention on the odd layers, built
 * with models/mapping.ts from a random-init teacher; `--mixer mamba1` for a Mamba1 hybrid), batch 1, f32. Rows
 * (JSON, one per line):
 *
 * - `verify_pass`: one target verification pass of K+1 tokens plus its rollback, fused vs unfused Mamba2
 *   verification (ms per pass, whole model), and `verify_mixer`: the conv + SSM part of one Mamba2 layer alone
 *   (the fused kernel vs K+1 step kernels with state copies; Mamba2 only);
 * - `baseline`: plain greedy decoding of the target (GPU-resident loop, one read per 32 tokens) and the same with
 *   one read per token;
 * - `spec`: per K, acceptance rate per position, mean accepted drafts per pass, tokens/s and speedup over the
 *   GPU-resident baseline, for two drafts: `random-2l`, a 2-layer Transformer of teacher layers [0, L-1] (low
 *   acceptance: random weights), and `own-first-2`, the target's own layers [0, 1] (a hybrid draft) of a target
 *   whose layers 2..L-1 are damped (residual writes x `--damp`, default 0.03) so that it agrees with them often;
 *   same cost per layer, only the acceptance differs;
 * - `exactness`: greedy speculative outputs compared with plain greedy decoding for every K, prompt and draft.
 *
 *   deno run -A bench/spec.ts --gpu dawn [--quick] [--tokens 48] [--prompts 4] [--damp 0.03] [--ks 1,2,4]
 *     [--calls 100] [--e2e-modes fused,unfused] [--drafts random,own] [--mixer mamba2|mamba1]
 *
 * `--quick` runs tiny shapes on any adapter (llvmpipe) to check the script.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { mapAttentionToMamba } from "../models/mapping.ts";
import type { MambaMixer } from "../models/config.ts";
import { buildDraftModel } from "../models/draft.ts";
import {
  dampLayers,
  LLAMA_3_2_1B_CONFIG,
  llamaConfig,
  randomTransformer,
  TINY_LLAMA_CONFIG,
} from "../models/random_init.ts";
import { measureSpeculative } from "../models/spec_measure.ts";
import { plainGenerate } from "../models/spec_decode.ts";
import {
  acceptLayerTokens,
  beginLayerVerification,
  mamba2VerifyScan,
  type VerifyMode,
} from "../models/verify_state.ts";
import { countParameters, type Model } from "../models/weights.ts";
import { Rng } from "../util/rng.ts";
import { flag } from "./harness.ts";

function log(row: Record<string, unknown>): void {
  console.log(JSON.stringify({ bench: "spec", ...row }));
}

/** Ms per call of `fn` (GPU work only, recorded between two syncs), after warm-up calls. */
async function timeCalls(rt: Runtime, fn: (i: number) => void, calls: number, warm: number): Promise<number> {
  for (let i = 0; i < warm; i++) rt.scope(() => fn(i));
  await rt.dev.sync();
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) rt.scope(() => fn(warm + i));
  await rt.dev.sync();
  return (performance.now() - t0) / calls;
}

/** A whole verification pass (K+1 tokens) and its rollback to `keep` tokens, ms per pass. */
async function timeVerifyPass(lm: CausalLM, k: number, mode: VerifyMode, calls: number): Promise<number> {
  const warm = 3;
  const keep = Math.ceil((k + 1) / 2);
  const s = lm.newVerifyState(8 + (warm + calls) * keep + k + 1, k, { mode });
  const V = lm.config.vocabSize;
  const ids = Int32Array.from({ length: k + 1 }, (_, i) => (i * 7919 + 11) % V);
  try {
    lm.rt.scope(() => lm.verifyPrefill(s, Int32Array.from([1, 2, 3, 4, 5, 6, 7, 8]), 8));
    return await timeCalls(
      lm.rt,
      () => {
        lm.verifyStep(s, ids, k + 1);
        lm.verifyAccept(s, keep);
      },
      calls,
      warm,
    );
  } finally {
    lm.disposeVerifyState(s);
  }
}

/** The conv + SSM part of Mamba2 layer 0 for K+1 tokens and its rollback, ms per call. */
async function timeMixer(lm: CausalLM, k: number, mode: VerifyMode, calls: number): Promise<number> {
  const rt = lm.rt, m = lm.mamba!;
  const s = lm.newVerifyState(16, k, { mode });
  const layer = s.mamba.get(0)!;
  const dims = {
    headsX: m.dXb / m.headDim,
    headsB: m.dXb / m.headDim,
    headsC: m.nHeads,
    dimP: m.headDim,
    dimN: m.dState,
  };
  const convC = 2 * m.dXb + m.dInner;
  const rng = new Rng("bench-spec-mixer");
  const xBCraw = rt.tensor(rng.uniformArray((k + 1) * convC, -1, 1), [1, k + 1, convC]).keep();
  const dt = rt.tensor(rng.uniformArray((k + 1) * m.nHeads, -3, 0), [1, k + 1, m.nHeads]).keep();
  const w = lm.param("model.layers.0.mamba.conv1d.weight").view([convC, m.dConv]).keep();
  const b = lm.param("model.layers.0.mamba.conv1d.bias");
  try {
    beginLayerVerification(rt, layer, s, dims);
    const keep = Math.ceil((k + 1) / 2);
    return await timeCalls(
      rt,
      () => {
        mamba2VerifyScan(layer, s, xBCraw, dt, w, b, dims);
        s.pending = k + 1;
        acceptLayerTokens(layer, s, keep);
        s.pending = 0;
      },
      calls,
      3,
    );
  } finally {
    xBCraw.dispose();
    dt.dispose();
    w.dispose();
    lm.disposeVerifyState(s);
  }
}

/** Runs the benchmark with the command-line flags (see the module documentation). */
export async function specBench(): Promise<void> {
  const quick = Deno.args.includes("--quick");
  const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
  const rt = new Runtime(await createDevice({ gpu }));
  const tokens = Number(flag("tokens") ?? (quick ? 12 : 48));
  const nPrompts = Number(flag("prompts") ?? (quick ? 2 : 4));
  const damp = Number(flag("damp") ?? 0.03);
  const ks = flag("ks")?.split(",").map(Number) ?? (quick ? [1, 2, 4, 8] : [1, 2, 3, 4, 5, 6, 7, 8]);
  const calls = Number(flag("calls") ?? (quick ? 5 : 100));
  // end-to-end runs per verification mode; `--e2e-modes fused` halves the run (the verify rows compare modes)
  const e2eModes = (flag("e2e-modes") ?? "fused,unfused").split(",") as ("fused" | "unfused")[];
  // which drafts run end to end: "random" (teacher layers [0, L-1]) and/or "own" (the damped target's first two)
  const drafts = (flag("drafts") ?? "random,own").split(",");
  const mixer = (flag("mixer") ?? "mamba2") as MambaMixer;
  if (mixer !== "mamba2" && mixer !== "mamba1") {
    throw new Error(`--mixer must be mamba2 or mamba1, got ${mixer}`);
  }
  log({ row: "device", device: rt.dev.describe(), quick, date: new Date().toISOString().slice(0, 10) });

  const t0 = performance.now();
  const cfg = llamaConfig(quick ? TINY_LLAMA_CONFIG : { ...LLAMA_3_2_1B_CONFIG });
  const L = cfg.numLayers;
  const attn = Array.from({ length: L }, (_, i) => i).filter((i) => i % 2 === 1);
  const rng = new Rng("bench-spec");
  const teacher = randomTransformer(cfg, rng.fork("teacher"));
  const hybrid: Model = mapAttentionToMamba(teacher.weights, cfg, attn, rng.fork("mamba"), mixer);
  const draftModel = buildDraftModel(teacher, [0, L - 1]);
  const target = CausalLM.fromModel(rt, hybrid);
  let draft = CausalLM.fromModel(rt, draftModel);
  await rt.dev.sync();
  log({
    row: "models",
    target_params: countParameters(hybrid.weights),
    draft_params: countParameters(draftModel.weights),
    mixer,
    attn_layers: attn,
    draft_layers: [0, L - 1],
    init_ms: Math.round(performance.now() - t0),
  });

  // 1. verification cost, fused vs unfused
  for (const k of ks) {
    const row: Record<string, unknown> = { row: "verify", k };
    for (const mode of ["fused", "unfused"] as const) {
      row[`pass_ms_${mode}`] = await timeVerifyPass(target, k, mode, calls);
      // the mixer-alone timing drives the Mamba2 kernels directly; Mamba1 is timed through whole passes
      if (mixer === "mamba2") row[`mixer_ms_${mode}`] = await timeMixer(target, k, mode, calls * 4);
    }
    row.pass_ratio = (row.pass_ms_unfused as number) / (row.pass_ms_fused as number);
    if (mixer === "mamba2") {
      row.mixer_ratio = (row.mixer_ms_unfused as number) / (row.mixer_ms_fused as number);
    }
    log(row);
  }

  // 2. end to end
  const vocab = cfg.vocabSize;
  const prompts = Array.from(
    { length: nPrompts },
    (_, i) => [1, ...Array.from({ length: 31 }, (_, j) => (i * 7919 + j * 104729 + 17) % vocab)],
  );
  const greedy = { temperature: 0 };
  let syncTokens = 0, syncMs = 0;
  for (const p of prompts) {
    const r = await plainGenerate(target, p, { maxNewTokens: tokens, sampling: greedy, greedyChunk: 1 });
    syncTokens += r.tokens.length;
    syncMs += r.decodeMs;
  }
  let mismatches = 0, checked = 0;
  const measure = async (t: CausalLM, d: CausalLM, name: string) => {
    for (const mode of e2eModes) {
      const m = await measureSpeculative(t, d, prompts, {
        ks,
        maxNewTokens: tokens,
        sampling: greedy,
        seed: 1,
        warmup: 1,
        mode,
      });
      if (mode === e2eModes[0]) {
        log({ row: "baseline", target: name, ...m.baseline });
      }
      for (const r of m.results) {
        log({
          row: "spec",
          draft: name,
          verify: mode,
          k: r.k,
          tokens_per_s: r.tokens_per_s,
          baseline_tokens_per_s: r.baseline_tokens_per_s,
          speedup: r.speedup,
          mean_accepted_per_pass: r.mean_accepted_per_pass,
          acceptance_rate_per_position: r.acceptance_rate_per_position.map((x) => +x.toFixed(3)),
          acceptance_histogram: r.acceptance_histogram,
          passes: r.passes,
          tokens: r.tokens,
        });
      }
      checked += ks.length * prompts.length;
      mismatches += m.greedyMismatches.length;
      for (const mm of m.greedyMismatches) log({ row: "mismatch", draft: name, verify: mode, ...mm });
    }
  };
  if (drafts.includes("random")) await measure(target, draft, "random-2l");
  log({
    row: "baseline_sync",
    note: "plain greedy, one GPU->CPU read per token",
    tokens: syncTokens,
    tokens_per_s: (syncTokens * 1000) / syncMs,
  });
  if (!drafts.includes("own")) {
    log({ row: "exactness", checked_outputs: checked, mismatches, ks, tokens, prompts: nPrompts });
    draft.dispose();
    target.dispose();
    return;
  }

  // 3. a draft that agrees often: the target's own first two layers, later layers damped
  draft.dispose();
  target.dispose();
  const damped = dampLayers(hybrid, Array.from({ length: L - 2 }, (_, i) => i + 2), damp);
  const agreeTarget = CausalLM.fromModel(rt, damped);
  draft = CausalLM.fromModel(rt, buildDraftModel(damped, [0, 1]));
  await measure(agreeTarget, draft, `own-first-2 (layers 2..${L - 1} damped x${damp})`);
  log({ row: "exactness", checked_outputs: checked, mismatches, ks, tokens, prompts: nPrompts });
  draft.dispose();
  agreeTarget.dispose();
}

if (import.meta.main) await specBench();
