/**
 * The stage graph: stages are nodes, `${stage.port}` references are edges from a consumer to its producer.
 *
 * Order is topological and otherwise follows the recipe, so `plan` and `run` list stages the way the recipe reads.
 *
 * @module
 */
import type { Loc } from "./source.ts";

/** A stage and the stages it reads from. */
export interface DagNode {
  /** Stage name. */
  name: string;
  /** Producers this stage reads, with the location of each reference (for cycle messages). */
  deps: { stage: string; loc: Loc }[];
}

/** A dependency cycle, as the list of stages walked (first = last) and where the closing reference is. */
export interface Cycle {
  /** e.g. `["a", "b", "a"]`: a reads b, b reads a. */
  path: string[];
  /** The reference in `path[0]` that starts the cycle. */
  loc: Loc;
}

/** Finds every elementary cycle reachable by depth-first search (one report per back edge). */
export function findCycles(nodes: DagNode[]): Cycle[] {
  const byName = new Map(nodes.map((n) => [n.name, n]));
  const state = new Map<string, "active" | "done">();
  const stack: string[] = [];
  const cycles: Cycle[] = [];
  const seenCycles = new Set<string>();
  const visit = (name: string) => {
    state.set(name, "active");
    stack.push(name);
    for (const dep of byName.get(name)?.deps ?? []) {
      if (!byName.has(dep.stage)) continue;
      const s = state.get(dep.stage);
      if (s === "active") {
        const path = [...stack.slice(stack.indexOf(dep.stage)), dep.stage];
        // Report each cycle once, whatever stage the search entered it from.
        const members = path.slice(0, -1);
        const canon = [...members].sort().join("\0");
        if (!seenCycles.has(canon)) {
          seenCycles.add(canon);
          const first = byName.get(path[0])!;
          const loc = first.deps.find((d) => d.stage === path[1])?.loc ?? dep.loc;
          cycles.push({ path, loc });
        }
      } else if (s === undefined) {
        visit(dep.stage);
      }
    }
    stack.pop();
    state.set(name, "done");
  };
  for (const n of nodes) if (!state.has(n.name)) visit(n.name);
  return cycles;
}

/**
 * Stage names in dependency order (producers before consumers), ties broken by recipe order. Nodes on cycles
 * (and their consumers) are left out; call {@linkcode findCycles} to report those.
 */
export function topoOrder(nodes: DagNode[]): string[] {
  const names = new Set(nodes.map((n) => n.name));
  const placed = new Set<string>();
  const order: string[] = [];
  let progress = true;
  while (progress) {
    progress = false;
    for (const n of nodes) {
      if (placed.has(n.name)) continue;
      if (n.deps.every((d) => !names.has(d.stage) || placed.has(d.stage))) {
        placed.add(n.name);
        order.push(n.name);
        progress = true;
        break; // restart from the top so earlier recipe stages go first
      }
    }
  }
  return order;
}

/** Every stage that (transitively) reads from `start`, not including `start`. */
export function descendantsOf(start: string, nodes: DagNode[]): Set<string> {
  const out = new Set<string>();
  let grew = true;
  while (grew) {
    grew = false;
    for (const n of nodes) {
      if (out.has(n.name) || n.name === start) continue;
      if (n.deps.some((d) => d.stage === start || out.has(d.stage))) {
        out.add(n.name);
        grew = true;
      }
    }
  }
  return out;
}

/** Every stage `start` (transitively) reads from, not including `start`. */
export function ancestorsOf(start: string, nodes: DagNode[]): Set<string> {
  const byName = new Map(nodes.map((n) => [n.name, n]));
  const out = new Set<string>();
  const walk = (name: string) => {
    for (const d of byName.get(name)?.deps ?? []) {
      if (!out.has(d.stage) && byName.has(d.stage)) {
        out.add(d.stage);
        walk(d.stage);
      }
    }
  };
  walk(start);
  return out;
}
