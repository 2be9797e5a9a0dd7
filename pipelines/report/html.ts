/**
 * The run report as ONE self-contained HTML page: inline CSS, charts as inline SVG rendered here, no script, no
 * fonts or images from the network. It opens from disk (or as a CI artifact) in any browser.
 *
 * @module
 */
import { dagSvg, STATUS_COLORS } from "./dag_svg.ts";
import { escapeHtml, formatDate, formatDuration, formatNumber, formatPercent, slug } from "./format.ts";
import type { ReportStage, RunReportData, SpecReport, TrainingCurves } from "./model.ts";
import { buildRunSummary, mainPerplexity, perplexityRatios, taskColumns } from "./summary.ts";
import { barChart, ema, lineChart, type LineSeries, PALETTE } from "./svg.ts";

const e = escapeHtml;

const CSS = `
:root{--fg:#0f172a;--muted:#64748b;--faint:#94a3b8;--border:#e2e8f0;--bg:#f6f8fb;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif;
  color:var(--fg);background:var(--bg)}
header.top{background:linear-gradient(135deg,#0f172a,#1e293b);color:#f1f5f9;padding:26px 0 22px}
.wrap{max-width:1200px;margin:0 auto;padding:0 32px}
header.top .eyebrow{font-size:12px;letter-spacing:.08em;text-transform:uppercase;color:#94a3b8;font-weight:600}
header.top h1{margin:4px 0 2px;font-size:28px;font-weight:700;letter-spacing:-.01em;display:flex;align-items:center;gap:12px;flex-wrap:wrap}
header.top .desc{color:#cbd5e1;margin:2px 0 0;max-width:900px}
.meta{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:10px 24px;margin-top:18px}
.meta div{min-width:0}
.meta dt{font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:#94a3b8;font-weight:600}
.meta dd{margin:1px 0 0;font-size:14px;color:#f8fafc;overflow-wrap:anywhere}
nav.toc{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.92);backdrop-filter:blur(6px);
  border-bottom:1px solid var(--border)}
nav.toc .wrap{display:flex;gap:4px;overflow-x:auto}
nav.toc a{padding:10px 12px;color:#334155;text-decoration:none;font-weight:500;font-size:13px;white-space:nowrap;
  border-bottom:2px solid transparent}
nav.toc a:hover{color:var(--accent);border-bottom-color:var(--accent)}
main{padding-bottom:48px}
section{margin-top:30px;scroll-margin-top:48px}
h2{font-size:19px;margin:0 0 12px;letter-spacing:-.01em}
h3{font-size:15px;margin:0 0 10px;display:flex;align-items:baseline;gap:8px;flex-wrap:wrap}
h3 .sub,h4 .sub{font-weight:400;color:var(--muted);font-size:13px}
h4{font-size:13px;margin:0 0 6px;color:#334155;font-weight:600}
.card{background:var(--card);border:1px solid var(--border);border-radius:10px;padding:16px 18px;
  box-shadow:0 1px 2px rgba(15,23,42,.04)}
.card+.card{margin-top:14px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.charts .wide{grid-column:span 2}
.charts.two{grid-template-columns:repeat(auto-fill,minmax(440px,1fr))}
@media (max-width:760px){.charts .wide{grid-column:auto}}
.chart-box{min-width:0}
svg.chart{width:100%;height:auto;display:block}
svg.dag{max-width:100%;height:auto;display:block;margin:0 auto}
svg text{font-family:inherit;font-size:11px;fill:#475569}
svg .grid line{stroke:#edf1f6}
svg .axis line{stroke:#94a3b8}
svg .plot-bg{fill:#fff}
svg .axis-label{fill:#334155;font-weight:600}
svg .legend text{fill:#334155}
svg .ref line{stroke:#64748b;stroke-dasharray:4 4}
svg .ref text{fill:#64748b;font-size:10.5px}
svg .point-label{fill:#1e293b;font-weight:600;font-size:10.5px}
svg .bar-label{fill:#334155;font-size:10px}
svg .node-name{font-size:12.5px;font-weight:650;fill:#0f172a}
svg .node-detail{font-size:11px;fill:#475569}
svg .node-mark{font-size:13px;font-weight:700}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
.table-scroll{overflow-x:auto}
th,td{padding:7px 10px;border-bottom:1px solid var(--border);text-align:left;vertical-align:top}
thead th{font-size:12px;color:var(--muted);font-weight:600;background:#f8fafc;white-space:nowrap}
thead tr.group th{color:#334155;font-size:12.5px;border-bottom:1px solid #cbd5e1;text-align:center}
tbody tr:hover{background:#f8fafc}
td.num,th.num{text-align:right;white-space:nowrap}
td.num .pm{color:var(--faint);font-size:12px}
td .ratio{display:block;color:var(--muted);font-size:11.5px}
tr.teacher td{background:#f8fafc;font-weight:500}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
.pill{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12px;font-weight:600;border:1px solid}
.badge{font-size:13px;padding:3px 12px;border-radius:999px;font-weight:700;letter-spacing:.02em}
.badge.ok{background:#16a34a;color:#fff}.badge.failed{background:#dc2626;color:#fff}
.badge.interrupted,.badge.incomplete{background:#d97706;color:#fff}
.legend-row{display:flex;gap:14px;flex-wrap:wrap;font-size:12px;color:var(--muted);margin:10px 0 0}
.legend-row span{display:inline-flex;align-items:center;gap:6px}
.legend-row i{display:inline-block;width:12px;height:12px;border-radius:3px;border:1.5px solid}
.alert{border:1px solid #fecaca;border-left:5px solid #dc2626;background:#fef2f2;padding:14px 18px;border-radius:10px}
.alert+.alert{margin-top:10px}
.alert.warn{border-color:#fde68a;border-left-color:#d97706;background:#fffbeb}
.alert h3{margin:0;color:#991b1b}.alert.warn h3{color:#92400e}
pre.error{white-space:pre-wrap;overflow-wrap:anywhere;margin:10px 0 0;padding:10px 12px;background:#fff;
  border:1px solid #fecaca;border-radius:6px;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#7f1d1d}
.note{color:var(--muted);margin:0}
.kv{color:var(--muted);font-size:12.5px}
.kv b{color:#334155;font-weight:600}
details{margin-top:12px}
summary{cursor:pointer;color:#334155;font-weight:600}
.gen{border-top:1px solid var(--border);padding:8px 0}
.gen .prompt{color:var(--muted)}
.gen .completion{white-space:pre-wrap}
ul.problems{margin:0;padding-left:18px}
footer{color:var(--faint);font-size:12px;margin-top:36px}
`;

function pill(status: ReportStage["status"]): string {
  const c = STATUS_COLORS[status];
  return `<span class="pill" style="color:${c.stroke};background:${c.fill};border-color:${c.stroke}40">${c.label}</span>`;
}

function section(id: string, title: string, body: string): string {
  return `<section id="${id}"><h2>${e(title)}</h2>${body}</section>`;
}

const note = (text: string) => `<p class="note">${e(text)}</p>`;

function chartBox(title: string, svg: string, wide = false, sub = ""): string {
  return `<div class="chart-box${wide ? " wide" : ""}"><h4>${e(title)}${
    sub ? ` <span class="sub">${e(sub)}</span>` : ""
  }</h4>${svg}</div>`;
}

function header(d: RunReportData): string {
  const counts = buildRunSummary(d).counts;
  const countText = (Object.keys(counts) as (keyof typeof counts)[])
    .filter((k) => counts[k] > 0).map((k) => `${counts[k]} ${STATUS_COLORS[k].label}`).join(" · ") || "none";
  const item = (k: string, v: string) => `<div><dt>${e(k)}</dt><dd>${v}</dd></div>`;
  return `<header class="top"><div class="wrap">` +
    `<div class="eyebrow">Distillery run report</div>` +
    `<h1>${e(d.recipe)} <span class="badge ${d.status}">${e(d.status)}</span></h1>` +
    (d.description ? `<p class="desc">${e(d.description)}</p>` : "") +
    `<dl class="meta">` +
    item("Started", e(formatDate(d.started))) +
    item("Total time", e(formatDuration(d.wall_s))) +
    item("Device", d.devices.length ? d.devices.map(e).join("<br>") : "not recorded") +
    item("Stages", e(countText)) +
    item("Run", `<span class="mono">${e(d.run_id)}</span>`) +
    (d.recipe_path ? item("Recipe", `<span class="mono">${e(d.recipe_path)}</span>`) : "") +
    `</dl></div></header>`;
}

function failures(d: RunReportData): string {
  const bad = d.stages.filter((s) => s.status === "failed" || s.status === "interrupted");
  if (!bad.length) return "";
  return `<section id="failures">` + bad.map((s) => {
    const warn = s.status === "interrupted" ? " warn" : "";
    const what = s.status === "failed"
      ? (s.user_error ? "failed (input problem)" : "failed")
      : "was interrupted";
    const cp = s.checkpoint_step !== null
      ? `<p class="note">Checkpoint at step ${s.checkpoint_step} kept: the next run resumes from it.</p>`
      : "";
    return `<div class="alert${warn}" role="alert"><h3>Stage ${e(s.name)}${
      s.kind ? ` <span class="sub">(${e(s.kind)})</span>` : ""
    } ${what}` +
      (s.wall_s !== null ? ` after ${e(formatDuration(s.wall_s))}` : "") + `</h3>` +
      (s.error ? `<pre class="error">${e(s.error)}</pre>` : "") + cp + `</div>`;
  }).join("") + `</section>`;
}

function stageTime(s: ReportStage): string {
  if (s.status === "cached") {
    return s.cached_wall_s !== null
      ? `<span class="kv">computed in ${e(formatDuration(s.cached_wall_s))}</span>`
      : "—";
  }
  return e(formatDuration(s.wall_s));
}

function pipeline(d: RunReportData): string {
  if (!d.stages.length) return section("pipeline", "Pipeline", note("The log lists no stages."));
  const legend = (Object.keys(STATUS_COLORS) as (keyof typeof STATUS_COLORS)[])
    .filter((k) => d.stages.some((s) => s.status === k))
    .map((k) =>
      `<span><i style="background:${STATUS_COLORS[k].fill};border-color:${STATUS_COLORS[k].stroke}"></i>${
        STATUS_COLORS[k].label
      }</span>`
    )
    .join("");
  const rows = d.stages.map((s) => {
    const metrics = Object.entries(s.metrics).slice(0, 5)
      .map(([k, v]) => `<b>${e(k)}</b> ${e(formatNumber(v))}`).join(" · ");
    const extra = [
      s.resumed_from_step !== null ? `resumed from step ${s.resumed_from_step}` : "",
      s.status === "skipped" || s.status === "pending" ? s.reasons.join("; ") : "",
    ].filter(Boolean).join("; ");
    return `<tr><td><b>${e(s.name)}</b></td><td class="mono">${e(s.kind ?? "—")}</td><td>${
      pill(s.status)
    }</td>` +
      `<td class="num">${stageTime(s)}</td><td class="kv">${metrics}${metrics && extra ? "<br>" : ""}${
        e(extra)
      }</td></tr>`;
  }).join("");
  return section(
    "pipeline",
    "Pipeline",
    `<div class="card">${dagSvg(d.stages, d.has_deps)}<div class="legend-row">${legend}</div>` +
      (d.has_deps
        ? ""
        : note("The run log does not record stage dependencies: stages are shown in run order.")) +
      `</div><div class="card table-scroll"><table><thead><tr><th>Stage</th><th>Kind</th><th>Status</th>` +
      `<th class="num">Time</th><th>Final metrics</th></tr></thead><tbody>${rows}</tbody></table></div>`,
  );
}

/** Chart widths that match their boxes at the page's width, so that text is drawn at its nominal size. */
const WIDE = 720, HALF = 536, SMALL = 352;

const LOSS = (n: string) => /(^|[_/])(loss|ce|kl|nll)$/.test(n) || n.endsWith("loss");
const LR = (n: string) => /^(lr|learning_rate)$|[_/](lr|learning_rate)$/.test(n);
const SKIP = new Set(["step", "epoch", "tokens", "samples"]);

/** Series with many points get a smoothed copy over a faint raw line, as experiment trackers draw them. */
function withSmoothing(name: string, x: number[], y: (number | null)[], color: string): LineSeries[] {
  if (x.length < 40) return [{ name, x, y, color, markers: x.length <= 12 }];
  const w = x.length > 400 ? 0.95 : x.length > 120 ? 0.9 : 0.8;
  return [
    { name: `${name} (raw)`, x, y, color, width: 1.2, opacity: 0.28, legend: false },
    { name, x, y: ema(y, w), color, width: 2.2, counted: false },
  ];
}

function trainingCard(c: TrainingCurves, runId: string): string {
  const names = Object.keys(c.series).filter((n) => !SKIP.has(n));
  // A component equal to the total everywhere (CE when there is no KL term) would only hide the total's line.
  const same = (a: string, b: string) =>
    c.series[a].steps.length === c.series[b].steps.length &&
    c.series[a].values.every((v, i) => v === c.series[b].values[i]);
  const lossNames = names.filter(LOSS).sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : 0))
    .filter((n) => n === "loss" || !c.series.loss || !same(n, "loss"));
  const lrNames = names.filter(LR);
  const rewardNames = names.filter((n) => n.startsWith("rewards/") && !n.endsWith("accuracies"));
  const others = names.filter((n) =>
    !lossNames.includes(n) && !lrNames.includes(n) && !rewardNames.includes(n)
  );
  const id = slug(c.stage);
  const boxes: string[] = [];
  const seriesOf = (list: string[]) =>
    list.flatMap((n, i) =>
      withSmoothing(n, c.series[n].steps, c.series[n].values, PALETTE[i % PALETTE.length])
    );
  let lastStep = 0, first = Infinity;
  for (const s of Object.values(c.series)) {
    lastStep = Math.max(lastStep, s.steps[s.steps.length - 1] ?? 0);
    first = Math.min(first, s.steps[0] ?? Infinity);
  }
  if (lossNames.length) {
    const smoothed = lossNames.some((n) => c.series[n].steps.length >= 40);
    boxes.push(chartBox(
      "Loss",
      lineChart({
        id: `loss-${id}`,
        title: `${c.stage}: ${lossNames.join(", ")} against step`,
        xLabel: "step",
        yLabel: "loss",
        series: seriesOf(lossNames),
        width: WIDE,
        height: 300,
      }),
      true,
      smoothed ? "smoothed (EMA), raw values faint" : "",
    ));
  }
  if (lrNames.length) {
    boxes.push(chartBox(
      "Learning rate",
      lineChart({
        id: `lr-${id}`,
        title: `${c.stage}: learning rate against step`,
        xLabel: "step",
        yLabel: "learning rate",
        series: lrNames.map((n, i) => ({
          name: n,
          x: c.series[n].steps,
          y: c.series[n].values,
          color: PALETTE[(i + 3) % 8],
        })),
        width: SMALL,
        height: 300,
        yMin: 0,
      }),
    ));
  }
  if (rewardNames.length) {
    boxes.push(chartBox(
      "Rewards",
      lineChart({
        id: `metric-${id}-rewards`,
        title: `${c.stage}: DPO implicit rewards against step`,
        xLabel: "step",
        yLabel: "reward",
        series: seriesOf(rewardNames),
        width: SMALL,
        height: 240,
      }),
    ));
  }
  for (const n of others.slice(0, 9)) {
    const isRate = /accurac/.test(n);
    boxes.push(chartBox(
      n,
      lineChart({
        id: `metric-${id}-${slug(n)}`,
        title: `${c.stage}: ${n} against step`,
        xLabel: "step",
        yLabel: n,
        series: withSmoothing(n, c.series[n].steps, c.series[n].values, PALETTE[5]).map((s) => ({
          ...s,
          legend: false,
        })),
        width: SMALL,
        height: 240,
        ...(isRate ? { yMin: 0, yMax: 1 } : {}),
      }),
    ));
  }
  const finals = lossNames.map((n) => {
    const vals = c.series[n].values.filter((v): v is number => v !== null);
    return vals.length ? `<b>${e(n)}</b> ${e(formatNumber(vals[vals.length - 1]))}` : "";
  }).filter(Boolean).join(" · ");
  return `<div class="card"><h3>${e(c.stage)}${c.kind ? ` <span class="sub mono">${e(c.kind)}</span>` : ""}` +
    `<span class="sub">steps ${formatNumber(Number.isFinite(first) ? first : 0)}–${formatNumber(lastStep)}` +
    `${finals ? ` · final ${finals}` : ""}</span></h3>` +
    `<div class="charts">${boxes.join("")}</div>` +
    (c.from_runs.length > 1 || (c.from_runs.length === 1 && c.from_runs[0] !== runId)
      ? `<p class="note">Curve from ${c.from_runs.length > 1 ? "runs" : "run"} ${
        c.from_runs.map((r) => `<span class="mono">${e(r)}</span>`).join(", ")
      } (the stage was ${c.from_runs.includes(runId) ? "resumed" : "cached"} in this run).</p>`
      : "") +
    `</div>`;
}

function training(d: RunReportData): string {
  if (!d.training.length) {
    return section(
      "training",
      "Training",
      note("No stage logged training metrics in this run or the runs it reused."),
    );
  }
  return section("training", "Training", d.training.map((c) => trainingCard(c, d.run_id)).join(""));
}

function evaluation(d: RunReportData): string {
  if (!d.evaluation.length) {
    return section("evaluation", "Evaluation", note("No evaluation results in this run."));
  }
  const ratios = perplexityRatios(d);
  const tasks = d.eval_tasks.map((t) => ({ task: t, cols: taskColumns(d.evaluation, t) }));
  const n = (t: string) => {
    const ns = new Set(d.evaluation.map((r) => r.tasks[t]?.n).filter((x) => typeof x === "number"));
    return ns.size === 1 ? ` · n=${[...ns][0]}` : "";
  };
  const group = `<tr class="group"><th colspan="2"></th>${
    tasks.map((t) =>
      `<th colspan="${t.cols.length}">${e(t.task)}<span class="sub">${e(n(t.task))}</span></th>`
    ).join("")
  }</tr>`;
  const head = `<tr><th>Model</th><th class="num">Attention</th>${
    tasks.flatMap((t) => t.cols.map((c) => `<th class="num">${e(c.label)}</th>`)).join("")
  }</tr>`;
  const body = d.evaluation.map((r) => {
    const rr = ratios.get(r.stage + "\u0000" + r.file) ?? {};
    const cells = tasks.flatMap((t) =>
      t.cols.map((c) => {
        const s = r.tasks[t.task];
        const v = s?.[c.key];
        if (v === undefined || v === null) return `<td class="num">—</td>`;
        const se = c.stderr ? s?.[c.stderr] : undefined;
        const pm = typeof se === "number"
          ? ` <span class="pm">± ${e(formatNumber(se, 2, false))}</span>`
          : "";
        const ratio = c.key === "token_perplexity" && r.role !== "teacher" && rr[t.task] !== undefined
          ? `<span class="ratio">×${rr[t.task].toFixed(2)} teacher</span>`
          : "";
        return `<td class="num">${e(formatNumber(v, 4, false))}${pm}${ratio}</td>`;
      })
    ).join("");
    return `<tr class="${r.role}"><td><b>${e(r.model_name)}</b> <span class="kv">${e(r.role)} · ${
      e(r.stage)
    }</span></td>` +
      `<td class="num">${e(formatPercent(r.attention_fraction))}</td>${cells}</tr>`;
  }).join("");
  const windows = [...new Set(d.evaluation.map((r) => r.max_length).filter((x) => x !== null))];
  const conv =
    `<p class="note">Conventions of lm-evaluation-harness: acc / acc_norm ± standard error; perplexities over ` +
    `non-overlapping windows${
      windows.length === 1 ? ` of ${windows[0]} tokens` : ""
    }, the first conditioned on BOS.</p>`;

  // Perplexity against attention fraction, one line per perplexity task.
  const pplTasks = d.eval_tasks.filter((t) => d.evaluation.some((r) => mainPerplexity(r.tasks[t]) !== null));
  let chart = "";
  if (pplTasks.length) {
    const series: LineSeries[] = pplTasks.flatMap((t, i) => {
      const pts = d.evaluation
        .map((r) => ({ x: r.attention_fraction * 100, y: mainPerplexity(r.tasks[t]), label: r.model_name }))
        .filter((p): p is { x: number; y: number; label: string } => p.y !== null)
        .sort((a, b) => a.x - b.x || a.y - b.y);
      // Several models can share a fraction (after distillation, SFT, DPO): the line joins the best of each.
      const best = pts.filter((p, j) => j === 0 || pts[j - 1].x !== p.x);
      const color = PALETTE[i % PALETTE.length];
      return [
        { name: t, x: best.map((p) => p.x), y: best.map((p) => p.y), color, counted: false },
        {
          name: t,
          x: pts.map((p) => p.x),
          y: pts.map((p) => p.y),
          labels: pts.map((p) => p.label),
          markers: true,
          line: false,
          legend: false,
          color,
        },
      ];
    });
    const kind = d.evaluation.some((r) =>
        pplTasks.some((t) => typeof r.tasks[t]?.token_perplexity === "number")
      )
      ? "token perplexity"
      : "perplexity";
    chart = `<div class="card"><div class="charts">${
      chartBox(
        "Perplexity against attention fraction",
        lineChart({
          id: "ppl-vs-attention",
          title: "Perplexity against the fraction of layers that keep attention (teacher at 100%)",
          xLabel: "attention layers kept",
          yLabel: kind,
          series,
          xMin: 0,
          xMax: 100,
          xTickFormat: (v) => `${v}%`,
          width: WIDE,
          height: 320,
        }),
        true,
        "lower is better · the line joins the best model at each fraction",
      )
    }${accuracyChart(d)}</div></div>`;
  }
  const gens = d.evaluation.filter((r) => r.generations.length);
  const genHtml = gens.length
    ? `<div class="card"><details><summary>Generated samples (${
      gens.reduce((a, r) => a + r.generations.length, 0)
    })</summary>${
      gens.map((r) =>
        `<h4 style="margin-top:12px">${e(r.model_name)}</h4>` +
        r.generations.slice(0, 8).map((g) =>
          `<div class="gen"><div class="prompt">${e(g.prompt)}</div><div class="completion">${
            e(g.completion)
          }</div></div>`
        ).join("")
      ).join("")
    }</details></div>`
    : "";
  return section(
    "evaluation",
    "Evaluation",
    `<div class="card table-scroll"><table><thead>${group}${head}</thead><tbody>${body}</tbody></table>${conv}</div>` +
      chart + genHtml,
  );
}

/** acc_norm (else acc) of each multiple-choice task against the attention fraction, beside the perplexity chart. */
function accuracyChart(d: RunReportData): string {
  const metricOf = (t: string) =>
    d.evaluation.some((r) => typeof r.tasks[t]?.acc_norm === "number")
      ? "acc_norm"
      : d.evaluation.some((r) => typeof r.tasks[t]?.acc === "number")
      ? "acc"
      : null;
  const tasks = d.eval_tasks.filter((t) => metricOf(t) !== null);
  if (!tasks.length) return "";
  const series: LineSeries[] = tasks.flatMap((t, i) => {
    const m = metricOf(t)!;
    const pts = d.evaluation
      .map((r) => ({ x: r.attention_fraction * 100, y: r.tasks[t]?.[m] ?? null, label: r.model_name }))
      .filter((p): p is { x: number; y: number; label: string } => typeof p.y === "number")
      .sort((a, b) => a.x - b.x || b.y - a.y);
    const best = pts.filter((p, j) => j === 0 || pts[j - 1].x !== p.x);
    const color = PALETTE[(i + 1) % PALETTE.length];
    return [
      { name: `${t} ${m}`, x: best.map((p) => p.x), y: best.map((p) => p.y), color, counted: false },
      {
        name: `${t} ${m}`,
        x: pts.map((p) => p.x),
        y: pts.map((p) => p.y),
        markers: true,
        line: false,
        legend: false,
        color,
      },
    ];
  });
  const names = [...new Set(tasks.map(metricOf))].join(" / ");
  return chartBox(
    "Accuracy against attention fraction",
    lineChart({
      id: "accuracy-vs-attention",
      title: `Multiple-choice ${names} against the fraction of layers that keep attention`,
      xLabel: "attention layers kept",
      yLabel: names,
      series,
      xMin: 0,
      xMax: 100,
      xTickFormat: (v) => `${v}%`,
      valueFormat: (v) => formatNumber(v),
      width: SMALL,
      height: 320,
    }),
    false,
    "higher is better",
  );
}

function specCard(s: SpecReport): string {
  const r = s.results;
  const id = slug(s.stage);
  const entries = [...r.results].sort((a, b) => a.k - b.k);
  const facts = [
    `<b>target</b> ${e(r.model)}`,
    `<b>draft</b> ${e(r.draft)}`,
    r.temperature !== undefined
      ? (r.temperature === 0 ? "greedy" : `<b>temperature</b> ${e(String(r.temperature))}`)
      : "",
    r.prompts !== undefined ? `<b>prompts</b> ${e(String(r.prompts))}` : "",
    r.max_new_tokens !== undefined ? `<b>new tokens</b> ${e(String(r.max_new_tokens))}` : "",
    r.device ? `<b>device</b> ${e(String(r.device))}` : "",
  ].filter(Boolean).join(" · ");
  const rows = entries.map((x) =>
    `<tr><td class="num"><b>${x.k}</b></td><td class="num">${
      e(formatNumber(x.mean_accepted_per_pass, 3))
    }</td>` +
    `<td class="mono">${x.acceptance_rate_per_position.map((v) => formatPercent(v, 0)).join(" ")}</td>` +
    `<td class="num">${e(formatNumber(x.tokens_per_s, 4))}</td><td class="num">${
      e(formatNumber(x.baseline_tokens_per_s, 4))
    }</td>` +
    `<td class="num"><b style="color:${x.speedup >= 1 ? "#15803d" : "#b91c1c"}">${
      x.speedup.toFixed(2)
    }×</b></td></tr>`
  ).join("");
  const table =
    `<div class="table-scroll"><table><thead><tr><th class="num">K</th><th class="num">Accepted / pass</th>` +
    `<th>Acceptance by position</th><th class="num">Tokens/s</th><th class="num">Baseline tokens/s</th>` +
    `<th class="num">Speedup</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  const maxK = Math.max(...entries.map((x) => x.k));
  const acc = lineChart({
    id: `spec-acceptance-${id}`,
    title: `${s.stage}: acceptance rate by draft position`,
    xLabel: "draft position",
    yLabel: "accepted",
    series: entries.map((x, i) => ({
      name: `K=${x.k}`,
      x: x.acceptance_rate_per_position.map((_, j) => j + 1),
      y: x.acceptance_rate_per_position,
      markers: true,
      color: PALETTE[i % PALETTE.length],
    })),
    xIntegers: true,
    xMin: 1,
    xMax: maxK,
    yMin: 0,
    yMax: 1,
    yTickFormat: (v) => formatPercent(v, 0),
    valueFormat: (v) => formatPercent(v),
    width: HALF,
    height: 280,
  });
  const speed = lineChart({
    id: `spec-speedup-${id}`,
    title: `${s.stage}: speedup against draft length K`,
    xLabel: "draft length K",
    yLabel: "speedup",
    series: [{
      name: "speedup",
      x: entries.map((x) => x.k),
      y: entries.map((x) => x.speedup),
      markers: true,
      color: PALETTE[2],
      legend: false,
    }],
    xIntegers: true,
    yMin: 0,
    refLines: [{ y: 1, label: "no speedup" }],
    yTickFormat: (v, step) => `${v.toFixed(step < 0.1 ? 2 : step < 1 ? 1 : 0)}×`,
    valueFormat: (v) => `${v.toFixed(2)}×`,
    width: HALF,
    height: 280,
  });
  const hists = entries.map((x) => {
    const total = x.acceptance_histogram.reduce((a, b) => a + b, 0);
    return chartBox(
      `K=${x.k}`,
      barChart({
        id: `spec-histogram-${id}-k${x.k}`,
        title: `${s.stage}: target passes by accepted draft tokens, K=${x.k}`,
        categories: x.acceptance_histogram.map((_, j) => String(j)),
        values: x.acceptance_histogram,
        xLabel: "draft tokens accepted",
        yLabel: "passes",
        color: PALETTE[entries.indexOf(x) % PALETTE.length],
        width: SMALL,
        height: 210,
        valueLabel: (v) => (total ? formatPercent(v / total, 0) : String(v)),
      }),
      false,
      `${total} passes`,
    );
  }).join("");
  return `<div class="card"><h3>${e(s.stage)} <span class="sub">${facts}</span></h3>${table}` +
    `<div class="charts two" style="margin-top:14px">${chartBox("Acceptance rate by position", acc)}${
      chartBox("Speedup against K", speed, false, "vs plain decoding of the target")
    }</div>` +
    `<h4 style="margin-top:14px">Accepted draft tokens per target pass</h4><div class="charts">${hists}</div></div>`;
}

function speculative(d: RunReportData): string {
  if (!d.speculative.length) {
    return section(
      "speculative",
      "Speculative decoding",
      note("No speculative-decoding benchmark in this run."),
    );
  }
  return section("speculative", "Speculative decoding", d.speculative.map(specCard).join(""));
}

function logSection(d: RunReportData): string {
  if (!d.logs.length && !d.problems.length) return "";
  const rows = d.logs.map((l) =>
    `<tr><td class="mono kv">${e(l.time ? formatDate(l.time).replace(" UTC", "") : "")}</td>` +
    `<td>${
      l.level === "error"
        ? pill("failed").replace(">failed<", ">error<")
        : pill("interrupted").replace(">interrupted<", ">warning<")
    }</td>` +
    `<td>${e(l.stage ?? "runner")}</td><td>${e(l.message)}</td></tr>`
  ).join("");
  const problems = d.problems.length
    ? `<div class="alert warn"><h3>Problems reading this run</h3><ul class="problems">${
      d.problems.map((p) => `<li><pre class="error" style="margin:4px 0">${e(p)}</pre></li>`).join("")
    }</ul></div>`
    : "";
  return section(
    "log",
    "Warnings and errors",
    problems +
      (rows
        ? `<div class="card table-scroll"><table><thead><tr><th>Time</th><th>Level</th><th>Stage</th><th>Message</th></tr>` +
          `</thead><tbody>${rows}</tbody></table></div>`
        : ""),
  );
}

/**
 * Renders the whole report page. `generatedAt` (ISO) is printed in the footer; pass a fixed value for
 * reproducible output.
 */
export function renderReportHtml(d: RunReportData, generatedAt: string = new Date().toISOString()): string {
  const nav = [
    ["pipeline", "Pipeline"],
    ["training", "Training"],
    ["evaluation", "Evaluation"],
    ["speculative", "Speculative decoding"],
    ...(d.logs.length || d.problems.length ? [["log", "Warnings"]] : []),
  ].map(([id, t]) => `<a href="#${id}">${t}</a>`).join("");
  const json = JSON.stringify(buildRunSummary(d)).replace(/</g, "\\u003c");
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>${e(d.recipe)} · Distillery run ${e(d.run_id)}</title>
<style>${CSS}</style></head>
<body>${header(d)}<nav class="toc"><div class="wrap">${nav}</div></nav><main class="wrap">
${failures(d)}
${pipeline(d)}
${training(d)}
${evaluation(d)}
${speculative(d)}
${logSection(d)}
<footer>Generated by Distillery on ${e(formatDate(generatedAt))} from <span class="mono">${
    e(d.run_dir)
  }</span>. ` +
    `The same data is in <span class="mono">results.json</span> beside this file.</footer>
</main>
<script type="application/json" id="distillery-results">${json}</script>
</body></html>
`;
}
