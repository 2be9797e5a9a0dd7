import assert from "node:assert/strict";
import { type DatasetRecord, iterateRecords, readRecords, resolveDataset } from "../../data/records.ts";
import type { HubDatasetResolver } from "../../data/data_files.ts";
import { assertUserError, fixture, localFixture, withTempDir, writeTree } from "./helpers.ts";

const text = (r: DatasetRecord) => (r.value as { text: string }).text;

Deno.test("records: text paragraphs, lines and whole file from tinystories_valid.txt", async () => {
  const path = fixture("text/tinystories_valid.txt");
  const raw = await Deno.readTextFile(path);
  const paras = await readRecords({ path });
  const expected = raw.split(/\n\s*\n/).filter((p) => p.trim() !== "");
  assert.equal(paras.length, expected.length);
  assert.equal(paras.length, 4302);
  assert.deepEqual(paras.map(text).slice(0, 50), expected.slice(0, 50));
  assert.deepEqual(paras[0].source, { file: path, index: 0, line: 1 });
  assert.deepEqual(paras[1].source, { file: path, index: 1, line: 3 });
  const lines = await readRecords({ path, textMode: "lines", offset: 2, limit: 3 });
  assert.deepEqual(lines.map((r) => r.source.line), [5, 7, 9]);
  const whole = await readRecords({ path, textMode: "file" });
  assert.equal(whole.length, 1);
  assert.equal(text(whole[0]), raw);
});

Deno.test("records: JSON array (alpaca) with offset/limit, and JSON object with a named field", async () => {
  const all = await readRecords({ path: fixture("chat/alpaca_en_demo.json") });
  assert.equal(all.length, 999);
  assert.equal((all[0].value as { instruction: string }).instruction, "Describe a process of making crepes.");
  const some = await readRecords({ path: fixture("chat/alpaca_en_demo.json"), offset: 990, limit: 20 });
  assert.deepEqual(some.map((r) => r.source.index), [990, 991, 992, 993, 994, 995, 996, 997, 998]);
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "obj.json": JSON.stringify({ version: 1, data: [{ text: "a" }, { text: "b" }] }),
    });
    const recs = await readRecords({ path: `${dir}/obj.json`, field: "data" });
    assert.deepEqual(recs.map(text), ["a", "b"]);
    await assertUserError(
      () => readRecords({ path: `${dir}/obj.json` }),
      "obj.json",
      "set field to one of: data",
    );
    await assertUserError(
      () => readRecords({ path: `${dir}/obj.json`, field: "rows" }),
      'field "rows"',
      "data",
    );
  });
});

Deno.test("records: JSONL with line numbers; a bad line becomes a record with an error", async () => {
  const cloze = await readRecords({ path: fixture("eval/tinystories_cloze.jsonl") });
  assert.equal(cloze.length, 1600);
  assert.equal((cloze[1599].value as { id: string }).id, "tsval-cloze-1599");
  assert.equal(cloze[1599].source.line, 1600);
  await withTempDir(async (dir) => {
    await writeTree(dir, { "d.jsonl": '{"text":"a"}\n\n{"text": "b"}\r\n{"text": oops}\n{"text":"d"}' });
    const recs = await readRecords({ path: `${dir}/d.jsonl` });
    assert.equal(recs.length, 4);
    assert.deepEqual(recs.map((r) => r.source.line), [1, 3, 4, 5]);
    assert.deepEqual(recs.map((r) => r.source.index), [0, 1, 2, 3]);
    assert.equal(text(recs[1]), "b");
    assert.match(recs[2].error ?? "", /invalid JSON/);
    assert.equal(recs[2].value, undefined);
  });
});

Deno.test("records: .json holding JSON Lines is read as JSONL; broken JSON names file and line", async () => {
  await withTempDir(async (dir) => {
    await writeTree(dir, {
      "lines.json": '{"text":"a"}\n{"text":"b"}\n',
      "broken.json": '[\n  {"text": "a"},\n  {"text": }\n]\n',
      "bad.txt": new Uint8Array([0x61, 0xff, 0xfe, 0x0a]),
      "data.csv": "a,b\n",
    });
    assert.deepEqual((await readRecords({ path: `${dir}/lines.json` })).map(text), ["a", "b"]);
    await assertUserError(
      () => readRecords({ path: `${dir}/broken.json` }),
      "broken.json:3",
      "not valid JSON",
    );
    await assertUserError(() => readRecords({ path: `${dir}/bad.txt` }), "bad.txt", "UTF-8");
    await assertUserError(() => readRecords({ path: `${dir}/data.csv` }), "data.csv", "unknown file type");
    await assertUserError(
      () => readRecords({ path: `${dir}/missing.jsonl` }),
      "missing.jsonl",
      "no such file",
    );
    await assertUserError(() => readRecords({ path: `${dir}/lines.json`, limit: -1 }), '"limit"');
  });
});

Deno.test("records: parquet streams by row group; offset skips row groups; int64 becomes number", async () => {
  const path = localFixture("chat_rg3.parquet");
  const all = await readRecords({ path });
  assert.equal(all.length, 10);
  assert.deepEqual(all[3].value, {
    id: 3,
    messages: [{ role: "user", content: "Question 3?" }, { role: "assistant", content: "Answer 3." }],
  });
  const mid = await readRecords({ path, offset: 4, limit: 4 });
  assert.deepEqual(mid.map((r) => (r.value as { id: number }).id), [4, 5, 6, 7]);
  assert.deepEqual(mid.map((r) => r.source.index), [4, 5, 6, 7]);
  const cols = await readRecords({ path, columns: ["id"], limit: 2 });
  assert.deepEqual(cols.map((r) => r.value), [{ id: 0 }, { id: 1 }]);
  await assertUserError(
    () => readRecords({ path, columns: ["nope"] }),
    "chat_rg3.parquet",
    "nope",
    "id, messages",
  );
  await assertUserError(
    () => readRecords({ path, columns: ["role"] }),
    "no column(s) role",
    "(has id, messages)",
  );
  for (const codec of ["zstd", "gzip"]) {
    const recs = await readRecords({ path: localFixture(`text_${codec}.parquet`), offset: 3 });
    assert.deepEqual(recs.map(text), [3, 4, 5, 6].map((i) => `Story number ${i}. The end.`));
  }
});

Deno.test("records: a corrupt parquet file is refused with its name", async () => {
  await withTempDir(async (dir) => {
    const good = await Deno.readFile(localFixture("chat_rg3.parquet"));
    await writeTree(dir, { "cut.parquet": good.subarray(0, 200), "junk.parquet": "not parquet at all" });
    await assertUserError(() => readRecords({ path: `${dir}/cut.parquet` }), "cut.parquet", "parquet");
    await assertUserError(() => readRecords({ path: `${dir}/junk.parquet` }), "junk.parquet", "parquet");
  });
});

Deno.test("records: a local directory resolves splits like datasets; offset/limit span files in order", async () => {
  await withTempDir(async (dir) => {
    const jl = (xs: string[]) => xs.map((t) => JSON.stringify({ text: t })).join("\n") + "\n";
    await writeTree(dir, {
      "data/train-00000-of-00002.jsonl": jl(["t0", "t1"]),
      "data/train-00001-of-00002.jsonl": jl(["t2", "t3"]),
      "data/validation-00000-of-00001.jsonl": jl(["v0"]),
      "README.md": "# no front matter\n",
      ".hidden/train-00000-of-00001.jsonl": jl(["hidden"]),
    });
    const train = await readRecords({ path: dir, offset: 1, limit: 2 });
    assert.deepEqual(train.map(text), ["t1", "t2"]);
    assert.ok(train[1].source.file.endsWith("data/train-00001-of-00002.jsonl"));
    assert.equal(train[1].source.index, 0);
    assert.deepEqual((await readRecords({ path: dir, split: "validation" })).map(text), ["v0"]);
    await assertUserError(
      () => readRecords({ path: dir, split: "test" }),
      'split "test"',
      "train, validation",
    );
    const glob = await readRecords({ path: `${dir}/data/train-*.jsonl` });
    assert.deepEqual(glob.map(text), ["t0", "t1", "t2", "t3"]);
  });
});

/** A fake Hub cache: a folder per revision holding the repository files. */
function fakeHub(root: string, calls: string[]): HubDatasetResolver {
  return {
    listFiles: async (repo, rev) => {
      calls.push(`list ${repo}@${rev}`);
      const base = `${root}/${repo}/${rev ?? "main"}`;
      const out: string[] = [];
      const walk = async (d: string, rel: string) => {
        for await (const e of Deno.readDir(d)) {
          if (e.isDirectory) await walk(`${d}/${e.name}`, `${rel}${e.name}/`);
          else out.push(`${rel}${e.name}`);
        }
      };
      await walk(base, "");
      return out;
    },
    localPath: (repo, rev, file) => {
      calls.push(`get ${file}`);
      return Promise.resolve(`${root}/${repo}/${rev ?? "main"}/${file}`);
    },
  };
}

Deno.test("records: hf:// datasets through a resolver, with README configs, revisions and file globs", async () => {
  await withTempDir(async (dir) => {
    const jl = (xs: string[]) => xs.map((t) => JSON.stringify({ text: t })).join("\n") + "\n";
    await writeTree(dir, {
      "org/chat/v1/README.md": [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train_sft",
        "    path: data/train_sft-*",
        "  - split: test_sft",
        "    path: data/test_sft-*",
        "- config_name: gen",
        "  data_files: gen/*.jsonl",
        "---",
        "# Chat",
      ].join("\n"),
      "org/chat/v1/data/train_sft-00000-of-00001.jsonl": jl(["a", "b"]),
      "org/chat/v1/data/test_sft-00000-of-00001.jsonl": jl(["c"]),
      "org/chat/v1/gen/x.jsonl": jl(["g"]),
      "org/chat/main/data/train-00000-of-00001.jsonl": jl(["m"]),
    });
    const calls: string[] = [];
    const hub = fakeHub(dir, calls);
    const sft = await readRecords({ path: "hf://datasets/org/chat@v1", split: "train_sft" }, { hub });
    assert.deepEqual(sft.map(text), ["a", "b"]);
    assert.equal(sft[0].source.file, "hf://datasets/org/chat@v1/data/train_sft-00000-of-00001.jsonl");
    assert.ok(
      !calls.includes("get data/test_sft-00000-of-00001.jsonl"),
      "only the split's files are fetched",
    );
    const gen = await readRecords({ path: "hf://datasets/org/chat@v1", subset: "gen" }, { hub });
    assert.deepEqual(gen.map(text), ["g"]);
    await assertUserError(
      () => readRecords({ path: "hf://datasets/org/chat@v1" }, { hub }),
      'split "train" not found',
      "train_sft, test_sft",
    );
    await assertUserError(
      () => readRecords({ path: "hf://datasets/org/chat@v1", subset: "x" }, { hub }),
      '"x"',
    );
    const main = await readRecords({ path: "hf://datasets/org/chat" }, { hub });
    assert.deepEqual(main.map(text), ["m"]);
    const globbed = await readRecords({ path: "hf://datasets/org/chat@v1/gen/*.jsonl" }, { hub });
    assert.deepEqual(globbed.map(text), ["g"]);
    await assertUserError(() => readRecords({ path: "hf://datasets/org/chat" }), "Hub cache");
    await assertUserError(
      () => readRecords({ path: "hf://models/org/chat" }, { hub }),
      "hf://datasets/<org>/<name>",
    );
  });
});

Deno.test("records: reading is deterministic and resolveDataset lists the split's files", async () => {
  const ds = await resolveDataset({ path: fixture("preference/dpo_en_demo.json") });
  assert.equal(ds.files.length, 1);
  assert.equal(ds.files[0].type, "json");
  const a: unknown[] = [], b: unknown[] = [];
  for await (const r of iterateRecords(ds, { limit: 5 })) a.push(r);
  for await (const r of iterateRecords(ds, { limit: 5 })) b.push(r);
  assert.deepEqual(a, b);
  assert.equal(a.length, 5);
});
