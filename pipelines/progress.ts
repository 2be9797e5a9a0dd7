/**
 * What the user sees while a recipe runs.
 *
 * On a terminal, one status line is redrawn in place (stage, step/total, rate, tokens/s, ETA and any extra
 * figures the stage reports, such as the loss); permanent lines (stage started/finished, warnings) are printed
 * above it. Without a terminal (CI logs), the same status is printed as a plain line at most every
 * `plainIntervalMs` (10 s by default) and when a stage finishes, so logs stay short but show the job is alive.
 *
 * @module
 */
import { formatCount, formatDuration, formatValue } from "./format.ts";
import type { Progress, ProgressExtra } from "./stage.ts";

/** Where the CLI writes: `out` for results (tables), `err` for progress and messages. */
export interface Output {
  /** Writes text to standard output (no newline added). */
  out(text: string): void;
  /** Writes text to standard error (no newline added). */
  err(text: string): void;
  /** True when standard error is a terminal: enables the live status line. */
  isTty: boolean;
  /** Terminal width in columns (used to truncate the status line). */
  columns: number;
}

/** The process's real standard output and error. */
export function processOutput(): Output {
  const enc = new TextEncoder();
  const isTty = Deno.stderr.isTerminal();
  let columns = 100;
  try {
    // A pseudo-terminal without a size reports 0 columns: keep the default then.
    if (isTty && Deno.consoleSize().columns >= 40) columns = Deno.consoleSize().columns;
  } catch {
    // not a console
  }
  return {
    out: (t) => writeAll(Deno.stdout, enc.encode(t)),
    err: (t) => writeAll(Deno.stderr, enc.encode(t)),
    isTty,
    columns,
  };
}

function writeAll(w: { writeSync(p: Uint8Array): number }, bytes: Uint8Array) {
  let off = 0;
  while (off < bytes.length) off += w.writeSync(bytes.subarray(off));
}

/** An {@linkcode Output} that collects everything in memory (tests). */
export function memoryOutput(): Output & { stdout: () => string; stderr: () => string } {
  let o = "", e = "";
  return {
    out: (t) => void (o += t),
    err: (t) => void (e += t),
    isTty: false,
    columns: 120,
    stdout: () => o,
    stderr: () => e,
  };
}

/** Prints permanent lines and keeps one live status line below them (TTY) or prints it periodically (plain). */
export class Console {
  readonly #o: Output;
  #status = "";
  #shown = false;

  /** Wraps an output. */
  constructor(output: Output) {
    this.#o = output;
  }

  /** The wrapped output. */
  get output(): Output {
    return this.#o;
  }

  /** Prints a permanent line to standard error. */
  line(text: string): void {
    this.#clear();
    this.#o.err(text + "\n");
    this.#redraw();
  }

  /** Replaces the live status line (TTY only; plain output prints status lines through {@linkcode line}). */
  status(text: string): void {
    if (!this.#o.isTty) return;
    this.#status = text;
    this.#clear();
    this.#redraw();
  }

  /** Removes the live status line. */
  clearStatus(): void {
    this.#clear();
    this.#status = "";
  }

  #clear() {
    if (this.#shown) {
      this.#o.err("\r\x1b[2K");
      this.#shown = false;
    }
  }

  #redraw() {
    if (!this.#o.isTty || !this.#status) return;
    const max = Math.max(20, this.#o.columns - 1);
    const s = this.#status.length > max ? this.#status.slice(0, max - 1) + "…" : this.#status;
    this.#o.err(s);
    this.#shown = true;
  }
}

/** A snapshot of a stage's progress, as rendered and logged. */
export interface ProgressSnapshot {
  /** Stage name. */
  stage: string;
  /** Units done. */
  done: number;
  /** Units in total. */
  total: number;
  /** Unit name (`step`, `sequence`, ...). */
  unit: string;
  /** Phase label given to `start`, if any. */
  label?: string;
  /** Units per second since `start` in this process, or null before two updates. */
  rate: number | null;
  /** Tokens per second since the first update with tokens, or null. */
  tokensPerSecond: number | null;
  /** Estimated seconds left, or null. */
  etaSeconds: number | null;
  /** Extra figures (loss, ...). */
  extra: Record<string, number>;
}

/** Renders a snapshot as one status line. */
export function renderProgress(p: ProgressSnapshot, prefix = ""): string {
  const pct = p.total > 0 ? Math.min(100, Math.floor((100 * p.done) / p.total)) : 0;
  const width = 20;
  const filled = p.total > 0 ? Math.min(width, Math.round((width * p.done) / p.total)) : 0;
  const bar = "#".repeat(filled) + "-".repeat(width - filled);
  const parts = [
    `${prefix}${p.stage}${p.label ? ` (${p.label})` : ""}`,
    `[${bar}]`,
    `${p.done}/${p.total} ${p.unit}${p.total === 1 ? "" : "s"}`,
    `${pct}%`,
  ];
  if (p.rate !== null) parts.push(`${formatCount(p.rate)} ${p.unit}/s`);
  if (p.tokensPerSecond !== null) parts.push(`${formatCount(p.tokensPerSecond)} tok/s`);
  if (p.etaSeconds !== null && p.done < p.total) parts.push(`ETA ${formatDuration(p.etaSeconds)}`);
  for (const [k, v] of Object.entries(p.extra)) parts.push(`${k} ${formatValue(v)}`);
  return parts.join("  ");
}

/** Options of a {@linkcode StageProgress}. */
export interface StageProgressOptions {
  /** Stage name. */
  stage: string;
  /** Prefix for the status line, e.g. `[2/5] `. */
  prefix: string;
  /** Where to draw. */
  console: Console;
  /** Receives a snapshot at most every `eventIntervalMs` (the runner writes a `progress` event). */
  onSnapshot: (p: ProgressSnapshot) => void;
  /** Plain (non-TTY) status line interval, ms (default 10000). */
  plainIntervalMs?: number;
  /** Event interval, ms (default 10000). */
  eventIntervalMs?: number;
  /** Clock (tests). */
  now?: () => number;
}

/** The {@linkcode Progress} handed to a stage: tracks rates and ETA and draws them. */
export class StageProgress implements Progress {
  readonly #o: StageProgressOptions;
  readonly #now: () => number;
  #total = 0;
  #unit = "step";
  #label: string | undefined;
  #startDone = 0;
  #startTime = 0;
  #done = 0;
  #tokens0: { t: number; tokens: number } | null = null;
  #tokens = 0;
  #extra: Record<string, number> = {};
  #lastDraw = 0;
  #lastPlain = 0;
  #lastEvent = 0;
  #started = false;

  /** Creates the tracker. */
  constructor(opts: StageProgressOptions) {
    this.#o = opts;
    this.#now = opts.now ?? (() => performance.now());
  }

  /** Starts a (new) progress bar. */
  start(total: number, unit = "step", label?: string): void {
    this.#total = Math.max(0, total);
    this.#unit = unit;
    this.#label = label;
    this.#started = false;
    this.#done = 0;
    this.#tokens0 = null;
    this.#extra = {};
    this.#draw(true);
  }

  /** Records progress; redraws at most every 100 ms. */
  update(done: number, extra?: ProgressExtra): void {
    const t = this.#now();
    if (!this.#started) {
      // Rates count from the first update in this process, so a resumed stage does not claim its past steps.
      this.#started = true;
      this.#startDone = done;
      this.#startTime = t;
    }
    this.#done = done;
    if (extra) {
      for (const [k, v] of Object.entries(extra)) {
        if (v === undefined) continue;
        if (k === "tokens") {
          this.#tokens = v;
          if (!this.#tokens0) this.#tokens0 = { t, tokens: v };
        } else this.#extra[k] = v;
      }
    }
    this.#draw(done >= this.#total);
  }

  /** The current snapshot. */
  snapshot(): ProgressSnapshot {
    const t = this.#now();
    const dt = (t - this.#startTime) / 1000;
    const rate = this.#started && dt > 0 && this.#done > this.#startDone
      ? (this.#done - this.#startDone) / dt
      : null;
    const tdt = this.#tokens0 ? (t - this.#tokens0.t) / 1000 : 0;
    const tps = this.#tokens0 && tdt > 0 && this.#tokens > this.#tokens0.tokens
      ? (this.#tokens - this.#tokens0.tokens) / tdt
      : null;
    return {
      stage: this.#o.stage,
      done: this.#done,
      total: this.#total,
      unit: this.#unit,
      label: this.#label,
      rate,
      tokensPerSecond: tps,
      etaSeconds: rate ? Math.max(0, this.#total - this.#done) / rate : null,
      extra: { ...this.#extra },
    };
  }

  /** Prints the final state on plain outputs (called by the runner when the stage ends). */
  finish(): void {
    if (!this.#o.console.output.isTty && this.#total > 0 && this.#lastPlain !== 0) {
      this.#o.console.line("  " + renderProgress(this.snapshot(), this.#o.prefix));
    }
    this.#o.console.clearStatus();
  }

  #draw(force: boolean) {
    const t = this.#now();
    const c = this.#o.console;
    if (c.output.isTty) {
      if (force || t - this.#lastDraw >= 100) {
        this.#lastDraw = t;
        c.status(renderProgress(this.snapshot(), this.#o.prefix));
      }
    } else if (this.#total > 0 && (t - this.#lastPlain >= (this.#o.plainIntervalMs ?? 10_000))) {
      if (this.#lastPlain !== 0 || this.#done > 0) {
        this.#lastPlain = t;
        c.line("  " + renderProgress(this.snapshot(), this.#o.prefix));
      }
    }
    if (t - this.#lastEvent >= (this.#o.eventIntervalMs ?? 10_000) && this.#started) {
      this.#lastEvent = t;
      this.#o.onSnapshot(this.snapshot());
    }
  }
}
