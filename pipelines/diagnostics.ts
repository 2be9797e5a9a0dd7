/**
 * Problems found in a recipe, collected so that validation reports every one of them at once.
 *
 * Each {@linkcode Problem} carries the location of the offending node, the field path (`stages.distill.params.lr`)
 * and a message of the form "expected X, found Y", plus an optional hint such as "did you mean `learning_rate`?".
 * {@linkcode RecipeError} wraps the list into a {@linkcode UserError} (exit code 2, no stack trace).
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { formatLoc, type Loc } from "./source.ts";

/** One problem with a recipe, flag or input. */
export interface Problem {
  /** Where the problem is; absent when it concerns the whole recipe. */
  loc?: Loc;
  /** Field path inside the recipe, e.g. `stages.distill.params.learning_rate`. */
  path?: string;
  /** What is wrong: what was expected and what was found. */
  message: string;
  /** A suggestion, e.g. `did you mean "learning_rate"?`. */
  hint?: string;
}

/** A growing list of problems. */
export class Problems {
  /** The problems in the order they were found. */
  readonly list: Problem[] = [];

  /** Adds a problem. */
  add(problem: Problem): void {
    this.list.push(problem);
  }

  /** Number of problems so far. */
  get count(): number {
    return this.list.length;
  }

  /** Throws a {@linkcode RecipeError} listing every problem, if there are any. */
  throwIfAny(subject: string): void {
    if (this.list.length > 0) throw new RecipeError(subject, this.list);
  }
}

/** Formats one problem as `file:line:col: path: message (hint)`. */
export function formatProblem(p: Problem): string {
  const parts: string[] = [];
  if (p.loc) parts.push(formatLoc(p.loc));
  if (p.path) parts.push(p.path);
  let text = parts.length > 0 ? `${parts.join(": ")}: ${p.message}` : p.message;
  if (p.hint) text += ` (${p.hint})`;
  return text;
}

/** Sorts problems by file, line and column, keeping the discovery order for equal positions. */
export function sortProblems(list: Problem[]): Problem[] {
  return list
    .map((p, i) => ({ p, i }))
    .sort((a, b) => {
      const la = a.p.loc, lb = b.p.loc;
      if (la && lb) {
        if (la.file !== lb.file) return la.file < lb.file ? -1 : 1;
        if (la.line !== lb.line) return la.line - lb.line;
        if (la.col !== lb.col) return la.col - lb.col;
      } else if (la || lb) {
        return la ? -1 : 1;
      }
      return a.i - b.i;
    })
    .map((x) => x.p);
}

/** A recipe (or its flags) has problems; the message lists all of them, one per line. */
export class RecipeError extends UserError {
  /** The problems, sorted by position. */
  readonly problems: Problem[];

  /** Builds the error; `subject` names what was checked, e.g. `recipe recipes/tiny.yaml`. */
  constructor(subject: string, problems: Problem[]) {
    const sorted = sortProblems(problems);
    const n = sorted.length;
    super(
      `${subject} has ${n} problem${n === 1 ? "" : "s"}:\n` +
        sorted.map((p) => `  ${formatProblem(p)}`).join("\n"),
    );
    this.problems = sorted;
  }
}

/** Edit distance with adjacent transpositions (optimal string alignment), case-insensitive. */
export function editDistance(a: string, b: string): number {
  a = a.toLowerCase();
  b = b.toLowerCase();
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.length][b.length];
}

/**
 * The candidate closest to `word`, if it is close enough to be a plausible typo (distance at most 40% of the
 * word's length, at least 1), or if one contains the other (`lr` vs `learning_rate` is not caught; `learn_rate`
 * vs `learning_rate` is).
 */
export function closest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestScore = Infinity;
  const w = word.toLowerCase().replace(/[-_]/g, "");
  for (const c of candidates) {
    const cc = c.toLowerCase().replace(/[-_]/g, "");
    let score = editDistance(word, c);
    if (w.length >= 3 && (cc.startsWith(w) || w.startsWith(cc) || (w.length >= 4 && cc.includes(w)))) {
      score = Math.min(score, 1);
    }
    if (score < bestScore) {
      bestScore = score;
      best = c;
    }
  }
  // One- and two-letter words are too short for a typo to be recognisable.
  const limit = word.length < 3 ? 0 : Math.max(1, Math.round(word.length * 0.4));
  return best !== undefined && bestScore <= limit ? best : undefined;
}

/** `did you mean "x"?` for the closest candidate, or a list of the valid choices when none is close. */
export function didYouMean(word: string, candidates: string[], what = "one of"): string {
  const c = closest(word, candidates);
  if (c !== undefined) return `did you mean "${c}"?`;
  if (candidates.length === 0) return "none are allowed here";
  const shown = candidates.slice(0, 12).map((x) => `"${x}"`).join(", ");
  return `expected ${what} ${shown}${candidates.length > 12 ? ", ..." : ""}`;
}
