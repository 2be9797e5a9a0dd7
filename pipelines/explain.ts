/**
 * `distillery explain <recipe> <stage>`: every input of a stage's key, its current value, and what differs from
 * the last recorded run in `distillery.lock` - the answer to "why did (or will) this rerun?".
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { didYouMean } from "./diagnostics.ts";
import { formatBytes, table } from "./format.ts";
import { shortDigest } from "./hash.ts";
import { canonicalJsonSafe, showKeyValue } from "./keys.ts";
import { ALL_STAGES, makePlan, resolveSelection } from "./plan.ts";
import type { Session } from "./runner.ts";

/** The explanation as data (for `explain --json`). */
export interface Explanation {
  /** Stage name. */
  stage: string;
  /** Kind and version. */
  kind: string;
  /** Kind version. */
  kind_version: number;
  /** `cached`, `run` (with reasons). */
  status: string;
  /** Reasons for the status. */
  reasons: string[];
  /** The key, or null if an upstream stage must run first. */
  key: string | null;
  /** Each key input: current value, recorded value, and whether it differs. */
  inputs: { name: string; now: unknown; recorded: unknown; differs: boolean; source?: string }[];
  /** Upstream stages whose outputs are not known yet. */
  unknown_upstream: string[];
  /** The lock record's date and run, if any. */
  recorded: { date: string; run_id: string; status: string; key: string } | null;
  /** Stored outputs (cached) or recorded outputs. */
  outputs: Record<string, { digest: string; size: number; path?: string }>;
}

/** Computes the explanation of one stage. */
export async function explainStage(session: Session, stageName: string): Promise<Explanation> {
  const { recipe, env, record } = session;
  const stage = recipe.stages.get(stageName);
  if (!stage) {
    throw new UserError(
      `recipe ${recipe.name} has no stage "${stageName}" (${
        didYouMean(stageName, [...recipe.stages.keys()], "a stage:")
      })`,
    );
  }
  const plan = await makePlan(env, resolveSelection(recipe, { ...ALL_STAGES, targets: [stageName] }), record);
  const p = plan.find((x) => x.name === stageName)!;
  const ev = p.evaluation!;
  const rec = record?.stages[stageName];
  const now = ev.keyInputs ?? {};
  const before = rec?.key_inputs ?? {};
  const names = [...new Set([...Object.keys(now), ...Object.keys(before)])];
  const sources: Record<string, string> = {};
  for (const [port, refs] of Object.entries(stage.inputs)) {
    sources[`inputs.${port}`] = refs.map((r) => r.text).join(", ");
  }
  if (!ev.keyInputs) {
    // The key is unknown, but the parameters and local inputs are: show them.
    for (const [k, v] of Object.entries(stage.params)) if (v !== undefined) now[`params.${k}`] = v;
    for (const [port, refs] of Object.entries(stage.inputs)) {
      if (refs.every((r) => r.kind !== "stage")) continue;
      now[`inputs.${port}`] = "(unknown until upstream runs)";
    }
    for (const n of Object.keys(now)) if (!names.includes(n)) names.push(n);
  }
  const outputs: Explanation["outputs"] = {};
  const src = ev.entry?.outputs ?? rec?.outputs ?? {};
  for (const [port, o] of Object.entries(src)) {
    outputs[port] = {
      digest: o.digest,
      size: o.size,
      path: ev.entry ? env.store.objectPath(o.digest) : undefined,
    };
  }
  return {
    stage: stageName,
    kind: stage.kind.kind,
    kind_version: stage.kind.version,
    status: p.action,
    reasons: p.reasons,
    key: ev.key,
    inputs: names.map((name) => ({
      name,
      now: now[name],
      recorded: before[name],
      differs: rec !== undefined && canonicalJsonSafe(now[name]) !== canonicalJsonSafe(before[name]),
      source: sources[name],
    })),
    unknown_upstream: ev.unknownUpstream,
    recorded: rec ? { date: rec.date, run_id: rec.run_id, status: rec.status, key: rec.key } : null,
    outputs,
  };
}

/** Renders an explanation for the terminal. */
export function formatExplanation(x: Explanation): string {
  const lines: string[] = [];
  lines.push(`stage ${x.stage} (kind ${x.kind}, version ${x.kind_version})`);
  lines.push(`status: ${x.status === "run" ? "will run" : x.status}`);
  for (const r of x.reasons) lines.push(`  - ${r}`);
  lines.push(
    `key: ${
      x.key ?? `unknown until ${x.unknown_upstream.join(", ")} run${x.unknown_upstream.length > 1 ? "" : "s"}`
    }`,
  );
  lines.push(
    x.recorded
      ? `last recorded run: ${
        x.recorded.date.slice(0, 19).replace("T", " ")
      } (${x.recorded.run_id}), ${x.recorded.status}, key ${shortDigest(x.recorded.key)}`
      : "last recorded run: none in distillery.lock",
  );
  lines.push("");
  const rows = x.inputs.map((i) => [
    i.differs ? "*" : " ",
    i.name,
    i.now === undefined ? "(absent)" : showKeyValue(i.now, 50),
    x.recorded
      ? (i.recorded === undefined ? "(absent)" : i.differs ? showKeyValue(i.recorded, 50) : "same")
      : "",
    i.source ?? "",
  ]);
  lines.push(table([" ", "key input", "now", x.recorded ? "recorded" : "", "from"], rows, ""));
  const changed = x.inputs.filter((i) => i.differs).length;
  if (x.recorded) {
    lines.push(
      changed
        ? `${changed} key input(s) differ from the recorded run (marked *)`
        : "no key input differs from the recorded run",
    );
  }
  const outs = Object.entries(x.outputs);
  if (outs.length) {
    lines.push("");
    lines.push(x.status === "cached" ? "outputs (in the cache):" : "outputs (recorded):");
    for (const [port, o] of outs) {
      lines.push(`  ${port}: ${o.digest} (${formatBytes(o.size)})${o.path ? `\n    ${o.path}` : ""}`);
    }
  }
  return lines.join("\n") + "\n";
}
