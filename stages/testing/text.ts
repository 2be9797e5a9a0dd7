/**
 * Test-only stage kinds that work on small text files: `testing.text` writes one from its parameters,
 * `testing.transform` rewrites its inputs, `testing.count` counts words into a directory artifact. Used by the
 * runner's tests and the smoke demo; they touch no GPU.
 *
 * @module
 */
import { join } from "node:path";
import { defineStage } from "../../pipelines/stage.ts";

/** Writes `text` repeated `repeat` times (one per line) to a file. */
export const textStage = defineStage({
  kind: "testing.text",
  version: 1,
  doc: "Test-only: writes `text` (repeated `repeat` times, one per line) to a file.",
  testOnly: true,
  params: {
    text: { type: "string", required: true, doc: "The text to write." },
    repeat: { type: "number", integer: true, min: 1, max: 1000, default: 1, doc: "How many lines." },
  },
  inputs: {},
  outputs: { text: { type: "file", doc: "UTF-8 text, one line per repetition." } },
  async run(ctx) {
    const lines = Array.from({ length: ctx.params.repeat }, () => ctx.params.text);
    await Deno.writeTextFile(ctx.outputs.text, lines.join("\n") + "\n");
  },
});

/** Concatenates its inputs and transforms the text. */
export const transformStage = defineStage({
  kind: "testing.transform",
  version: 1,
  doc: "Test-only: concatenates the `source` files and upper-cases, lower-cases or reverses every line.",
  testOnly: true,
  params: {
    mode: {
      type: "string",
      enum: ["upper", "lower", "reverse"],
      default: "upper",
      doc: "What to do to each line.",
    },
    prefix: { type: "string", nullable: true, doc: "Text put before every line, if set." },
  },
  inputs: {
    source: { doc: "Text files (stage outputs or local files).", list: true, type: "file" },
    extra: { doc: "An optional extra text file appended at the end.", optional: true, type: "file" },
  },
  outputs: { text: { type: "file", doc: "The transformed text." } },
  async run(ctx) {
    const parts: string[] = [];
    for (const a of ctx.inputs.source) parts.push(await Deno.readTextFile(a.path!));
    if (ctx.inputs.extra) parts.push(await Deno.readTextFile(ctx.inputs.extra.path!));
    const lines = parts.join("").split("\n").filter((l) => l !== "").map((l) => {
      const t = ctx.params.mode === "upper"
        ? l.toUpperCase()
        : ctx.params.mode === "lower"
        ? l.toLowerCase()
        : [...l].reverse().join("");
      return (ctx.params.prefix ?? "") + t;
    });
    await Deno.writeTextFile(ctx.outputs.text, lines.join("\n") + "\n");
  },
});

/** Counts words and lines into a directory artifact. */
export const countStage = defineStage({
  kind: "testing.count",
  version: 1,
  doc: "Test-only: counts the words and lines of a text file; writes counts.json and a sorted word list.",
  testOnly: true,
  params: {
    min_length: { type: "number", integer: true, min: 1, default: 1, doc: "Ignore words shorter than this." },
  },
  inputs: { source: { doc: "A text file.", type: "file" } },
  outputs: { counts: { type: "dir", doc: "counts.json ({words, lines}) and words/sorted.txt." } },
  async run(ctx) {
    const text = await Deno.readTextFile(ctx.inputs.source.path!);
    const words = text.split(/\s+/).filter((w) => w.length >= ctx.params.min_length);
    const lines = text.split("\n").filter((l) => l !== "").length;
    await Deno.writeTextFile(
      join(ctx.outputs.counts, "counts.json"),
      JSON.stringify({ words: words.length, lines }),
    );
    await Deno.mkdir(join(ctx.outputs.counts, "words"));
    await Deno.writeTextFile(
      join(ctx.outputs.counts, "words", "sorted.txt"),
      [...words].sort().join("\n") + "\n",
    );
    ctx.setMetrics({ words: words.length, lines });
  },
});
