/**
 * Static SVG charts rendered to strings: line charts (with markers, legends, reference lines) and bar charts.
 * No script runs in the page; hovering a marker or bar shows its value through SVG `<title>` tooltips.
 *
 * Every chart's root is `<svg data-chart="<id>" data-points="<n>">`, where n counts the data points actually drawn,
 * so a test can check that each chart has data without parsing geometry.
 *
 * @module
 */
import { escapeHtml, formatNumber } from "./format.ts";

/** Colours for series, in order: distinct, readable on white, friendly to the common colour-vision deficiencies. */
export const PALETTE: readonly string[] = [
  "#2563eb",
  "#ea580c",
  "#059669",
  "#9333ea",
  "#dc2626",
  "#0891b2",
  "#ca8a04",
  "#db2777",
];

/** Axis ticks: `step` is 1, 2 or 5 times a power of ten; `min`/`max` are the domain widened to whole steps. */
export interface Ticks {
  /** Tick values, ascending. */
  values: number[];
  /** Distance between ticks. */
  step: number;
  /** Lower end of the axis. */
  min: number;
  /** Upper end of the axis. */
  max: number;
}

/** About `target` round-numbered ticks covering [min, max] (a degenerate range is widened around its value). */
export function niceTicks(min: number, max: number, target = 5): Ticks {
  if (!Number.isFinite(min) || !Number.isFinite(max)) min = max = 0;
  if (max < min) [min, max] = [max, min];
  if (max === min) {
    const pad = min === 0 ? 1 : Math.abs(min) * 0.1;
    min -= pad;
    max += pad;
  }
  const raw = (max - min) / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
  const lo = Math.floor(min / step + 1e-9) * step;
  const hi = Math.ceil(max / step - 1e-9) * step;
  const values: number[] = [];
  for (let v = lo, i = 0; v <= hi + step * 1e-6 && i < 100; v = lo + ++i * step) {
    values.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  return { values, step, min: lo, max: hi };
}

/**
 * Tick labels of one axis with as many decimals as the step needs and the same number on every tick: `0.25`,
 * `1.5k`, `2.0e-4 1.5e-4 1.0e-4 5.0e-5`.
 */
export function formatTicks(values: number[], step: number): string[] {
  const e = Math.floor(Math.log10(step) + 1e-9);
  const extra = Math.abs(step / 10 ** e - 2.5) < 1e-6 ? 1 : 0; // 2.5-steps need one more digit
  const largest = Math.max(...values.map(Math.abs), step);
  if (step < 1e-3 || largest >= 1e7) {
    const top = Math.floor(Math.log10(largest) + 1e-9);
    const digits = Math.min(6, Math.max(0, top - e + extra));
    return values.map((v) => (v === 0 ? "0" : v.toExponential(digits).replace("e+", "e")));
  }
  if (step >= 1000) {
    const [d, unit] = step >= 1e6 ? [1e6, "M"] : [1e3, "k"];
    const digits = Math.max(0, Math.log10(d) - e + extra);
    return values.map((v) => (v === 0 ? "0" : `${(v / d).toFixed(digits)}${unit}`));
  }
  const digits = Math.min(8, Math.max(0, -e + extra));
  return values.map((v) => (v === 0 ? "0" : v.toFixed(digits)));
}

/** One tick label, formatted as {@linkcode formatTicks} formats it on an axis of ticks `step` apart. */
export function formatTick(v: number, step: number): string {
  return formatTicks([v], step)[0];
}

/** Exponential moving average with bias correction (like TensorBoard's smoothing); nulls are carried over. */
export function ema(values: (number | null)[], weight: number): (number | null)[] {
  let acc = 0, norm = 0;
  return values.map((v) => {
    if (v === null) return null;
    acc = acc * weight + (1 - weight) * v;
    norm = norm * weight + (1 - weight);
    return acc / norm;
  });
}

/**
 * Thins a series to at most `max` points, keeping the minimum and maximum of each bucket (so spikes stay visible)
 * and the first and last points.
 */
export function downsample(
  x: number[],
  y: (number | null)[],
  max: number,
): { x: number[]; y: (number | null)[] } {
  if (x.length <= max) return { x, y };
  const buckets = Math.max(1, Math.floor(max / 2));
  const size = x.length / buckets;
  const keep = new Set<number>([0, x.length - 1]);
  for (let b = 0; b < buckets; b++) {
    const from = Math.floor(b * size), to = Math.min(x.length, Math.floor((b + 1) * size));
    let lo = -1, hi = -1;
    for (let i = from; i < to; i++) {
      const v = y[i];
      if (v === null) {
        keep.add(i); // keep the gap
        continue;
      }
      if (lo < 0 || v < y[lo]!) lo = i;
      if (hi < 0 || v > y[hi]!) hi = i;
    }
    if (lo >= 0) keep.add(lo);
    if (hi >= 0) keep.add(hi);
  }
  const idx = [...keep].sort((a, b) => a - b);
  return { x: idx.map((i) => x[i]), y: idx.map((i) => y[i]) };
}

/** One line of a line chart. */
export interface LineSeries {
  /** Name in the legend and tooltips. */
  name: string;
  /** X values. */
  x: number[];
  /** Y values, same length; null leaves a gap. */
  y: (number | null)[];
  /** Stroke colour (defaults to the palette in order). */
  color?: string;
  /** Stroke width in px (default 2). */
  width?: number;
  /** Stroke opacity (default 1). */
  opacity?: number;
  /** Dashed line. */
  dashed?: boolean;
  /** Draw a marker (with a tooltip) at every point. */
  markers?: boolean;
  /** Draw the line through the points (default true; false for a scatter of markers). */
  line?: boolean;
  /** A text label beside each point (same length as `x`). */
  labels?: string[];
  /** Show in the legend (default true). */
  legend?: boolean;
  /** Counted in `data-points` (default true; false for derived lines such as a smoothed copy). */
  counted?: boolean;
}

/** A horizontal reference line. */
export interface RefLine {
  /** Where it crosses the y axis. */
  y: number;
  /** Label at its right end. */
  label: string;
}

/** Options of {@linkcode lineChart}. */
export interface LineChartOptions {
  /** The `data-chart` id. */
  id: string;
  /** Accessible title (an SVG `<title>`). */
  title: string;
  /** X axis label. */
  xLabel: string;
  /** Y axis label. */
  yLabel: string;
  /** The lines. */
  series: LineSeries[];
  /** Width of the drawing in px (default 560). */
  width?: number;
  /** Height in px (default 280). */
  height?: number;
  /** Fixed y range ends (otherwise from the data). */
  yMin?: number;
  /** Fixed upper y end. */
  yMax?: number;
  /** Fixed x range ends (otherwise from the data). */
  xMin?: number;
  /** Fixed upper x end. */
  xMax?: number;
  /** Integer x only (draft positions, K): ticks on integers and half a step of padding on both sides. */
  xIntegers?: boolean;
  /** Formats y tick labels (default: decimals from the tick step). */
  yTickFormat?: (v: number, step: number) => string;
  /** Formats x tick labels. */
  xTickFormat?: (v: number, step: number) => string;
  /** Formats values in tooltips (default {@linkcode formatNumber}). */
  valueFormat?: (v: number) => string;
  /** Horizontal reference lines. */
  refLines?: RefLine[];
  /** Most points drawn per series (default 800; longer series are thinned, extremes kept). */
  maxPointsPerSeries?: number;
}

const FONT = 11;
const charWidth = (s: string, size = FONT) => s.length * size * 0.58;

function legendLayout(
  names: { name: string; color: string; dashed?: boolean }[],
  left: number,
  right: number,
) {
  const items: { x: number; row: number; name: string; color: string; dashed?: boolean }[] = [];
  let x = left, row = 0;
  for (const n of names) {
    const w = 22 + charWidth(n.name) + 14;
    if (x + w > right && x > left) {
      x = left;
      row++;
    }
    items.push({ x, row, ...n });
    x += w;
  }
  return { items, rows: names.length ? row + 1 : 0 };
}

function legendSvg(items: ReturnType<typeof legendLayout>["items"], top: number): string {
  return items.map((it) => {
    const y = top + it.row * 16;
    return `<g class="legend-item"><line x1="${it.x}" y1="${y}" x2="${
      it.x + 16
    }" y2="${y}" stroke="${it.color}" ` +
      `stroke-width="2.5"${it.dashed ? ' stroke-dasharray="5 3"' : ""}/>` +
      `<text x="${it.x + 21}" y="${y + 3.8}">${escapeHtml(it.name)}</text></g>`;
  }).join("");
}

const r2 = (v: number) => Math.round(v * 100) / 100;

/**
 * Labels beside a series' points: above a point that has its x to itself, in a column beside points that share
 * an x (the same attention fraction), spread apart vertically so that they never overlap.
 */
function pointLabels(
  s: LineSeries,
  sx: (x: number) => number,
  sy: (y: number) => number,
  plotLeft: number,
  plotRight: number,
): string {
  const pts = s.x.map((x, i) => ({
    px: sx(x),
    py: s.y[i] === null ? NaN : sy(s.y[i]!),
    text: s.labels?.[i] ?? "",
  }))
    .filter((p) => Number.isFinite(p.py) && p.text);
  const groups = new Map<number, typeof pts>();
  for (const p of pts) {
    const k = Math.round(p.px);
    groups.set(k, [...(groups.get(k) ?? []), p]);
  }
  const out: string[] = [];
  for (const group of groups.values()) {
    const px = group[0].px;
    const width = Math.max(...group.map((p) => charWidth(p.text, 10.5)));
    if (group.length === 1) {
      const p = group[0];
      const half = width / 2 + 2;
      const x = Math.min(Math.max(px, plotLeft + half), plotRight - half);
      out.push(
        `<text class="point-label" x="${r2(x)}" y="${r2(p.py - 10)}" text-anchor="middle">${
          escapeHtml(p.text)
        }</text>`,
      );
      continue;
    }
    const right = px + 9 + width <= plotRight;
    const ys = group.map((p) => p.py + 3.5).sort((a, b) => a - b);
    for (let i = 1; i < ys.length; i++) ys[i] = Math.max(ys[i], ys[i - 1] + 13);
    const sorted = [...group].sort((a, b) => a.py - b.py);
    sorted.forEach((p, i) => {
      out.push(
        `<text class="point-label" x="${r2(right ? px + 9 : px - 9)}" y="${r2(ys[i])}" ` +
          `text-anchor="${right ? "start" : "end"}">${escapeHtml(p.text)}</text>`,
      );
    });
  }
  return out.join("");
}

/** Renders a line chart to an SVG string (see {@linkcode LineChartOptions}). */
export function lineChart(o: LineChartOptions): string {
  const W = o.width ?? 560, H = o.height ?? 280;
  const maxPts = o.maxPointsPerSeries ?? 800;
  const series = o.series.map((s, i) => {
    const d = s.labels ? { x: s.x, y: s.y } : downsample(s.x, s.y, maxPts);
    return { ...s, ...d, color: s.color ?? PALETTE[i % PALETTE.length] };
  });
  const xs: number[] = [], ys: number[] = [];
  for (const s of series) {
    s.x.forEach((x, i) => {
      const y = s.y[i];
      if (y !== null && Number.isFinite(y) && Number.isFinite(x)) {
        xs.push(x);
        ys.push(y);
      }
    });
  }
  for (const r of o.refLines ?? []) ys.push(r.y);
  const points = series.reduce(
    (n, s) => n + (s.counted === false ? 0 : s.y.filter((v) => v !== null && Number.isFinite(v)).length),
    0,
  );

  // A single line needs no legend: the chart's heading names it.
  const legendNames = series.filter((s) => s.legend !== false).length < 2
    ? []
    : series.filter((s) => s.legend !== false).map((s) => ({
      name: s.name,
      color: s.color,
      dashed: s.dashed,
    }));
  const left = 58, right = 18;
  const legend = legendLayout(legendNames, left, W - right);
  const top = 14 + (legend.rows > 0 ? legend.rows * 16 + 4 : 0), bottom = 44;
  const pw = W - left - right, ph = H - top - bottom;

  let xMin = o.xMin ?? Math.min(...xs), xMax = o.xMax ?? Math.max(...xs);
  if (!xs.length) [xMin, xMax] = [0, 1];
  let xt: Ticks;
  if (o.xIntegers) {
    xMin = Math.floor(xMin);
    xMax = Math.ceil(xMax);
    const step = Math.max(1, Math.ceil((xMax - xMin) / 10));
    const values: number[] = [];
    for (let v = xMin; v <= xMax; v += step) values.push(v);
    xt = { values, step, min: xMin - 0.5, max: xMax + 0.5 };
  } else {
    // Steps and fractions: the axis spans the data exactly (from 0 when the data starts near it).
    if (o.xMin === undefined && xMin > 0 && xMin <= (xMax - xMin) * 0.1) xMin = 0;
    xt = niceTicks(xMin, xMax, Math.max(3, Math.round(pw / 90)));
    xt.min = xMin;
    xt.max = xMax > xMin ? xMax : xMin + 1;
    xt.values = xt.values.filter((v) => v >= xt.min - 1e-9 && v <= xt.max + 1e-9);
  }
  let yLo = o.yMin ?? Math.min(...ys), yHi = o.yMax ?? Math.max(...ys);
  if (!ys.length) [yLo, yHi] = [0, 1];
  const nonNegative = yLo >= 0;
  if (o.yMin === undefined && o.yMax === undefined && yHi > yLo) {
    const pad = (yHi - yLo) * 0.04;
    yLo -= pad;
    yHi += pad;
  }
  const yt = niceTicks(yLo, yHi, Math.max(3, Math.round(ph / 50)));
  if (nonNegative && yt.min < 0) yt.min = 0; // losses, rates, perplexities: no axis below zero
  if (o.yMin !== undefined) yt.min = o.yMin;
  if (o.yMax !== undefined) yt.max = o.yMax;
  yt.values = yt.values.filter((v) => v >= yt.min - 1e-9 && v <= yt.max + 1e-9);

  const sx = (x: number) => left + ((x - xt.min) / (xt.max - xt.min || 1)) * pw;
  const sy = (y: number) => top + ph - ((y - yt.min) / (yt.max - yt.min || 1)) * ph;
  const fx = o.xTickFormat ?? formatTick;
  const yLabels = o.yTickFormat
    ? yt.values.map((v) => o.yTickFormat!(v, yt.step))
    : formatTicks(yt.values, yt.step);
  const xLabels = o.xTickFormat
    ? xt.values.map((v) => o.xTickFormat!(v, xt.step))
    : formatTicks(xt.values, xt.step);
  const fv = o.valueFormat ?? ((v: number) => formatNumber(v));

  const out: string[] = [];
  out.push(
    `<svg class="chart" data-chart="${escapeHtml(o.id)}" data-points="${points}" viewBox="0 0 ${W} ${H}" ` +
      `width="${W}" height="${H}" role="img" xmlns="http://www.w3.org/2000/svg">`,
    `<title>${escapeHtml(o.title)}</title>`,
  );
  out.push(`<rect class="plot-bg" x="${left}" y="${top}" width="${pw}" height="${ph}"/>`);
  out.push(`<g class="grid">`);
  for (const v of yt.values) {
    out.push(`<line x1="${left}" x2="${left + pw}" y1="${r2(sy(v))}" y2="${r2(sy(v))}"/>`);
  }
  for (const v of xt.values) {
    out.push(`<line y1="${top}" y2="${top + ph}" x1="${r2(sx(v))}" x2="${r2(sx(v))}"/>`);
  }
  out.push(`</g><g class="axis">`);
  out.push(`<line x1="${left}" x2="${left + pw}" y1="${top + ph}" y2="${top + ph}"/>`);
  out.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${top + ph}"/>`);
  yt.values.forEach((v, i) => {
    out.push(
      `<text x="${left - 7}" y="${r2(sy(v) + 3.8)}" text-anchor="end">${escapeHtml(yLabels[i])}</text>`,
    );
  });
  xt.values.forEach((v, i) => {
    out.push(
      `<text x="${r2(sx(v))}" y="${top + ph + 16}" text-anchor="middle">${escapeHtml(xLabels[i])}</text>`,
    );
  });
  out.push(
    `<text class="axis-label" x="${left + pw / 2}" y="${H - 6}" text-anchor="middle">${
      escapeHtml(o.xLabel)
    }</text>`,
    `<text class="axis-label" transform="translate(13 ${top + ph / 2}) rotate(-90)" text-anchor="middle">${
      escapeHtml(o.yLabel)
    }</text>`,
    `</g>`,
  );
  for (const r of o.refLines ?? []) {
    const y = r2(sy(r.y));
    out.push(
      `<g class="ref"><line x1="${left}" x2="${left + pw}" y1="${y}" y2="${y}"/>` +
        `<text x="${left + pw - 4}" y="${y - 4}" text-anchor="end">${escapeHtml(r.label)}</text></g>`,
    );
  }
  out.push(`<g class="series">`);
  for (const s of series) {
    const attrs = `fill="none" stroke="${s.color}" stroke-width="${s.width ?? 2}"` +
      (s.opacity !== undefined ? ` stroke-opacity="${s.opacity}"` : "") +
      (s.dashed ? ` stroke-dasharray="6 4"` : "") + ` stroke-linejoin="round" stroke-linecap="round"`;
    let run: string[] = [];
    const flush = () => {
      if (run.length > 1) out.push(`<polyline ${attrs} points="${run.join(" ")}"/>`);
      run = [];
    };
    s.x.forEach((x, i) => {
      const y = s.y[i];
      if (y === null || !Number.isFinite(y)) return s.line !== false ? flush() : undefined;
      run.push(`${r2(sx(x))},${r2(sy(y))}`);
    });
    if (s.line !== false) flush();
    if (s.markers) {
      s.x.forEach((x, i) => {
        const y = s.y[i];
        if (y === null || !Number.isFinite(y)) return;
        const tip = `${s.labels?.[i] ?? s.name}: ${o.xLabel} ${fx(x, xt.step)}, ${o.yLabel} ${fv(y)}`;
        out.push(
          `<circle cx="${r2(sx(x))}" cy="${
            r2(sy(y))
          }" r="4" fill="${s.color}" stroke="#fff" stroke-width="1.5">` +
            `<title>${escapeHtml(tip)}</title></circle>`,
        );
      });
    }
    if (s.labels) out.push(pointLabels(s, sx, sy, left, left + pw));
  }
  out.push(`</g>`);
  out.push(`<g class="legend">${legendSvg(legend.items, 12)}</g>`);
  out.push(`</svg>`);
  return out.join("");
}

/** Options of {@linkcode barChart}. */
export interface BarChartOptions {
  /** The `data-chart` id. */
  id: string;
  /** Accessible title. */
  title: string;
  /** Category labels along x. */
  categories: string[];
  /** One value per category. */
  values: number[];
  /** X axis label. */
  xLabel: string;
  /** Y axis label. */
  yLabel: string;
  /** Bar colour. */
  color?: string;
  /** Width in px (default 280). */
  width?: number;
  /** Height in px (default 200). */
  height?: number;
  /** Text above each bar (default the value). */
  valueLabel?: (v: number, i: number) => string;
}

/** Renders a bar chart to an SVG string (see {@linkcode BarChartOptions}). */
export function barChart(o: BarChartOptions): string {
  const W = o.width ?? 280, H = o.height ?? 200;
  const left = 50, right = 10, top = 18, bottom = 40;
  const pw = W - left - right, ph = H - top - bottom;
  const finite = o.values.filter((v) => Number.isFinite(v));
  const yt = niceTicks(0, Math.max(1e-12, ...finite), 4);
  yt.min = 0;
  const sy = (y: number) => top + ph - (y / (yt.max || 1)) * ph;
  const n = Math.max(1, o.categories.length);
  const band = pw / n, bw = Math.max(2, band * 0.7);
  const color = o.color ?? PALETTE[0];
  const label = o.valueLabel ?? ((v: number) => formatNumber(v));
  const out: string[] = [];
  out.push(
    `<svg class="chart" data-chart="${
      escapeHtml(o.id)
    }" data-points="${finite.length}" viewBox="0 0 ${W} ${H}" ` +
      `width="${W}" height="${H}" role="img" xmlns="http://www.w3.org/2000/svg">`,
    `<title>${escapeHtml(o.title)}</title>`,
    `<rect class="plot-bg" x="${left}" y="${top}" width="${pw}" height="${ph}"/>`,
    `<g class="grid">`,
  );
  for (const v of yt.values) {
    out.push(`<line x1="${left}" x2="${left + pw}" y1="${r2(sy(v))}" y2="${r2(sy(v))}"/>`);
  }
  out.push(`</g><g class="axis">`);
  out.push(`<line x1="${left}" x2="${left + pw}" y1="${top + ph}" y2="${top + ph}"/>`);
  const yLabels = formatTicks(yt.values, yt.step);
  yt.values.forEach((v, i) => {
    out.push(`<text x="${left - 6}" y="${r2(sy(v) + 3.8)}" text-anchor="end">${yLabels[i]}</text>`);
  });
  o.categories.forEach((c, i) => {
    out.push(
      `<text x="${r2(left + band * (i + 0.5))}" y="${top + ph + 15}" text-anchor="middle">${
        escapeHtml(c)
      }</text>`,
    );
  });
  out.push(
    `<text class="axis-label" x="${left + pw / 2}" y="${H - 5}" text-anchor="middle">${
      escapeHtml(o.xLabel)
    }</text>`,
    `<text class="axis-label" transform="translate(12 ${top + ph / 2}) rotate(-90)" text-anchor="middle">${
      escapeHtml(o.yLabel)
    }</text></g><g class="series">`,
  );
  o.values.forEach((v, i) => {
    if (!Number.isFinite(v)) return;
    const x = left + band * i + (band - bw) / 2, y = sy(v);
    out.push(
      `<rect x="${r2(x)}" y="${r2(y)}" width="${r2(bw)}" height="${
        r2(top + ph - y)
      }" rx="2" fill="${color}">` +
        `<title>${escapeHtml(`${o.xLabel} ${o.categories[i]}: ${label(v, i)}`)}</title></rect>`,
    );
    if (bw >= 14) {
      out.push(
        `<text class="bar-label" x="${r2(x + bw / 2)}" y="${r2(y - 4)}" text-anchor="middle">${
          escapeHtml(label(v, i))
        }</text>`,
      );
    }
  });
  out.push(`</g></svg>`);
  return out.join("");
}
