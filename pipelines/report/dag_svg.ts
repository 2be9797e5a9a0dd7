/**
 * The pipeline's DAG as a layered SVG graph: each stage is placed in the layer after its deepest dependency
 * (longest path), nodes within a layer are ordered to reduce edge crossings (barycentre sweeps), and edges are
 * drawn as curves from producer to consumer. Nodes are coloured by status and show the stage's kind and time.
 * Short pipelines flow left to right; long chains flow top to bottom so that they fit the page.
 *
 * @module
 */
import { escapeHtml, formatDuration } from "./format.ts";
import type { ReportStage, StageStatus } from "./model.ts";

/** Stroke and fill colours for each status (also used by the HTML legend and status pills). */
export const STATUS_COLORS: Record<StageStatus, { stroke: string; fill: string; label: string }> = {
  ran: { stroke: "#16a34a", fill: "#dcfce7", label: "ran" },
  cached: { stroke: "#0284c7", fill: "#e0f2fe", label: "cached" },
  failed: { stroke: "#dc2626", fill: "#fee2e2", label: "failed" },
  interrupted: { stroke: "#d97706", fill: "#fef3c7", label: "interrupted" },
  skipped: { stroke: "#6b7280", fill: "#f3f4f6", label: "skipped" },
  pending: { stroke: "#9ca3af", fill: "#ffffff", label: "not reached" },
};

/** An item of a layer: a stage, or a waypoint of an edge that spans several layers. */
export interface DagItem {
  /** Stage name, or `"<from>-><to>#<layer>"` for a waypoint. */
  id: string;
  /** True for an edge's waypoint. */
  dummy: boolean;
}

/** The layered graph: items per layer in drawing order, and each edge as the chain of items it passes. */
export interface DagLayout {
  /** Layers, from the sources; within a layer, items in order. */
  layers: DagItem[][];
  /** Edges: producer, consumer, and the waypoints in between (one per skipped layer). */
  edges: { from: string; to: string; via: string[] }[];
}

/**
 * Layers the stages (longest path from a source), adds a waypoint in every layer an edge skips (so long edges
 * bend around stages instead of crossing them), and orders each layer to reduce crossings (barycentre sweeps,
 * down and up). Dependencies on unknown stages and cycles are ignored rather than looping.
 */
export function layoutDag(stages: { name: string; deps: string[] }[]): DagLayout {
  const byName = new Map(stages.map((s) => [s.name, s]));
  const layerOf = new Map<string, number>();
  const visiting = new Set<string>();
  const depth = (name: string): number => {
    const known = layerOf.get(name);
    if (known !== undefined) return known;
    if (visiting.has(name)) return 0; // a cycle: the runner refuses these, the report just stays finite
    visiting.add(name);
    let d = 0;
    for (const dep of byName.get(name)?.deps ?? []) if (byName.has(dep)) d = Math.max(d, depth(dep) + 1);
    visiting.delete(name);
    layerOf.set(name, d);
    return d;
  };
  stages.forEach((s) => depth(s.name));
  const layers: DagItem[][] = [];
  for (const s of stages) (layers[layerOf.get(s.name)!] ??= []).push({ id: s.name, dummy: false });
  const preds = new Map<string, string[]>(), succs = new Map<string, string[]>();
  const link = (a: string, b: string) => {
    succs.set(a, [...(succs.get(a) ?? []), b]);
    preds.set(b, [...(preds.get(b) ?? []), a]);
  };
  const edges: DagLayout["edges"] = [];
  for (const s of stages) {
    for (const d of new Set(s.deps)) {
      if (!byName.has(d) || d === s.name) continue;
      const from = layerOf.get(d)!, to = layerOf.get(s.name)!;
      if (to <= from) continue; // only in a cycle
      const via: string[] = [];
      let prev = d;
      for (let l = from + 1; l < to; l++) {
        const id = `${d}->${s.name}#${l}`;
        layers[l].push({ id, dummy: true });
        via.push(id);
        link(prev, id);
        prev = id;
      }
      link(prev, s.name);
      edges.push({ from: d, to: s.name, via });
    }
  }
  const pos = new Map<string, number>();
  const setPos = () => layers.forEach((l) => l.forEach((it, i) => pos.set(it.id, i)));
  setPos();
  const sortBy = (l: DagItem[], neighbours: Map<string, string[]>) => {
    const bary = new Map(l.map((it) => {
      const ns = (neighbours.get(it.id) ?? []).filter((m) => pos.has(m));
      return [it.id, ns.length ? ns.reduce((a, m) => a + pos.get(m)!, 0) / ns.length : pos.get(it.id)!];
    }));
    l.sort((a, b) => bary.get(a.id)! - bary.get(b.id)! || pos.get(a.id)! - pos.get(b.id)!);
  };
  for (let sweep = 0; sweep < 4; sweep++) {
    for (let i = 1; i < layers.length; i++) {
      sortBy(layers[i], preds);
      setPos();
    }
    for (let i = layers.length - 2; i >= 0; i--) {
      sortBy(layers[i], succs);
      setPos();
    }
  }
  return { layers, edges };
}

function truncate(s: string, max: number): string {
  return s.length <= max ? s : s.slice(0, max - 1) + "…";
}

/** Second line of a node: kind and time (the colour and mark say ran or failed), or what happened instead. */
function nodeDetail(s: ReportStage): string {
  const what = s.status === "ran" || s.status === "failed" || s.status === "interrupted"
    ? formatDuration(s.wall_s)
    : STATUS_COLORS[s.status].label;
  return s.kind ? `${s.kind} · ${what}` : what;
}

/**
 * Renders the stages as an SVG graph (`data-chart="dag"`, `data-points` = number of stages). When `withEdges` is
 * false (the log did not record dependencies) the stages are laid out in rows, in run order, without edges.
 */
export function dagSvg(stages: ReportStage[], withEdges: boolean, maxWidth = 1080): string {
  const NW = 176, NH = 50, DW = 14, pad = 8;
  const layout: DagLayout = withEdges ? layoutDag(stages) : { layers: [], edges: [] };
  if (!withEdges) {
    const perRow = Math.max(1, Math.floor((maxWidth + 20) / (NW + 20)));
    stages.forEach((s, i) =>
      (layout.layers[Math.floor(i / perRow)] ??= []).push({ id: s.name, dummy: false })
    );
  }
  const n = layout.layers.length;
  // Left to right when the layers fit the page; top to bottom otherwise (long chains of stages).
  const horizontal = withEdges && n * NW + (n - 1) * 56 + 2 * pad <= maxWidth;
  const gapLayer = horizontal ? 56 : 36, gapItem = horizontal ? 14 : 18;
  const thick = horizontal ? NW : NH; // size across the layer axis
  const size = (it: DagItem) => (it.dummy ? DW : horizontal ? NH : NW); // size along the layer
  const extent = (l: DagItem[]) => l.reduce((a, it) => a + size(it), 0) + Math.max(0, l.length - 1) * gapItem;
  const widest = Math.max(0, ...layout.layers.map(extent));
  // along: position within the layer; across: position of the layer.
  const along = new Map<string, number>(), across = new Map<string, number>();
  layout.layers.forEach((l, li) => {
    let a = pad + (withEdges ? (widest - extent(l)) / 2 : 0);
    for (const it of l) {
      along.set(it.id, a + size(it) / 2);
      across.set(it.id, pad + li * (thick + gapLayer));
      a += size(it) + gapItem;
    }
  });
  if (withEdges) placeAlong(layout, along, size, gapItem);
  // Shift so that the graph starts at the padding, and measure it.
  let lo = Infinity, hi = -Infinity;
  for (const l of layout.layers) {
    for (const it of l) {
      lo = Math.min(lo, along.get(it.id)! - size(it) / 2);
      hi = Math.max(hi, along.get(it.id)! + size(it) / 2);
    }
  }
  for (const [k, v] of along) along.set(k, v - lo + pad);
  const alongTotal = (Number.isFinite(hi - lo) ? hi - lo : 0) + 2 * pad,
    acrossTotal = n * thick + Math.max(0, n - 1) * gapLayer + 2 * pad;
  const W = Math.ceil(horizontal ? acrossTotal : alongTotal),
    H = Math.ceil(horizontal ? alongTotal : acrossTotal);
  const pt = (al: number, ac: number) => (horizontal ? `${r1(ac)},${r1(al)}` : `${r1(al)},${r1(ac)}`);
  const byName = new Map(stages.map((s) => [s.name, s]));

  const out: string[] = [];
  out.push(
    `<svg class="dag" data-chart="dag" data-points="${stages.length}" viewBox="0 0 ${W} ${H}" width="${W}" ` +
      `height="${H}" role="img" xmlns="http://www.w3.org/2000/svg"><title>Pipeline stages and dependencies</title>`,
    `<defs><marker id="dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" ` +
      `orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs>`,
    `<g class="edges">`,
  );
  for (const e of layout.edges) {
    // From the producer's far side, through each waypoint (straight across its layer), to the consumer's near side.
    const chain = [e.from, ...e.via, e.to];
    let d = `M${pt(along.get(e.from)!, across.get(e.from)! + thick)}`;
    for (let i = 1; i < chain.length; i++) {
      const a0 = along.get(chain[i - 1])!, c0 = across.get(chain[i - 1])! + thick;
      const a1 = along.get(chain[i])!, c1 = across.get(chain[i])! - (i === chain.length - 1 ? 2 : 0);
      const mid = (c0 + c1) / 2;
      d += ` C${pt(a0, mid)} ${pt(a1, mid)} ${pt(a1, c1)}`;
      if (i < chain.length - 1) d += ` L${pt(a1, c1 + thick)}`;
    }
    const failedUp = byName.get(e.from)?.status === "failed";
    out.push(
      `<path d="${d}" fill="none" stroke="${failedUp ? "#fca5a5" : "#94a3b8"}" stroke-width="1.5" ` +
        `marker-end="url(#dag-arrow)"/>`,
    );
  }
  out.push(`</g><g class="nodes">`);
  for (const s of stages) {
    const cx = along.get(s.name)!, top = across.get(s.name)!;
    const x = horizontal ? top : cx - NW / 2, y = horizontal ? cx - NH / 2 : top;
    const c = STATUS_COLORS[s.status];
    const dashed = s.status === "skipped" || s.status === "pending" ? ` stroke-dasharray="5 3"` : "";
    const tip = [
      `${s.name}${s.kind ? ` (${s.kind})` : ""}: ${c.label}`,
      s.wall_s !== null ? `time ${formatDuration(s.wall_s)}` : "",
      s.cached_wall_s !== null ? `computed earlier in ${formatDuration(s.cached_wall_s)}` : "",
      s.resumed_from_step !== null ? `resumed from step ${s.resumed_from_step}` : "",
      s.deps.length ? `after ${s.deps.join(", ")}` : "",
      s.error ? `error: ${s.error}` : "",
    ].filter(Boolean).join("\n");
    const mark =
      { ran: "✓", cached: "↺", failed: "✕", interrupted: "❚❚", skipped: "", pending: "" }[s.status];
    out.push(
      `<g class="node" data-stage="${escapeHtml(s.name)}" data-status="${s.status}">` +
        `<title>${escapeHtml(tip)}</title>` +
        `<rect x="${x}" y="${y}" width="${NW}" height="${NH}" rx="7" fill="${c.fill}" stroke="${c.stroke}" ` +
        `stroke-width="1.5"${dashed}/>` +
        `<rect x="${x}" y="${y}" width="5" height="${NH}" rx="2" fill="${c.stroke}"/>` +
        `<text class="node-name" x="${x + 14}" y="${y + 21}">${escapeHtml(truncate(s.name, 20))}</text>` +
        `<text class="node-detail" x="${x + 14}" y="${y + 38}">${
          escapeHtml(truncate(nodeDetail(s), 28))
        }</text>` +
        (mark
          ? `<text class="node-mark" x="${x + NW - 13}" y="${
            y + 20
          }" text-anchor="middle" fill="${c.stroke}">${mark}</text>`
          : "") +
        `</g>`,
    );
  }
  out.push(`</g></svg>`);
  return out.join("");
}

const r1 = (v: number) => Math.round(v * 10) / 10;

/**
 * Moves items along their layer towards the mean position of their neighbours in the previous layer (down
 * sweeps) or the next one (up sweeps), keeping their order and a gap between them, so that edges run straight
 * where they can. Each sweep places a layer twice under the spacing constraint, once packing from the left and
 * once from the right, and takes the mean of the two, which keeps both the order and the gaps.
 */
function placeAlong(
  layout: DagLayout,
  along: Map<string, number>,
  size: (it: DagItem) => number,
  gap: number,
): void {
  const preds = new Map<string, string[]>(), succs = new Map<string, string[]>();
  for (const e of layout.edges) {
    const chain = [e.from, ...e.via, e.to];
    for (let i = 1; i < chain.length; i++) {
      succs.set(chain[i - 1], [...(succs.get(chain[i - 1]) ?? []), chain[i]]);
      preds.set(chain[i], [...(preds.get(chain[i]) ?? []), chain[i - 1]]);
    }
  }
  const place = (l: DagItem[], neighbours: Map<string, string[]>) => {
    const want = l.map((it) => {
      const ns = neighbours.get(it.id) ?? [];
      return ns.length ? ns.reduce((a, m) => a + along.get(m)!, 0) / ns.length : along.get(it.id)!;
    });
    const sep = (i: number) => (size(l[i - 1]) + size(l[i])) / 2 + gap;
    const fromLeft = [...want], fromRight = [...want];
    for (let i = 1; i < l.length; i++) fromLeft[i] = Math.max(fromLeft[i], fromLeft[i - 1] + sep(i));
    for (let i = l.length - 2; i >= 0; i--) {
      fromRight[i] = Math.min(fromRight[i], fromRight[i + 1] - sep(i + 1));
    }
    l.forEach((it, i) => along.set(it.id, (fromLeft[i] + fromRight[i]) / 2));
  };
  const layers = layout.layers;
  for (let sweep = 0; sweep < 6; sweep++) {
    for (let i = 1; i < layers.length; i++) place(layers[i], preds);
    for (let i = layers.length - 2; i >= 0; i--) place(layers[i], succs);
  }
}
