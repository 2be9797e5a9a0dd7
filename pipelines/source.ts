/**
 * YAML with source positions.
 *
 * Recipes are parsed into a small tree of {@linkcode YNode}s that keeps, for every map key and every value, the
 * file, line and column it came from. Every later step (the `extends` merge, `--set` overrides, validation) works
 * on this tree, so any error can point at `file:line:col` - including errors in a base recipe, which point into
 * the base file, and errors in a `--set` flag, which name the flag.
 *
 * Anchors, aliases and `<<` merge keys are resolved while building the tree; nothing in YAML executes code.
 *
 * @module
 */
import { isAlias, isMap, isScalar, isSeq, LineCounter, parseDocument } from "yaml";
import type { Document, Node as YamlNode } from "yaml";
import { Problems } from "./diagnostics.ts";

/** Where a node came from: a file position (1-based line and column), or a command-line flag (line 0). */
export interface Loc {
  /** File path as the user should see it (relative to the working directory when possible), or the flag text. */
  file: string;
  /** 1-based line; 0 when the node came from a flag or was synthesised. */
  line: number;
  /** 1-based column; 0 when unknown. */
  col: number;
}

/** A scalar value: YAML's core schema types. */
export type ScalarValue = string | number | boolean | null;

/** A YAML mapping; entries keep their order and the position of each key. */
export interface YMap {
  /** Discriminant. */
  kind: "map";
  /** Position of the mapping itself (its first key, or `{` for flow maps). */
  loc: Loc;
  /** Entries in source order; keys are unique. */
  entries: YEntry[];
}

/** One `key: value` entry of a {@linkcode YMap}. */
export interface YEntry {
  /** The key, converted to a string. */
  key: string;
  /** Position of the key. */
  keyLoc: Loc;
  /** The value. */
  value: YNode;
}

/** A YAML sequence. */
export interface YSeq {
  /** Discriminant. */
  kind: "seq";
  /** Position of the sequence. */
  loc: Loc;
  /** Items in order. */
  items: YNode[];
}

/** A YAML scalar (string, number, boolean or null). */
export interface YScalar {
  /** Discriminant. */
  kind: "scalar";
  /** Position of the scalar. */
  loc: Loc;
  /** The value under YAML 1.2's core schema (`1e-4` is a number, `"1e-4"` a string, `~` null). */
  value: ScalarValue;
}

/** Any node of the located tree. */
export type YNode = YMap | YSeq | YScalar;

/** Formats a location as `file:line:col`, or just the flag text for flags. */
export function formatLoc(loc: Loc): string {
  return loc.line > 0 ? `${loc.file}:${loc.line}:${loc.col}` : loc.file;
}

/** The entry for `key` in a map, or undefined. */
export function getEntry(map: YMap, key: string): YEntry | undefined {
  return map.entries.find((e) => e.key === key);
}

/** The value for `key` in a map, or undefined. */
export function getValue(map: YMap, key: string): YNode | undefined {
  return getEntry(map, key)?.value;
}

/** Sets (replacing in place, or appending) an entry of a map. */
export function setEntry(map: YMap, entry: YEntry): void {
  const i = map.entries.findIndex((e) => e.key === entry.key);
  if (i >= 0) map.entries[i] = entry;
  else map.entries.push(entry);
}

/** Converts a located tree into plain JavaScript values (maps become objects with keys in source order). */
export function toPlain(node: YNode): unknown {
  switch (node.kind) {
    case "scalar":
      return node.value;
    case "seq":
      return node.items.map(toPlain);
    case "map": {
      const out: Record<string, unknown> = {};
      for (const e of node.entries) out[e.key] = toPlain(e.value);
      return out;
    }
  }
}

/** Builds a located tree from a plain value, every node at `loc` (used for values that come from flags). */
export function fromPlain(value: unknown, loc: Loc): YNode {
  if (Array.isArray(value)) return { kind: "seq", loc, items: value.map((v) => fromPlain(v, loc)) };
  if (value !== null && typeof value === "object") {
    return {
      kind: "map",
      loc,
      entries: Object.entries(value).map(([key, v]) => ({ key, keyLoc: loc, value: fromPlain(v, loc) })),
    };
  }
  return { kind: "scalar", loc, value: value as ScalarValue };
}

/** A short description of what a node is, for "expected X, found Y" messages. */
export function describeNode(node: YNode): string {
  if (node.kind === "map") return "a mapping";
  if (node.kind === "seq") return `a list of ${node.items.length}`;
  const v = node.value;
  if (v === null) return "null";
  if (typeof v === "string") return `string ${JSON.stringify(v.length > 60 ? v.slice(0, 57) + "..." : v)}`;
  if (typeof v === "number") return Number.isNaN(v) ? "NaN" : `number ${v}`;
  return `boolean ${v}`;
}

/**
 * Parses YAML text into a located tree. Syntax errors, duplicate keys, unsupported tags and multi-document
 * files are added to `problems` (with positions); the result is null when nothing usable was parsed.
 *
 * @param text the YAML source
 * @param file the file name to put into locations (as the user should see it)
 * @param problems where to collect problems
 */
export function parseYaml(text: string, file: string, problems: Problems): YNode | null {
  const lineCounter = new LineCounter();
  const locAt = (offset: number | undefined): Loc => {
    if (offset === undefined) return { file, line: 1, col: 1 };
    const { line, col } = lineCounter.linePos(offset);
    return { file, line, col };
  };
  // A second document is an error; `parseDocument` reports it as MULTIPLE_DOCS.
  const doc: Document.Parsed = parseDocument(text, {
    lineCounter,
    prettyErrors: false,
    uniqueKeys: true,
    merge: true,
    strict: true,
  });
  for (const err of doc.errors) {
    const msg = err.code === "MULTIPLE_DOCS"
      ? "a recipe file holds one YAML document; found a second `---` document"
      : `YAML syntax error: ${err.message}`;
    problems.add({ loc: locAt(err.pos[0]), message: msg });
  }
  for (const w of doc.warnings) {
    const tag = /^Unresolved tag: (.*)$/.exec(w.message);
    problems.add({
      loc: locAt(w.pos[0]),
      message: tag
        ? `YAML tag ${tag[1]} is not supported (recipes hold plain values; nothing is included or executed)`
        : `YAML: ${w.message}`,
    });
  }
  if (doc.errors.length > 0) return null;

  const convert = (node: YamlNode | null | undefined, fallback: Loc, seen: Set<YamlNode>): YNode => {
    if (node == null) return { kind: "scalar", loc: fallback, value: null };
    const loc = node.range ? locAt(node.range[0]) : fallback;
    if (isAlias(node)) {
      const target = node.resolve(doc) as YamlNode | undefined;
      if (!target) {
        problems.add({ loc, message: `unknown YAML alias *${node.source}` });
        return { kind: "scalar", loc, value: null };
      }
      if (seen.has(target)) {
        problems.add({ loc, message: `YAML alias *${node.source} refers to itself` });
        return { kind: "scalar", loc, value: null };
      }
      return convert(target, loc, new Set([...seen, target]));
    }
    if (isScalar(node)) {
      const v = node.value;
      if (v === null || typeof v === "string" || typeof v === "number" || typeof v === "boolean") {
        return { kind: "scalar", loc, value: v };
      }
      if (typeof v === "bigint") return { kind: "scalar", loc, value: Number(v) };
      problems.add({ loc, message: `unsupported YAML value of type ${typeof v}` });
      return { kind: "scalar", loc, value: null };
    }
    if (isSeq(node)) {
      return { kind: "seq", loc, items: node.items.map((it) => convert(it as YamlNode, loc, seen)) };
    }
    if (isMap(node)) {
      const out: YMap = { kind: "map", loc, entries: [] };
      const merged: YEntry[] = [];
      for (const pair of node.items) {
        const keyNode = pair.key as YamlNode | null;
        const keyLoc = keyNode?.range ? locAt(keyNode.range[0]) : loc;
        if (isScalar(keyNode) && typeof keyNode.value === "symbol") {
          // `<<: *anchor` (or a list of anchors): explicit keys of this map win over merged ones.
          const src = convert(pair.value as YamlNode, keyLoc, seen);
          const maps = src.kind === "seq" ? src.items : [src];
          for (const m of maps) {
            if (m.kind !== "map") {
              problems.add({
                loc: m.loc,
                message: "a `<<` merge key needs a mapping (or a list of mappings)",
              });
              continue;
            }
            for (const e of m.entries) if (!merged.some((x) => x.key === e.key)) merged.push(e);
          }
          continue;
        }
        if (keyNode && !isScalar(keyNode)) {
          problems.add({ loc: keyLoc, message: "map keys must be plain scalars" });
          continue;
        }
        const key = keyNode ? String(keyNode.value) : "";
        out.entries.push({ key, keyLoc, value: convert(pair.value as YamlNode, keyLoc, seen) });
      }
      for (const e of merged) if (!out.entries.some((x) => x.key === e.key)) out.entries.push(e);
      return out;
    }
    problems.add({ loc, message: "unsupported YAML node" });
    return { kind: "scalar", loc, value: null };
  };

  return convert(doc.contents as YamlNode | null, { file, line: 1, col: 1 }, new Set());
}

/**
 * Parses one YAML value given on the command line (`--set a.b=VALUE`): a scalar or flow collection. The nodes are
 * located at the flag, so problems name it.
 */
export function parseFlagValue(text: string, flag: string, problems: Problems): YNode | null {
  const inner = new Problems();
  const node = parseYaml(text, flag, inner);
  const relocate = (n: YNode): YNode => {
    const loc = { file: flag, line: 0, col: 0 };
    if (n.kind === "scalar") return { ...n, loc };
    if (n.kind === "seq") return { kind: "seq", loc, items: n.items.map(relocate) };
    return {
      kind: "map",
      loc,
      entries: n.entries.map((e) => ({ key: e.key, keyLoc: loc, value: relocate(e.value) })),
    };
  };
  for (const p of inner.list) problems.add({ ...p, loc: { file: flag, line: 0, col: 0 } });
  if (!node) return null;
  // An empty value (`--set a.b=`) is an empty string, not null: null must be written `null` or `~`.
  if (text.trim() === "") return { kind: "scalar", loc: { file: flag, line: 0, col: 0 }, value: "" };
  return relocate(node);
}
