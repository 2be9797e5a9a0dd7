/**
 * Documentation of stage kinds and recipe settings, generated from their schemas (`distillery stages [kind]`), so
 * the docs can never drift from what validation accepts.
 *
 * @module
 */
import { describeFields, type ParamFields } from "./params.ts";
import type { StageRegistry } from "./registry.ts";
import type { AnyStageKind, InputPort, OutputPort } from "./stage.ts";
import { RECIPE_SETTINGS } from "./validate.ts";

function wrap(text: string, width: number, indent: string): string {
  const words = text.split(/\s+/).filter(Boolean);
  const lines: string[] = [];
  let line = "";
  for (const w of words) {
    if (line && line.length + 1 + w.length > width) {
      lines.push(indent + line);
      line = w;
    } else line = line ? `${line} ${w}` : w;
  }
  if (line) lines.push(indent + line);
  return lines.join("\n");
}

function fieldsDoc(fields: ParamFields, indent: string): string {
  const rows = describeFields(fields);
  if (rows.length === 0) return `${indent}(none)`;
  return rows.map((r) => `${indent}${r.path}: ${r.type}; ${r.presence}\n${wrap(r.doc, 100, indent + "    ")}`)
    .join("\n");
}

/** Full documentation of one stage kind: what it does, flags, inputs, outputs, every parameter. */
export function formatStageKind(k: AnyStageKind): string {
  const flags = [
    k.usesDevice ? "uses the GPU (runtime facts in its key)" : null,
    k.usesSeed ? "uses settings.seed" : null,
    k.deterministic === false ? "not deterministic" : null,
    k.testOnly ? "test-only" : null,
  ].filter(Boolean);
  const ins = Object.entries(k.inputs as Record<string, InputPort>);
  const outs = Object.entries(k.outputs as Record<string, OutputPort>);
  return [
    `${k.kind} (version ${k.version})${flags.length ? "  [" + flags.join(", ") + "]" : ""}`,
    wrap(k.doc, 100, "  "),
    "",
    "inputs:",
    ins.length === 0
      ? "  (none)"
      : ins.map(([n, p]) =>
        `  ${n}: ${p.list ? "one or more references" : "a reference"}${
          p.type ? ` to a ${p.type === "dir" ? "directory" : "file"}` : ""
        }; ${p.optional ? "optional" : "required"}\n${wrap(p.doc, 100, "      ")}`
      ).join("\n"),
    "outputs:",
    outs.map(([n, p]) => `  ${n}: ${p.type === "dir" ? "directory" : "file"}\n${wrap(p.doc, 100, "      ")}`)
      .join("\n"),
    "params:",
    fieldsDoc(k.params as ParamFields, "  "),
    "",
  ].join("\n");
}

/** One line per kind (name, version, first sentence of the doc). */
export function formatStageList(registry: StageRegistry, includeTestOnly: boolean): string {
  const kinds = registry.list().filter((k) => includeTestOnly || !k.testOnly);
  if (kinds.length === 0) {
    return "no stage kinds are registered yet" + (includeTestOnly ? "" : " (test-only kinds: --all)") + "\n";
  }
  const w = Math.max(...kinds.map((k) => k.kind.length));
  const lines = kinds.map((k) => `  ${k.kind.padEnd(w)}  ${firstSentence(k.doc)}`);
  return "stage kinds (details: distillery stages <kind>):\n" + lines.join("\n") + "\n" +
    (includeTestOnly ? "" : "(test-only kinds are hidden; --all shows them)\n");
}

/** The first sentence of a doc string: up to a period followed by a space, not counting "e.g." / "i.e.". */
function firstSentence(doc: string): string {
  const m = /^(.*?(?<!\b(?:e\.g|i\.e|etc|vs))\.)\s/s.exec(doc);
  return m ? m[1] : doc;
}

/** Documentation of the recipe format's `settings:` block. */
export function formatSettingsDoc(): string {
  return "recipe settings (settings: in a recipe):\n" + fieldsDoc(RECIPE_SETTINGS, "  ") + "\n";
}
