/**
 * Text formatting shared by the HTML page and the Markdown summary: durations, numbers, dates, escaping.
 *
 * @module
 */

/** A duration for people: `0.42 s`, `12.3 s`, `2m 05s`, `1h 02m`; an em dash for null. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 10) return `${seconds.toFixed(seconds < 1 ? 2 : 1)} s`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/**
 * A metric value in four significant digits (`2.091`, `0.6612`, `0.63`), integers as they are with thousands separators,
 * very small or very large values in exponent form (`8.0e-5`); an em dash for null or undefined. With `trim` false
 * trailing zeros stay (`0.6300`), so that a table column lines up.
 */
export function formatNumber(
  v: number | string | boolean | null | undefined,
  digits = 4,
  trim = true,
): string {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
  if (Number.isInteger(v) && Math.abs(v) < 1e12) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e7)) return v.toExponential(Math.max(1, digits - 3));
  if (a >= 1000) return v.toLocaleString("en-US", { maximumFractionDigits: 1 });
  // Trailing zeros say nothing about precision here: 0.63 reads better than 0.6300.
  const text = v.toPrecision(digits);
  return trim ? text.replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "") : text;
}

/** A fraction as a percentage: `0.5` -> `50%`, `0.125` -> `12.5%`. */
export function formatPercent(v: number | null | undefined, decimals = 1): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  const p = v * 100;
  return Math.abs(p - Math.round(p)) < 1e-9 ? `${Math.round(p)}%` : `${p.toFixed(decimals)}%`;
}

/** An ISO time as `2025-11-28 21:44:12 UTC`; the input unchanged when it does not parse. */
export function formatDate(iso: string | null | undefined): string {
  if (!iso) return "—";
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return iso;
  return new Date(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC");
}

/** Escapes text for HTML and SVG content and attribute values. */
export function escapeHtml(s: string): string {
  return s.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!,
  );
}

/** A name made safe for ids and `data-chart` values: lower case, `[a-z0-9-]` only. */
export function slug(s: string): string {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "x";
}
