/**
 * Resolving a model or dataset source to a local directory: a path on disk, or a Hugging Face Hub repo
 * (`org/name`, optionally `org/name@revision`) downloaded through `@huggingface/hub` into the standard Hub cache.
 *
 * The cache is the one Python tools use, so files they downloaded are reused and files downloaded here serve
 * them: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
 * `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, laid out as
 * `models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/<revision>}`
 * (`datasets--org--name` for datasets). `@huggingface/hub`'s `downloadFileToCacheDir` writes that layout
 * (etag = LFS sha256 or git blob id, relative symlinks, `.incomplete` then rename); this module resolves the
 * revision to a commit first, writes `refs/<revision>` and picks the files to fetch.
 *
 * Offline (`HF_HUB_OFFLINE=1` or `offline: true`) resolves from the cache alone: `refs/<revision>` -> commit ->
 * `snapshots/<commit>`. Online, a network failure falls back to the cache when the revision is there, as
 * transformers does. The token (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, or the token file Python's `hf auth login`
 * writes) is sent to the Hub and never printed.
 *
 * @module
 */
import { dirname, join, resolve } from "node:path";
import { datasetInfo, downloadFileToCacheDir, listFiles, modelInfo } from "@huggingface/hub";
import { UserError } from "../util/errors.ts";
import { writeFileAtomic } from "../util/atomic.ts";
import { readEnv } from "../util/env.ts";

/** Kind of Hub repository. */
export type RepoType = "model" | "dataset";

/** Options for resolving a source. Every field has an environment-variable default. */
export interface HubOptions {
  /** Branch, tag or commit (default: the `@revision` in the source, else "main"). */
  revision?: string;
  /** Use the cache only (default: `HF_HUB_OFFLINE` is 1/true/yes/on). */
  offline?: boolean;
  /** Hub cache directory (default: see the module documentation). */
  cacheDir?: string;
  /** Access token (default: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then the token file). */
  token?: string;
  /** Hub endpoint (default: `HF_ENDPOINT`, else https://huggingface.co). */
  hubUrl?: string;
  /**
   * Which repo files to fetch, as fnmatch-style globs (`*` matches any characters, "/" included). Default: for
   * models, the top-level configs, tokenizer files and one set of weights (see {@linkcode selectModelFiles});
   * for datasets, everything.
   */
  allowPatterns?: string[];
  /** Called before each file is fetched (not for files already cached). */
  onFile?: (path: string, size: number) => void;
  /** The fetch implementation (tests inject a fake Hub here). */
  fetch?: typeof fetch;
}

/** Where a source was found. */
export interface ResolvedSource {
  /** A local directory holding the files. */
  dir: string;
  /** "local" for a path given by the user, "hub" for a Hub repo. */
  origin: "local" | "hub";
  /** The Hub repo id (hub only). */
  repoId?: string;
  /** The revision asked for (hub only). */
  revision?: string;
  /** The commit the revision resolved to (hub only). */
  commit?: string;
  /** True when the files came from the cache without asking the Hub. */
  fromCache?: boolean;
}

const COMMIT = /^[0-9a-f]{40}$/;
const REPO_ID = /^[A-Za-z0-9][A-Za-z0-9._-]*(\/[A-Za-z0-9][A-Za-z0-9._-]*)?$/;

function homeDir(): string {
  return readEnv("HOME") ?? readEnv("USERPROFILE") ?? ".";
}

/** huggingface_hub's home: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface. */
function hfHome(): string {
  return readEnv("HF_HOME") ?? join(readEnv("XDG_CACHE_HOME") ?? join(homeDir(), ".cache"), "huggingface");
}

/** The Hub cache directory the Python tools use (see the module documentation for the lookup order). */
export function hubCacheDir(): string {
  const explicit = readEnv("HF_HUB_CACHE") ?? readEnv("HUGGINGFACE_HUB_CACHE");
  if (explicit) return explicit;
  return join(hfHome(), "hub");
}

/** True when `HF_HUB_OFFLINE` asks for offline mode. */
export function offlineFromEnv(): boolean {
  return ["1", "true", "yes", "on"].includes((readEnv("HF_HUB_OFFLINE") ?? "").toLowerCase());
}

/** The access token from the environment or Python's token file, or undefined. Never log it. */
export function hubToken(): string | undefined {
  const t = readEnv("HF_TOKEN") ?? readEnv("HUGGING_FACE_HUB_TOKEN");
  if (t) return t.trim();
  const path = readEnv("HF_TOKEN_PATH") ?? join(hfHome(), "token");
  try {
    const s = Deno.readTextFileSync(path).trim();
    return s === "" ? undefined : s;
  } catch {
    return undefined;
  }
}

/** The cache folder name of a repo: `models--org--name` / `datasets--org--name`. */
export function repoFolderName(repoId: string, type: RepoType = "model"): string {
  return [`${type}s`, ...repoId.split("/")].join("--");
}

/** Splits `org/name@revision` into the repo id and the revision (undefined when absent). */
export function parseRepoRef(source: string): { repoId: string; revision?: string } {
  const at = source.indexOf("@");
  if (at < 0) return { repoId: source };
  return { repoId: source.slice(0, at), revision: source.slice(at + 1) || undefined };
}

/** True when `s` can be a Hub repo id (`name` or `org/name`). */
export function isRepoId(s: string): boolean {
  return REPO_ID.test(s) && !s.includes("--") && !s.includes("..") && !s.endsWith(".git");
}

function isFileSync(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Shard files an index names that are not in `dir` (null when the index cannot be read). */
function missingShards(dir: string, index: string): string[] | null {
  try {
    const wm = JSON.parse(Deno.readTextFileSync(join(dir, index))).weight_map ?? {};
    return [...new Set(Object.values(wm) as string[])].filter((f) => !isFileSync(join(dir, f)));
  } catch {
    return null;
  }
}

/** Model files that must be in a snapshot for it to be usable (config.json and every weight file). */
function missingModelFiles(dir: string): string[] {
  const missing: string[] = [];
  if (!isFileSync(join(dir, "config.json"))) missing.push("config.json");
  for (const index of ["model.safetensors.index.json", "pytorch_model.bin.index.json"]) {
    if (isFileSync(join(dir, index))) {
      return [...missing, ...(missingShards(dir, index) ?? [`${index} (unreadable)`])];
    }
  }
  let names: string[] = [];
  try {
    names = [...Deno.readDirSync(dir)].map((e) => e.name);
  } catch {
    // reported below as missing weights
  }
  if (!names.some((n) => n.endsWith(".safetensors")) && !names.includes("pytorch_model.bin")) {
    missing.push("model.safetensors");
  }
  return missing;
}

/**
 * Finds a revision in the cache: a commit hash directly, else `refs/<revision>`. Returns the commit and its
 * snapshot directory, or null when the cache does not have it.
 */
export function resolveFromCache(
  cacheDir: string,
  repoId: string,
  type: RepoType,
  revision: string,
): { commit: string; dir: string } | null {
  const storage = join(cacheDir, repoFolderName(repoId, type));
  let commit: string;
  if (COMMIT.test(revision)) commit = revision;
  else {
    try {
      commit = Deno.readTextFileSync(join(storage, "refs", revision)).trim();
    } catch {
      return null;
    }
  }
  const dir = join(storage, "snapshots", commit);
  try {
    if (!Deno.statSync(dir).isDirectory) return null;
  } catch {
    return null;
  }
  return { commit, dir };
}

/** fnmatch-style glob to RegExp (`*` matches anything, `?` one character, `[...]` a class). */
function globToRegExp(glob: string): RegExp {
  const g = glob.endsWith("/") ? glob + "*" : glob;
  let re = "";
  for (let i = 0; i < g.length; i++) {
    const c = g[i];
    if (c === "*") re += ".*";
    else if (c === "?") re += ".";
    else if (c === "[") {
      const j = g.indexOf("]", i + 1);
      if (j < 0) re += "\\[";
      else {
        re += `[${g.slice(i + 1, j).replace(/^!/, "^").replace(/\\/g, "\\\\")}]`;
        i = j;
      }
    } else re += c.replace(/[.+^${}()|\\]/g, "\\$&");
  }
  return new RegExp(`^${re}$`);
}

/** Files matching any of the globs. */
export function filterByPatterns(paths: readonly string[], patterns: readonly string[]): string[] {
  const res = patterns.map(globToRegExp);
  return paths.filter((p) => res.some((r) => r.test(p)));
}

/**
 * The files of a model repo worth fetching: top-level JSON configs, tokenizer files and chat templates, and
 * one set of weights (the shards an index names, else `model.safetensors`, else every top-level
 * `.safetensors`, else PyTorch `.bin` files). Sub-folders (`original/`, `onnx/`, ...) and duplicate weight
 * formats are skipped. `indexWeightFiles` gives the shard names once the index has been read.
 */
export function selectModelFiles(paths: readonly string[], indexWeightFiles?: readonly string[]): string[] {
  const top = paths.filter((p) => !p.includes("/"));
  const meta = top.filter((p) =>
    p.endsWith(".json") || p.endsWith(".jinja") || p === "tokenizer.model" || p === "merges.txt" ||
    p === "vocab.txt" || p.endsWith(".tiktoken")
  );
  const st = top.filter((p) => p.endsWith(".safetensors"));
  let weights: string[];
  if (indexWeightFiles) weights = [...new Set(indexWeightFiles)];
  else if (st.includes("model.safetensors")) weights = ["model.safetensors"];
  else if (st.length) weights = st;
  else weights = top.filter((p) => p.endsWith(".bin") && p.startsWith("pytorch_model"));
  return [...new Set([...meta, ...weights])].sort();
}

function hubUrlOf(options: HubOptions): string {
  return (options.hubUrl ?? readEnv("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, "");
}

function isNetworkError(e: unknown): boolean {
  if (e instanceof TypeError) return true; // fetch() rejects with TypeError when no connection can be made
  const name = (e as Error)?.name ?? "";
  return ["ConnectionRefused", "ConnectionReset", "TimedOut", "NotConnected", "AddrNotAvailable"].includes(
    name,
  );
}

function statusOf(e: unknown): number | undefined {
  const s = (e as { statusCode?: unknown })?.statusCode;
  return typeof s === "number" ? s : undefined;
}

/** Turns a Hub failure into a UserError that names the repo and says how to fix it; never prints the token. */
function hubError(
  e: unknown,
  repoId: string,
  type: RepoType,
  revision: string,
  hasToken: boolean,
  what: string,
  hubUrl: string,
): UserError {
  const page = `${hubUrl}/${type === "dataset" ? "datasets/" : ""}${repoId}`;
  const status = statusOf(e);
  const name = `${type} ${repoId}${revision !== "main" ? `@${revision}` : ""}`;
  let msg: string;
  if (status === 401 && !hasToken) {
    msg =
      `${name}: the Hub refused ${what} without a token: the repo does not exist, is private, or is gated. ` +
      `Check the id; if it is gated or private, accept its terms at ${page} and set HF_TOKEN (or run \`hf auth login\`)`;
  } else if (status === 401 || status === 403) {
    msg = `${name}: access denied for ${what} with the configured token: request access at ${page} ` +
      `(gated repos need the terms accepted) and check the token has read permission`;
  } else if (status === 404) {
    msg = `${name}: not found on the Hub (${what}): check the repo id and revision`;
  } else if (isNetworkError(e)) {
    msg = `${name}: cannot reach the Hugging Face Hub (${(e as Error).message}) and it is not in the cache ` +
      `(${hubCacheDir()}): connect to the network, download it elsewhere (\`hf download ${repoId}\`) and copy ` +
      `the cache, or point to a local directory`;
  } else {
    msg = `${name}: ${what} failed: ${(e as Error)?.message ?? String(e)}`;
  }
  return new UserError(msg, { cause: e });
}

async function resolveHub(
  repoId: string,
  type: RepoType,
  revision: string,
  options: HubOptions,
): Promise<ResolvedSource> {
  const cacheDir = options.cacheDir ?? hubCacheDir();
  const offline = options.offline ?? offlineFromEnv();
  const cached = () => resolveFromCache(cacheDir, repoId, type, revision);
  const fromCache = (why: string): ResolvedSource => {
    const c = cached();
    const name = `${type} ${repoId}${revision !== "main" ? `@${revision}` : ""}`;
    if (!c) {
      throw new UserError(
        `${name} is not in the Hub cache (${join(cacheDir, repoFolderName(repoId, type))}) and ${why}: ` +
          `download it once with network access (unset HF_HUB_OFFLINE), or with \`hf download ${repoId}` +
          `${revision !== "main" ? ` --revision ${revision}` : ""}\`, or point to a local directory`,
      );
    }
    if (type === "model") {
      const missing = missingModelFiles(c.dir);
      if (missing.length) {
        throw new UserError(
          `${name}: the cached snapshot ${c.dir} lacks ${missing.join(", ")} and ${why}: ` +
            `download the model completely with network access`,
        );
      }
    }
    return { dir: c.dir, origin: "hub", repoId, revision, commit: c.commit, fromCache: true };
  };
  if (offline) return fromCache("offline mode is on (HF_HUB_OFFLINE or offline: true)");

  const token = options.token ?? hubToken();
  if (token !== undefined && !token.startsWith("hf_")) {
    throw new UserError(
      "the Hugging Face token (HF_TOKEN or the token file) does not start with hf_: check it",
    );
  }
  const hubUrl = hubUrlOf(options);
  const common = { accessToken: token, hubUrl, fetch: options.fetch };
  const repo = { type, name: repoId } as const;
  let commit: string;
  try {
    const info = type === "model"
      ? await modelInfo({ ...common, name: repoId, revision, additionalFields: ["sha"] })
      : await datasetInfo({ ...common, name: repoId, revision, additionalFields: ["sha"] });
    commit = (info as { sha?: string }).sha ?? "";
    if (!COMMIT.test(commit)) throw new Error(`the Hub returned no commit for revision ${revision}`);
  } catch (e) {
    if (isNetworkError(e) && cached()) {
      console.warn(
        `distillery: cannot reach the Hub (${(e as Error).message}); using the cached ${repoId}@${revision}`,
      );
      return fromCache("the Hub cannot be reached");
    }
    throw hubError(e, repoId, type, revision, token !== undefined, "the repo lookup", hubUrl);
  }
  const storage = join(cacheDir, repoFolderName(repoId, type));
  const snapshot = join(storage, "snapshots", commit);
  try {
    if (revision !== commit) {
      await Deno.mkdir(dirname(join(storage, "refs", revision)), { recursive: true });
      await writeFileAtomic(join(storage, "refs", revision), commit);
    }
    const entries: { path: string; size: number }[] = [];
    for await (const f of listFiles({ ...common, repo, revision: commit, recursive: true })) {
      if (f.type === "file") entries.push({ path: f.path, size: f.lfs?.size ?? f.size });
    }
    const paths = entries.map((e) => e.path);
    const size = new Map(entries.map((e) => [e.path, e.size]));
    const fetchOne = async (path: string) => {
      if (!isFileSync(join(snapshot, path))) options.onFile?.(path, size.get(path) ?? 0);
      // The library logs every download with console.debug (stdout); progress goes through onFile instead,
      // so stdout stays clean for commands whose output is data.
      const debug = console.debug;
      console.debug = () => {};
      try {
        return await downloadFileToCacheDir({ ...common, repo, path, revision: commit, cacheDir });
      } finally {
        console.debug = debug;
      }
    };
    let wanted: string[];
    if (options.allowPatterns) wanted = filterByPatterns(paths, options.allowPatterns);
    else if (type === "dataset") wanted = paths;
    else {
      let shards: string[] | undefined;
      if (paths.includes("model.safetensors.index.json")) {
        const index = await fetchOne("model.safetensors.index.json");
        shards = Object.values(JSON.parse(await Deno.readTextFile(index)).weight_map ?? {}) as string[];
      }
      wanted = selectModelFiles(paths, shards);
    }
    const missingInRepo = wanted.filter((p) => !paths.includes(p));
    if (missingInRepo.length) {
      throw new UserError(
        `${type} ${repoId}@${revision}: files named by the index are not in the repo: ${
          missingInRepo.join(", ")
        }`,
      );
    }
    for (const p of wanted) await fetchOne(p);
  } catch (e) {
    if (e instanceof UserError) throw e;
    throw hubError(e, repoId, type, revision, token !== undefined, "the download", hubUrl);
  }
  if (type === "model" && !options.allowPatterns) {
    const missing = missingModelFiles(snapshot);
    if (missing.length) {
      throw new UserError(
        `model ${repoId}@${revision} (commit ${commit}) has no ${
          missing.join(", ")
        }: it is not a model repo Distillery can load`,
      );
    }
  }
  return { dir: snapshot, origin: "hub", repoId, revision, commit, fromCache: false };
}

async function resolveSource(source: string, type: RepoType, options: HubOptions): Promise<ResolvedSource> {
  if (source.trim() === "") {
    throw new UserError(`${type} source is empty: give a local directory or a Hub repo id`);
  }
  const expanded = source.startsWith("~/") ? join(homeDir(), source.slice(2)) : source;
  const looksLikePath = /^(\/|\.\.?\/|~\/|[A-Za-z]:[\\/])/.test(source) || source === "." || source === "..";
  try {
    const st = await Deno.stat(expanded);
    if (st.isDirectory) return { dir: resolve(expanded), origin: "local" };
    throw new UserError(`${source}: is a file; a ${type} source must be a directory or a Hub repo id`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const { repoId, revision: atRevision } = parseRepoRef(source);
  if (looksLikePath || !isRepoId(repoId)) {
    throw new UserError(
      `${source}: no such directory${
        looksLikePath ? "" : `, and not a Hub repo id (expected org/name or org/name@revision)`
      }`,
    );
  }
  const revision = options.revision ?? atRevision ?? "main";
  if (revision.split("/").some((p) => p === ".." || p === "") || revision.startsWith("/")) {
    throw new UserError(
      `${source}: revision ${JSON.stringify(revision)} is not a branch, tag or commit name`,
    );
  }
  return await resolveHub(repoId, type, revision, options);
}

/**
 * Resolves a model source to a directory: an existing local directory as is, else a Hub repo id
 * (`org/name` or `org/name@revision`) fetched into (or found in) the Hub cache. Errors name the repo and the fix.
 */
export function resolveModelSource(source: string, options: HubOptions = {}): Promise<ResolvedSource> {
  return resolveSource(source, "model", options);
}

/** Like {@linkcode resolveModelSource} for dataset repos (`datasets--org--name` in the cache; all files by default). */
export function resolveDatasetSource(source: string, options: HubOptions = {}): Promise<ResolvedSource> {
  return resolveSource(source, "dataset", options);
}
