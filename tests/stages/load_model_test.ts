/**
 * The load_model stage: offline loading from a Hub-layout cache built from the fixtures (files hard-linked from
 * the cache's blobs), local directories (copied), dtype conversion, hybrids with a separate tokenizer, and the
 * errors for a model that is not in the cache or does not match its config.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadModel } from "../../models/checkpoint.ts";
import { openSafetensors } from "../../models/safetensors.ts";
import { EMBED } from "../../models/weights.ts";
import { HYBRID_DIR, TEACHER_DIR, withEnv, withRecipe, writeHubSnapshot } from "./recipe_run.ts";
import { lastEvents } from "../pipelines/helpers.ts";

const COMMIT = "c0ffee".padEnd(40, "0");

/** A Hub cache holding `dir`'s files as `repo` at COMMIT (refs/main). */
async function hubCache(root: string, repo: string, dir: string): Promise<string> {
  const files: Record<string, Uint8Array> = {};
  for (const e of Deno.readDirSync(dir)) files[e.name] = Deno.readFileSync(join(dir, e.name));
  return await writeHubSnapshot(root, "model", repo, COMMIT, files);
}

async function sameWeights(a: string, b: string): Promise<void> {
  const [x, y] = [await loadModel(a), await loadModel(b)];
  assert.deepEqual([...x.weights.keys()].sort(), [...y.weights.keys()].sort());
  for (const [k, t] of x.weights) assert.deepEqual(t.data, y.weights.get(k)!.data, k);
}

Deno.test("load_model: hf://org/name offline from a Hub-layout cache, files hard-linked from its blobs", async () => {
  const cache = await Deno.makeTempDir({ prefix: "hf-cache-" });
  try {
    const snapshot = await hubCache(cache, "org/tiny", TEACHER_DIR);
    await withEnv({ HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" }, () =>
      withRecipe(
        `name: lm
stages:
  teacher:
    kind: load_model
    inputs: { model: "hf://org/tiny@${COMMIT}" }
  by_branch:
    kind: load_model
    inputs: { model: "hf://org/tiny" }
  missing:
    kind: load_model
    inputs: { model: "hf://org/absent" }
`,
        {},
        async (run, p) => {
          const r = await run(["teacher", "by_branch"]);
          assert.equal(r.code, 0, r.stderr);
          const out = r.outputs["teacher.model"];
          const names = [...Deno.readDirSync(out)].map((e) => e.name).sort();
          assert.deepEqual(names, [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
          ]);
          for (const n of names) {
            const st = Deno.lstatSync(join(out, n));
            assert.ok(st.isFile, `${n} is a regular file, not a link`);
            assert.equal(
              st.ino,
              Deno.statSync(join(snapshot, n)).ino,
              `${n} is hard-linked to the cache blob`,
            );
          }
          await sameWeights(out, TEACHER_DIR);
          const logs = lastEvents(p).map((e) => (e as { message?: string }).message ?? "");
          assert.ok(
            logs.some((m) => m.includes(`org/tiny@${COMMIT}: commit ${COMMIT} (from the Hub cache)`)),
          );
          // the same files, so the same artifact
          assert.equal(r.outputs["by_branch.model"], out);

          const miss = await run(["missing"]);
          assert.equal(miss.code, 2, miss.stderr);
          assert.match(miss.stderr, /org\/absent is not in the Hub cache .* offline mode is on/);
        },
      ));
  } finally {
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("load_model: local directories are copied; dtype converts; a hybrid takes a separate tokenizer", async () => {
  await withRecipe(
    `name: lm
stages:
  local:
    kind: load_model
    inputs: { model: ${TEACHER_DIR} }
  bf16:
    kind: load_model
    params: { dtype: BF16 }
    inputs: { model: ${TEACHER_DIR} }
  hybrid:
    kind: load_model
    inputs: { model: ${HYBRID_DIR}, tokenizer: ${TEACHER_DIR} }
  hybrid_no_tok:
    kind: load_model
    inputs: { model: ${HYBRID_DIR} }
`,
    {},
    async (run) => {
      const r = await run(["local", "bf16", "hybrid"]);
      assert.equal(r.code, 0, r.stderr);
      const local = r.outputs["local.model"];
      assert.notEqual(
        Deno.statSync(join(local, "model.safetensors")).ino,
        Deno.statSync(join(TEACHER_DIR, "model.safetensors")).ino,
        "a user's directory is copied, never linked (the cache makes its files read-only)",
      );
      await sameWeights(local, TEACHER_DIR);

      const bf16 = r.outputs["bf16.model"];
      const st = await openSafetensors(join(bf16, "model.safetensors"));
      assert.equal(st.info(EMBED).dtype, "BF16");
      assert.equal(JSON.parse(Deno.readTextFileSync(join(bf16, "config.json"))).torch_dtype, "bfloat16");
      const a = (await loadModel(bf16)).weights.get(EMBED)!.data;
      const b = (await loadModel(TEACHER_DIR)).weights.get(EMBED)!.data;
      a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) <= Math.abs(b[i]) * 2 ** -8, `embedding[${i}]`));

      const hybrid = r.outputs["hybrid.model"];
      assert.ok(Deno.statSync(join(hybrid, "mamba_config.json")).isFile);
      assert.ok(Deno.statSync(join(hybrid, "tokenizer.json")).isFile);
      await sameWeights(hybrid, HYBRID_DIR);

      const noTok = await run(["hybrid_no_tok"]);
      assert.equal(noTok.code, 2, noTok.stderr);
      assert.match(noTok.stderr, /no tokenizer\.json .*give a tokenizer input/);
    },
  );
});

Deno.test("load_model: weights that do not match the config are refused before anything is written", async () => {
  const cfg = JSON.parse(Deno.readTextFileSync(join(TEACHER_DIR, "config.json")));
  await withRecipe(
    `name: lm
stages:
  bad:
    kind: load_model
    inputs: { model: bad }
`,
    {
      "bad/config.json": JSON.stringify({ ...cfg, intermediate_size: 128 }),
      "bad/tokenizer.json": Deno.readTextFileSync(join(TEACHER_DIR, "tokenizer.json")),
    },
    async (run, p) => {
      Deno.copyFileSync(join(TEACHER_DIR, "model.safetensors"), p.path("bad/model.safetensors"));
      const r = await run();
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /model\.safetensors: weights do not match the config: wrong shape: .*mlp/);
    },
  );
});
