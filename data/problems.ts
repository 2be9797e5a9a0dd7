/**
 * Where a dataset record came from, what was wrong with it, and what to do about it.
 *
 * Every record carries a {@linkcode RecordSource} (file, zero-based record index, one-based line where the file
 * has lines) so that a problem found at any later step names the exact place in the user's file. A
 * {@linkcode ProblemCollector} applies the recipe's `on_invalid` policy: `error` stops with a {@linkcode UserError}
 * listing the first problems, `skip` drops the record and counts it so the stage can report it (never
 * silently).
 *
 * @module
 */
import { UserError } from "../util/errors.ts";

/** Where a record came from. */
export interface RecordSource {
  /** The file (a local path; for Hub datasets the cached file, see `label`). */
  file: string;
  /** Zero-based index of the record within the file (after blank lines and before offset/limit). */
  index: number;
  /** One-based line of the record's start, for line-oriented files (JSONL, text). */
  line?: number;
}

/** One thing wrong with one record: which field, what was expected, what was found. */
export interface RecordProblem {
  /** Where the record is. */
  source: RecordSource;
  /** The field path inside the record, e.g. `messages[2].role`; `(record)` for the record as a whole. */
  field: string;
  /** What the format requires there. */
  expected: string;
  /** What the record has there (short, quoted where it is a value). */
  found: string;
}

/** What to do with a record that does not fit the declared format (the recipe's `on_invalid`). */
export type InvalidPolicy = "error" | "skip";

/** The two allowed {@linkcode InvalidPolicy} values, for schema checks. */
export const INVALID_POLICIES: readonly InvalidPolicy[] = ["error", "skip"];

/** Formats the location part of a problem: `file:line (record 12)` or `file (record 12)`. */
export function formatSource(source: RecordSource): string {
  const where = source.line !== undefined ? `${source.file}:${source.line}` : source.file;
  return `${where} (record ${source.index})`;
}

/** One line describing a problem: `file:line (record i): field "f": expected X, found Y`. */
export function formatProblem(p: RecordProblem): string {
  return `${formatSource(p.source)}: field "${p.field}": expected ${p.expected}, found ${p.found}`;
}

/** Short printable description of a JSON-like value for `found` texts (type and a clipped preview). */
export function describeValue(v: unknown): string {
  if (v === undefined) return "nothing (field missing)";
  if (v === null) return "null";
  if (Array.isArray(v)) return v.length === 0 ? "an empty list" : `a list of ${v.length}`;
  if (typeof v === "string") {
    const clip = v.length > 40 ? `${v.slice(0, 40)}...` : v;
    return v.length === 0 ? "an empty string" : `the string ${JSON.stringify(clip)}`;
  }
  if (typeof v === "number" || typeof v === "bigint") return `the number ${v}`;
  if (typeof v === "boolean") return `${v}`;
  if (typeof v === "object") {
    const keys = Object.keys(v as object);
    const shown = keys.slice(0, 6).join(", ") + (keys.length > 6 ? ", ..." : "");
    return keys.length === 0 ? "an empty object" : `an object with keys {${shown}}`;
  }
  return typeof v;
}

/** Counts after a pass over a dataset with an {@linkcode InvalidPolicy}. */
export interface ProblemReport {
  /** The policy that was applied. */
  policy: InvalidPolicy;
  /** Records looked at. */
  seen: number;
  /** Records kept. */
  kept: number;
  /** Records dropped because they did not fit (only with policy `skip`). */
  skipped: number;
  /** The first problems (at most `maxListed`), for the stage's log and report. */
  problems: RecordProblem[];
}

/** Options for {@linkcode ProblemCollector}. */
export interface ProblemCollectorOptions {
  /** `error` (default) or `skip`. */
  policy?: InvalidPolicy;
  /** How many problems to keep for messages and reports (default 10). */
  maxListed?: number;
  /** What the data is, for the error message, e.g. `dataset "chat" (format chat)`. */
  what?: string;
}

/**
 * Applies the `on_invalid` policy while a stage walks a dataset.
 *
 * Usage: for each record call {@linkcode ProblemCollector.record} with the problems found (empty when it fits);
 * it returns whether to keep the record. With `error` it collects problems and throws once `maxListed` are
 * known; call {@linkcode ProblemCollector.finish} at the end so that fewer problems still throw.
 */
export class ProblemCollector {
  readonly #policy: InvalidPolicy;
  readonly #maxListed: number;
  readonly #what: string;
  #seen = 0;
  #kept = 0;
  #skipped = 0;
  #problems: RecordProblem[] = [];
  #bad = 0;

  /** Creates a collector with the given policy. */
  constructor(opts: ProblemCollectorOptions = {}) {
    this.#policy = opts.policy ?? "error";
    if (!INVALID_POLICIES.includes(this.#policy)) {
      throw new UserError(
        `on_invalid: expected one of ${INVALID_POLICIES.join(", ")}, found "${this.#policy}"`,
      );
    }
    this.#maxListed = opts.maxListed ?? 10;
    this.#what = opts.what ?? "dataset";
  }

  /** Records the outcome for one record; returns true when the record should be kept. */
  record(problems: RecordProblem[]): boolean {
    this.#seen++;
    if (problems.length === 0) {
      this.#kept++;
      return true;
    }
    this.#bad++;
    for (const p of problems) if (this.#problems.length < this.#maxListed) this.#problems.push(p);
    if (this.#policy === "skip") {
      this.#skipped++;
      return false;
    }
    if (this.#problems.length >= this.#maxListed) this.#throw(false);
    return false;
  }

  /** Ends the pass: throws under policy `error` if any record was bad, else returns the report. */
  finish(): ProblemReport {
    if (this.#policy === "error" && this.#bad > 0) this.#throw(true);
    return this.report();
  }

  /** The counts so far. */
  report(): ProblemReport {
    return {
      policy: this.#policy,
      seen: this.#seen,
      kept: this.#kept,
      skipped: this.#skipped,
      problems: [...this.#problems],
    };
  }

  #throw(complete: boolean): never {
    const head = complete
      ? `${this.#what}: ${this.#bad} record(s) do not fit the declared format`
      : `${this.#what}: records do not fit the declared format (stopped after the first ${this.#problems.length} problems)`;
    const lines = this.#problems.map((p) => `  ${formatProblem(p)}`);
    const hint = `  (set on_invalid: skip to drop such records; skipped records are counted and reported)`;
    throw new UserError([head + ":", ...lines, hint].join("\n"));
  }
}
