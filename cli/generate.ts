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
 * stage's for its first prompt. Decoding is `models/generate.ts`'s GPU-resident loop: `--chunk` tokens (default
 * 8) are decoded per GPU->CPU read and printed together, token ids being the only thing read back.
 *
 * @module
 */
import { join } from "node:path";
import type { Command } from "commander";
import { UserError } from "../util/errors.ts";
import type { SamplingOptions } from "../models/sampling.ts";
import { generate } from "../models/generate.ts";
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
  /** Tokens decoded per GPU->CPU read (streamed together). */
  chunk?: number;
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
    .option(
      "--chunk <n>",
      "tokens decoded per GPU->CPU read, printed together (default 8; 1 prints each token as it comes)",
      num("--chunk", true, 1),
    )
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
  const eos = [...new Set([...lm.config.eosTokenIds, ...(tok.eosTokenId !== null ? [tok.eosTokenId] : [])])];
  const chunk = o.chunk ?? 8;
  const decoder = tok.streamDecoder();
  let generated = 0, stop = "length";
  const t0 = performance.now();
  let tFirst = 0, firstCount = 0;
  try {
    // The GPU-resident loop of models/generate.ts: `chunk` tokens per read, so the provider's GPU->CPU round
    // trip (about 12 ms on the built-in one) is paid once per chunk instead of once per token.
    const [completion] = await generate(lm, [ids], {
      maxNewTokens: maxNew,
      sampling,
      seed: o.seed ?? 0,
      eosIds: eos,
      dropEos: true,
      chunk,
      signal,
      onTokens: (_, tokens) => {
        if (tFirst === 0) {
          tFirst = performance.now();
          firstCount = tokens.length;
        }
        generated += tokens.length;
        out.out(tokens.map((t) => decoder.push(t)).join(""));
      },
    });
    if (completion.length < maxNew) stop = "eos";
  } catch (e) {
    if (!signal?.aborted) throw e;
    stop = "interrupted";
  } finally {
    lm.dispose();
  }
  out.out(decoder.flush() + "\n");
  const t1 = performance.now();
  // the first read brings the prefill and the first chunk; the rate counts the tokens decoded after it
  const firstS = ((tFirst || t1) - t0) / 1000;
  const rate = generated > firstCount && t1 > tFirst
    ? ((generated - firstCount) / ((t1 - tFirst) / 1000)).toFixed(1)
    : "-";
  out.err(
    `${generated} tokens (${stop}) in ${((t1 - t0) / 1000).toFixed(2)} s: ${rate} tokens/s decoding, ` +
      `prompt of ${ids.length} tokens and the first ${firstCount} in ${firstS.toFixed(2)} s, ` +
      `${chunk} per read (temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP})\n`,
  );
}
