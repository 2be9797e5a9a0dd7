/**
 * Hub resolution without network: a Hub-layout cache built from the fixtures (as Python's huggingface_hub lays
 * it out) for offline loading, and a fake Hub behind the injectable `fetch` for the download path.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { isUserError } from "../../util/errors.ts";
import {
  filterByPatterns,
  hubCacheDir,
  offlineFromEnv,
  parseRepoRef,
  repoFolderName,
  resolveDatasetSource,
  resolveModelSource,
  selectModelFiles,
} from "../../models/hub.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { Tokenizer } from "../../models/tokenizer.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const TEACHER_FILES = [
  "config.json",
  "generation_config.json",
  "model.safetensors",
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
];
const COMMIT_A = "a".repeat(40);
const COMMIT_B = "0123456789abcdef0123456789abcdef01234567";

async function hex(algo: "SHA-1" | "SHA-256", data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest(algo, data));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Git's blob id (the etag of a regular, non-LFS file on the Hub). */
function gitBlobId(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const head = new TextEncoder().encode(`blob ${data.length}\0`);
  const all = new Uint8Array(head.length + data.length);
  all.set(head);
  all.set(data, head.length);
  return hex("SHA-1", all);
}

interface RepoFile {
  path: string;
  data: Uint8Array<ArrayBuffer>;
  lfs: boolean;
}

async function etagOf(f: RepoFile): Promise<string> {
  return f.lfs ? await hex("SHA-256", f.data) : await gitBlobId(f.data);
}

function teacherFiles(extra: RepoFile[] = []): RepoFile[] {
  return [
    ...TEACHER_FILES.map((p) => ({
      path: p,
      data: Deno.readFileSync(join(TEACHER, p)),
      lfs: p.endsWith(".safetensors") || p === "tokenizer.model",
    })),
    ...extra,
  ];
}

/** Writes a snapshot the way Python's huggingface_hub does: blobs by etag, relative symlinks, refs. */
async function writeCacheSnapshot(
  cacheDir: string,
  repoId: string,
  type: "model" | "dataset",
  commit: string,
  files: RepoFile[],
  refs: Record<string, string>,
): Promise<string> {
  const storage = join(cacheDir, repoFolderName(repoId, type));
  const snapshot = join(storage, "snapshots", commit);
  await Deno.mkdir(join(storage, "blobs"), { recursive: true });
  for (const f of files) {
    const etag = await etagOf(f);
    await Deno.writeFile(join(storage, "blobs", etag), f.data);
    const link = join(snapshot, f.path);
    await Deno.mkdir(join(link, ".."), { recursive: true });
    const depth = f.path.split("/").length + 1;
    await Deno.symlink(`${"../".repeat(depth)}blobs/${etag}`, link);
  }
  for (const [ref, c] of Object.entries(refs)) {
    await Deno.mkdir(join(storage, "refs"), { recursive: true });
    await Deno.writeTextFile(join(storage, "refs", ref), c);
  }
  return snapshot;
}

interface FakeRepo {
  type: "model" | "dataset";
  refs: Record<string, string>;
  files: RepoFile[];
  /** When set, every request must carry this bearer token (a gated repo). */
  token?: string;
}

/** A fake Hub: the endpoints @huggingface/hub uses, answered from memory. Records every request. */
function fakeHub(repos: Record<string, FakeRepo>, hubUrl = "https://hub.test") {
  const log: { method: string; url: string; auth: string | null; range: string | null }[] = [];
  const json = (v: unknown, status = 200) =>
    new Response(JSON.stringify(v), { status, headers: { "Content-Type": "application/json" } });
  const fetchFn = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const headers = new Headers(init?.headers);
    const method = init?.method ?? "GET";
    log.push({ method, url: url.href, auth: headers.get("Authorization"), range: headers.get("Range") });
    assert.equal(url.origin, hubUrl);
    const parts = decodeURIComponent(url.pathname).split("/").slice(1);
    let api = false, type: "model" | "dataset" = "model";
    if (parts[0] === "api") {
      api = true;
      type = parts[1] === "datasets" ? "dataset" : "model";
      parts.splice(0, 2);
    } else if (parts[0] === "datasets") {
      type = "dataset";
      parts.splice(0, 1);
    }
    const name = `${parts[0]}/${parts[1]}`;
    const repo = repos[name];
    if (!repo || repo.type !== type) return json({ error: "Repository not found" }, 401);
    if (repo.token && headers.get("Authorization") !== `Bearer ${repo.token}`) {
      return headers.get("Authorization")
        ? json({ error: "Access to this repo is restricted and you are not in the authorized list" }, 403)
        : json({ error: "Access to this repo is restricted. You must be authenticated." }, 401);
    }
    const rev = parts[3];
    const commit = /^[0-9a-f]{40}$/.test(rev) ? rev : repo.refs[rev];
    if (!commit) return json({ error: "Revision not found" }, 404);
    const fileInfo = async (f: RepoFile) => ({
      type: "file",
      path: f.path,
      size: f.lfs ? 134 : f.data.length,
      oid: await gitBlobId(f.data),
      ...(f.lfs ? { lfs: { oid: await hex("SHA-256", f.data), size: f.data.length, pointerSize: 134 } } : {}),
      lastCommit: { id: commit, title: "upload", date: "2026-11-28T00:00:00.000Z" },
    });
    if (api && parts[2] === "revision") return json({ _id: "x", id: name, sha: commit, private: false });
    if (api && parts[2] === "tree") {
      const dirs = [
        ...new Set(repo.files.filter((f) => f.path.includes("/")).map((f) => f.path.split("/")[0])),
      ];
      return json([
        ...dirs.map((d) => ({ type: "directory", path: d, size: 0, oid: "0" })),
        ...await Promise.all(repo.files.map(fileInfo)),
      ]);
    }
    if (api && parts[2] === "paths-info") {
      const body = JSON.parse(String(init?.body));
      return json(await Promise.all(repo.files.filter((f) => body.paths.includes(f.path)).map(fileInfo)));
    }
    if (!api && parts[2] === "resolve") {
      const path = parts.slice(4).join("/");
      const f = repo.files.find((x) => x.path === path);
      if (!f) return new Response("", { status: 404, headers: { "X-Error-Code": "EntryNotFound" } });
      const etag = `"${await etagOf(f)}"`;
      const range = headers.get("Range");
      if (range) {
        const [a, b] = range.replace("bytes=", "").split("-").map(Number);
        return new Response(f.data.slice(a, b + 1), {
          status: 206,
          headers: {
            "Content-Range": `bytes ${a}-${b}/${f.data.length}`,
            "ETag": etag,
            "X-Linked-ETag": etag,
          },
        });
      }
      return new Response(f.data, {
        status: 200,
        headers: { "ETag": etag, "Content-Length": String(f.data.length) },
      });
    }
    return json({ error: `fake hub: unhandled ${method} ${url.pathname}` }, 500);
  };
  return { fetch: fetchFn as typeof fetch, log, hubUrl };
}

async function withCache(fn: (cache: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "distillery-hub-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function refused(fragments: string[]) {
  return (e: Error) => {
    assert.ok(isUserError(e), `expected a UserError, got ${e?.stack ?? e}`);
    for (const f of fragments) assert.ok(e.message.includes(f), `"${f}" missing from: ${e.message}`);
    return true;
  };
}

Deno.test("hub: offline load from a Python-layout cache by repo id, by ref and by commit", async () => {
  await withCache(async (cache) => {
    const snap = await writeCacheSnapshot(cache, "karpathy/stories260K", "model", COMMIT_A, teacherFiles(), {
      main: COMMIT_A,
      "v1.0": COMMIT_A,
    });
    const opts = { cacheDir: cache, offline: true };
    for (
      const src of ["karpathy/stories260K", "karpathy/stories260K@v1.0", `karpathy/stories260K@${COMMIT_A}`]
    ) {
      const r = await resolveModelSource(src, opts);
      assert.equal(r.dir, snap, src);
      assert.equal(r.commit, COMMIT_A);
      assert.equal(r.origin, "hub");
      assert.equal(r.fromCache, true);
    }
    assert.equal((await resolveModelSource("karpathy/stories260K", { ...opts, revision: "v1.0" })).dir, snap);
    const r = await resolveModelSource("karpathy/stories260K", opts);
    const model = await loadModel(r.dir);
    assert.equal(model.kind, "transformer");
    assert.equal(model.config.numLayers, 5);
    assert.deepEqual((await Tokenizer.fromDir(r.dir)).encode("Once upon a time"), [1, 403, 407, 261, 378]);

    await assert.rejects(
      resolveModelSource("karpathy/missing-model", opts),
      refused([
        "model karpathy/missing-model",
        "not in the Hub cache",
        "offline",
        "hf download karpathy/missing-model",
      ]),
    );
    await assert.rejects(
      resolveModelSource("karpathy/stories260K@v2", opts),
      refused(["@v2", "not in the Hub cache", "--revision v2"]),
    );
    await assert.rejects(
      resolveModelSource(`karpathy/stories260K@${COMMIT_B}`, opts),
      refused(["not in the Hub cache"]),
    );
    // A snapshot that lacks its weights (an interrupted download) is reported, not loaded half-way.
    await writeCacheSnapshot(
      cache,
      "org/partial",
      "model",
      COMMIT_B,
      teacherFiles().filter((f) => f.path !== "model.safetensors"),
      {
        main: COMMIT_B,
      },
    );
    await assert.rejects(resolveModelSource("org/partial", opts), refused(["lacks model.safetensors"]));
  });
});

Deno.test("hub: local directories, bad ids, environment defaults", async () => {
  assert.deepEqual(await resolveModelSource(TEACHER), { dir: TEACHER, origin: "local" });
  await assert.rejects(resolveModelSource("./no/such/dir"), refused(["./no/such/dir", "no such directory"]));
  await assert.rejects(resolveModelSource("a/b/c"), refused(["not a Hub repo id"]));
  await assert.rejects(resolveModelSource(join(TEACHER, "config.json")), refused(["is a file"]));
  await assert.rejects(resolveModelSource(""), refused(["empty"]));
  await assert.rejects(
    resolveModelSource("org/name@../../etc", { offline: true }),
    refused(["not a branch, tag or commit"]),
  );
  assert.deepEqual(parseRepoRef("org/name@refs/pr/1"), { repoId: "org/name", revision: "refs/pr/1" });
  assert.deepEqual(parseRepoRef("org/name"), { repoId: "org/name" });
  assert.equal(repoFolderName("HuggingFaceH4/zephyr-7b-beta"), "models--HuggingFaceH4--zephyr-7b-beta");
  assert.equal(
    repoFolderName("HuggingFaceH4/ultrachat_200k", "dataset"),
    "datasets--HuggingFaceH4--ultrachat_200k",
  );
  const saved = ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"].map((k) =>
    [k, Deno.env.get(k)] as const
  );
  try {
    for (const [k] of saved) Deno.env.delete(k);
    Deno.env.set("HF_HOME", "/data/hf");
    assert.equal(hubCacheDir(), "/data/hf/hub");
    Deno.env.set("HF_HUB_CACHE", "/fast/cache");
    assert.equal(hubCacheDir(), "/fast/cache");
    assert.equal(offlineFromEnv(), false);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    assert.equal(offlineFromEnv(), true);
  } finally {
    for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
  }
});

Deno.test("hub: file selection skips sub-folders and duplicate weight formats", () => {
  const repo = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "consolidated.safetensors",
    "original/consolidated.00.pth",
    "original/params.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
  ];
  assert.deepEqual(
    selectModelFiles(repo, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
    [
      "chat_template.jinja",
      "config.json",
      "generation_config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
      "special_tokens_map.json",
      "tokenizer.json",
      "tokenizer.model",
      "tokenizer_config.json",
    ],
  );
  assert.deepEqual(selectModelFiles(["config.json", "pytorch_model.bin", "README.md"]), [
    "config.json",
    "pytorch_model.bin",
  ]);
  assert.deepEqual(
    filterByPatterns(["data/train-0.parquet", "data/test-0.parquet", "README.md"], ["data/train-*"]),
    [
      "data/train-0.parquet",
    ],
  );
  assert.deepEqual(filterByPatterns(["a/b/c.json", "x.json"], ["*.json"]), ["a/b/c.json", "x.json"]);
  assert.deepEqual(filterByPatterns(["sft/x", "dpo/y"], ["sft/"]), ["sft/x"]);
});

Deno.test("hub: download into the Python cache layout through @huggingface/hub, then reuse it", async () => {
  await withCache(async (cache) => {
    const files = teacherFiles([
      { path: "README.md", data: new TextEncoder().encode("# card"), lfs: false },
      { path: "original/consolidated.00.pth", data: new Uint8Array(64), lfs: true },
    ]);
    const hub = fakeHub({ "karpathy/stories260K": { type: "model", refs: { main: COMMIT_A }, files } });
    const fetched: string[] = [];
    const opts = {
      cacheDir: cache,
      hubUrl: hub.hubUrl,
      fetch: hub.fetch,
      onFile: (p: string) => fetched.push(p),
    };
    const r = await resolveModelSource("karpathy/stories260K", opts);
    const storage = join(cache, "models--karpathy--stories260K");
    assert.equal(r.dir, join(storage, "snapshots", COMMIT_A));
    assert.equal(r.commit, COMMIT_A);
    assert.equal(r.fromCache, false);
    assert.equal(await Deno.readTextFile(join(storage, "refs", "main")), COMMIT_A);
    assert.deepEqual(fetched.sort(), TEACHER_FILES);
    // Python's layout: snapshot entries are relative symlinks to blobs named by etag (LFS sha256 or git blob id).
    for (const f of files.filter((x) => TEACHER_FILES.includes(x.path))) {
      const link = join(r.dir, f.path);
      assert.equal(await Deno.readLink(link), `../../blobs/${await etagOf(f)}`, f.path);
      assert.deepEqual(await Deno.readFile(link), f.data);
    }
    assert.deepEqual([...Deno.readDirSync(r.dir)].map((e) => e.name).sort(), TEACHER_FILES);
    assert.ok(![...Deno.readDirSync(join(storage, "blobs"))].some((e) => e.name.endsWith(".incomplete")));
    const model = await loadModel(r.dir);
    assert.equal(model.config.hiddenSize, 64);

    // Second resolve: the files are in the cache, nothing is downloaded again.
    hub.log.length = 0;
    fetched.length = 0;
    assert.equal((await resolveModelSource("karpathy/stories260K", opts)).dir, r.dir);
    assert.deepEqual(fetched, []);
    assert.ok(!hub.log.some((l) => l.url.includes("/resolve/")), JSON.stringify(hub.log));
    // And offline it now resolves from the same cache.
    assert.equal(
      (await resolveModelSource("karpathy/stories260K", { cacheDir: cache, offline: true })).dir,
      r.dir,
    );
    // allowPatterns narrows what is fetched (here: the model card only, into the same snapshot).
    const only = await resolveModelSource("karpathy/stories260K", { ...opts, allowPatterns: ["README*"] });
    assert.equal(only.dir, r.dir);
    assert.equal(await Deno.readTextFile(join(r.dir, "README.md")), "# card");
    assert.ok(![...Deno.readDirSync(r.dir)].some((e) => e.name === "original"));
  });
});

Deno.test("hub: a snapshot already downloaded by Python tools is reused without downloading", async () => {
  await withCache(async (cache) => {
    const snap = await writeCacheSnapshot(cache, "karpathy/stories260K", "model", COMMIT_B, teacherFiles(), {
      main: COMMIT_B,
    });
    const hub = fakeHub({
      "karpathy/stories260K": { type: "model", refs: { main: COMMIT_B }, files: teacherFiles() },
    });
    const r = await resolveModelSource("karpathy/stories260K", {
      cacheDir: cache,
      hubUrl: hub.hubUrl,
      fetch: hub.fetch,
    });
    assert.equal(r.dir, snap);
    assert.ok(
      !hub.log.some((l) => l.url.includes("/resolve/") || l.url.includes("paths-info")),
      JSON.stringify(hub.log),
    );
  });
});

Deno.test("hub: sharded weights: only the shards the index names are fetched", async () => {
  await withCache(async (cache) => {
    const enc = (s: string) => new TextEncoder().encode(s);
    const base = teacherFiles().filter((f) => f.path !== "model.safetensors");
    const st = Deno.readFileSync(join(TEACHER, "model.safetensors"));
    // Both "shards" are the full file; the index maps every tensor into shard 1 except the embedding.
    const index = {
      metadata: {},
      weight_map: { "model.embed_tokens.weight": "model-00002-of-00002.safetensors" } as Record<
        string,
        string
      >,
    };
    const { SafetensorsFile } = await import("../../models/safetensors.ts");
    const tmp = await Deno.makeTempFile();
    await Deno.writeFile(tmp, st);
    for (const n of (await SafetensorsFile.open(tmp)).names()) {
      index.weight_map[n] ??= "model-00001-of-00002.safetensors";
    }
    await Deno.remove(tmp);
    const files = [
      ...base,
      { path: "model-00001-of-00002.safetensors", data: st, lfs: true },
      { path: "model-00002-of-00002.safetensors", data: st, lfs: true },
      { path: "model.safetensors.index.json", data: enc(JSON.stringify(index)), lfs: false },
      { path: "consolidated.safetensors", data: st, lfs: true },
    ];
    const hub = fakeHub({ "org/sharded": { type: "model", refs: { main: COMMIT_A }, files } });
    const r = await resolveModelSource("org/sharded", {
      cacheDir: cache,
      hubUrl: hub.hubUrl,
      fetch: hub.fetch,
    });
    const got = [...Deno.readDirSync(r.dir)].map((e) => e.name).sort();
    assert.ok(!got.includes("consolidated.safetensors"));
    assert.ok(got.includes("model-00002-of-00002.safetensors"));
    const m = await loadModel(r.dir);
    assert.equal(m.config.vocabSize, 512);
  });
});

Deno.test("hub: gated repos, missing repos and no network give errors that name the repo and the fix", async () => {
  await withCache(async (cache) => {
    const hub = fakeHub({
      "meta-llama/Llama-3.2-1B": {
        type: "model",
        refs: { main: COMMIT_A },
        files: teacherFiles(),
        token: "hf_granted",
      },
    });
    const base = { cacheDir: cache, hubUrl: hub.hubUrl, fetch: hub.fetch };
    const saved = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"].map((k) =>
      [k, Deno.env.get(k)] as const
    );
    try {
      for (const [k] of saved) Deno.env.delete(k);
      Deno.env.set("HF_TOKEN_PATH", join(cache, "no-token-file"));
      await assert.rejects(
        resolveModelSource("meta-llama/Llama-3.2-1B", base),
        refused(["meta-llama/Llama-3.2-1B", "HF_TOKEN", "https://hub.test/meta-llama/Llama-3.2-1B"]),
      );
      const secret = "hf_wrongtoken123";
      await assert.rejects(
        resolveModelSource("meta-llama/Llama-3.2-1B", { ...base, token: secret }),
        (e: Error) => {
          refused(["access denied", "request access"])(e);
          assert.ok(!e.message.includes(secret), "the token must never be printed");
          return true;
        },
      );
      await assert.rejects(
        resolveModelSource("meta-llama/Llama-3.2-1B", { ...base, token: "not-a-token" }),
        refused(["hf_"]),
      );
      // HF_TOKEN from the environment is sent as a bearer token.
      Deno.env.set("HF_TOKEN", "hf_granted");
      hub.log.length = 0;
      const r = await resolveModelSource("meta-llama/Llama-3.2-1B", base);
      assert.equal(r.commit, COMMIT_A);
      assert.ok(hub.log.every((l) => l.auth === "Bearer hf_granted"));
    } finally {
      for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    }
    await assert.rejects(
      resolveModelSource("org/does-not-exist", { ...base, token: "hf_x" }),
      refused(["org/does-not-exist"]),
    );
    await assert.rejects(
      resolveModelSource("meta-llama/Llama-3.2-1B@nope", { ...base, token: "hf_granted" }),
      refused(["@nope", "not found", "revision"]),
    );
    // No network: an uncached repo is an error naming the fix; a cached one is used with a warning.
    const offlineFetch = (() =>
      Promise.reject(new TypeError("error sending request: dns error"))) as typeof fetch;
    await assert.rejects(
      resolveModelSource("org/uncached", {
        cacheDir: cache,
        hubUrl: hub.hubUrl,
        fetch: offlineFetch,
        token: "hf_x",
      }),
      refused(["org/uncached", "cannot reach the Hugging Face Hub", "hf download org/uncached"]),
    );
    const warn = console.warn;
    const warnings: string[] = [];
    console.warn = (m: string) => warnings.push(m);
    try {
      const r = await resolveModelSource("meta-llama/Llama-3.2-1B", {
        cacheDir: cache,
        hubUrl: hub.hubUrl,
        fetch: offlineFetch,
        token: "hf_x",
      });
      assert.equal(r.fromCache, true);
      assert.equal(r.commit, COMMIT_A);
    } finally {
      console.warn = warn;
    }
    assert.equal(warnings.length, 1);
  });
});

Deno.test("hub: dataset repos use datasets--org--name and fetch every file (or the allowed ones)", async () => {
  await withCache(async (cache) => {
    const enc = (s: string) => new TextEncoder().encode(s);
    const files = [
      { path: "README.md", data: enc("# data"), lfs: false },
      { path: "data/train-00000.parquet", data: enc("PAR1 train"), lfs: true },
      { path: "data/test-00000.parquet", data: enc("PAR1 test"), lfs: true },
    ];
    const hub = fakeHub({
      "HuggingFaceH4/ultrachat_200k": { type: "dataset", refs: { main: COMMIT_A }, files },
    });
    const base = { cacheDir: cache, hubUrl: hub.hubUrl, fetch: hub.fetch };
    const r = await resolveDatasetSource("HuggingFaceH4/ultrachat_200k", {
      ...base,
      allowPatterns: ["data/train-*"],
    });
    assert.equal(r.dir, join(cache, "datasets--HuggingFaceH4--ultrachat_200k", "snapshots", COMMIT_A));
    assert.deepEqual([...Deno.readDirSync(join(r.dir, "data"))].map((e) => e.name), ["train-00000.parquet"]);
    assert.equal(await Deno.readTextFile(join(r.dir, "data/train-00000.parquet")), "PAR1 train");
    await resolveDatasetSource("HuggingFaceH4/ultrachat_200k", base);
    assert.deepEqual([...Deno.readDirSync(join(r.dir, "data"))].map((e) => e.name).sort(), [
      "test-00000.parquet",
      "train-00000.parquet",
    ]);
    assert.equal(await Deno.readTextFile(join(r.dir, "README.md")), "# data");
    const off = await resolveDatasetSource("HuggingFaceH4/ultrachat_200k", {
      cacheDir: cache,
      offline: true,
    });
    assert.equal(off.dir, r.dir);
    // A model id is not a dataset id: the model cache is not consulted.
    await assert.rejects(
      resolveModelSource("HuggingFaceH4/ultrachat_200k", { cacheDir: cache, offline: true }),
      refused(["not in the Hub cache"]),
    );
  });
});
