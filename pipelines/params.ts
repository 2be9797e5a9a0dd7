/**
 * Typed parameter schemas for stage kinds (and for recipe `settings`).
 *
 * A stage kind declares its parameters as a map of field name -> {@linkcode ParamSchema}:
 *
 * ```ts
 * const params = {
 *   learning_rate: { type: "number", exclusiveMin: 0, default: 8e-5, doc: "Peak AdamW learning rate." },
 *   schedule: { type: "string", enum: ["cosine", "linear"], default: "cosine", doc: "Learning-rate decay." },
 *   attn_layers: { type: "array", items: { type: "number", integer: true, min: 0, doc: "layer index" },
 *                  required: true, doc: "Layers that keep attention." },
 * } as const satisfies ParamFields;
 * type P = ParamsOf<typeof params>; // { learning_rate: number; schedule: "cosine" | "linear"; attn_layers: number[] }
 * ```
 *
 * {@linkcode validateFields} checks a located YAML node against such a map, collecting every problem (with
 * "did you mean" for unknown keys) and returning the resolved value with defaults filled in. The resolved value
 * is what enters the stage's cache key and what `ctx.params` holds. {@linkcode describeFields} renders the schema
 * as documentation for `distillery stages <kind>`.
 *
 * @module
 */
import { didYouMean, Problems } from "./diagnostics.ts";
import { describeNode, fromPlain, type Loc, type YMap, type YNode } from "./source.ts";

/** Fields every parameter schema may carry. */
export interface ParamCommon {
  /** One or two sentences for the docs: what the parameter does, its unit, where its default comes from. */
  doc: string;
  /** Value used when the recipe omits the field. A parameter with a default is never `undefined`. */
  default?: unknown;
  /** The recipe must set this field (no default makes sense). */
  required?: boolean;
  /** `null` is accepted (and is the default when no other default is given). */
  nullable?: boolean;
  /**
   * Set to `false` for a top-level parameter that cannot change the stage's outputs (log or checkpoint interval,
   * a progress setting): it is then left out of the cache key, so changing it does not rerun the stage. Getting
   * this wrong reuses stale results, so leave it unset (in the key) when in doubt.
   */
  inKey?: boolean;
}

/** A number; `integer` restricts to whole numbers. Bounds are inclusive except `exclusiveMin`/`exclusiveMax`. */
export interface NumberParam extends ParamCommon {
  /** Discriminant. */
  type: "number";
  /** Only whole numbers are accepted. */
  integer?: boolean;
  /** Smallest allowed value (inclusive). */
  min?: number;
  /** Largest allowed value (inclusive). */
  max?: number;
  /** Values must be greater than this. */
  exclusiveMin?: number;
  /** Values must be less than this. */
  exclusiveMax?: number;
}

/** A string, optionally one of an `enum` or matching a `pattern` (a regular expression source, anchored by you). */
export interface StringParam extends ParamCommon {
  /** Discriminant. */
  type: "string";
  /** The allowed values. */
  enum?: readonly string[];
  /** A regular expression the value must match, e.g. `"^[a-z]+$"`. */
  pattern?: string;
}

/** `true` or `false`. */
export interface BooleanParam extends ParamCommon {
  /** Discriminant. */
  type: "boolean";
}

/** A list whose items all follow `items`. */
export interface ArrayParam extends ParamCommon {
  /** Discriminant. */
  type: "array";
  /** Schema of each item (its `doc` describes one item). */
  items: ParamSchema;
  /** Fewest items allowed. */
  minItems?: number;
  /** Most items allowed. */
  maxItems?: number;
}

/** A nested mapping with its own named fields (unknown keys are rejected). */
export interface ObjectParam extends ParamCommon {
  /** Discriminant. */
  type: "object";
  /** The fields of the mapping. */
  fields: ParamFields;
}

/** Schema of one parameter. */
export type ParamSchema = NumberParam | StringParam | BooleanParam | ArrayParam | ObjectParam;

/** A map of field name -> schema: the `params` of a stage kind, or the fields of an object parameter. */
export type ParamFields = { readonly [name: string]: ParamSchema };

/** Flattens an intersection for readable hover types. */
// deno-lint-ignore ban-types
export type Simplify<T> = { [K in keyof T]: T[K] } & {};

/** The TypeScript type of a value accepted by schema `S` (after defaults are applied). */
export type ValueOf<S> =
  | (S extends { type: "number" } ? number
    : S extends { type: "string"; enum: readonly (infer E extends string)[] } ? E
    : S extends { type: "string" } ? string
    : S extends { type: "boolean" } ? boolean
    : S extends { type: "array"; items: infer I } ? ValueOf<I>[]
    : S extends { type: "object"; fields: infer F extends ParamFields } ? ParamsOf<F>
    : unknown)
  | (S extends { nullable: true } ? null : never);

/** True when a field always has a value after resolution (a default, `required`, or `nullable`). */
export type AlwaysPresent<S> = S extends { default: unknown } ? true
  : S extends { required: true } ? true
  : S extends { nullable: true } ? true
  : false;

/**
 * The type of resolved parameters for a field map: fields with a default, `required` or `nullable` are always
 * present; others are optional.
 */
export type ParamsOf<F extends ParamFields> = Simplify<
  & { -readonly [K in keyof F as AlwaysPresent<F[K]> extends true ? K : never]: ValueOf<F[K]> }
  & { -readonly [K in keyof F as AlwaysPresent<F[K]> extends true ? never : K]?: ValueOf<F[K]> }
>;

/** Where a value being validated sits: its field path (for messages) and the location to blame if absent. */
export interface At {
  /** Field path for messages, e.g. `stages.distill.params`. */
  path: string;
  /** Location to blame when the value is absent. */
  loc: Loc;
  /** Where problems go. */
  problems: Problems;
}

function joinPath(base: string, key: string | number): string {
  if (typeof key === "number") return `${base}[${key}]`;
  return base ? `${base}.${key}` : key;
}

/** A human description of the values a schema accepts, e.g. `an integer >= 1` or `one of "f32", "f16"`. */
export function describeType(s: ParamSchema): string {
  let t: string;
  switch (s.type) {
    case "number": {
      const bounds: string[] = [];
      if (s.min !== undefined) bounds.push(`>= ${s.min}`);
      if (s.exclusiveMin !== undefined) bounds.push(`> ${s.exclusiveMin}`);
      if (s.max !== undefined) bounds.push(`<= ${s.max}`);
      if (s.exclusiveMax !== undefined) bounds.push(`< ${s.exclusiveMax}`);
      t = (s.integer ? "an integer" : "a number") + (bounds.length ? " " + bounds.join(" and ") : "");
      break;
    }
    case "string":
      if (s.enum) t = `one of ${s.enum.map((e) => JSON.stringify(e)).join(", ")}`;
      else if (s.pattern) t = `a string matching /${s.pattern}/`;
      else t = "a string";
      break;
    case "boolean":
      t = "true or false";
      break;
    case "array": {
      const n = s.minItems !== undefined && s.maxItems !== undefined
        ? ` (${s.minItems} to ${s.maxItems} items)`
        : s.minItems !== undefined
        ? ` (at least ${s.minItems} item${s.minItems === 1 ? "" : "s"})`
        : s.maxItems !== undefined
        ? ` (at most ${s.maxItems} items)`
        : "";
      t = `a list of ${plural(describeType(s.items))}${n}`;
      break;
    }
    case "object":
      t = `a mapping with fields ${Object.keys(s.fields).join(", ")}`;
      break;
  }
  return s.nullable ? `${t} or null` : t;
}

/** "an integer >= 0" -> "integers >= 0", "one of ..." -> "values, each one of ...", for list descriptions. */
function plural(desc: string): string {
  if (desc.startsWith("one of ")) return "values, each " + desc;
  if (desc.startsWith("true or false")) return "booleans" + desc.slice("true or false".length);
  return desc.replace(/^an? (\w+)/, "$1s");
}

/**
 * Validates `node` against `schema`, adding problems to `at.problems`. Returns the resolved value (with nested
 * defaults filled in), or undefined when the node is invalid.
 */
export function validateValue(schema: ParamSchema, node: YNode, at: At): unknown {
  const bad = (hint?: string) => {
    at.problems.add({
      loc: node.loc,
      path: at.path,
      message: `expected ${describeType(schema)}, found ${describeNode(node)}`,
      hint,
    });
    return undefined;
  };
  if (node.kind === "scalar" && node.value === null) {
    if (schema.nullable) return null;
    return bad(schema.default !== undefined ? "remove the field to use the default" : undefined);
  }
  switch (schema.type) {
    case "number": {
      if (node.kind !== "scalar" || typeof node.value !== "number") {
        const hint = node.kind === "scalar" && typeof node.value === "string" && node.value.trim() !== "" &&
            !Number.isNaN(Number(node.value))
          ? "remove the quotes to write a number"
          : undefined;
        return bad(hint);
      }
      const v = node.value;
      if (!Number.isFinite(v)) return bad();
      if (schema.integer && !Number.isInteger(v)) return bad();
      if (schema.min !== undefined && v < schema.min) return bad();
      if (schema.max !== undefined && v > schema.max) return bad();
      if (schema.exclusiveMin !== undefined && v <= schema.exclusiveMin) return bad();
      if (schema.exclusiveMax !== undefined && v >= schema.exclusiveMax) return bad();
      return v;
    }
    case "string": {
      if (node.kind !== "scalar" || typeof node.value !== "string") {
        // Numbers and booleans are not silently turned into strings: `revision: 1e3` is almost surely a mistake.
        const hint = node.kind === "scalar" && node.value !== null &&
            (!schema.enum || schema.enum.includes(String(node.value)))
          ? "quote the value to write a string"
          : undefined;
        return bad(hint);
      }
      const v = node.value;
      if (schema.enum && !schema.enum.includes(v)) return bad(didYouMean(v, [...schema.enum]));
      if (schema.pattern && !new RegExp(schema.pattern).test(v)) return bad();
      return v;
    }
    case "boolean":
      if (node.kind !== "scalar" || typeof node.value !== "boolean") return bad();
      return node.value;
    case "array": {
      if (node.kind !== "seq") {
        return bad(node.kind === "scalar" ? "write a list as [a, b] or one `- item` per line" : undefined);
      }
      if (schema.minItems !== undefined && node.items.length < schema.minItems) return bad();
      if (schema.maxItems !== undefined && node.items.length > schema.maxItems) return bad();
      const out: unknown[] = [];
      let ok = true;
      node.items.forEach((item, i) => {
        const v = validateValue(schema.items, item, { ...at, path: joinPath(at.path, i) });
        if (v === undefined) ok = false;
        out.push(v);
      });
      return ok ? out : undefined;
    }
    case "object": {
      if (node.kind !== "map") return bad();
      const before = at.problems.count;
      const v = validateFields(schema.fields, node, at);
      return at.problems.count === before ? v : undefined;
    }
  }
}

/**
 * Validates a mapping against a field map: unknown keys (with "did you mean"), missing required fields, and each
 * value. `node` may be undefined (the whole mapping was omitted): defaults are used and required fields reported
 * at `at.loc`. Returns the resolved object (defaults filled in; fields without a value are left out).
 */
export function validateFields(
  fields: ParamFields,
  node: YNode | undefined,
  at: At,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (node !== undefined && !(node.kind === "scalar" && node.value === null) && node.kind !== "map") {
    at.problems.add({
      loc: node.loc,
      path: at.path,
      message: `expected a mapping, found ${describeNode(node)}`,
    });
    return out;
  }
  const map: YMap | undefined = node?.kind === "map" ? node : undefined;
  const names = Object.keys(fields);
  for (const e of map?.entries ?? []) {
    if (!(e.key in fields)) {
      at.problems.add({
        loc: e.keyLoc,
        path: joinPath(at.path, e.key),
        message: `unknown field "${e.key}"`,
        hint: didYouMean(e.key, names, "one of"),
      });
    }
  }
  for (const name of names) {
    const schema = fields[name];
    const entry = map?.entries.find((e) => e.key === name);
    const path = joinPath(at.path, name);
    if (entry) {
      const v = validateValue(schema, entry.value, { ...at, path });
      if (v !== undefined) out[name] = v;
    } else if (schema.default !== undefined) {
      out[name] = structuredClone(schema.default);
    } else if (schema.required) {
      at.problems.add({
        loc: map?.loc ?? at.loc,
        path,
        message: `missing required field "${name}": ${describeType(schema)}`,
        hint: schema.doc,
      });
    } else if (schema.nullable) {
      out[name] = null;
    }
  }
  return out;
}

/** One line of field documentation, as printed by {@linkcode describeFields}. */
export interface FieldDoc {
  /** Dotted path of the field (`schedule[].attn_layers` for fields of list items). */
  path: string;
  /** What values it accepts. */
  type: string;
  /** `required`, `default: X`, or `optional`. */
  presence: string;
  /** The field's documentation. */
  doc: string;
}

/** Flattens a field map into documentation rows, nested fields included. */
export function describeFields(fields: ParamFields, prefix = ""): FieldDoc[] {
  const rows: FieldDoc[] = [];
  for (const [name, s] of Object.entries(fields)) {
    const path = prefix ? `${prefix}.${name}` : name;
    const keyNote = s.inKey === false ? " (not in the cache key)" : "";
    const presence = s.required
      ? "required"
      : s.default !== undefined
      ? `default: ${JSON.stringify(s.default)}`
      : s.nullable
      ? "default: null"
      : "optional";
    rows.push({ path, type: describeType(s), presence: presence + keyNote, doc: s.doc });
    if (s.type === "object") rows.push(...describeFields(s.fields, path));
    if (s.type === "array" && s.items.type === "object") {
      rows.push(...describeFields(s.items.fields, `${path}[]`));
    }
  }
  return rows;
}

/**
 * Checks a schema written by a stage author: every field has a doc, defaults satisfy their own schema, enums are
 * non-empty, patterns compile. Returns a list of mistakes (empty when fine); the registry refuses kinds with any.
 */
export function checkSchema(fields: ParamFields, prefix = ""): string[] {
  const errors: string[] = [];
  for (const [name, s] of Object.entries(fields)) {
    const path = prefix ? `${prefix}.${name}` : name;
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) errors.push(`${path}: field names are identifiers`);
    if (typeof s.doc !== "string" || s.doc.trim() === "") errors.push(`${path}: missing doc`);
    if (s.type === "string" && s.enum && s.enum.length === 0) errors.push(`${path}: empty enum`);
    if (s.type === "string" && s.pattern) {
      try {
        new RegExp(s.pattern);
      } catch (e) {
        errors.push(`${path}: bad pattern: ${(e as Error).message}`);
      }
    }
    if (s.required && s.default !== undefined) errors.push(`${path}: required fields have no default`);
    if (s.inKey === false && prefix !== "") {
      errors.push(`${path}: inKey applies to top-level parameters only`);
    }
    if (s.default !== undefined) {
      const problems = new Problems();
      const loc = { file: "<default>", line: 0, col: 0 };
      validateValue(s, fromPlain(s.default, loc), { path, loc, problems });
      for (const p of problems.list) errors.push(`${p.path}: default does not fit its schema: ${p.message}`);
    }
    if (s.type === "object") errors.push(...checkSchema(s.fields, path));
    if (s.type === "array") {
      if (s.items.type === "object") errors.push(...checkSchema(s.items.fields, `${path}[]`));
    }
  }
  return errors;
}
