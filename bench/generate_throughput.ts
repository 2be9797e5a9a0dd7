/**
 * Batched generation throughput of the fixture teacher (stories260K), the workload of the `pseudo_label` stage:
 * prompts of 16 tokens, 256 new tokens each, through `models/generate.ts`'s GPU-resident loop, for several
 * batch sizes and sampling settings, each with the GPU's busy time from pass timestamps next to its wall time;
 * then every dispatch of a short generation timed alone (timestamp queries), summed per kernel, to show where a
 * decode step's GPU time goes. The PyTorch twin is
 * `bench/pytorch/generate.py` (Hugging Face `generate` on the same model and shapes).
 *
 *   deno run -A bench/generate_throughput.ts --gpu dawn [--batches 16,256,1024] [--new 256] [--text FILE] [--quick]
 *     [--stage N]   # also N prompts through the pseudo_label stage (the runner in this process), timed the same way
 *
 * @module
 */
import { join, resolve } from "node:path";
import { acquireRuntime } from "../runtime/runtime.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { loadModel } from "../models/checkpoint.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { generate } from "../models/generate.ts";
import { Tokenizer } from "../models/tokenizer.ts";
import { GREEDY, type SamplingOptions } from "../models/sampling.ts";
import { flag, gpuTimeline, profileDispatches, timelineRow } from "./harness.ts";
import { iterateRecords, resolveDataset } from "../data/records.ts";
import { main } from "../main.ts";
import { listRuns } from "../pipelines/runs.ts";
import { resolveStateDirs } from "../pipelines/paths.ts";

const MODEL = flag("model") ?? new URL("../fixtures/models/stories260K-hf", import.meta.url).pathname;
const SAMPLINGS: Record<string, SamplingOptions> = {
  greedy: GREEDY,
  t1: { temperature: 1 },
  paper: { temperature: 0.7, topK: 10, topP: 0.95 },
};

const quick = Deno.args.includes("--quick");
const rt = await acquireRuntime({ gpu: parseProviderPreference(flag("gpu") ?? "auto", "--gpu") });
const lm = CausalLM.fromModel(rt, await loadModel(MODEL));
const newTokens = Number(flag("new") ?? (quick ? 8 : 256));
const batches = (flag("batches") ?? (quick ? "4" : "16,256,1024")).split(",").map(Number);
const promptLen = 16;
const V = lm.config.vocabSize;
const out = Deno.env.get("OUT");
const rows: string[] = [];
const log = (row: Record<string, unknown>) => {
  const line = JSON.stringify({ bench: "generate", provider: rt.dev.provider, ...row });
  console.log(line);
  rows.push(line);
};
log({ device: rt.dev.describe(), date: new Date().toISOString(), model: flag("model") ?? "stories260K" });

/** With `--text FILE`: the first 15 tokens of each of its paragraphs (read as the stages read text) after BOS. */
async function textPrompts(file: string): Promise<number[][]> {
  const tok = await Tokenizer.fromDir(MODEL);
  const out: number[][] = [];
  for await (const rec of iterateRecords(await resolveDataset({ path: file }))) {
    const text = (rec.value as { text?: unknown })?.text;
    if (typeof text !== "string") continue;
    const ids = tok.encode(text, { addSpecialTokens: false });
    if (ids.length >= promptLen - 1) out.push([1, ...ids.slice(0, promptLen - 1)]);
  }
  if (out.length === 0) throw new Error(`--text ${file}: no paragraph of ${promptLen - 1} tokens`);
  return out;
}
const fromText = flag("text") ? await textPrompts(flag("text")!) : null;

/**
 * Prompts that differ per row: with `--text FILE`, its paragraphs' first tokens (as pseudo_label's
 * `prompt_tokens: 15` with BOS), cycled; else ids spread over the vocabulary; BOS first.
 */
function prompts(B: number): number[][] {
  if (fromText) return Array.from({ length: B }, (_, i) => fromText[i % fromText.length]);
  return Array.from(
    { length: B },
    (
      _,
      i,
    ) => [1, ...Array.from({ length: promptLen - 1 }, (_, t) => 3 + ((i * 7919 + t * 104729) % (V - 3)))],
  );
}

for (const B of batches) {
  for (const [name, sampling] of Object.entries(SAMPLINGS)) {
    const p = prompts(B);
    const run = () => generate(lm, p, { maxNewTokens: newTokens, sampling, seed: 1, batchSize: B });
    await generate(lm, p, { maxNewTokens: Math.min(newTokens, 33), sampling, seed: 1, batchSize: B });
    let ms = 0;
    const timed = async () => {
      const t0 = performance.now();
      await run();
      ms = performance.now() - t0;
    };
    // with pass timestamps when the adapter offers them, else the run alone
    const tl = await gpuTimeline(rt, timed);
    if (!tl) await timed();
    log({
      batch: B,
      sampling: name,
      prompt: promptLen,
      new_tokens: newTokens,
      ...(tl ? timelineRow(tl) : {}),
      // the generation's own wall time (the timeline's also holds the syncs around it)
      wall_ms: +ms.toFixed(1),
      ms_per_step: +(ms / newTokens).toFixed(3),
      tokens_per_s: Math.round((B * newTokens) / (ms / 1000)),
    });
  }
}

// where the GPU time goes, per sampling: a generation of `steps` tokens (prefill + steps - 1 decode steps),
// each dispatch timed alone
const B = batches[batches.length > 1 ? 1 : 0];
profiles: for (const [name, sampling] of Object.entries(SAMPLINGS)) {
  for (const steps of [1, 9]) {
    const kernels = await rt.scope(() =>
      profileDispatches(rt, async () => {
        await generate(lm, prompts(B), { maxNewTokens: steps, sampling, seed: 1, batchSize: B });
      })
    );
    if (!kernels) {
      log({ profile: "skipped: no timestamp-query on this adapter" });
      break profiles;
    }
    for (const k of kernels) {
      log({ profile: `batch ${B}, ${name}, ${steps} token(s)`, ...k, ms: +k.ms.toFixed(4) });
    }
  }
}
// the same workload through the pseudo_label stage (runner, chunks, checkpoints, output writing): on the H200
// the stage ran at 16-18 k tokens/s where generate() alone ran at 142 k
const stagePrompts = Number(flag("stage") ?? 0);
if (stagePrompts > 0) {
  const dir = await Deno.makeTempDir({ prefix: "generate-stage-" });
  try {
    const recipe = join(dir, "labels.yaml");
    // absolute: the recipe lives in a temporary directory, and recipe paths are relative to it
    const promptFile = resolve(
      flag("text") ?? new URL("../fixtures/text/tinystories_train.txt", import.meta.url).pathname,
    );
    await Deno.writeTextFile(
      recipe,
      `name: generate_stage
description: pseudo_label throughput (bench/generate_throughput.ts --stage)
settings: { seed: 0 }
stages:
  labels:
    kind: pseudo_label
    params: { format: text, prompt_tokens: ${
        promptLen - 1
      }, max_new_tokens: ${newTokens}, limit: ${stagePrompts},
      batch_size: ${B}, temperature: 1, top_k: 0, top_p: 1 }
    inputs: { teacher: ${MODEL}, prompts: ${promptFile} }
`,
    );
    let code = -1;
    const tl = await gpuTimeline(rt, async () => {
      code = await main([
        "run",
        recipe,
        "--gpu",
        rt.dev.provider === "dawn" ? "dawn" : "builtin",
        "--force",
        "labels",
      ]);
    });
    const run = listRuns(resolveStateDirs(recipe).runs)[0]?.record;
    const tokens = Number(run?.stages.find((x) => x.stage === "labels")?.metrics.completion_tokens ?? 0);
    log({
      stage: "pseudo_label",
      exit: code,
      prompts: stagePrompts,
      batch: B,
      new_tokens: newTokens,
      completion_tokens: tokens,
      ...(tl
        ? {
          tokens_per_s: Math.round(tokens / (tl.wallMs / 1000)),
          ...timelineRow(tl),
        }
        : {}),
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
lm.dispose();
if (out) await Deno.writeTextFile(join(out, "generate.jsonl"), rows.join("\n") + "\n");
