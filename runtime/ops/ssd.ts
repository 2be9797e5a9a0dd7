/**
 * The Mamba2 state-space scan as a differentiable op (chunked SSD form, kernels in `kernels/ssd.ts`).
 *
 * Per batch b and head h:  a_t = exp(delta_t A_h);  S_t = a_t S_{t-1} + delta_t x_t B_t^T;  y_t = S_t C_t + D_h x_t,
 * with S_t of shape [P, N]. Grouped inputs: head h reads group floor(h / (H / Hg)) of x, B and C, so the caller
 * never repeats the key/value groups of an attention-initialised layer in memory.
 *
 * `dt` is either delta itself (positive, after softplus) or, when `dtBias` is given, the raw projection:
 * delta = softplus(dt + dtBias) is then computed inside the scan (and differentiated there), which saves the
 * mixer one elementwise pass and one [B, L, H] tensor each way.
 *
 * Decoding: {@linkcode ssdStep} advances a state [B, H, P, N] by one token in place; {@linkcode ssdVerify} is the
 * fused verification pass of speculative decoding (snapshot + accepted cached steps + K+1 new tokens in one
 * kernel), with its input cache from {@linkcode ssdVerifyCache} and per-head scalars from
 * {@linkcode ssdHeadParams}. Both read x, B and C from the packed conv output [B, T, Hx P + Hb N + Hc N].
 *
 * Precision: the kernels compute and store in f32 (the recurrence, its states and the dt/A math need it, as in the
 * official code). f16 inputs of {@linkcode ssdScan}, {@linkcode ssdStep}, {@linkcode ssdVerify} and
 * {@linkcode ssdHeadParams} are widened to f32 at the op's boundary (differentiable casts) and y is narrowed back
 * to the input's dtype; states stay f32 whatever the inputs. The one exception, opt-in ({@linkcode SSD_SGM_ENV_VAR},
 * off by default, see {@linkcode SSD_SGM_VARIANTS}): a scan whose x, B and C are f16 may run the three matrix
 * products of each row product on the device's matrix units ({@linkcode ssdRowTilings}), with f16 operands (x, B,
 * C and dy are f16 values there anyway; the states and the masked C B^T-like blocks are rounded) and f32
 * accumulation.
 *
 * @module
 */
import {
  ssdChunkCumsum,
  ssdChunkRows,
  ssdChunks,
  ssdChunkState,
  ssdDecayGrad,
  ssdGroupSum,
  ssdHeadReduce,
  type SsdOperand,
  type SsdOutputLayout,
  ssdRowsSgmApplies,
  ssdRowsSharedBytes,
  type SsdRowsTiling,
  type SsdRowsVariant,
  type SsdShape,
  ssdStateDecayGrad,
  ssdStatePass,
  ssdStatePassBackward,
  ssdWorkspaceSizes,
} from "../../kernels/ssd.ts";
import {
  ssdCacheWidth,
  ssdStepKernel,
  type SsdStepLayout,
  type SsdStepShape,
  ssdVerifyKernel,
  ssdXbcWidth,
} from "../../kernels/ssd_step.ts";
import type { Launch } from "../../kernels/fill.ts";
import type { SgmDeviceInfo } from "../../kernels/matmul_subgroup_matrix.ts";
import type { Runtime } from "../runtime.ts";
import { shapeStr, type Tensor } from "../tensor.ts";
import { readEnv } from "../../util/env.ts";
import { cast, widen } from "./cast.ts";
import { useSubgroupMatrices } from "./matmul.ts";

/** Group counts and dims of the x, B and C inputs. */
export interface SsdDims {
  /** Groups of x (divides the heads). */
  headsX: number;
  /** Groups of B (divides the heads). */
  headsB: number;
  /** Groups of C (divides the heads). */
  headsC: number;
  /** Head dim P of x and y. */
  dimP: number;
  /** State dim N of B and C. */
  dimN: number;
}

/** Common inputs of {@linkcode ssdScan}. */
interface SsdScanCommon {
  /** [B, L, H]: delta (positive), or the raw dt when `dtBias` is given. */
  dt: Tensor;
  /** [H], negative (A = -exp(A_log), computed by the caller). */
  A: Tensor;
  /** [H], the skip connection. */
  D: Tensor;
  /** [H]: when given, delta = softplus(dt + dtBias) inside the scan. */
  dtBias?: Tensor;
  /** [B, H, P, N]: the state before the first step (zero when absent). */
  initialState?: Tensor;
}

/** x, B and C as three tensors. */
export interface SsdScanSeparate extends SsdScanCommon {
  /** [B, L, Hx, P]. */
  x: Tensor;
  /** [B, L, Hb, N]. */
  B: Tensor;
  /** [B, L, Hc, N]. */
  C: Tensor;
}

/** x, B and C as column ranges [x | B | C] of one tensor, e.g. the mixer's conv output. */
export interface SsdScanPacked extends SsdScanCommon {
  /** [B, L, Hx P + Hb N + Hc N], columns ordered x, B, C. Its gradient comes back as one tensor too. */
  xBC: Tensor;
  /** Groups and dims of the three column ranges. */
  dims: SsdDims;
}

/** Inputs of {@linkcode ssdScan}. */
export type SsdScanArgs = SsdScanSeparate | SsdScanPacked;

/** Options of {@linkcode ssdScan}. */
export interface SsdScanOptions {
  /** Chunk length Q (default 64). Changes only rounding. */
  chunkSize?: number;
  /**
   * Workgroup tiling of all four row products (default: {@linkcode ssdRowTilings}). Changes only rounding
   * (`sgm`: f16 operands); forcing one is for tests and benchmarks.
   */
  rowsTiling?: SsdRowsTiling;
}

/**
 * The tiling of the row products for a device without subgroup matrices (or for the variants that do not use
 * them): `wide` (the fast path) where its workgroup memory fits, else `narrow`, which fits WebGPU's default
 * 16 KiB; throws below that, naming both sizes.
 */
export function ssdRowsTilingFor(limits: { maxComputeWorkgroupStorageSize: number }): SsdRowsTiling {
  const have = limits.maxComputeWorkgroupStorageSize;
  for (const t of ["wide", "narrow"] as const) if (ssdRowsSharedBytes(t) <= have) return t;
  throw new Error(
    `ssdScan: the row products need ${
      ssdRowsSharedBytes("narrow")
    } bytes of workgroup memory, the device allows ${have}`,
  );
}

/**
 * Environment variable for A/B runs of the matrix-unit row products: `0` keeps every variant off them; a comma
 * list of variants (`y,dx,dB,dC`) puts exactly those on them (where they apply); unset, the variants of
 * {@linkcode SSD_SGM_VARIANTS}. `DISTILLERY_SGM=0` (runtime/ops/matmul.ts) turns them off with all other
 * matrix-unit kernels.
 */
export const SSD_SGM_ENV_VAR = "DISTILLERY_SSD_SGM";

/**
 * The row-product variants that run on the matrix units by default: none. On the H200 they saved 4.5 ms of a
 * 342 ms 1B training step (9.4 against 10.5 ms each), but rounding the masked score block and the states to f16
 * tripled the error of the decay gradients (A_log 0.21 max / 0.074 rms against the f32 model, beyond the f16
 * test's 0.1 / 0.04), so they stay opt-in: `DISTILLERY_SSD_SGM=y,dx,dB,dC` (BENCHMARKS.md, ninth session).
 */
export const SSD_SGM_VARIANTS: readonly SsdRowsVariant[] = [];

/** Every row-product variant that has a matrix-unit kernel. */
export const SSD_SGM_ALL: readonly SsdRowsVariant[] = ["y", "dx", "dB", "dC"];

/** The variants {@linkcode SSD_SGM_ENV_VAR} asks for, or the defaults when it is unset. */
function sgmVariantsWanted(): readonly SsdRowsVariant[] {
  const env = readEnv(SSD_SGM_ENV_VAR);
  if (env === undefined) return SSD_SGM_VARIANTS;
  if (env.trim() === "0") return [];
  const names = env.split(",").map((v) => v.trim());
  for (const v of names) {
    if (!SSD_SGM_ALL.includes(v as SsdRowsVariant)) {
      throw new Error(`${SSD_SGM_ENV_VAR}: unknown row product '${v}' (a comma list of y, dx, dB, dC, or 0)`);
    }
  }
  return names as SsdRowsVariant[];
}

/**
 * The row-product variants of a scan with these dims that run on the device's matrix units (the `sgm` tiling):
 * those {@linkcode SSD_SGM_ENV_VAR} asks for (by default {@linkcode SSD_SGM_VARIANTS}) when the device supports
 * subgroup matrices (`useSubgroupMatrices`) and the dims and workgroup memory fit ({@linkcode ssdRowsSgmApplies});
 * none otherwise.
 */
export function ssdSgmRowVariants(
  dev: SgmDeviceInfo,
  dims: { dimP: number; dimN: number },
): SsdRowsVariant[] {
  if (!useSubgroupMatrices(dev) || !ssdRowsSgmApplies(dims, dev.limits.maxComputeWorkgroupStorageSize)) {
    return [];
  }
  const wanted = sgmVariantsWanted();
  return SSD_SGM_ALL.filter((v) => wanted.includes(v));
}

/** Outputs of {@linkcode ssdScan}. */
export interface SsdScanResult {
  /** [B, L, H, P]. */
  y: Tensor;
  /** [B, H, P, N]: the state after the last step (for decoding after a prefill). */
  finalState: Tensor;
}

/** Default chunk length. */
export const SSD_DEFAULT_CHUNK = 64;

function dispatch(rt: Runtime, l: Launch, tensors: Tensor[]): void {
  rt.dev.dispatch(l.spec, tensors.map((t) => t.binding), l.workgroups, l.uniforms);
}

function expectShape(name: string, t: Tensor, shape: number[]): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new Error(`ssdScan: ${name} has shape ${shapeStr(t.shape)}, expected ${shapeStr(shape)}`);
  }
  if (t.dtype !== "f32") throw new Error(`ssdScan: ${name} must be f32, found ${t.dtype}`);
}

interface Resolved {
  shape: SsdShape;
  /** The tiling of each row product. */
  tilings: Record<SsdRowsVariant, SsdRowsTiling>;
  dims: SsdDims;
  x: SsdOperand;
  B: SsdOperand;
  C: SsdOperand;
  xT: Tensor;
  BT: Tensor;
  CT: Tensor;
  packed: boolean;
}

function resolve(args: SsdScanArgs, opts: SsdScanOptions, f16Operands = false): Resolved {
  const chunk = opts.chunkSize ?? SSD_DEFAULT_CHUNK;
  const [batch, seqlen, heads] = args.dt.shape;
  if (args.dt.shape.length !== 3) {
    throw new Error(`ssdScan: dt must be [B, L, H], found ${shapeStr(args.dt.shape)}`);
  }
  if (!(Number.isInteger(chunk) && chunk >= 1)) {
    throw new Error(`ssdScan: chunkSize must be a positive integer`);
  }
  let dims: SsdDims, x: SsdOperand, B: SsdOperand, C: SsdOperand, xT: Tensor, BT: Tensor, CT: Tensor;
  const packed = "xBC" in args;
  if (packed) {
    dims = args.dims;
    const width = dims.headsX * dims.dimP + (dims.headsB + dims.headsC) * dims.dimN;
    expectShape("xBC", args.xBC, [batch, seqlen, width]);
    x = { offset: 0, stride: width, heads: dims.headsX, dim: dims.dimP };
    B = { offset: dims.headsX * dims.dimP, stride: width, heads: dims.headsB, dim: dims.dimN };
    C = {
      offset: dims.headsX * dims.dimP + dims.headsB * dims.dimN,
      stride: width,
      heads: dims.headsC,
      dim: dims.dimN,
    };
    xT = BT = CT = args.xBC;
  } else {
    if (args.x.shape.length !== 4 || args.B.shape.length !== 4 || args.C.shape.length !== 4) {
      throw new Error(
        `ssdScan: x, B, C must be 4-d, found ${shapeStr(args.x.shape)}, ${shapeStr(args.B.shape)}, ${
          shapeStr(args.C.shape)
        }`,
      );
    }
    dims = {
      headsX: args.x.shape[2],
      headsB: args.B.shape[2],
      headsC: args.C.shape[2],
      dimP: args.x.shape[3],
      dimN: args.B.shape[3],
    };
    expectShape("x", args.x, [batch, seqlen, dims.headsX, dims.dimP]);
    expectShape("B", args.B, [batch, seqlen, dims.headsB, dims.dimN]);
    expectShape("C", args.C, [batch, seqlen, dims.headsC, dims.dimN]);
    x = { offset: 0, stride: dims.headsX * dims.dimP, heads: dims.headsX, dim: dims.dimP };
    B = { offset: 0, stride: dims.headsB * dims.dimN, heads: dims.headsB, dim: dims.dimN };
    C = { offset: 0, stride: dims.headsC * dims.dimN, heads: dims.headsC, dim: dims.dimN };
    xT = args.x;
    BT = args.B;
    CT = args.C;
  }
  for (const [name, g] of [["x", dims.headsX], ["B", dims.headsB], ["C", dims.headsC]] as const) {
    if (!(g >= 1 && heads % g === 0)) {
      throw new Error(`ssdScan: ${name} has ${g} groups, which does not divide ${heads} heads`);
    }
  }
  expectShape("dt", args.dt, [batch, seqlen, heads]);
  expectShape("A", args.A, [heads]);
  expectShape("D", args.D, [heads]);
  if (args.dtBias) expectShape("dtBias", args.dtBias, [heads]);
  if (args.initialState) expectShape("initialState", args.initialState, [batch, heads, dims.dimP, dims.dimN]);
  return {
    shape: { batch, seqlen, heads, dimP: dims.dimP, dimN: dims.dimN, chunk },
    tilings: ssdRowTilings(args.dt.rt.dev, dims, { f16Operands, forced: opts.rowsTiling }),
    dims,
    x,
    B,
    C,
    xT,
    BT,
    CT,
    packed,
  };
}

/**
 * Each row product's tiling for a scan: the `forced` one (`SsdScanOptions.rowsTiling`), else for a scan of f16
 * x, B and C (`f16Operands`) `sgm` where {@linkcode ssdSgmRowVariants} says, else the FMA tiling of
 * {@linkcode ssdRowsTilingFor}. f32 scans stay on f32 arithmetic, as f32 matmuls and attention do.
 */
export function ssdRowTilings(
  dev: SgmDeviceInfo,
  dims: { dimP: number; dimN: number },
  opts: { f16Operands: boolean; forced?: SsdRowsTiling },
): Record<SsdRowsVariant, SsdRowsTiling> {
  const { forced } = opts;
  const sgm = forced || !opts.f16Operands ? [] : ssdSgmRowVariants(dev, dims);
  const fma = forced ?? ssdRowsTilingFor(dev.limits);
  return Object.fromEntries(SSD_SGM_ALL.map((v) => [v, sgm.includes(v) ? "sgm" : fma])) as Record<
    SsdRowsVariant,
    SsdRowsTiling
  >;
}

/**
 * The chunked SSD scan: y [B, L, H, P] and the final state [B, H, P, N] (f32 throughout). Differentiable in every
 * input (x, B, C or xBC, dt, A, D, dtBias, initialState); a gradient of the final state may flow back too.
 * Records GPU work only (no sync).
 */
export function ssdScan(args: SsdScanArgs, opts: SsdScanOptions = {}): SsdScanResult {
  if (scanTensors(args).some((t) => t.dtype === "f16")) {
    return ssdScanWidened(args, opts, ("xBC" in args ? args.xBC : args.x).dtype === "f16" ? "f16" : "f32");
  }
  return scanF32(args, opts, false);
}

/** The scan of f32 tensors; `f16Operands`: x, B and C hold f16 values (widened), so may be staged as f16. */
function scanF32(args: SsdScanArgs, opts: SsdScanOptions, f16Operands: boolean): SsdScanResult {
  const r = resolve(args, opts, f16Operands);
  const rt = args.dt.rt;
  const saved = ssdScanForward(rt, r, args);
  const { y, finalState } = saved;
  const inputs: Tensor[] = r.packed
    ? [(args as SsdScanPacked).xBC]
    : [(args as SsdScanSeparate).x, (args as SsdScanSeparate).B, (args as SsdScanSeparate).C];
  inputs.push(args.dt, args.A, args.D);
  if (args.dtBias) inputs.push(args.dtBias);
  if (args.initialState) inputs.push(args.initialState);
  if (!rt.needsGrad(...inputs)) {
    saved.csd.dispose();
    saved.states.dispose();
    return { y, finalState };
  }
  rt.record("ssdScan", inputs, [y, finalState], ([gy, gFinal]) => {
    const g = ssdScanBackward(rt, r, args, saved, gy, gFinal);
    const out: (Tensor | null)[] = r.packed ? [g.xBC!] : [g.x!, g.B!, g.C!];
    out.push(g.dt, g.A, g.D);
    if (args.dtBias) out.push(g.dtBias!);
    if (args.initialState) out.push(g.initialState!);
    return out;
  });
  return { y, finalState };
}

/** Every tensor input of a scan. */
function scanTensors(args: SsdScanArgs): Tensor[] {
  const xs = "xBC" in args ? [args.xBC] : [args.x, args.B, args.C];
  return [...xs, args.dt, args.A, args.D, args.dtBias, args.initialState].filter((t) => t !== undefined);
}

/** The f32 island of a scan with f16 inputs: widen them all, scan in f32, narrow y to the x input's dtype. */
function ssdScanWidened(args: SsdScanArgs, opts: SsdScanOptions, io: "f32" | "f16"): SsdScanResult {
  const common = {
    dt: widen(args.dt),
    A: widen(args.A),
    D: widen(args.D),
    dtBias: args.dtBias && widen(args.dtBias),
    initialState: args.initialState && widen(args.initialState),
  };
  const wide: SsdScanArgs = "xBC" in args
    ? { ...common, xBC: widen(args.xBC), dims: args.dims }
    : { ...common, x: widen(args.x), B: widen(args.B), C: widen(args.C) };
  const f16Operands = ("xBC" in args ? [args.xBC] : [args.x, args.B, args.C]).every((t) => t.dtype === "f16");
  const r = scanF32(wide, opts, f16Operands);
  return { y: cast(r.y, io), finalState: r.finalState };
}

/** Forward kernels; returns the outputs and what the backward needs. */
function ssdScanForward(rt: Runtime, r: Resolved, args: SsdScanArgs): SsdSaved & { y: Tensor } {
  const s = r.shape;
  const ws = ssdWorkspaceSizes(s);
  const nc = ssdChunks(s);
  const softplus = args.dtBias !== undefined;
  const csd = rt.empty([ws.csd]);
  const states = rt.empty([s.batch, nc, s.heads, s.dimP, s.dimN]);
  const finalState = rt.empty([s.batch, s.heads, s.dimP, s.dimN]);
  const y = rt.empty([s.batch, s.seqlen, s.heads, s.dimP]);
  const dtLayout = { offset: 0, stride: s.heads };
  dispatch(rt, ssdChunkCumsum(s, dtLayout, softplus), [args.dt, args.A, args.D, args.dtBias ?? args.A, csd]);
  dispatch(rt, ssdChunkState(s, r.x, r.B, "state"), [r.xT, r.BT, csd, states]);
  dispatch(rt, ssdStatePass(s, args.initialState !== undefined), [
    states,
    csd,
    args.initialState ?? csd,
    finalState,
  ]);
  const yLayout: SsdOutputLayout = { offset: 0, stride: s.heads * s.dimP };
  dispatch(rt, ssdChunkRows("y", s, r.C, r.B, r.x, null, yLayout, r.tilings.y), [
    r.CT,
    r.BT,
    r.xT,
    states,
    csd,
    y,
  ]);
  return { csd, states, finalState, y };
}

interface SsdSaved {
  csd: Tensor;
  states: Tensor;
  finalState: Tensor;
}

interface SsdGrads {
  x?: Tensor;
  B?: Tensor;
  C?: Tensor;
  xBC?: Tensor;
  dt: Tensor;
  A: Tensor;
  D: Tensor;
  dtBias?: Tensor;
  initialState?: Tensor;
}

function ssdScanBackward(
  rt: Runtime,
  r: Resolved,
  args: SsdScanArgs,
  saved: SsdSaved,
  gyIn: Tensor | null,
  gFinal: Tensor | null,
): SsdGrads {
  const s = r.shape;
  const ws = ssdWorkspaceSizes(s);
  const nc = ssdChunks(s);
  const softplus = args.dtBias !== undefined;
  const hasInit = args.initialState !== undefined;
  const dtLayout = { offset: 0, stride: s.heads };
  // A missing output gradient is zero; the kernels read it like any other input.
  const gy = gyIn ?? rt.zeros([s.batch, s.seqlen, s.heads, s.dimP]);
  const dyOp: SsdOperand = { offset: 0, stride: s.heads * s.dimP, heads: s.heads, dim: s.dimP };

  // local gradients of each chunk's entering state, then the reverse pass over chunks (in place -> dstates)
  const dstates = rt.empty([s.batch, nc, s.heads, s.dimP, s.dimN]);
  dispatch(rt, ssdChunkState(s, dyOp, r.C, "output"), [gy, r.CT, saved.csd, dstates]);
  const dT = rt.empty([ws.stateDecayGrads]);
  const dInit = hasInit ? rt.empty([s.batch, s.heads, s.dimP, s.dimN]) : rt.empty([1]);
  dispatch(rt, ssdStatePassBackward(s, hasInit, gFinal !== null), [
    dstates,
    gFinal ?? saved.csd,
    saved.csd,
    dInit,
  ]);
  dispatch(rt, ssdStateDecayGrad(s), [dstates, saved.states, saved.finalState, dT]);

  // x, B, C gradients: straight into their layout when each head has its own group, else per head + group sum
  const grads: SsdGrads = {} as SsdGrads;
  let gxT: Tensor, gBT: Tensor, gCT: Tensor;
  if (r.packed) {
    grads.xBC =
      gxT =
      gBT =
      gCT =
        rt.empty((args as SsdScanPacked).xBC.shape);
  } else {
    const a = args as SsdScanSeparate;
    grads.x = gxT = rt.empty(a.x.shape);
    grads.B = gBT = rt.empty(a.B.shape);
    grads.C = gCT = rt.empty(a.C.shape);
  }
  const rowParts = rt.empty([ws.rowPartials]);
  const perHead = (
    op: SsdOperand,
    target: Tensor,
  ): { t: Tensor; layout: SsdOutputLayout; finish: () => void } => {
    if (op.heads === s.heads) {
      return { t: target, layout: { offset: op.offset, stride: op.stride }, finish: () => {} };
    }
    const t = rt.empty([s.batch, s.seqlen, s.heads, op.dim]);
    return {
      t,
      layout: { offset: 0, stride: s.heads * op.dim },
      finish: () => {
        dispatch(rt, ssdGroupSum(s, op.heads, op.dim, { offset: op.offset, stride: op.stride }), [t, target]);
        t.dispose();
      },
    };
  };
  const dx = perHead(r.x, gxT);
  dispatch(rt, ssdChunkRows("dx", s, r.B, r.C, dyOp, r.x, dx.layout, r.tilings.dx), [
    r.BT,
    r.CT,
    gy,
    dstates,
    saved.csd,
    r.xT,
    dx.t,
    rowParts,
  ]);
  dx.finish();
  const dB = perHead(r.B, gBT);
  dispatch(rt, ssdChunkRows("dB", s, r.x, dyOp, r.C, r.B, dB.layout, r.tilings.dB), [
    r.xT,
    gy,
    r.CT,
    dstates,
    saved.csd,
    r.BT,
    dB.t,
    rowParts,
  ]);
  dB.finish();
  const dC = perHead(r.C, gCT);
  dispatch(rt, ssdChunkRows("dC", s, dyOp, r.x, r.B, r.C, dC.layout, r.tilings.dC), [
    gy,
    r.xT,
    r.BT,
    saved.states,
    saved.csd,
    r.CT,
    dC.t,
    rowParts,
  ]);
  dC.finish();
  dstates.dispose();

  // decay gradients (dt, A) and the per-head sums (A, D, dt_bias)
  grads.dt = rt.empty(args.dt.shape);
  const headParts = rt.empty([ws.headPartials]);
  dispatch(rt, ssdDecayGrad(s, dtLayout, softplus), [
    rowParts,
    dT,
    saved.csd,
    args.dt,
    args.dtBias ?? saved.csd,
    grads.dt,
    headParts,
  ]);
  grads.A = rt.empty([s.heads]);
  grads.D = rt.empty([s.heads]);
  const dBias = softplus ? rt.empty([s.heads]) : rt.empty([1]);
  dispatch(rt, ssdHeadReduce(s, softplus), [headParts, grads.A, grads.D, dBias]);
  if (softplus) grads.dtBias = dBias;
  else dBias.dispose();
  if (hasInit) grads.initialState = dInit;
  else dInit.dispose();
  rowParts.dispose();
  dT.dispose();
  headParts.dispose();
  if (!gyIn) gy.dispose();
  return grads;
}

/** Gradients returned by {@linkcode ssdScanVjp}, one per input (grouped inputs get grouped gradients). */
export type SsdScanGrads = SsdGrads;

/**
 * Forward and vector-Jacobian product in one call, outside the tape: the scan's outputs and the gradients of
 * `sum(y * gy) + sum(finalState * gFinal)` with respect to every input (either seed may be null = zero). For
 * custom training loops and tests that seed both outputs at once. f32 inputs only.
 */
export function ssdScanVjp(
  args: SsdScanArgs,
  gy: Tensor | null,
  gFinal: Tensor | null,
  opts: SsdScanOptions = {},
): SsdScanResult & { grads: SsdScanGrads } {
  const rt = args.dt.rt;
  const r = resolve(args, opts);
  const fwd = rt.noGrad(() => ssdScanForward(rt, r, args));
  const grads = rt.noGrad(() => ssdScanBackward(rt, r, args, fwd, gy, gFinal));
  fwd.csd.dispose();
  fwd.states.dispose();
  return { y: fwd.y, finalState: fwd.finalState, grads };
}

// ---- decoding ------------------------------------------------------------------------------------------------

/**
 * The per-head scalars of the decode kernels as one tensor [3, H]: rows A, D and dt_bias (zeros when absent).
 * Build it once per weight update; it saves the verify kernel two storage bindings.
 */
export function ssdHeadParams(A: Tensor, D: Tensor, dtBias?: Tensor): Tensor {
  const rt = A.rt;
  const H = A.size;
  if (D.size !== H || (dtBias && dtBias.size !== H)) {
    throw new Error(`ssdHeadParams: A, D and dtBias must all have ${H} elements`);
  }
  if (A.dtype === "f16" || D.dtype === "f16" || dtBias?.dtype === "f16") {
    return ssdHeadParams(widen(A), widen(D), dtBias && widen(dtBias));
  }
  for (const [name, t] of [["A", A], ["D", D], ["dtBias", dtBias]] as const) {
    if (t && t.dtype !== "f32") {
      throw new Error(`ssdHeadParams: ${name} must be f32 or f16, found ${t.dtype}`);
    }
  }
  const t = rt.empty([3, H]);
  rt.dev.copyBuffer(A.buffer, 0, t.buffer, 0, 4 * H);
  rt.dev.copyBuffer(D.buffer, 0, t.buffer, 4 * H, 4 * H);
  if (dtBias) rt.dev.copyBuffer(dtBias.buffer, 0, t.buffer, 8 * H, 4 * H);
  else rt.dev.encoder().clearBuffer(t.buffer, 8 * H, 4 * H);
  return t;
}

/** Inputs of {@linkcode ssdStep}. */
export interface SsdStepArgs {
  /** [B, H, P, N] f32, updated in place. */
  state: Tensor;
  /** The conv output [B, W] or [B, T, W] with W = Hx P + Hb N + Hc N, columns [x | B | C]. */
  xBC: Tensor;
  /** [B, H] or [B, T, H]: raw dt (delta = softplus(dt + dt_bias)), or delta when `dtIsDelta`. */
  dt: Tensor;
  /** [3, H] from {@linkcode ssdHeadParams}. */
  heads: Tensor;
  /** Groups and dims of x, B, C. */
  dims: SsdDims;
  /** dt already is delta (default false). */
  dtIsDelta?: boolean;
  /** Which token of a [B, T, ...] input to take (default 0), so a block of tokens can be stepped without copies. */
  token?: number;
}

function stepShape(state: Tensor, dims: SsdDims, fn: string): SsdStepShape {
  if (state.dtype !== "f32") throw new Error(`${fn}: state must be f32, found ${state.dtype}`);
  if (state.shape.length !== 4 || state.shape[2] !== dims.dimP || state.shape[3] !== dims.dimN) {
    throw new Error(
      `${fn}: state has shape ${shapeStr(state.shape)}, expected [B, H, ${dims.dimP}, ${dims.dimN}]`,
    );
  }
  const [batch, heads] = state.shape;
  for (const [name, g] of [["x", dims.headsX], ["B", dims.headsB], ["C", dims.headsC]] as const) {
    if (!(g >= 1 && heads % g === 0)) {
      throw new Error(`${fn}: ${name} has ${g} groups, which does not divide ${heads} heads`);
    }
  }
  return { batch, heads, ...dims };
}

function tokenLayout(
  s: SsdStepShape,
  xBC: Tensor,
  dt: Tensor,
  fn: string,
): { tokens: number; layout: SsdStepLayout } {
  const w = ssdXbcWidth(s);
  const tokens = xBC.shape.length === 3 ? xBC.shape[1] : 1;
  const xOk = xBC.size === s.batch * tokens * w && xBC.shape[0] === s.batch &&
    xBC.shape[xBC.shape.length - 1] === w;
  const dOk = dt.size === s.batch * tokens * s.heads && dt.shape[0] === s.batch;
  if (!xOk || !dOk) {
    throw new Error(
      `${fn}: xBC ${shapeStr(xBC.shape)} and dt ${
        shapeStr(dt.shape)
      } do not match [${s.batch}, ${tokens}, ${w}] and ` +
        `[${s.batch}, ${tokens}, ${s.heads}]`,
    );
  }
  return {
    tokens,
    layout: {
      xbcOffset: 0,
      xbcBatchStride: tokens * w,
      xbcTokenStride: w,
      dtOffset: 0,
      dtBatchStride: tokens * s.heads,
      dtTokenStride: s.heads,
    },
  };
}

/** Throws unless xBC and dt are f32 or f16 and heads is f32. */
function checkStepInputs(args: { xBC: Tensor; dt: Tensor; heads: Tensor }, fn: string): void {
  for (const [name, t] of [["xBC", args.xBC], ["dt", args.dt]] as const) {
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      throw new Error(`${fn}: ${name} must be f32 or f16, found ${t.dtype}`);
    }
  }
  if (args.heads.dtype !== "f32") {
    throw new Error(`${fn}: heads must be f32 (ssdHeadParams), found ${args.heads.dtype}`);
  }
}

/**
 * One decode step of the recurrence: advances `state` (f32) in place and returns y [B, H, P] in xBC's dtype.
 * Inference only.
 */
export function ssdStep(args: SsdStepArgs): Tensor {
  const s = stepShape(args.state, args.dims, "ssdStep");
  const rt = args.state.rt;
  const io = args.xBC.dtype as "f32" | "f16";
  checkStepInputs(args, "ssdStep"); // the kernel reads f16 as it is
  if (args.dt.dtype !== io) {
    throw new Error(`ssdStep: dt (${args.dt.dtype}) must have xBC's dtype (${io})`);
  }
  const { xBC, dt } = args;
  const { tokens, layout } = tokenLayout(s, args.xBC, args.dt, "ssdStep");
  const j = args.token ?? 0;
  if (!(Number.isInteger(j) && j >= 0 && j < tokens)) {
    throw new Error(`ssdStep: token ${j} outside [0, ${tokens})`);
  }
  const l: SsdStepLayout = {
    ...layout,
    xbcOffset: j * layout.xbcTokenStride,
    dtOffset: j * layout.dtTokenStride,
  };
  const y = rt.empty([s.batch, s.heads, s.dimP], io);
  const k = ssdStepKernel(s, l, !args.dtIsDelta, io);
  rt.dev.dispatch(
    k.spec,
    [args.state.binding, xBC.binding, dt.binding, args.heads.binding, y.binding],
    k.workgroups,
    k.uniforms,
  );
  return y;
}

/** Inputs of {@linkcode ssdVerify}. */
export interface SsdVerifyArgs {
  /** [B, H, P, N]: the snapshot; replaced by the new snapshot (after the accepted cached steps). */
  state: Tensor;
  /** [2, B, Kc, Wc] from {@linkcode ssdVerifyCache}. */
  cache: Tensor;
  /** Which half of the cache holds the cached steps; the new steps go to the other half. */
  parity: 0 | 1;
  /** [B] u32: how many cached steps to re-apply per batch row (0..Kc; more is clamped to Kc). */
  accepted: Tensor;
  /** [B, K+1, W]: the conv output of the new tokens. */
  xBC: Tensor;
  /** [B, K+1, H]: their raw dt (or delta when `dtIsDelta`). */
  dt: Tensor;
  /** [3, H] from {@linkcode ssdHeadParams}. */
  heads: Tensor;
  /** Groups and dims of x, B, C. */
  dims: SsdDims;
  /** dt already is delta (default false). */
  dtIsDelta?: boolean;
}

/** A zeroed verification cache [2, B, Kc, Wc] for up to `cacheSteps` steps (K + 1) per call. */
export function ssdVerifyCache(
  rt: Runtime,
  batch: number,
  heads: number,
  cacheSteps: number,
  dims: SsdDims,
): Tensor {
  return rt.zeros([2, batch, cacheSteps, ssdCacheWidth({ batch, heads, ...dims })]);
}

/**
 * The fused speculative-verification step of a Mamba2 layer: from the snapshot, re-apply `accepted[b]` cached
 * steps, store the new snapshot in `state`, then run the K+1 new tokens (caching their x, B and delta in the other
 * half of `cache`) and return their outputs y [B, K+1, H, P]. Equal to K+1 {@linkcode ssdStep} calls after
 * `accepted` re-applied ones, without writing intermediate states (y in xBC's dtype, state and cache f32). Flip `parity` after each call; after a verify
 * that accepted i drafts, the next call's `accepted` is i + 1 (the tokens whose states are kept).
 */
export function ssdVerify(args: SsdVerifyArgs): Tensor {
  const s = stepShape(args.state, args.dims, "ssdVerify");
  const rt = args.state.rt;
  const io = args.xBC.dtype as "f32" | "f16";
  checkStepInputs(args, "ssdVerify"); // the kernel reads f16 as it is
  if (args.dt.dtype !== io) {
    throw new Error(`ssdVerify: dt (${args.dt.dtype}) must have xBC's dtype (${io})`);
  }
  const { xBC, dt } = args;
  const { tokens, layout } = tokenLayout(s, args.xBC, args.dt, "ssdVerify");
  const wc = ssdCacheWidth(s);
  const c = args.cache;
  if (c.dtype !== "f32") throw new Error(`ssdVerify: cache must be f32, found ${c.dtype}`);
  if (c.shape.length !== 4 || c.shape[0] !== 2 || c.shape[1] !== s.batch || c.shape[3] !== wc) {
    throw new Error(`ssdVerify: cache has shape ${shapeStr(c.shape)}, expected [2, ${s.batch}, Kc, ${wc}]`);
  }
  if (args.accepted.dtype !== "u32" || args.accepted.size !== s.batch) {
    throw new Error(
      `ssdVerify: accepted must be u32 [${s.batch}], found ${args.accepted.dtype} ${
        shapeStr(args.accepted.shape)
      }`,
    );
  }
  const y = rt.empty([s.batch, tokens, s.heads, s.dimP], io);
  const k = ssdVerifyKernel(s, layout, !args.dtIsDelta, tokens, c.shape[2], args.parity, io);
  rt.dev.dispatch(
    k.spec,
    [
      args.state.binding,
      c.binding,
      args.accepted.binding,
      xBC.binding,
      dt.binding,
      args.heads.binding,
      y.binding,
    ],
    k.workgroups,
    k.uniforms,
  );
  return y;
}
