/**
 * Test-only stage kinds that exercise the runner's edges: large outputs (`testing.bytes`, for the no-op re-run
 * benchmark), misbehaving stages (`testing.misbehave`: escaping symlinks and paths, errors), and a device stage
 * (`testing.device`) whose key includes the runtime facts.
 *
 * @module
 */
import { join } from "node:path";
import { UserError } from "../../util/errors.ts";
import { Rng } from "../../util/rng.ts";
import { defineStage, safeJoin } from "../../pipelines/stage.ts";

/** Writes `size_mb` megabytes of seeded pseudo-random bytes, split over `files` files. */
export const bytesStage = defineStage({
  kind: "testing.bytes",
  version: 1,
  doc: "Test-only: writes size_mb MB (2^20 bytes) of pseudo-random data into `files` files of a directory.",
  testOnly: true,
  params: {
    size_mb: { type: "number", integer: true, min: 0, max: 1 << 16, default: 1, doc: "Total size in MiB." },
    files: { type: "number", integer: true, min: 1, max: 10000, default: 1, doc: "Number of files." },
    salt: { type: "number", integer: true, default: 0, doc: "Changes the bytes (and the key)." },
  },
  inputs: {},
  outputs: { data: { type: "dir", doc: "part-0000.bin, part-0001.bin, ..." } },
  async run(ctx) {
    const { size_mb, files, salt } = ctx.params;
    const rng = new Rng(`bytes/${salt}`);
    const block = new Uint8Array(1 << 20);
    const words = new Uint32Array(block.buffer);
    for (let i = 0; i < words.length; i++) words[i] = rng.nextU32();
    const perFile = Math.floor(size_mb / files);
    ctx.progress.start(size_mb, "MiB");
    let done = 0;
    for (let f = 0; f < files; f++) {
      const mb = f === files - 1 ? size_mb - perFile * (files - 1) : perFile;
      const file = await Deno.open(join(ctx.outputs.data, `part-${String(f).padStart(4, "0")}.bin`), {
        write: true,
        create: true,
      });
      for (let m = 0; m < mb; m++) {
        words[0] = done; // every MiB differs
        let off = 0;
        while (off < block.length) off += await file.write(block.subarray(off));
        ctx.progress.update(++done);
      }
      file.close();
    }
  },
});

/** Misbehaves on purpose. */
export const misbehaveStage = defineStage({
  kind: "testing.misbehave",
  version: 1,
  doc:
    "Test-only: does one wrong thing - links out of its output, writes through an escaping name, or throws.",
  testOnly: true,
  params: {
    action: {
      type: "string",
      enum: [
        "symlink_out",
        "symlink_absolute",
        "symlink_inside",
        "escape_name",
        "user_error",
        "internal_error",
        "no_output",
        "random_output",
      ],
      required: true,
      doc: "What to do.",
    },
    name: { type: "string", default: "../escaped.txt", doc: "File name used by escape_name." },
  },
  inputs: {},
  outputs: { out: { type: "dir", doc: "Whatever the action leaves." } },
  async run(ctx) {
    const out = ctx.outputs.out;
    switch (ctx.params.action) {
      case "symlink_out":
        await Deno.writeTextFile(join(out, "ok.txt"), "fine\n");
        await Deno.symlink("../../../../outside.txt", join(out, "link"));
        break;
      case "symlink_absolute":
        await Deno.symlink("/etc/hostname", join(out, "link"));
        break;
      case "symlink_inside":
        await Deno.writeTextFile(join(out, "real.txt"), "real\n");
        await Deno.symlink("real.txt", join(out, "alias.txt"));
        break;
      case "escape_name":
        await Deno.writeTextFile(safeJoin(out, ctx.params.name), "should never be written\n");
        break;
      case "user_error":
        throw new UserError("the data has a problem the user must fix");
      case "internal_error":
        throw new TypeError("a bug inside the stage");
      case "no_output":
        await Deno.remove(out);
        break;
      case "random_output":
        // Claims to be deterministic (the default) but is not: the runner warns when a recompute differs.
        await Deno.writeTextFile(join(out, "r.txt"), crypto.randomUUID());
        break;
    }
  },
});

/** Records the runtime facts it was given (they are part of its key). */
export const deviceStage = defineStage({
  kind: "testing.device",
  version: 1,
  doc: "Test-only: a stage that declares usesDevice; writes the runtime facts and dtype it received.",
  testOnly: true,
  usesDevice: true,
  params: {},
  inputs: {},
  outputs: { facts: { type: "file", doc: "JSON of ctx.runtimeFacts and ctx.settings.dtype." } },
  async run(ctx) {
    await Deno.writeTextFile(
      ctx.outputs.facts,
      JSON.stringify({ facts: ctx.runtimeFacts, dtype: ctx.settings.dtype, gpu: ctx.settings.gpu }) + "\n",
    );
  },
});
