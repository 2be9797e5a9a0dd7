/**
 * Differentiable Mamba1 selective scan and its decode step; the math, layouts and memory trade-offs are in
 * `kernels/selective_scan.ts`.
 *
 * @module
 */
import {
  scanAdjointChain,
  scanAdjointLocal,
  scanBackward,
  scanChain,
  type ScanChunking,
  scanChunking,
  scanForward,
  scanGroupSum,
  scanGroupWidth,
  type ScanShape,
  scanStep,
  scanVerify,
} from "../../kernels/selective_scan.ts";
import type { BufferSlice } from "../device.ts";
import type { Runtime } from "../runtime.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Options of {@linkcode selectiveScan}. */
export interface SelectiveScanOptions {
  /** State before the first step, `[B, Dn, N]` f32 (default zeros). Differentiable. */
  initialState?: Tensor | null;
  /** Also return the state after the last step, `[B, Dn, N]` f32 (default false). Differentiable. */
  finalState?: boolean;
  /** Steps per chunk = checkpoint interval of the backward (default 64; rounded to whole sub-chunks of 8). */
  chunkLength?: number;
  /** Force chunks to run in parallel (true) or one thread per channel to walk them (false). Default: by size. */
  parallelChunks?: boolean;
}

/** Result of {@linkcode selectiveScan}. */
export interface SelectiveScanResult {
  /** `[B, L, Dn]` (the shape of x). */
  y: Tensor;
  /** `[B, Dn, N]` f32, or null unless requested. */
  finalState: Tensor | null;
}

interface Dims extends ScanShape {
  /** Leading shape of x. */
  xShape: readonly number[];
}

function groupsOf(
  op: string,
  name: string,
  t: Tensor,
  rows: number,
  dims: { channels: number; states: number },
) {
  const g = t.size / (rows * dims.states);
  if (!Number.isInteger(g) || g < 1 || dims.channels % g !== 0) {
    throw new Error(
      `${op}: ${name} ${
        shapeStr(t.shape)
      } must hold [${rows} tokens, G, ${dims.states}] with G dividing ${dims.channels} channels`,
    );
  }
  return g;
}

function checkInputs(
  op: string,
  x: Tensor,
  delta: Tensor,
  A: Tensor,
  B: Tensor,
  C: Tensor,
  D: Tensor,
  tokens: number,
): { channels: number; states: number; groupsB: number; groupsC: number } {
  const channels = x.shape[x.shape.length - 1];
  if (A.shape.length !== 2 || A.shape[0] !== channels) {
    throw new Error(`${op}: A must be [${channels}, N], got ${shapeStr(A.shape)}`);
  }
  const states = A.shape[1];
  if (delta.size !== x.size) {
    throw new Error(`${op}: delta ${shapeStr(delta.shape)} must match x ${shapeStr(x.shape)}`);
  }
  if (D.size !== channels) throw new Error(`${op}: D must be [${channels}], got ${shapeStr(D.shape)}`);
  for (const [n, t] of [["delta", delta], ["A", A], ["B", B], ["C", C], ["D", D]] as const) {
    if (t.dtype !== x.dtype) throw new Error(`${op}: ${n} is ${t.dtype}, x is ${x.dtype}; use one dtype`);
  }
  const dims = { channels, states };
  return {
    channels,
    states,
    groupsB: groupsOf(op, "B", B, tokens, dims),
    groupsC: groupsOf(op, "C", C, tokens, dims),
  };
}

function checkState(
  op: string,
  name: string,
  s: Tensor,
  batch: number,
  channels: number,
  states: number,
): void {
  if (s.size !== batch * channels * states || s.dtype !== "f32") {
    throw new Error(
      `${op}: ${name} must be [${batch}, ${channels}, ${states}] f32, got ${shapeStr(s.shape)} ${s.dtype}`,
    );
  }
}

/**
 * The Mamba1 selective scan over a sequence (see `kernels/selective_scan.ts`): x and delta `[B, L, Dn]` (or
 * `[L, Dn]`), A `[Dn, N]` (negative: `-exp(A_log)`), B `[B, L, GB, N]`, C `[B, L, GC, N]` (any shapes of those
 * sizes, e.g. a projection's `[B, L, GB * N]`), D `[Dn]`. Gradients for all of them and the initial state.
 */
export function selectiveScan(
  x: Tensor,
  delta: Tensor,
  A: Tensor,
  B: Tensor,
  C: Tensor,
  D: Tensor,
  opts: SelectiveScanOptions = {},
): SelectiveScanResult {
  if (x.shape.length !== 2 && x.shape.length !== 3) {
    throw new Error(`selectiveScan: x must be [B, L, Dn] or [L, Dn], got ${shapeStr(x.shape)}`);
  }
  const [batch, length] = x.shape.length === 3 ? x.shape : [1, x.shape[0]];
  const info = checkInputs("selectiveScan", x, delta, A, B, C, D, batch * length);
  const dims: Dims = { batch, length, ...info, xShape: x.shape };
  const h0 = opts.initialState ?? null;
  if (h0) checkState("selectiveScan", "initialState", h0, batch, dims.channels, dims.states);
  const rt = x.rt;
  const dev = rt.dev;
  const inputs = [x, delta, A, B, C, D, ...(h0 ? [h0] : [])];
  const needGrad = rt.needsGrad(...inputs);
  const ch = scanChunking(dims, opts.chunkLength, opts.parallelChunks);
  const { channels: Dn, states: N } = dims;
  const y = rt.empty(x.shape, x.dtype);
  const hL = opts.finalState ? rt.empty([batch, Dn, N], "f32") : null;
  const ck = needGrad || ch.parallel ? rt.empty([batch, ch.chunks, N, Dn], "f32") : null;
  const core: BufferSlice[] = [x.binding, delta.binding, A.binding, B.binding, C.binding, D.binding];
  if (!ch.parallel) {
    const f = scanForward(x.dtype, dims, ch, {
      mode: "sequential",
      initialState: h0 !== null,
      checkpoints: ck !== null,
      finalState: hL !== null,
    });
    const bind = [...core];
    if (h0) bind.push(h0.binding);
    bind.push(y.binding);
    if (ck) bind.push(ck.binding);
    if (hL) bind.push(hL.binding);
    dev.dispatch(f.spec, bind, f.workgroups, f.uniforms);
  } else {
    const dsum = rt.empty([batch, ch.chunks, Dn], "f32");
    const flags = { initialState: false, checkpoints: false, finalState: false };
    const local = scanForward(x.dtype, dims, ch, { ...flags, mode: "local" });
    dev.dispatch(local.spec, [...core, ck!.binding, dsum.binding], local.workgroups, local.uniforms);
    const chain = scanChain(x.dtype, dims, ch, h0 !== null, hL !== null);
    const cb: BufferSlice[] = [A.binding, dsum.binding];
    if (h0) cb.push(h0.binding);
    cb.push(ck!.binding);
    if (hL) cb.push(hL.binding);
    dev.dispatch(chain.spec, cb, chain.workgroups, chain.uniforms);
    const chunk = scanForward(x.dtype, dims, ch, { ...flags, mode: "chunk" });
    dev.dispatch(chunk.spec, [...core, y.binding, ck!.binding], chunk.workgroups, chunk.uniforms);
    dsum.dispose();
  }
  if (ck && !needGrad) ck.dispose();
  rt.record("selectiveScan", inputs, hL ? [y, hL] : [y], ([gy, gFin]) => {
    const grads = scanBackwardOp(
      rt,
      dims,
      ch,
      { x, delta, A, B, C, D, h0, ck: ck! },
      gy ?? null,
      gFin ?? null,
    );
    return h0 ? grads : grads.slice(0, 6);
  });
  return { y, finalState: hL };
}

interface Saved {
  x: Tensor;
  delta: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D: Tensor;
  h0: Tensor | null;
  ck: Tensor;
}

function scanBackwardOp(
  rt: Runtime,
  dims: Dims,
  ch: ScanChunking,
  s: Saved,
  gyIn: Tensor | null,
  gFin: Tensor | null,
): Tensor[] {
  const dev = rt.dev;
  const { batch, length, channels: Dn, states: N, groupsB, groupsC } = dims;
  const dtype = s.x.dtype;
  const gy = gyIn ?? rt.zeros(s.x.shape, dtype);
  const scratch: Tensor[] = gyIn ? [] : [gy];
  let qk: Tensor | null = null;
  if (ch.parallel) {
    qk = rt.empty([batch, ch.chunks, N, Dn], "f32");
    const dsum = rt.empty([batch, ch.chunks, Dn], "f32");
    scratch.push(qk, dsum);
    const l = scanAdjointLocal(dtype, dims, ch);
    dev.dispatch(
      l.spec,
      [s.delta.binding, s.A.binding, s.C.binding, gy.binding, qk.binding, dsum.binding],
      l.workgroups,
      l.uniforms,
    );
    const c = scanAdjointChain(dtype, dims, ch, gFin !== null);
    const cb = [s.A.binding, dsum.binding];
    if (gFin) cb.push(gFin.binding);
    cb.push(qk.binding);
    dev.dispatch(c.spec, cb, c.workgroups, c.uniforms);
  }
  const W = scanGroupWidth(dims);
  const shared = 2 * W * N * 4;
  if (shared > dev.limits.maxComputeWorkgroupStorageSize) {
    throw new Error(
      `selectiveScan backward: d_state ${N} needs ${shared} bytes of workgroup memory, the device allows ${dev.limits.maxComputeWorkgroupStorageSize}`,
    );
  }
  const cpgB = Dn / groupsB, cpgC = Dn / groupsC;
  const partialB = cpgB > W, partialC = cpgC > W;
  const tokens = batch * length;
  const gx = rt.empty(s.x.shape, dtype);
  const gdelta = rt.empty(s.delta.shape, dtype);
  const gB = rt.empty(s.B.shape, dtype);
  const gC = rt.empty(s.C.shape, dtype);
  const gBp = partialB ? rt.empty([tokens, Dn / W, N], "f32") : null;
  const gCp = partialC ? rt.empty([tokens, Dn / W, N], "f32") : null;
  const k = scanBackward(dtype, dims, ch, {
    parallel: ch.parallel,
    finalGrad: !ch.parallel && gFin !== null,
    initialGrad: s.h0 !== null,
    partialB,
    partialC,
  });
  const rows = batch * k.ranges;
  const gap = rt.empty([rows, Dn, N], "f32");
  const gdp = rt.empty([rows, Dn], "f32");
  const gh0 = s.h0 ? rt.empty(s.h0.shape, "f32") : null;
  scratch.push(gap, gdp, ...(gBp ? [gBp] : []), ...(gCp ? [gCp] : []));
  const bind: BufferSlice[] = [
    s.x.binding,
    s.delta.binding,
    s.A.binding,
    s.B.binding,
    s.C.binding,
    s.D.binding,
    gy.binding,
    s.ck.binding,
  ];
  if (qk) bind.push(qk.binding);
  if (!ch.parallel && gFin) bind.push(gFin.binding);
  bind.push(gx.binding, gdelta.binding, (gBp ?? gB).binding, (gCp ?? gC).binding, gap.binding, gdp.binding);
  if (gh0) bind.push(gh0.binding);
  dev.dispatch(k.spec, bind, k.workgroups, k.uniforms);
  if (gBp) {
    const r = scanGroupSum(dtype, tokens * groupsB, cpgB / W, N);
    dev.dispatch(r.spec, [gBp.binding, gB.binding], r.workgroups, r.uniforms);
  }
  if (gCp) {
    const r = scanGroupSum(dtype, tokens * groupsC, cpgC / W, N);
    dev.dispatch(r.spec, [gCp.binding, gC.binding], r.workgroups, r.uniforms);
  }
  const gA = rt.empty(s.A.shape, dtype);
  const gD = rt.empty(s.D.shape, dtype);
  const ra = scanGroupSum(dtype, 1, rows, Dn * N);
  dev.dispatch(ra.spec, [gap.binding, gA.binding], ra.workgroups, ra.uniforms);
  const rd = scanGroupSum(dtype, 1, rows, Dn);
  dev.dispatch(rd.spec, [gdp.binding, gD.binding], rd.workgroups, rd.uniforms);
  for (const t of scratch) t.dispose();
  return [gx, gdelta, gA, gB, gC, gD, ...(gh0 ? [gh0] : [])];
}

/**
 * One decode token: x and delta `[B, Dn]`, A `[Dn, N]`, B `[B, GB, N]`, C `[B, GC, N]`, D `[Dn]`; `state`
 * `[B, Dn, N]` f32 is read and updated in place. Returns y `[B, Dn]`. Inference only (not recorded).
 */
export function selectiveScanStep(
  x: Tensor,
  delta: Tensor,
  A: Tensor,
  B: Tensor,
  C: Tensor,
  D: Tensor,
  state: Tensor,
): Tensor {
  const channels = x.shape[x.shape.length - 1];
  const batch = x.size / channels;
  const info = checkInputs("selectiveScanStep", x, delta, A, B, C, D, batch);
  checkState("selectiveScanStep", "state", state, batch, channels, info.states);
  const rt = x.rt;
  const y = rt.empty(x.shape, x.dtype);
  const k = scanStep(x.dtype, batch, channels, info.states, info.groupsB, info.groupsC);
  rt.dev.dispatch(
    k.spec,
    [x.binding, delta.binding, A.binding, B.binding, C.binding, D.binding, state.binding, y.binding],
    k.workgroups,
    k.uniforms,
  );
  return y;
}

/** The per-step inputs of one verification call that the next call re-applies (x and delta after conv/softplus). */
export interface ScanVerifyCache {
  /** `[B, T, Dn]`. */
  x: Tensor;
  /** `[B, T, Dn]`. */
  delta: Tensor;
  /** `[B, T, GB, N]` (any shape of that size). */
  B: Tensor;
}

/** The new tokens of a verification call. */
export interface ScanVerifyInputs extends ScanVerifyCache {
  /** `[B, T, GC, N]` (any shape of that size). */
  C: Tensor;
}

/**
 * Speculative verification for Mamba1 (method.md 3) in one kernel. `state` `[B, Dn, N]` f32 is the snapshot
 * before the previous call's tokens; with `previous`, its first `kept[b]` steps (u32 `[B]`: accepted drafts + 1,
 * computed on the GPU or uploaded) are re-applied and `state` is overwritten with the new snapshot. Then the
 * `next` tokens (K + 1 of them) are advanced through without writing any state, and their y `[B, T, Dn]` is
 * returned (null when `next` is null, which only commits). Keep `next` alive as the next call's `previous`.
 * Inference only.
 */
export function selectiveScanVerify(
  A: Tensor,
  D: Tensor,
  state: Tensor,
  previous: { cache: ScanVerifyCache; kept: Tensor } | null,
  next: ScanVerifyInputs | null,
): Tensor | null {
  const rt = A.rt;
  const [channels, states] = A.shape;
  const batch = state.size / (channels * states);
  checkState("selectiveScanVerify", "state", state, batch, channels, states);
  if (D.size !== channels) {
    throw new Error(`selectiveScanVerify: D must be [${channels}], got ${shapeStr(D.shape)}`);
  }
  const tokensOf = (x: Tensor) => {
    const t = x.size / (batch * channels);
    if (!Number.isInteger(t) || x.shape[0] !== batch) {
      throw new Error(`selectiveScanVerify: x ${shapeStr(x.shape)} must be [${batch}, T, ${channels}]`);
    }
    return t;
  };
  let groupsB = 1, groupsC = 1, cachedSteps = 0, tokens = 0;
  if (previous) {
    const pc = previous.cache;
    cachedSteps = tokensOf(pc.x);
    const info = checkInputs(
      "selectiveScanVerify (previous)",
      pc.x,
      pc.delta,
      A,
      pc.B,
      pc.B,
      D,
      batch * cachedSteps,
    );
    groupsB = info.groupsB;
    if (previous.kept.size !== batch || previous.kept.dtype !== "u32") {
      throw new Error(
        `selectiveScanVerify: kept must be [${batch}] u32, got ${shapeStr(previous.kept.shape)}`,
      );
    }
  }
  if (next) {
    tokens = tokensOf(next.x);
    const info = checkInputs("selectiveScanVerify", next.x, next.delta, A, next.B, next.C, D, batch * tokens);
    if (previous && info.groupsB !== groupsB) {
      throw new Error(
        `selectiveScanVerify: B groups differ between previous (${groupsB}) and next (${info.groupsB})`,
      );
    }
    groupsB = info.groupsB;
    groupsC = info.groupsC;
  }
  if (A.dtype !== D.dtype) throw new Error(`selectiveScanVerify: A ${A.dtype} and D ${D.dtype} differ`);
  const k = scanVerify(A.dtype, { batch, tokens, cached: cachedSteps, channels, states, groupsB, groupsC });
  const bind: BufferSlice[] = [A.binding, D.binding, state.binding];
  if (previous) {
    const pc = previous.cache;
    bind.push(pc.x.binding, pc.delta.binding, pc.B.binding, previous.kept.binding);
  }
  let y: Tensor | null = null;
  if (next) {
    y = rt.empty(next.x.shape, next.x.dtype);
    bind.push(next.x.binding, next.delta.binding, next.B.binding, next.C.binding, y.binding);
  }
  if (!previous && !next) return null;
  rt.dev.dispatch(k.spec, bind, k.workgroups, k.uniforms);
  return y;
}
