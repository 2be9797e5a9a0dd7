/**
 * A deliberately tiny, safe template language for task files (`doc_to_text`, `doc_to_choice`,
 * `doc_to_target`), covering what lm-evaluation-harness task YAMLs use for plain field access.
 *
 * Supported, and nothing else:
 * - literal text;
 * - `{{ path }}` where `path` is a field name followed by any number of `.name` or `[index]` steps, e.g.
 *   `{{ctx}}`, `{{ question.stem }}`, `{{ endings[0] }}`, `{{choices.text}}` (whitespace inside the braces is
 *   ignored).
 *
 * A template that is exactly one placeholder yields the field's value unchanged, of any type (so
 * `doc_to_choice: "{{endings}}"` gives the list and `doc_to_target: "{{label}}"` the number). A template with
 * literal text renders each placeholder as text; such placeholders must hold strings, numbers or booleans.
 *
 * Filters (`|`), expressions, calls, `{% %}` blocks and `{# #}` comments are refused when the template is
 * compiled, with the offending construct named: nothing in a task file is ever executed.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { describeValue } from "./problems.ts";

/** One step of a field path: a property name or a list index. */
export type PathStep = string | number;

/** A compiled template part: literal text or a field path. */
export type TemplatePart = { literal: string } | { path: PathStep[]; text: string };

/** A compiled template. */
export interface Template {
  /** The template source. */
  source: string;
  /** Its parts in order. */
  parts: TemplatePart[];
}

/** A rendering outcome: the value, or what was wrong (for a precise problem report). */
export type RenderResult =
  | { ok: true; value: unknown }
  | { ok: false; field: string; expected: string; found: string };

const IDENT = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Parses `a.b[0].c` into steps, or returns null when it is not a plain path. */
export function parsePath(expr: string): PathStep[] | null {
  const steps: PathStep[] = [];
  const re = /\s*(?:([A-Za-z_][A-Za-z0-9_]*)|\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(\d+)\s*\])\s*/y;
  let pos = 0;
  while (pos < expr.length) {
    re.lastIndex = pos;
    const m = re.exec(expr);
    if (!m) return null;
    if (m[1] !== undefined) {
      if (steps.length > 0) return null; // two names in a row, e.g. "a b"
      steps.push(m[1]);
    } else if (m[2] !== undefined) {
      if (steps.length === 0) return null;
      steps.push(m[2]);
    } else {
      if (steps.length === 0) return null;
      steps.push(Number(m[3]));
    }
    pos = re.lastIndex;
  }
  return steps.length > 0 ? steps : null;
}

/** Formats steps back to `a.b[0]` (for messages). */
export function formatPath(steps: PathStep[]): string {
  return steps.map((s, i) => (typeof s === "number" ? `[${s}]` : i === 0 ? s : `.${s}`)).join("");
}

/**
 * Compiles a template; `where` names it in errors (e.g. `tasks/cloze.yaml:7 doc_to_text`).
 *
 * @throws {UserError} for any construct outside the supported subset.
 */
export function compileTemplate(source: string, where: string): Template {
  const refuse = (what: string) =>
    new UserError(
      `${where}: unsupported template construct ${what}; only literal text and {{ field }}, {{ field.sub }}, ` +
        `{{ field[0] }} are allowed (templates never execute code)`,
    );
  for (const tag of ["{%", "%}", "{#", "#}"]) if (source.includes(tag)) throw refuse(`"${tag}"`);
  const parts: TemplatePart[] = [];
  let pos = 0;
  while (pos < source.length) {
    const open = source.indexOf("{{", pos);
    if (open < 0) {
      if (source.indexOf("}}", pos) >= 0) throw refuse(`"}}" without "{{"`);
      parts.push({ literal: source.slice(pos) });
      break;
    }
    if (source.slice(pos, open).includes("}}")) throw refuse(`"}}" without "{{"`);
    if (open > pos) parts.push({ literal: source.slice(pos, open) });
    const close = source.indexOf("}}", open + 2);
    if (close < 0) throw refuse(`"{{" without "}}"`);
    const expr = source.slice(open + 2, close);
    const path = parsePath(expr);
    if (!path) throw refuse(`"{{${expr}}}"`);
    parts.push({ path, text: expr.trim() });
    pos = close + 2;
  }
  return { source, parts };
}

/** True when `t` is exactly one placeholder (renders to the raw value). */
export function isSinglePlaceholder(t: Template): boolean {
  return t.parts.length === 1 && "path" in t.parts[0];
}

/** Looks up a path in a document; returns the value or a description of where it broke. */
export function lookupPath(doc: unknown, path: PathStep[]): RenderResult {
  let v: unknown = doc;
  for (let i = 0; i < path.length; i++) {
    const step = path[i];
    const here = formatPath(path.slice(0, i + 1));
    if (typeof step === "number") {
      if (!Array.isArray(v)) {
        return {
          ok: false,
          field: formatPath(path.slice(0, i)),
          expected: "a list",
          found: describeValue(v),
        };
      }
      if (step >= v.length) {
        return { ok: false, field: here, expected: `an index below ${v.length}`, found: `index ${step}` };
      }
      v = v[step];
    } else {
      if (!v || typeof v !== "object" || Array.isArray(v)) {
        const at = i === 0 ? "(record)" : formatPath(path.slice(0, i));
        return { ok: false, field: at, expected: `an object with field "${step}"`, found: describeValue(v) };
      }
      if (!(step in (v as object))) {
        return { ok: false, field: here, expected: "a value", found: "nothing (field missing)" };
      }
      v = (v as Record<string, unknown>)[step];
    }
  }
  return { ok: true, value: v };
}

/** Renders `t` against `doc`. */
export function renderTemplate(t: Template, doc: unknown): RenderResult {
  if (isSinglePlaceholder(t)) return lookupPath(doc, (t.parts[0] as { path: PathStep[] }).path);
  let out = "";
  for (const p of t.parts) {
    if ("literal" in p) {
      out += p.literal;
      continue;
    }
    const r = lookupPath(doc, p.path);
    if (!r.ok) return r;
    const v = r.value;
    if (typeof v === "string" || typeof v === "number" || typeof v === "boolean") out += String(v);
    else {
      return {
        ok: false,
        field: formatPath(p.path),
        expected: "a string, number or boolean (to insert into text)",
        found: describeValue(v),
      };
    }
  }
  return { ok: true, value: out };
}

/** True when `s` is a bare field name (lm-eval treats such a `doc_to_*` value as a column reference). */
export function isBareFieldName(s: string): boolean {
  return IDENT.test(s);
}
