/**
 * `tokenize`: dataset records -> the binary token artifact the training stages read (data/tokenize_dataset.ts
 * does the work: formats, chat template, completion-only masks, packing).
 *
 * @module
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { defineStage } from "../pipelines/stage.ts";
import { PACKING_MODES, type PackingMode } from "../data/packing.ts";
import { formatProblem, type ProblemReport } from "../data/problems.ts";
import { type DatasetSpec, iterateRecords, resolveDataset, TEXT_MODES } from "../data/records.ts";
import { loadExamples } from "../data/formats.ts";
import type { HubDatasetResolver } from "../data/data_files.ts";
import { TokenFileReader, TokenFileWriter, type TokenizerInfo } from "../data/token_file.ts";
import { type TokenizeDatasetParams, tokenizeDatasetToFile } from "../data/tokenize_dataset.ts";
import { newTokenizeStats, type TokenizeStats } from "../data/tokenize.ts";
import { UserError } from "../util/errors.ts";
import { loadTokenizerInput, modelDir } from "./shared/models.ts";
import { datasetSpecOf } from "./shared/datasets.ts";
import { hubDatasetResolver } from "./shared/hub_datasets.ts";
import { TOKENS_FILE, TOKENS_SUMMARY } from "./shared/tokens.ts";

const FIELD = (name: string) =>
  ({
    type: "string",
    nullable: true,
    doc: `Dataset field holding "${name}" (null: "${name}").`,
  }) as const;

/** A digest of the tokenizer files (recorded in the token file; training checks the vocabulary against it). */
export async function tokenizerDigest(dir: string): Promise<string> {
  const h = createHash("sha256");
  for (const f of ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"]) {
    try {
      h.update(f + "\0");
      h.update(await Deno.readFile(join(dir, f)));
    } catch {
      h.update("absent\0");
    }
  }
  return `sha256:${h.digest("hex")}`;
}

/** The tokenize stage kind. */
export const tokenizeStage = defineStage({
  kind: "tokenize",
  version: 1,
  doc:
    "Tokenizes dataset records (local text/JSON/JSONL/parquet files or hf://datasets repos) in a declared " +
    "format - text, prompt_completion, chat (messages or ShareGPT conversations) or preference - with the " +
    "model's tokenizer and chat template, masks prompt tokens for completion-only losses, and packs sequences " +
    "to max_length. Records that do not fit the format stop the stage or are skipped (on_invalid), and " +
    "skipped records are reported as a warning.",
  params: {
    format: {
      type: "string",
      enum: ["text", "prompt_completion", "chat", "preference"],
      default: "text",
      doc: "Record format: text, prompt_completion, chat or preference.",
    },
    fields: {
      type: "object",
      fields: {
        text: FIELD("text"),
        prompt: FIELD("prompt"),
        completion: FIELD("completion"),
        messages: FIELD("messages"),
        chosen: FIELD("chosen"),
        rejected: FIELD("rejected"),
      },
      nullable: true,
      doc: "Renames canonical fields to the dataset's field names, e.g. {messages: conversations}.",
    },
    max_length: {
      type: "number",
      integer: true,
      min: 2,
      default: 2048,
      doc:
        "Tokens per packed row, or the truncation length (paper: 2048 for distillation and SFT, 1024 for DPO).",
    },
    packing: {
      type: "string",
      enum: PACKING_MODES,
      nullable: true,
      doc:
        "packed (windows of exactly max_length), none (one truncated sequence per record) or padding_free; " +
        "null: packed, or none for preference data.",
    },
    drop_remainder: { type: "boolean", default: false, doc: "Drop the last, shorter packed window." },
    on_invalid: {
      type: "string",
      enum: ["error", "skip"],
      default: "error",
      doc:
        "What to do with a record that does not fit the format: stop (error) or skip it (counted, warned).",
    },
    completion_only: {
      type: "boolean",
      default: true,
      doc:
        "Only assistant/completion tokens are loss targets (TRL completion_only_loss); false: every token.",
    },
    template: {
      type: "string",
      enum: ["chat", "none"],
      default: "chat",
      doc: "Render prompt/completion and preference strings through the chat template, or as plain text.",
    },
    add_bos: { type: "boolean", default: true, doc: "Plain text: prepend BOS." },
    add_eos: { type: "boolean", default: true, doc: "Plain text (and untemplated completions): append EOS." },
    max_prompt_length: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "Preference: prompt tokens kept when a pair is too long (paper: 512; null: max_length / 2).",
    },
    truncation_mode: {
      type: "string",
      enum: ["keep_end", "keep_start"],
      default: "keep_end",
      doc: "Preference: which end of a too-long prompt to keep (TRL 0.8 default keep_end).",
    },
    pairs_from_choices: {
      type: "boolean",
      default: false,
      doc: "format preference: read multiple-choice records ({ctx, endings, label}, e.g. a cloze task) and " +
        "make one pair each: prompt = ctx, chosen = ' ' + the true ending, rejected = ' ' + a wrong one " +
        "(rotating through the wrong endings by record index).",
    },
    split: { type: "string", default: "train", doc: "Split of a directory or Hub dataset." },
    subset: { type: "string", nullable: true, doc: "Subset (config) of a Hub dataset." },
    text_mode: {
      type: "string",
      enum: TEXT_MODES,
      default: "paragraphs",
      doc: "Plain .txt files: one record per paragraph (blank-line separated), per line, or per file.",
    },
    field: { type: "string", nullable: true, doc: "JSON files: the top-level field that holds the records." },
    offset: { type: "number", integer: true, min: 0, default: 0, doc: "Records to skip at the start." },
    limit: {
      type: "number",
      integer: true,
      min: 1,
      nullable: true,
      doc: "At most this many records per input.",
    },
  },
  inputs: {
    tokenizer: { doc: "A model (directory, stage output or hf:// reference) whose tokenizer to use." },
    data: {
      doc: "Dataset file(s), folder(s) or hf://datasets/org/name[@rev] references; several are concatenated.",
      list: true,
    },
  },
  outputs: {
    tokens: {
      type: "dir",
      doc: `${TOKENS_FILE} (ids, loss masks, sequence offsets; data/token_file.ts) and ${TOKENS_SUMMARY} ` +
        "(counts, skipped records, tokenize statistics).",
    },
  },
  async run(ctx) {
    const p = ctx.params;
    if (ctx.inputs.data.length === 0) throw new UserError("tokenize: the data input lists no dataset");
    const tok = await loadTokenizerInput(ctx.inputs.tokenizer, "tokenizer");
    const info: TokenizerInfo = {
      digest: await tokenizerDigest(await modelDir(ctx.inputs.tokenizer, "tokenizer")),
      bos_id: tok.bosId,
      eos_id: tok.eosId,
      vocab_size: tok.vocabSize,
    };
    const pref = p.format === "preference";
    const packing: PackingMode = p.packing ?? (pref ? "none" : "packed");
    const fields: Record<string, string> = {};
    for (const [k, v] of Object.entries(p.fields ?? {})) if (v) fields[k] = v;
    const hub = hubDatasetResolver();
    const out = join(ctx.outputs.tokens, TOKENS_FILE);
    const parts: string[] = [];
    const perInput: { ref: string; report: ProblemReport; stats: TokenizeStats }[] = [];
    ctx.progress.start(ctx.inputs.data.length, "dataset", "tokenize");
    for (const [i, input] of ctx.inputs.data.entries()) {
      let dataset = datasetSpecOf(input, {
        split: p.split,
        subset: p.subset,
        textMode: p.text_mode,
        field: p.field,
        offset: p.offset,
        limit: p.limit,
      });
      if (p.pairs_from_choices) {
        if (!pref) throw new UserError("tokenize: pairs_from_choices needs format: preference");
        const path = join(ctx.workDir, `pairs-${i}.jsonl`);
        await choicesToPairs(dataset, path, { hub, onInvalid: p.on_invalid, ref: input.ref, log: ctx.log });
        dataset = { path };
      }
      const params: TokenizeDatasetParams = {
        dataset,
        format: p.format,
        fields,
        onInvalid: p.on_invalid,
        maxLength: p.max_length,
        packing,
        dropRemainder: p.drop_remainder,
        tokenize: {
          completionOnly: p.completion_only,
          template: p.template,
          addBos: p.add_bos,
          addEos: p.add_eos,
        },
        preference: {
          maxPromptLength: p.max_prompt_length ?? undefined,
          truncationMode: p.truncation_mode,
        },
      };
      const path = ctx.inputs.data.length === 1 ? out : join(ctx.workDir, `part-${i}.bin`);
      const r = await tokenizeDatasetToFile(path, params, {
        tokenizer: tok,
        tokenizerInfo: info,
        hub,
        signal: ctx.signal,
      });
      parts.push(path);
      perInput.push({ ref: input.ref, report: r.report, stats: r.stats });
      if (r.report.skipped > 0) {
        const shown = r.report.problems.slice(0, 3).map((q) => `\n  ${formatProblem(q)}`).join("");
        ctx.log.warn(
          `${input.ref}: skipped ${r.report.skipped} of ${r.report.seen} records that do not fit format ` +
            `${p.format} (on_invalid: skip); first problems:${shown}`,
        );
      }
      ctx.progress.update(i + 1);
    }
    if (parts.length > 1) await concatTokenFiles(parts, out);
    const reader = await TokenFileReader.open(out);
    const h = reader.header;
    reader.close();
    const stats = newTokenizeStats();
    for (const x of perInput) {
      for (const k of Object.keys(stats) as (keyof TokenizeStats)[]) stats[k] += x.stats[k];
    }
    const records = {
      seen: perInput.reduce((a, x) => a + x.report.seen, 0),
      kept: perInput.reduce((a, x) => a + x.report.kept, 0),
      skipped: perInput.reduce((a, x) => a + x.report.skipped, 0),
    };
    const summary = {
      format: h.format,
      layout: h.layout,
      packing: h.packing,
      max_length: h.max_length,
      num_sequences: h.num_sequences,
      num_tokens: h.num_tokens,
      num_target_tokens: h.num_target_tokens,
      max_sequence_length: h.max_sequence_length,
      records,
      stats,
      inputs: perInput.map((x) => ({
        ref: x.ref,
        seen: x.report.seen,
        kept: x.report.kept,
        skipped: x.report.skipped,
        problems: x.report.problems.map(formatProblem),
      })),
      tokenizer: info,
    };
    await Deno.writeTextFile(
      join(ctx.outputs.tokens, TOKENS_SUMMARY),
      JSON.stringify(summary, null, 2) + "\n",
    );
    if (stats.truncated > 0) {
      ctx.log.info(`${stats.truncated} sequences were longer than max_length ${p.max_length} and were cut`);
    }
    ctx.setMetrics({
      sequences: h.num_sequences,
      tokens: h.num_tokens,
      target_tokens: h.num_target_tokens,
      records: records.kept,
      skipped: records.skipped,
    });
  },
});

/**
 * Writes preference records made from multiple-choice records (see the `pairs_from_choices` parameter) to a
 * JSONL file. The wrong ending of record i is the (i mod (n - 1))-th wrong one.
 */
export async function choicesToPairs(
  dataset: DatasetSpec,
  out: string,
  o: { hub: HubDatasetResolver; onInvalid: "error" | "skip"; ref: string; log: { warn(m: string): void } },
): Promise<void> {
  const ds = await resolveDataset(dataset, { hub: o.hub });
  const { examples, report } = await loadExamples(iterateRecords(ds, dataset), {
    format: "multiple_choice",
    onInvalid: o.onInvalid,
    what: `${o.ref} (multiple-choice records for pairs_from_choices)`,
  });
  const lines: string[] = [];
  examples.forEach((ex, i) => {
    if (ex.kind !== "multiple_choice" || ex.choices.length < 2) return;
    const wrong = ex.choices.map((_, k) => k).filter((k) => k !== ex.label);
    const r = wrong[i % wrong.length];
    lines.push(JSON.stringify({
      prompt: ex.context,
      chosen: " " + ex.choices[ex.label],
      rejected: " " + ex.choices[r],
    }));
  });
  if (report.skipped > 0) {
    o.log.warn(
      `${o.ref}: skipped ${report.skipped} of ${report.seen} multiple-choice records (on_invalid: skip)`,
    );
  }
  await Deno.writeTextFile(out, lines.join("\n") + "\n");
}

/** Concatenates token files with the same header fields into `out` (sequences in order). */
async function concatTokenFiles(paths: string[], out: string): Promise<void> {
  const readers: TokenFileReader[] = [];
  try {
    for (const p of paths) readers.push(await TokenFileReader.open(p));
    const h0 = readers[0].header;
    const w = await TokenFileWriter.create(out, {
      format: h0.format,
      layout: h0.layout,
      max_length: h0.max_length,
      packing: h0.packing,
      tokenizer: h0.tokenizer,
    });
    try {
      const meta: Record<string, unknown>[] = [];
      for (const r of readers) {
        for (let i = 0; i < r.numSequences; i++) await w.append(r.read(i));
        meta.push(r.header.meta);
      }
      await w.finish({ parts: meta });
    } catch (e) {
      await w.abort();
      throw e;
    }
  } finally {
    for (const r of readers) r.close();
  }
}
