/**
 * Which files make up a dataset split: `hf://datasets/...` addresses, glob patterns, and the Hugging Face
 * `datasets` conventions for finding splits in a repository or a local directory.
 *
 * Split resolution follows `datasets` (data_files.py) in this order, so a repository resolves to the same files
 * here as with `load_dataset`:
 *
 * 1. `configs:` in the README's YAML front matter (`config_name`, `data_files` as a string, a list, or a list of
 *    `{split, path}`, optional `data_dir`, `default: true`); `subset` picks the config.
 * 2. Sharded parquet-export names `data/{split}-00000-of-00003*.*` (any split name).
 * 3. Split keywords in directory names, then in file names, separated by one of `-._ 0-9`:
 *    train/training; validation/valid/dev/val; test/testing/eval/evaluation.
 * 4. Otherwise every data file is the `train` split.
 *
 * Hidden files and folders (a name starting with `.`) and `__special__` folders are ignored unless the pattern
 * names them, as are README.md and the `datasets` metadata files. Only file types this layer can read are data
 * files: `.parquet`, `.jsonl`, `.ndjson`, `.json`, `.txt`.
 *
 * Hub access goes through a {@linkcode HubDatasetResolver} that the models layer's Hub cache provides; tests pass
 * a fake one. Listing and fetching are separate so that split resolution can look at names before any download.
 *
 * @module
 */
import { parse as parseYaml } from "yaml";
import { UserError } from "../util/errors.ts";

/** A parsed `hf://datasets/org/name[@revision][/path-or-glob]` address. */
export interface HubDatasetRef {
  /** `org/name`. */
  repo: string;
  /** Branch, tag or commit; null for the default branch. URL-encoded revisions (`refs%2Fpr%2F1`) are decoded. */
  revision: string | null;
  /** A file path or glob inside the repository, or null for "the split's files". */
  pattern: string | null;
}

/** Access to Hub dataset repositories through the local cache (provided by the models layer). */
export interface HubDatasetResolver {
  /** Repository-relative paths of every file in `repo` at `revision` (sorted or not; the caller sorts). */
  listFiles(repo: string, revision: string | null): Promise<string[]>;
  /** A local path holding `file` of `repo` at `revision`, fetched into the cache if needed. */
  localPath(repo: string, revision: string | null, file: string): Promise<string>;
}

/** File extensions this layer reads, and the reader each one uses. */
export const DATA_FILE_EXTENSIONS: Readonly<Record<string, "parquet" | "jsonl" | "json" | "text">> = {
  ".parquet": "parquet",
  ".jsonl": "jsonl",
  ".ndjson": "jsonl",
  ".json": "json",
  ".txt": "text",
};

const FILES_TO_IGNORE = new Set([
  "README.md",
  "config.json",
  "dataset_info.json",
  "dataset_infos.json",
  "dummy_data.zip",
  "dataset_dict.json",
]);

const SPLIT_KEYWORDS: Record<string, string[]> = {
  train: ["train", "training"],
  validation: ["validation", "valid", "dev", "val"],
  test: ["test", "testing", "eval", "evaluation"],
};
const DEFAULT_SPLITS = ["train", "validation", "test"];
const SEP = "-._ 0-9";
const IN_DIR_NAME = ["**/{k}/**", "**/{k}[{s}]*/**", "**/*[{s}]{k}/**", "**/*[{s}]{k}[{s}]*/**"];
const IN_FILE_NAME = ["**/{k}[{s}]*", "**/*[{s}]{k}[{s}]*"];
const SHARDED = /^data\/(.+)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*$/;
const SPLIT_NAME = /^\w+(\.\w+)*$/;

/** True when `s` is an `hf://` address. */
export function isHubAddress(s: string): boolean {
  return s.startsWith("hf://");
}

/**
 * Parses `hf://datasets/org/name[@revision][/path-or-glob]`.
 *
 * @throws {UserError} when `url` is an `hf://` address of another kind or lacks `org/name`.
 */
export function parseHubDatasetUrl(url: string): HubDatasetRef {
  const m = /^hf:\/\/datasets\/([^/@]+)\/([^/@]+)(?:@([^/]+))?(?:\/(.*))?$/.exec(url);
  if (!m) {
    throw new UserError(
      `dataset path "${url}": expected hf://datasets/<org>/<name>[@<revision>][/<file or glob>]`,
    );
  }
  const pattern = m[4] && m[4].length > 0 ? m[4] : null;
  return { repo: `${m[1]}/${m[2]}`, revision: m[3] ? decodeURIComponent(m[3]) : null, pattern };
}

/** Formats a Hub file as a stable, readable label: `hf://datasets/org/name@rev/path`. */
export function hubFileLabel(repo: string, revision: string | null, file: string): string {
  return `hf://datasets/${repo}${revision ? `@${encodeURIComponent(revision)}` : ""}/${file}`;
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\\/]/g, "\\$&");
}

function segmentToRegExp(seg: string): string {
  let out = "";
  for (let i = 0; i < seg.length; i++) {
    const c = seg[i];
    if (c === "*") {
      while (seg[i + 1] === "*") i++; // "**" inside a segment acts like "*"
      out += "[^/]*";
    } else if (c === "?") {
      out += "[^/]";
    } else if (c === "[") {
      const end = seg.indexOf("]", i + 2);
      if (end < 0) {
        out += "\\[";
        continue;
      }
      let body = seg.slice(i + 1, end);
      let neg = "";
      if (body[0] === "!" || body[0] === "^") {
        neg = "^";
        body = body.slice(1);
      }
      let cls = "";
      for (let j = 0; j < body.length; j++) {
        const b = body[j];
        const isRange = b === "-" && j > 0 && j < body.length - 1;
        cls += isRange ? "-" : /[\\\]\[^-]/.test(b) ? `\\${b}` : b;
      }
      out += `[${neg}${cls}]`;
      i = end;
    } else {
      out += escapeRe(c);
    }
  }
  return out;
}

/**
 * Compiles a glob (fsspec/Python-glob semantics) to a RegExp over `/`-separated relative paths: `*` and `?` stay
 * inside one path segment, `[...]` is a character class (`!` or `^` negates), and a `**` segment matches zero or
 * more whole segments.
 */
export function globToRegExp(glob: string): RegExp {
  const segs = glob.split("/").filter((s, i, a) => s !== "" || i === a.length - 1);
  let re = "";
  segs.forEach((s, i) => {
    const last = i === segs.length - 1;
    if (s === "**") re += last ? ".*" : "(?:[^/]*/)*";
    else re += segmentToRegExp(s) + (last ? "" : "/");
  });
  return new RegExp(`^${re}$`);
}

function hiddenParts(path: string): number {
  return path.split("/").filter((p) => p.startsWith(".") && !/^\.+$/.test(p)).length;
}

function specialDirs(path: string): number {
  return path.split("/").slice(0, -1).filter((p) => p.startsWith("__")).length;
}

/**
 * Files of `files` (relative paths) that match `pattern`, sorted, skipping hidden files/folders and
 * `__special__` folders the pattern does not name, and the `datasets` metadata files.
 */
export function matchFiles(files: readonly string[], pattern: string): string[] {
  const re = globToRegExp(pattern);
  const patHidden = hiddenParts(pattern), patSpecial = specialDirs(pattern);
  const ignore = new Set(FILES_TO_IGNORE);
  ignore.delete(pattern.split("/").pop() ?? "");
  return files.filter((f) =>
    re.test(f) && hiddenParts(f) === patHidden && specialDirs(f) === patSpecial &&
    !ignore.has(f.split("/").pop() ?? "")
  ).sort();
}

/** The reader for a file name, or null when this layer cannot read it. */
export function fileTypeOf(path: string): "parquet" | "jsonl" | "json" | "text" | null {
  const lower = path.toLowerCase();
  for (const [ext, type] of Object.entries(DATA_FILE_EXTENSIONS)) if (lower.endsWith(ext)) return type;
  return null;
}

/** Extracts the YAML front matter of a dataset README (between the leading `---` lines), or null. */
export function readmeFrontMatter(readme: string): Record<string, unknown> | null {
  const m = /^---\r?\n([\s\S]*?)\r?\n---\s*(?:\r?\n|$)/.exec(readme);
  if (!m) return null;
  const v = parseYaml(m[1]);
  return v && typeof v === "object" && !Array.isArray(v) ? v as Record<string, unknown> : null;
}

/** Options for {@linkcode resolveSplitFiles}. */
export interface SplitSelection {
  /** The split to read (default `train`). */
  split?: string;
  /** The config/subset (README `configs:` name, or a top-level folder). */
  subset?: string;
  /** A glob that restricts the files before split resolution (from the `hf://` address or the recipe). */
  pattern?: string | null;
  /** The README.md text, when the dataset has one (for `configs:`). */
  readme?: string | null;
  /** How to name the dataset in messages. */
  label: string;
}

/** The files of one split, and the splits that exist. */
export interface SplitFiles {
  /** The split that was selected. */
  split: string;
  /** Its files (relative paths), sorted. */
  files: string[];
  /** Every split found, in `datasets` order (train, validation, test, then the rest sorted). */
  available: string[];
}

function isDataFile(f: string): boolean {
  return fileTypeOf(f) !== null;
}

function orderSplits(splits: Iterable<string>): string[] {
  const set = new Set(splits);
  return [
    ...DEFAULT_SPLITS.filter((s) => set.has(s)),
    ...[...set].filter((s) => !DEFAULT_SPLITS.includes(s)).sort(),
  ];
}

/** Infers `{split: files}` from file names alone (steps 2-4 of the module doc). */
export function inferSplits(files: readonly string[]): Map<string, string[]> {
  const data = files.filter(isDataFile);
  const out = new Map<string, string[]>();
  const sharded = matchFiles(data, "data/*-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*");
  if (sharded.length > 0) {
    const splits = new Set<string>();
    for (const f of sharded) {
      const m = SHARDED.exec(f);
      if (m && SPLIT_NAME.test(m[1])) splits.add(m[1]);
    }
    for (const s of orderSplits(splits)) {
      out.set(s, sharded.filter((f) => SHARDED.exec(f)?.[1] === s));
    }
    if (out.size > 0) return out;
  }
  for (const bases of [IN_DIR_NAME, IN_FILE_NAME]) {
    for (const split of DEFAULT_SPLITS) {
      const hits = new Set<string>();
      for (const k of SPLIT_KEYWORDS[split]) {
        for (const b of bases) {
          for (const f of matchFiles(data, b.replaceAll("{k}", k).replaceAll("{s}", SEP))) hits.add(f);
        }
      }
      if (hits.size > 0) out.set(split, [...hits].sort());
    }
    if (out.size > 0) return out;
  }
  const all = matchFiles(data, "**");
  if (all.length > 0) out.set("train", all);
  return out;
}

interface ConfigEntry {
  config_name?: unknown;
  data_files?: unknown;
  data_dir?: unknown;
  default?: unknown;
}

function configPatterns(entry: ConfigEntry, label: string): Map<string, string[]> | null {
  const dir = typeof entry.data_dir === "string" ? entry.data_dir.replace(/\/+$/, "") : "";
  const join = (p: string) => (dir ? `${dir}/${p}` : p);
  const df = entry.data_files;
  const out = new Map<string, string[]>();
  const bad = () =>
    new UserError(
      `${label}: README configs entry "${entry.config_name}": data_files must be a string, a list of strings ` +
        `or a list of {split, path}`,
    );
  if (df === undefined) return null;
  if (typeof df === "string") out.set("train", [join(df)]);
  else if (Array.isArray(df) && df.every((x) => typeof x === "string")) out.set("train", df.map(join));
  else if (Array.isArray(df)) {
    for (const x of df) {
      if (!x || typeof x !== "object" || typeof x.split !== "string") throw bad();
      const p = x.path;
      const paths = typeof p === "string"
        ? [p]
        : Array.isArray(p) && p.every((q) => typeof q === "string")
        ? p
        : null;
      if (!paths) throw bad();
      out.set(x.split, paths.map(join));
    }
  } else if (df && typeof df === "object") {
    for (const [split, p] of Object.entries(df)) {
      const paths = typeof p === "string" ? [p] : Array.isArray(p) ? p.map(String) : null;
      if (!paths) throw bad();
      out.set(split, paths.map(join));
    }
  } else throw bad();
  return out;
}

/**
 * Resolves the files of one split among `files` (every relative path of a repository or directory).
 *
 * @throws {UserError} naming the dataset, the requested split or subset and what is available.
 */
export function resolveSplitFiles(files: readonly string[], sel: SplitSelection): SplitFiles {
  const split = sel.split ?? "train";
  let pool = [...files].sort();
  if (sel.pattern) {
    pool = matchFiles(pool, sel.pattern);
    if (pool.length === 0) throw new UserError(`${sel.label}: no file matches "${sel.pattern}"`);
  }
  let splits: Map<string, string[]> | null = null;
  const front = sel.readme ? readmeFrontMatter(sel.readme) : null;
  const configs = Array.isArray(front?.configs) ? front.configs as ConfigEntry[] : null;
  if (configs && configs.length > 0 && !sel.pattern) {
    const names = configs.map((c) => String(c.config_name ?? "default"));
    let entry: ConfigEntry | undefined;
    if (sel.subset !== undefined) {
      entry = configs.find((c) => String(c.config_name ?? "default") === sel.subset);
      if (!entry) {
        throw new UserError(
          `${sel.label}: subset "${sel.subset}" not found; the README declares ${names.join(", ")}`,
        );
      }
    } else {
      entry = configs.find((c) => c.default === true) ??
        configs.find((c) => String(c.config_name ?? "default") === "default") ??
        (configs.length === 1 ? configs[0] : undefined);
      if (!entry) {
        throw new UserError(`${sel.label}: several subsets (${names.join(", ")}); set subset to one of them`);
      }
    }
    const patterns = configPatterns(entry, sel.label);
    if (patterns) {
      splits = new Map();
      for (const [s, pats] of patterns) {
        const hits = new Set<string>();
        for (const p of pats) for (const f of matchFiles(pool, p)) hits.add(f);
        splits.set(s, [...hits].sort());
      }
    } else if (typeof entry.data_dir === "string") {
      const dir = entry.data_dir.replace(/\/+$/, "") + "/";
      splits = prefixed(
        inferSplits(pool.filter((f) => f.startsWith(dir)).map((f) => f.slice(dir.length))),
        dir,
      );
    }
  } else if (sel.subset !== undefined && !sel.pattern) {
    const dir = sel.subset.replace(/\/+$/, "") + "/";
    const under = pool.filter((f) => f.startsWith(dir));
    if (under.length === 0) {
      throw new UserError(
        `${sel.label}: subset "${sel.subset}" not found (no README configs and no folder "${dir}")`,
      );
    }
    splits = prefixed(inferSplits(under.map((f) => f.slice(dir.length))), dir);
  }
  splits ??= inferSplits(pool);
  const available = [...splits.keys()];
  const chosen = splits.get(split);
  if (!chosen || chosen.length === 0) {
    const what = available.length
      ? `available splits: ${available.join(", ")}`
      : "no readable data files were found";
    throw new UserError(`${sel.label}: split "${split}" not found (${what})`);
  }
  return { split, files: chosen, available };
}

function prefixed(m: Map<string, string[]>, dir: string): Map<string, string[]> {
  return new Map([...m].map(([k, v]) => [k, v.map((f) => dir + f)]));
}

/** Every file under `dir` as sorted `/`-separated relative paths (symlinks to files included). */
export async function listLocalFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(abs: string, rel: string) {
    for await (const e of Deno.readDir(abs)) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      const a = `${abs}/${e.name}`;
      if (e.isDirectory) await walk(a, r);
      else if (e.isFile) out.push(r);
      else if (e.isSymlink) {
        const st = await Deno.stat(a).catch(() => null);
        if (st?.isFile) out.push(r);
        else if (st?.isDirectory) await walk(a, r);
      }
    }
  }
  await walk(dir, "");
  return out.sort();
}
