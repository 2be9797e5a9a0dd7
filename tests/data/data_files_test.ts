import assert from "node:assert/strict";
import {
  globToRegExp,
  inferSplits,
  matchFiles,
  parseHubDatasetUrl,
  readmeFrontMatter,
  resolveSplitFiles,
} from "../../data/data_files.ts";
import { assertUserError } from "./helpers.ts";

Deno.test("data_files: hf:// addresses parse into repo, revision and pattern", () => {
  assert.deepEqual(parseHubDatasetUrl("hf://datasets/HuggingFaceH4/ultrachat_200k"), {
    repo: "HuggingFaceH4/ultrachat_200k",
    revision: null,
    pattern: null,
  });
  assert.deepEqual(parseHubDatasetUrl("hf://datasets/a/b@refs%2Fconvert%2Fparquet/default/train/*.parquet"), {
    repo: "a/b",
    revision: "refs/convert/parquet",
    pattern: "default/train/*.parquet",
  });
  assert.throws(() => parseHubDatasetUrl("hf://datasets/only-name"), /hf:\/\/datasets\/<org>\/<name>/);
});

Deno.test("data_files: globs follow fsspec semantics (* within a segment, ** across, classes)", () => {
  assert.ok(globToRegExp("*.jsonl").test("a.jsonl"));
  assert.ok(!globToRegExp("*.jsonl").test("d/a.jsonl"));
  assert.ok(globToRegExp("**/*.jsonl").test("a.jsonl"));
  assert.ok(globToRegExp("**/*.jsonl").test("d/e/a.jsonl"));
  assert.ok(globToRegExp("data/**").test("data/x/y.parquet"));
  assert.ok(globToRegExp("**/train[-._ 0-9]*").test("x/train-0.json"));
  assert.ok(!globToRegExp("**/train[-._ 0-9]*").test("x/trainer.json"));
  assert.ok(globToRegExp("f[!a]?.txt").test("fbc.txt"));
  assert.ok(!globToRegExp("f[!a]?.txt").test("fac.txt"));
  assert.deepEqual(matchFiles(["a.json", ".h/a.json", "__pycache__/a.json", "README.md"], "**"), ["a.json"]);
  assert.deepEqual(matchFiles([".h/a.json"], ".h/*"), [".h/a.json"]);
});

Deno.test("data_files: split inference matches datasets' order of conventions", () => {
  const sharded = inferSplits([
    "data/train_sft-00000-of-00002-abc.parquet",
    "data/train_sft-00001-of-00002-abc.parquet",
    "data/test_gen-00000-of-00001.parquet",
    "data/train_gen-00000-of-00001.parquet",
  ]);
  assert.deepEqual([...sharded.keys()], ["test_gen", "train_gen", "train_sft"]);
  assert.equal(sharded.get("train_sft")!.length, 2);
  const dirs = inferSplits(["train/a.jsonl", "dev/b.jsonl", "test/c.jsonl", "notes.txt"]);
  assert.deepEqual(Object.fromEntries(dirs), {
    train: ["train/a.jsonl"],
    validation: ["dev/b.jsonl"],
    test: ["test/c.jsonl"],
  });
  const names = inferSplits(["my_train.json", "my_valid.json", "trainer.json"]);
  assert.deepEqual(Object.fromEntries(names), { train: ["my_train.json"], validation: ["my_valid.json"] });
  assert.deepEqual(Object.fromEntries(inferSplits(["a.jsonl", "b.parquet", "c.csv"])), {
    train: ["a.jsonl", "b.parquet"],
  });
});

Deno.test("data_files: README configs choose files; bad configs and unknown splits are explained", async () => {
  const readme =
    "---\nconfigs:\n- config_name: a\n  data_files: a/*.jsonl\n- config_name: b\n  data_dir: bdir\n---\n";
  assert.ok(readmeFrontMatter(readme));
  const files = ["a/1.jsonl", "bdir/train.jsonl", "bdir/test.jsonl"];
  assert.deepEqual(resolveSplitFiles(files, { readme, subset: "a", label: "x" }).files, ["a/1.jsonl"]);
  const b = resolveSplitFiles(files, { readme, subset: "b", split: "test", label: "x" });
  assert.deepEqual(b.files, ["bdir/test.jsonl"]);
  assert.deepEqual(b.available, ["train", "test"]);
  await assertUserError(
    () => resolveSplitFiles(files, { readme, label: "ds" }),
    "ds",
    "several subsets",
    "a, b",
  );
  const bad = "---\nconfigs:\n- config_name: default\n  data_files: 3\n---\n";
  await assertUserError(() => resolveSplitFiles(files, { readme: bad, label: "ds" }), "data_files must be");
  await assertUserError(() => resolveSplitFiles([], { label: "empty" }), "empty", "no readable data files");
  await assertUserError(
    () => resolveSplitFiles(files, { pattern: "z/*", label: "ds" }),
    'no file matches "z/*"',
  );
});
