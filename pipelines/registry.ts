/**
 * A registry of stage kinds. `stages/registry.ts` builds the default one from the list of built-in kinds; tests
 * build their own. Adding a kind checks its declaration (names, version, docs, parameter schema), so an author's
 * mistake fails at start-up rather than in the middle of a run.
 *
 * @module
 */
import { checkSchema } from "./params.ts";
import type { AnyStageKind, InputPorts, OutputPorts } from "./stage.ts";

const KIND_NAME = /^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$/;
const PORT_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Checks a stage kind's declaration; returns the list of mistakes (empty when fine). */
export function checkStageKind(k: AnyStageKind): string[] {
  const errors: string[] = [];
  if (typeof k.kind !== "string" || !KIND_NAME.test(k.kind)) {
    errors.push(`kind name ${JSON.stringify(k.kind)} must match ${KIND_NAME}`);
  }
  if (!Number.isInteger(k.version) || k.version < 1) errors.push(`version must be a positive integer`);
  if (typeof k.doc !== "string" || k.doc.trim() === "") errors.push(`missing doc`);
  if (typeof k.run !== "function") errors.push(`missing run(ctx)`);
  errors.push(...checkSchema(k.params ?? {}).map((e) => `params.${e}`));
  for (const [port, p] of Object.entries((k.inputs ?? {}) as InputPorts)) {
    if (!PORT_NAME.test(port)) errors.push(`input port ${JSON.stringify(port)} must be an identifier`);
    if (!p.doc) errors.push(`input port ${port}: missing doc`);
    if (p.type !== undefined && p.type !== "dir" && p.type !== "file") {
      errors.push(`input port ${port}: bad type`);
    }
  }
  const outs = Object.entries((k.outputs ?? {}) as OutputPorts);
  if (outs.length === 0) errors.push("declares no outputs (every stage produces at least one artifact)");
  for (const [port, p] of outs) {
    // Port names become file names under the temporary output directory: keep them plain identifiers.
    if (!PORT_NAME.test(port)) errors.push(`output port ${JSON.stringify(port)} must be an identifier`);
    if (!p.doc) errors.push(`output port ${port}: missing doc`);
    if (p.type !== "dir" && p.type !== "file") {
      errors.push(`output port ${port}: type must be "dir" or "file"`);
    }
  }
  return errors;
}

/** Stage kinds by name. */
export class StageRegistry {
  #kinds = new Map<string, AnyStageKind>();

  /** Creates a registry holding `kinds`. */
  constructor(kinds: AnyStageKind[] = []) {
    for (const k of kinds) this.add(k);
  }

  /**
   * Adds a kind.
   *
   * @throws {Error} if the declaration is invalid or the name is taken (both are bugs in Distillery, not user errors)
   */
  add(kind: AnyStageKind): void {
    const errors = checkStageKind(kind);
    if (errors.length > 0) {
      throw new Error(
        `stage kind ${JSON.stringify(kind.kind)} is declared wrongly:\n  ${errors.join("\n  ")}`,
      );
    }
    if (this.#kinds.has(kind.kind)) throw new Error(`stage kind "${kind.kind}" is registered twice`);
    this.#kinds.set(kind.kind, kind);
  }

  /** The kind named `name`, or undefined. */
  get(name: string): AnyStageKind | undefined {
    return this.#kinds.get(name);
  }

  /** All kinds, sorted by name. */
  list(): AnyStageKind[] {
    return [...this.#kinds.values()].sort((a, b) => a.kind.localeCompare(b.kind));
  }

  /** All kind names, sorted. */
  names(): string[] {
    return this.list().map((k) => k.kind);
  }
}
