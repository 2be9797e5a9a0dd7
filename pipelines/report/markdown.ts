/**
 * `summary.md`: the run in GitHub-flavoured Markdown, short enough for a CI job summary (append it to
 * `$GITHUB_STEP_SUMMARY`): the stage table, the evaluation table (teacher vs students) and the
 * speculative-decoding table, with failures first.
 *
 * @module
 */
import { formatDate, formatDuration, formatNumber, formatPercent } from "./format.ts";
import type { ReportStage, RunReportData } from "./model.ts";
import { buildRunSummary, perplexityRatios, taskColumns } from "./summary.ts";

const STATUS_MARK: Record<ReportStage["status"], string> = {
  ran: "✅ ran",
  cached: "♻️ cached",
  failed: "❌ failed",
  interrupted: "⏸️ interrupted",
  skipped: "⏭️ skipped",
  pending: "⚪ not reached",
};

const RUN_MARK: Record<RunReportData["status"], string> = {
  ok: "✅ ok",
  failed: "❌ failed",
  interrupted: "⏸️ interrupted",
  incomplete: "⚠️ incomplete",
};

/** Escapes a table cell: pipes and line breaks would break the row. */
function cell(s: string): string {
  return s.replace(/\\/g, "\\\\").replace(/\|/g, "\\|").replace(/\r?\n/g, " ");
}

function table(head: string[], rows: string[][], right: boolean[] = []): string {
  const align = head.map((_, i) => (right[i] ? "---:" : ":---"));
  return [head, align, ...rows].map((r, i) => `| ${(i === 1 ? r : r.map(cell)).join(" | ")} |`).join("\n");
}

/** A fenced code block whose fence is longer than any backtick run inside `text`. */
function fenced(text: string): string {
  const longest = Math.max(2, ...[...text.matchAll(/`+/g)].map((m) => m[0].length));
  const fence = "`".repeat(longest + 1);
  return `${fence}\n${text}\n${fence}`;
}

/** Renders the Markdown summary of a run. */
export function renderSummaryMarkdown(d: RunReportData): string {
  const out: string[] = [];
  const counts = buildRunSummary(d).counts;
  out.push(`## Distillery: ${d.recipe} — ${RUN_MARK[d.status]}`);
  out.push("");
  const facts = [
    `**Run** \`${d.run_id}\``,
    `**started** ${formatDate(d.started)}`,
    `**total** ${formatDuration(d.wall_s)}`,
    d.devices.length ? `**device** ${d.devices.join("; ")}` : "",
    `**stages** ${
      (Object.keys(counts) as (keyof typeof counts)[]).filter((k) => counts[k])
        .map((k) => `${counts[k]} ${STATUS_MARK[k].split(" ").slice(1).join(" ")}`).join(", ")
    }`,
  ].filter(Boolean);
  out.push(facts.join(" · "));

  for (const s of d.stages.filter((s) => s.status === "failed" || s.status === "interrupted")) {
    out.push("");
    out.push(
      `> [!${s.status === "failed" ? "CAUTION" : "WARNING"}]\n> Stage **${s.name}**${
        s.kind ? ` (${s.kind})` : ""
      } ${s.status === "failed" ? "failed" : "was interrupted"}${
        s.wall_s !== null ? ` after ${formatDuration(s.wall_s)}` : ""
      }${s.checkpoint_step !== null ? `; checkpoint at step ${s.checkpoint_step} kept` : ""}.`,
    );
    if (s.error) out.push("", fenced(s.error));
  }

  out.push("", "### Stages", "");
  out.push(table(
    ["Stage", "Kind", "Status", "Cached", "Time", "Final metrics"],
    d.stages.map((s) => [
      `\`${s.name}\``,
      s.kind ?? "—",
      STATUS_MARK[s.status],
      s.status === "cached" ? "yes" : "no",
      s.status === "cached"
        ? (s.cached_wall_s !== null ? `cached (computed in ${formatDuration(s.cached_wall_s)})` : "cached")
        : formatDuration(s.wall_s),
      Object.entries(s.metrics).slice(0, 4).map(([k, v]) => `${k} ${formatNumber(v)}`).join(", "),
    ]),
    [false, false, false, false, true, false],
  ));

  if (d.evaluation.length) {
    const ratios = perplexityRatios(d);
    const cols = d.eval_tasks.flatMap((t) => taskColumns(d.evaluation, t).map((c) => ({ task: t, ...c })));
    out.push("", "### Evaluation", "");
    out.push(table(
      ["Model", "Attention", ...cols.map((c) => `${c.task} ${c.label}`)],
      d.evaluation.map((r) => {
        const rr = ratios.get(r.stage + "\u0000" + r.file) ?? {};
        return [
          r.role === "teacher" ? `**${r.model_name}** (teacher)` : r.model_name,
          formatPercent(r.attention_fraction),
          ...cols.map((c) => {
            const s = r.tasks[c.task];
            const v = s?.[c.key];
            if (v === undefined || v === null) return "—";
            const se = c.stderr ? s?.[c.stderr] : undefined;
            const ratio = c.key === "token_perplexity" && r.role !== "teacher" && rr[c.task] !== undefined
              ? ` (×${rr[c.task].toFixed(2)})`
              : "";
            return `${formatNumber(v)}${typeof se === "number" ? ` ± ${formatNumber(se, 2)}` : ""}${ratio}`;
          }),
        ];
      }),
      [false, true, ...cols.map(() => true)],
    ));
  }

  for (const sp of d.speculative) {
    const r = sp.results;
    out.push(
      "",
      `### Speculative decoding: \`${sp.stage}\``,
      "",
      `Target **${r.model}**, draft **${r.draft}**${
        r.temperature !== undefined
          ? (r.temperature === 0 ? ", greedy" : `, temperature ${r.temperature}`)
          : ""
      }${r.prompts !== undefined ? `, ${r.prompts} prompts` : ""}${
        r.max_new_tokens !== undefined ? ` × ${r.max_new_tokens} tokens` : ""
      }.`,
      "",
    );
    out.push(table(
      ["K", "Accepted / pass", "Acceptance by position", "Tokens/s", "Baseline tokens/s", "Speedup"],
      [...r.results].sort((a, b) => a.k - b.k).map((x) => [
        String(x.k),
        formatNumber(x.mean_accepted_per_pass, 3),
        x.acceptance_rate_per_position.map((v) => formatPercent(v, 0)).join(" "),
        formatNumber(x.tokens_per_s, 4),
        formatNumber(x.baseline_tokens_per_s, 4),
        `**${x.speedup.toFixed(2)}×**`,
      ]),
      [true, true, false, true, true, true],
    ));
  }

  if (d.problems.length) {
    out.push(
      "",
      "### Problems reading this run",
      "",
      ...d.problems.map((p) => `- ${p.replace(/\n\s*/g, " ")}`),
    );
  }
  out.push("");
  return out.join("\n");
}
