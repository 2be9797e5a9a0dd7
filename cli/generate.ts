/**
 * `distillery generate`: streams a model's continuation of a prompt to stdout as it is decoded, then prints the
 * decoding speed to stderr.
 *
 * ```sh
 * deno run -A main.ts generate --model fixtures/models/stories260K-hf --prompt "Once upon a time" \
 *   --max-new-tokens 64 --temperature 0.8 --top-k 40 --seed 1
 * deno run -A main.ts generate --model HuggingFaceH4/zephyr-7b-beta --chat --prompt "Name three birds."
 * ```
 *
 * Sampling defaults come from the model's `generation_config.json` as in transformers (greedy unless it sets
 * `do_sample`; then its temperature, top_k and top_p, with transformers' defaults 1.0, 50 and 1.0); the flags
 * override them, and `--temperature 0` is greedy. The prompt is encoded with the tokenizer's special tokens
 * (BOS), so `--prompt ""` starts from BOS alone; `--chat` wraps it in the chat template with the generation
 * prompt. Decoding stops at an end-of-sequence token (config and generation_config ids, and the tokenizer's
 * EOS) or after `--max-new-tokens`. Tokens are sampled on the GPU (`runtime/ops/sampling.ts`) from random
 * stream 0 of the seed, the stream `models/generate.ts` gives prompt 0, so a sample here equals the evaluate
 * stage's for its first prompt; only the token id is read back per step.
 *
 * @module
 */
import { join } from "node:path";
import type { Command } from "commander";
import { UserError } from "../util/errors.ts";
import type { SamplingOptions } from "../models/sampling.ts";
import { sampleTokens } from "../runtime/ops/sampling.ts";
import type { Output } from "../pipelines/progress.ts";
import { addModelOptions, type ModelOptions, openModel, openTokenizer } from "./model.ts";

/** Options of {@linkcode runGenerate} (the command's flags). */
export interface GenerateOptions extends ModelOptions {
  /** The prompt text ("" = BOS only). */
  prompt: string;
  /** Tokens to generate at most. */
  maxNewTokens?: number;
  /** Sampling temperature (0 = greedy). */
  temperature?: number;
  /** Top-k filter (0 = off). */
  topK?: number;
  /** Top-p filter (1 = off). */
  topP?: number;
  /** Seed of the random stream. */
  seed?: number;
  /** Wrap the prompt in the chat template. */
  chat?: boolean;
  /** A system message for `--chat`. */
  system?: string;
  /** A directory or Hub id to take the tokenizer from. */
  tokenizer?: string;
}

const num = (name: string, integer: boolean, min: number) => (v: string): number => {
  const x = Number(v);
  if (v.trim() === "" || !Number.isFinite(x) || (integer && !Number.isInteger(x)) || x < min) {
    throw new UserError(`${name}: expected ${integer ? "an integer" : "a number"} >= ${min}, found "${v}"`);
  }
  return x;
};

/** Adds the `generate` command to the CLI. */
export function addGenerateCommand(program: Command, out: Output, signal?: AbortSignal): void {
  addModelOptions(
    program.command("generate")
      .description("stream a model's continuation of a prompt (prints tokens/s at the end, on stderr)"),
  )
    .requiredOption("--prompt <text>", 'the prompt ("" starts from BOS alone)')
    .option(
      "--max-new-tokens <n>",
      "tokens to generate at most (default 256)",
      num("--max-new-tokens", true, 1),
    )
    .option("--temperature <t>", "sampling temperature; 0 is greedy", num("--temperature", false, 0))
    .option("--top-k <k>", "keep the k most likely tokens (0: all)", num("--top-k", true, 0))
    .option("--top-p <p>", "nucleus sampling mass (1: off)", num("--top-p", false, 0))
    .option("--seed <s>", "seed of the random stream (default 0)", num("--seed", true, 0))
    .option("--chat", "wrap the prompt in the tokenizer's chat template")
    .option("--system <text>", "a system message (with --chat)")
    .option("--tokenizer <dir|org/name>", "take the tokenizer from here (models shipped without one)")
    .action(async (o: GenerateOptions) => await runGenerate(o, out, signal));
}

interface GenerationDefaults {
  doSample: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
}

async function generationDefaults(dir: string): Promise<GenerationDefaults> {
  const path = join(dir, "generation_config.json");
  let g: Record<string, unknown>;
  try {
    g = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { doSample: false };
    throw new UserError(`${path}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  const n = (k: string) => (typeof g[k] === "number" ? g[k] as number : undefined);
  return {
    doSample: g.do_sample === true,
    temperature: n("temperature"),
    topK: n("top_k"),
    topP: n("top_p"),
  };
}

/** The sampling settings: flags over generation_config.json over transformers' defaults. */
export function samplingOf(o: GenerateOptions, d: GenerationDefaults): SamplingOptions {
  const sampleByDefault = d.doSample;
  const temperature = o.temperature ?? (sampleByDefault ? d.temperature ?? 1 : 0);
  if (o.topP !== undefined && !(o.topP > 0 && o.topP <= 1)) {
    throw new UserError(`--top-p: expected a number in (0, 1], found ${o.topP}`);
  }
  return {
    temperature,
    topK: o.topK ?? (sampleByDefault ? d.topK ?? 50 : 0),
    topP: o.topP ?? (sampleByDefault ? d.topP ?? 1 : 1),
  };
}

/** Generates and streams; resolves when done. */
export async function runGenerate(o: GenerateOptions, out: Output, signal?: AbortSignal): Promise<void> {
  if (o.system !== undefined && !o.chat) throw new UserError("--system needs --chat");
  const { dir, lm } = await openModel(o, out);
  const tok = await openTokenizer(dir, o.tokenizer);
  const sampling = samplingOf(o, await generationDefaults(dir));
  const maxNew = o.maxNewTokens ?? 256;
  const messages = [
    ...(o.system !== undefined ? [{ role: "system", content: o.system }] : []),
    { role: "user", content: o.prompt },
  ];
  const ids = o.chat ? tok.encodeChat(messages, { addGenerationPrompt: true }) : tok.encode(o.prompt);
  if (ids.length === 0) throw new UserError("the prompt is empty and the tokenizer adds no BOS token");
  const V = lm.config.vocabSize;
  if (ids.some((i) => i >= V)) {
    throw new UserError(`the tokenizer gives ids beyond the model's vocabulary (${V})`);
  }
  const eos = new Set([...lm.config.eosTokenIds, ...(tok.eosTokenId !== null ? [tok.eosTokenId] : [])]);
  const rt = lm.rt;
  const state = lm.newDecodeState(1, ids.length + maxNew);
  const streams = rt.tensor(Uint32Array.of(0), [1], "u32").keep();
  const decoder = tok.streamDecoder();
  let generated = 0, steps = 0, stop = "length";
  const t0 = performance.now();
  let tDecode = t0;
  try {
    let input = Int32Array.from(ids);
    for (let step = 0; step < maxNew; step++) {
      if (signal?.aborted) {
        stop = "interrupted";
        break;
      }
      const [next] = await rt.scope(async () => {
        const logits = lm.step(state, input, input.length, { lastOnly: true });
        return await sampleTokens(logits, sampling, { seed: o.seed ?? 0, streams, step }).read();
      });
      steps++;
      if (step === 0) tDecode = performance.now();
      if (eos.has(next)) {
        stop = "eos";
        break;
      }
      generated++;
      out.out(decoder.push(next));
      input = Int32Array.of(next);
    }
  } finally {
    streams.dispose();
    lm.disposeState(state);
    lm.dispose();
  }
  out.out(decoder.flush() + "\n");
  const t1 = performance.now();
  // the first step is the prefill; each later step decoded one token
  const decodeS = (t1 - tDecode) / 1000;
  const rate = steps > 1 ? ((steps - 1) / decodeS).toFixed(1) : "-";
  out.err(
    `${generated} tokens (${stop}) in ${((t1 - t0) / 1000).toFixed(2)} s: ${rate} tokens/s decoding, ` +
      `prefill ${ids.length} tokens in ${((tDecode - t0) / 1000).toFixed(2)} s ` +
      `(temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP})\n`,
  );
}
