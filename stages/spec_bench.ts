/**
 * `spec_bench`: the speculative-decoding benchmark (method.md section 3). For a target (the hybrid), a draft of
 * the same tokenizer and a prompt set, it first measures plain decoding of the target, then speculative decoding
 * for each K, on the same prompts, seeds and device, and writes `results.json` in the
 * {@linkcode SpecBenchResults} layout the run report charts (acceptance rate per position, mean accepted tokens per
 * target pass, acceptance histogram, tokens/s, speedup).
 *
 * Batch 1, prefill excluded from the timings. With temperature 0 every speculative output is also checked
 * against the baseline's (they must be equal); a difference is warned about and listed in the results with the
 * baseline's logit margin at that position. Timings are measurements, so the stage is not deterministic.
 *
 * @module
 */
import { join } from "node:path";
import { type Artifact, defineStage } from "../pipelines/stage.ts";
import type { SpecBenchResults } from "../pipelines/report/results.ts";
import { measureSpeculative } from "../models/spec_measure.ts";
import type { ChatMessage } from "../data/tokenizer.ts";
import { readRecords } from "../data/records.ts";
import { loadExamples } from "../data/formats.ts";
import type { Tokenizer } from "../models/tokenizer.ts";
import { UserError } from "../util/errors.ts";
import { writeFileAtomic } from "../util/atomic.ts";
import { loadModelInput, loadTokenizerInput, stageRuntime, toGpu } from "./shared/models.ts";

/** A prompt as the dataset gives it: text, or a conversation for the chat template. */
type RawPrompt = string | ChatMessage[];

/** The `spec_bench` stage kind. */
export const specBenchStage = defineStage({
  kind: "spec_bench",
  version: 1,
  doc:
    "Benchmarks speculative decoding of a target (e.g. the distilled hybrid) with a draft model of the same " +
    "tokenizer: plain decoding of the target first, then speculative decoding for each K, batch 1. Writes " +
    "results.json (acceptance rate per draft position, mean accepted tokens per target pass, acceptance " +
    "histogram, tokens/s and speedup against the plain decoding measured in the same run). With temperature 0 " +
    "every output is checked to equal plain greedy decoding.",
  deterministic: false,
  usesDevice: true,
  usesSeed: true,
  params: {
    k: {
      type: "array",
      items: { type: "number", integer: true, min: 1, max: 32, doc: "Draft tokens per target pass." },
      minItems: 1,
      default: [1, 2, 4, 8],
      doc: "Draft lengths K to measure, each in its own series.",
    },
    max_new_tokens: {
      type: "number",
      integer: true,
      min: 1,
      default: 128,
      doc: "Tokens generated per prompt.",
    },
    temperature: { type: "number", min: 0, default: 0, doc: "Sampling temperature; 0 is greedy decoding." },
    top_k: { type: "number", integer: true, min: 0, default: 0, doc: "Top-k filter (0: none)." },
    top_p: { type: "number", exclusiveMin: 0, max: 1, default: 1, doc: "Top-p (nucleus) filter (1: none)." },
    warmup: {
      type: "number",
      integer: true,
      min: 0,
      default: 1,
      doc: "Untimed decodes of the first prompt before each measurement (compiles kernels, ramps clocks).",
    },
    prompts: {
      type: "array",
      items: { type: "string", doc: "A prompt." },
      default: [],
      doc: "Inline prompts, used when the prompts input is not given.",
    },
    num_prompts: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Use only the first N prompts (default: all).",
    },
    format: {
      type: "string",
      enum: ["text", "prompt_completion", "chat"],
      default: "text",
      doc:
        "Record format of the prompts input: text (each record's text; .txt files give one prompt per line), " +
        "prompt_completion (the prompt field; alpaca instruction/input) or chat (the turns before the first " +
        "assistant turn).",
    },
    chat_template: {
      type: "boolean",
      default: false,
      doc: "Render text prompts as one user turn with the target tokenizer's chat template (conversations " +
        "always use it), with the generation prompt appended.",
    },
    max_prompt_tokens: {
      type: "number",
      integer: true,
      min: 1,
      default: 512,
      doc: "Prompts longer than this are cut to their first N tokens.",
    },
    ignore_eos: {
      type: "boolean",
      default: false,
      doc: "Generate max_new_tokens for every prompt, ignoring end-of-sequence tokens.",
    },
    verify: {
      type: "string",
      enum: ["fused", "unfused"],
      default: "fused",
      doc:
        "Mamba verification (Mamba2 and Mamba1 layers): the fused multi-step kernel, or one kernel per step " +
        "with state copies.",
    },
    target_name: {
      type: "string",
      nullable: true,
      doc: "Display name of the target (default: its reference).",
    },
    draft_name: {
      type: "string",
      nullable: true,
      doc: "Display name of the draft (default: its reference).",
    },
  },
  inputs: {
    target: {
      doc: "The verified model (a hybrid or a Transformer): stage output, directory or hf://.",
      type: "dir",
    },
    draft: { doc: "The draft model, same tokenizer (e.g. the output of make_draft).", type: "dir" },
    prompts: {
      doc: "Prompt records (JSONL, JSON, parquet, or .txt with one prompt per line); see `format`.",
      optional: true,
    },
  },
  outputs: {
    results: {
      type: "dir",
      doc:
        "results.json: SpecBenchResults (pipelines/report/results.ts) plus the baseline, settings and any " +
        "greedy mismatch.",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    const tok = await promptTokenizer(ctx.inputs.target, ctx.inputs.draft);
    const raw = await readPrompts(ctx.inputs.prompts?.path, p.format, p.prompts);
    const chosen = p.num_prompts === null ? raw : raw.slice(0, p.num_prompts);
    if (chosen.length === 0) {
      throw new UserError(
        "spec_bench: no prompts: wire the prompts input or set params.prompts to a list of strings",
      );
    }
    const prompts = chosen.map((r, i) => encodePrompt(tok, r, p.chat_template, p.max_prompt_tokens, i));

    const { model: targetModel } = await loadModelInput(ctx.inputs.target, "target");
    const { model: draftModel } = await loadModelInput(ctx.inputs.draft, "draft");
    if (draftModel.config.vocabSize !== targetModel.config.vocabSize) {
      throw new UserError(
        `spec_bench: the draft's vocabulary (${draftModel.config.vocabSize} tokens, input draft) differs from the ` +
          `target's (${targetModel.config.vocabSize}); the draft must use the target's tokenizer`,
      );
    }
    const rt = await stageRuntime(ctx.settings);
    const target = toGpu(rt, targetModel, ctx.settings);
    const draft = toGpu(rt, draftModel, ctx.settings);
    const ks = [...new Set(p.k)].sort((a, b) => a - b);
    const sampling = { temperature: p.temperature, topK: p.top_k, topP: p.top_p };
    try {
      let tokens = 0;
      ctx.progress.start((p.warmup + prompts.length) * (1 + ks.length), "decode", "baseline, then each K");
      const m = await measureSpeculative(target, draft, prompts, {
        ks,
        maxNewTokens: p.max_new_tokens,
        sampling,
        seed: ctx.settings.seed,
        warmup: p.warmup,
        eosIds: p.ignore_eos ? [] : targetModel.config.eosTokenIds,
        mode: p.verify,
        signal: ctx.signal,
        onProgress: (done, _total, _phase, n) => {
          tokens += n;
          ctx.progress.update(done, { tokens });
        },
      });
      for (const mm of m.greedyMismatches) {
        ctx.log.warn(
          `greedy output differs from plain decoding: prompt ${mm.prompt}, K=${mm.k}, token ${mm.position} ` +
            `(baseline top-1/top-2 margin ${mm.baselineMargin})`,
        );
      }
      for (const r of m.results) {
        ctx.log.metric(r.k, {
          tokens_per_s: r.tokens_per_s,
          speedup: r.speedup,
          mean_accepted_per_pass: r.mean_accepted_per_pass,
        });
      }
      const results: SpecBenchResults = {
        model: p.target_name ?? ctx.inputs.target.ref,
        draft: p.draft_name ?? ctx.inputs.draft.ref,
        temperature: p.temperature,
        prompts: prompts.length,
        max_new_tokens: p.max_new_tokens,
        device: rt.dev.adapterName,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: ctx.settings.seed,
        verify: p.verify,
        ignore_eos: p.ignore_eos,
        prompt_tokens: prompts.reduce((a, q) => a + q.length, 0),
        baseline: m.baseline,
        greedy_mismatches: m.greedyMismatches,
        results: m.results,
      };
      await writeFileAtomic(
        join(ctx.outputs.results, "results.json"),
        JSON.stringify(results, null, 2) + "\n",
      );
      const best = m.results.reduce((a, b) => (b.speedup > a.speedup ? b : a));
      ctx.setMetrics({
        baseline_tokens_per_s: m.baseline.tokens_per_s,
        best_k: best.k,
        best_speedup: best.speedup,
        best_tokens_per_s: best.tokens_per_s,
        ...(p.temperature <= 0 ? { greedy_mismatches: m.greedyMismatches.length } : {}),
      });
    } finally {
      target.dispose();
      draft.dispose();
    }
  },
});

/**
 * The target's tokenizer, or the draft's when the target directory has none (a converted hybrid written
 * without tokenizer files): both must share one tokenizer anyway.
 */
async function promptTokenizer(target: Artifact, draft: Artifact): Promise<Tokenizer> {
  try {
    return await loadTokenizerInput(target, "target");
  } catch (e) {
    if (!(e instanceof UserError)) throw e;
    try {
      return await loadTokenizerInput(draft, "draft");
    } catch {
      throw new UserError(`spec_bench: neither the target nor the draft has a tokenizer: ${e.message}`);
    }
  }
}

/** Prompts from the input file (in the declared format) or the inline list. */
async function readPrompts(
  path: string | undefined,
  format: "text" | "prompt_completion" | "chat",
  inline: readonly string[],
): Promise<RawPrompt[]> {
  if (path === undefined) return [...inline];
  const records = await readRecords({ path, textMode: "lines" });
  const { examples } = await loadExamples(records, { format, what: `prompts ${path}` });
  return examples.map((e) => {
    switch (e.kind) {
      case "text":
        return e.text;
      case "prompt_completion":
        return e.prompt;
      case "chat": {
        const firstReply = e.messages.findIndex((m) => m.role === "assistant");
        return firstReply < 0 ? e.messages : e.messages.slice(0, firstReply);
      }
      default:
        throw new UserError(`prompts ${path}: format ${format} gives no prompts`);
    }
  });
}

function encodePrompt(
  tok: Tokenizer,
  prompt: RawPrompt,
  chat: boolean,
  maxTokens: number,
  index: number,
): number[] {
  const ids = typeof prompt === "string"
    ? chat
      ? tok.encodeChat([{ role: "user", content: prompt }], { addGenerationPrompt: true })
      : tok.encode(prompt)
    : tok.encodeChat(prompt, { addGenerationPrompt: true });
  if (ids.length === 0) throw new UserError(`spec_bench: prompt ${index} encodes to no tokens`);
  return ids.slice(0, maxTokens);
}
