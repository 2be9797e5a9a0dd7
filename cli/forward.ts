/**
 * `distillery forward`: one full-sequence forward over given token ids, written as safetensors so any model can
 * be compared with another implementation (transformers, the official MambaInLlama code).
 *
 * ```sh
 * deno run -A main.ts forward --model fixtures/models/stories260K-hf --input-ids ids.json --out out.safetensors \
 *   --layers --greedy 48
 * ```
 *
 * `--input-ids` is a JSON file holding the ids: a list of integers, a list holding one such list, or an object
 * with `input_ids` (either form). Nothing is added (no BOS). The output holds, all f32 except the ids (I64, as
 * torch stores token ids): `input_ids` [T], `logits` [T, V], with `--layers` `layer_out.{i}` [T, D] (decoder
 * layer i's output, residual included, before the final norm: the fixtures' convention), and with `--greedy N`
 * `greedy_ids` [N] (greedy continuation through the decode path, not stopping at EOS, like transformers'
 * `generate(do_sample=False, eos_token_id=None)`).
 *
 * @module
 */
import { dirname } from "node:path";
import type { Command } from "commander";
import { UserError } from "../util/errors.ts";
import { type TensorToWrite, writeSafetensors } from "../models/safetensors.ts";
import { generate } from "../models/generate.ts";
import { GREEDY } from "../models/sampling.ts";
import type { Output } from "../pipelines/progress.ts";
import { addModelOptions, type ModelOptions, openModel } from "./model.ts";

/** Options of {@linkcode runForward} (the command's flags). */
export interface ForwardOptions extends ModelOptions {
  /** JSON file with the ids. */
  inputIds: string;
  /** Output safetensors file. */
  out: string;
  /** Also write every decoder layer's output. */
  layers?: boolean;
  /** Also write a greedy continuation of this many tokens. */
  greedy?: number;
}

/** Adds the `forward` command to the CLI. */
export function addForwardCommand(program: Command, out: Output): void {
  addModelOptions(
    program.command("forward")
      .description("run one forward over token ids and write logits (and layer outputs) as safetensors"),
  )
    .requiredOption("--input-ids <ids.json>", "JSON list of token ids (or {input_ids: [...]})")
    .requiredOption("--out <file.safetensors>", "where to write the tensors")
    .option("--layers", "also write layer_out.{i} [T, D] for every decoder layer")
    .option("--greedy <n>", "also write greedy_ids: the greedy continuation of n tokens", (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) {
        throw new UserError(`--greedy: expected an integer >= 1, found "${v}"`);
      }
      return n;
    })
    .action(async (o: ForwardOptions) => await runForward(o, out));
}

/** Reads and checks an ids file: integers in [0, vocabSize). */
export async function readIdsFile(path: string, vocabSize: number): Promise<number[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UserError(`--input-ids ${path}: cannot read (${(e as Error).message})`, { cause: e });
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new UserError(`--input-ids ${path}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (v !== null && typeof v === "object" && !Array.isArray(v)) v = (v as Record<string, unknown>).input_ids;
  if (Array.isArray(v) && v.length === 1 && Array.isArray(v[0])) v = v[0];
  if (!Array.isArray(v) || v.length === 0) {
    throw new UserError(
      `--input-ids ${path}: expected a non-empty list of token ids (or {"input_ids": [...]})`,
    );
  }
  v.forEach((id, i) => {
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new UserError(
        `--input-ids ${path}: entry ${i} is ${JSON.stringify(id)}, expected a token id from 0 to ${
          Number.isFinite(vocabSize) ? vocabSize - 1 : "the vocabulary size - 1"
        }`,
      );
    }
  });
  return v as number[];
}

/** Runs the forward and writes the file. */
export async function runForward(o: ForwardOptions, out: Output): Promise<void> {
  try {
    if (!(await Deno.stat(dirname(o.out))).isDirectory) throw new Error();
  } catch {
    throw new UserError(`--out ${o.out}: the folder ${dirname(o.out)} does not exist`);
  }
  // read the ids before the (slower) model load so a bad file fails at once; the range check needs the model
  const given = await readIdsFile(o.inputIds, Infinity);
  const { lm } = await openModel(o, out);
  try {
    const ids = await readIdsFile(o.inputIds, lm.config.vocabSize);
    if (ids.length !== given.length) throw new Error("ids file changed while reading");
    const T = ids.length, V = lm.config.vocabSize, D = lm.config.hiddenSize;
    const rt = lm.rt;
    const tensors: Record<string, TensorToWrite> = {
      input_ids: { shape: [T], data: BigInt64Array.from(ids, BigInt), dtype: "I64" },
    };
    await rt.noGrad(() =>
      rt.scope(async () => {
        const res = lm.forward(Int32Array.from(ids), 1, T, { layerOutputs: !!o.layers });
        tensors.logits = { shape: [T, V], data: Float32Array.from(await res.logits.read()) };
        for (const [i, t] of (res.layerOut ?? []).entries()) {
          tensors[`layer_out.${i}`] = { shape: [T, D], data: Float32Array.from(await t.read()) };
        }
      })
    );
    if (o.greedy) {
      const [gen] = await generate(lm, [ids], { maxNewTokens: o.greedy, sampling: GREEDY, seed: 0 });
      tensors.greedy_ids = { shape: [gen.length], data: BigInt64Array.from(gen, BigInt), dtype: "I64" };
    }
    await writeSafetensors(o.out, tensors, { format: "pt" });
    out.err(`wrote ${Object.keys(tensors).sort().join(", ")} (T = ${T}) to ${o.out}\n`);
  } finally {
    lm.dispose();
  }
}
