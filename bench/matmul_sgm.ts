/**
 * The f16 matmul on the GPU's matrix units (`kernels/matmul_subgroup_matrix.ts`, Dawn's subgroup matrices):
 * correctness of every swept config first, then TFLOP/s at 4096^3 and 8192^3, then the best figure against
 * PyTorch's bf16 at 8192^3 (`bench/pytorch/kernels.py` prints it; 778.3 TFLOP/s on the H200). One JSON row per
 * check or measurement on stdout (and appended to `--out`).
 *
 *   deno run -A bench/matmul_sgm.ts --gpu dawn [--out sgm.jsonl] [--budget-s 420] [--compare-robustness]
 *     [--sizes 4096,8192] [--configs NAME,NAME] [--extra JSON] [--no-checks] [--torch-tflops 778.3] [--quick]
 *
 * `--extra '[{"sgN": 4}, {"ablate": "stage"}]'` adds configs given as changes to SGM_LARGE (experiments; the
 * `ablate` ones time the kernel without its staging or its multiplies and give wrong results on purpose).
 *
 * Phases:
 * 1. device: adapter, features, the subgroup-matrix configs (their fields), subgroup sizes, whether the op would
 *    use the kernel (`sgmSupported`), the Dawn toggles in effect.
 * 2. checks (f16 inputs drawn uniform in [-1, 1) and rounded to f16; f32 accumulation), per config: 256^3 and
 *    512x384x640 against a float64 CPU reference, all four transpose layouts and a ragged 200x136x72 (partial
 *    blocks, alpha, C += ...) for the op's configs, and 2048^3 against the register-tiled f32 kernel on the same
 *    values plus 32 float64 dot products. The error is normwise, max |C - ref| / max |ref|; tolerance 1e-4 for an
 *    f32 C (f32 accumulation of up to 2048 terms) and 2e-3 for an f16 C (its rounding, 2^-11 relative). The
 *    register-tiled f16 kernel runs the same checks as a control of the harness. A config that fails to compile
 *    or to check is logged with the error and left out of the timing.
 * 3. timing, per config and size, C = A B^T (the `linear` layout) with an f16 C like PyTorch's bf16 matmul:
 *    inputs hashed on the GPU; a warm-up, then the GPU time of `iters` back-to-back dispatches inside one compute
 *    pass between timestamps (median of 3 passes; `iters` sized to about 0.4 s, at least 1) and the wall time of
 *    the same dispatches through the normal recorder; 16 outputs spot-checked against float64 dot products.
 *    The best config at the largest size is also timed with an f32 C, in the A B and A^T B layouts (backward
 *    passes), and the register-tiled f16 kernel beside it.
 * 4. summary: the best TFLOP/s per size and its ratio to PyTorch (the target: 35%).
 *
 * `--compare-robustness` then reruns the timing of the 4 best configs at the largest size in a child process with
 * Dawn's `disable_robustness` toggle (`DISTILLERY_DAWN_TOGGLES`), to show what Dawn's bounds checks on every
 * shared-memory and fragment access cost. Every phase watches `--budget-s` (default 420 s; 270 s with the child,
 * which gets 120 s): what does not fit is logged as skipped, so the run ends in time however slow the kernels are.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { DAWN_TOGGLES_ENV_VAR, parseProviderPreference } from "../runtime/provider.ts";
import type { Tensor } from "../runtime/tensor.ts";
import type { Launch } from "../kernels/fill.ts";
import {
  MATMUL_LARGE,
  MATMUL_SWEEP,
  type MatmulConfig,
  matmulConfigName,
  matmulKernel,
} from "../kernels/matmul.ts";
import {
  SGM_LARGE,
  SGM_SMALL,
  SGM_SWEEP,
  type SgmConfig,
  sgmConfigName,
  sgmExact,
  sgmLaunch,
  type SgmLayout,
  sgmSupported,
  validateSgmConfig,
} from "../kernels/matmul_subgroup_matrix.ts";
import { Rng } from "../util/rng.ts";
import { flag } from "./harness.ts";
import { hashed, hashValue } from "./kernels.ts";

/** PyTorch bf16 C = A B^T at 8192^3 on the H200 (bench/pytorch/kernels.py), TFLOP/s. */
export const TORCH_BF16_8192_TFLOPS = 778.3;

/** A kernel under test: the subgroup-matrix kernel with a config, or the register-tiled f16 kernel (control). */
export interface Candidate {
  /** Name in the rows. */
  name: string;
  /** The subgroup-matrix config (absent for the register-tiled control). */
  sgm?: SgmConfig;
  /** The register-tiled config of the control. */
  plain?: MatmulConfig;
}

/** Options of {@linkcode benchSgm}. */
export interface SgmBenchOptions {
  /** Timed sizes (cubes). */
  sizes: number[];
  /** Candidates (sweep configs plus the control). */
  candidates: Candidate[];
  /** Run the correctness phase. */
  checks: boolean;
  /** Seconds the whole run may take. */
  budgetS: number;
  /** PyTorch's bf16 TFLOP/s at 8192^3, for the summary's ratio. */
  torchTflops: number;
  /** Small sizes only (CPU adapters). */
  quick: boolean;
}

type Log = (row: Record<string, unknown>) => void;

interface Shape {
  m: number;
  n: number;
  k: number;
}

const layoutName = (L: { transA: boolean; transB: boolean }) =>
  `${L.transA ? "A^T" : "A"} ${L.transB ? "B^T" : "B"}`;

/** The launch of a candidate for a product (throws when the candidate cannot take it). */
function launchOf(cand: Candidate, s: Shape, L: SgmLayout, alpha = 1): Launch {
  const shape = { ...s, batch: 1, strideA: 0, strideB: 0, strideC: 0, alpha };
  if (cand.sgm) return sgmLaunch(shape, L, cand.sgm);
  if (L.out !== "f16") throw new Error("the register-tiled f16 kernel writes an f16 C");
  return matmulKernel(
    shape,
    { dtype: "f16", transA: L.transA, transB: L.transB, accumulate: L.accumulate },
    cand.plain,
  );
}

/** Whether a candidate can take a shape at all (fragment staging needs whole blocks). */
function takes(cand: Candidate, s: Shape): boolean {
  return !cand.sgm || cand.sgm.stage === "threads" || sgmExact(cand.sgm, s.m, s.n, s.k);
}

/** Compiles a launch's kernel; returns the compiler's error message (or null) and the time it took. */
async function compile(rt: Runtime, l: Launch): Promise<{ error: string | null; ms: number }> {
  const t0 = performance.now();
  try {
    rt.dev.kernel(l.spec);
    await rt.dev.checkErrors();
    return { error: null, ms: performance.now() - t0 };
  } catch (e) {
    return { error: e instanceof Error ? e.message : String(e), ms: performance.now() - t0 };
  }
}

/** float64 `alpha op(A) op(B)` (+ C0), row-major, for the checks. */
function refMatmul(
  a: Float64Array,
  b: Float64Array,
  s: Shape,
  L: SgmLayout,
  alpha: number,
  c0?: Float64Array,
): Float64Array {
  const { m, n, k } = s;
  const out = new Float64Array(m * n);
  const bt = new Float64Array(n * k); // B as [N, K] for a contiguous inner loop
  for (let p = 0; p < k; p++) {
    for (let j = 0; j < n; j++) {
      bt[j * k + p] = L.transB ? b[j * k + p] : b[p * n + j];
    }
  }
  const row = new Float64Array(k);
  for (let i = 0; i < m; i++) {
    for (let p = 0; p < k; p++) row[p] = L.transA ? a[p * m + i] : a[i * k + p];
    for (let j = 0; j < n; j++) {
      let acc = 0;
      for (let p = 0; p < k; p++) acc += row[p] * bt[j * k + p];
      out[i * n + j] = alpha * acc + (c0 ? c0[i * n + j] : 0);
    }
  }
  return out;
}

/** f16-representable values uniform in [-1, 1). */
function f16Values(rng: Rng, n: number): Float64Array {
  const h = new Float16Array(n);
  for (let i = 0; i < n; i++) h[i] = 2 * rng.uniform() - 1;
  return Float64Array.from(h);
}

/** Normwise relative error max |got - ref| / max |ref| (NaN anywhere gives Infinity). */
export function normwiseError(got: ArrayLike<number>, ref: ArrayLike<number>): number {
  let diff = 0, scale = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(got[i] - ref[i]);
    if (!(d <= diff)) diff = Number.isNaN(d) ? Infinity : d;
    scale = Math.max(scale, Math.abs(ref[i]));
  }
  return diff / Math.max(scale, 1e-30);
}

/** Tolerance of the normwise error for a C type (see the module comment). */
export function tolerance(out: "f32" | "f16"): number {
  return out === "f16" ? 2e-3 : 1e-4;
}

// ---- phase 2: checks ---------------------------------------------------------------------------------------------

interface CheckCase {
  name: string;
  s: Shape;
  L: SgmLayout;
  alpha: number;
  /** Which candidates run it: every one, or only the op's configs. */
  who: "all" | "op";
}

const LAYOUTS = [[false, true], [false, false], [true, false], [true, true]] as const;

function checkCases(quick: boolean): CheckCase[] {
  const cases: CheckCase[] = [];
  const nt = (out: "f32" | "f16", accumulate = false): SgmLayout => ({
    transA: false,
    transB: true,
    out,
    accumulate,
  });
  cases.push({ name: "256^3", s: { m: 256, n: 256, k: 256 }, L: nt("f16"), alpha: 1, who: "all" });
  if (!quick) {
    cases.push({ name: "512x384x640", s: { m: 512, n: 384, k: 640 }, L: nt("f32"), alpha: 1, who: "all" });
  }
  for (const [transA, transB] of LAYOUTS) {
    const s = quick ? { m: 128, n: 128, k: 64 } : { m: 512, n: 384, k: 640 };
    cases.push({
      name: `${s.m}x${s.n}x${s.k} ${layoutName({ transA, transB })} C+=0.5AB`,
      s,
      L: { transA, transB, out: "f16", accumulate: true },
      alpha: 0.5,
      who: "op",
    });
    cases.push({
      name: `200x136x72 ${layoutName({ transA, transB })} ragged`,
      s: { m: 200, n: 136, k: 72 },
      L: { transA, transB, out: "f16", accumulate: false },
      alpha: -1.5,
      who: "op",
    });
  }
  return cases;
}

async function runChecks(
  rt: Runtime,
  log: Log,
  cands: Candidate[],
  opts: SgmBenchOptions,
  deadline: number,
): Promise<Set<string>> {
  const failed = new Set<string>();
  const rng = new Rng("bench-sgm-checks");
  const opNames = new Set([SGM_LARGE, SGM_SMALL].map(sgmConfigName));
  for (const cc of checkCases(opts.quick)) {
    const { s, L } = cc;
    const aShape = L.transA ? [s.k, s.m] : [s.m, s.k], bShape = L.transB ? [s.n, s.k] : [s.k, s.n];
    const a = f16Values(rng, s.m * s.k), b = f16Values(rng, s.k * s.n);
    const c0 = L.accumulate ? f16Values(rng, s.m * s.n) : undefined;
    const ref = refMatmul(a, b, s, L, cc.alpha, c0);
    for (const cand of cands) {
      const isOp = !cand.sgm || opNames.has(cand.name);
      if (failed.has(cand.name) || (cc.who === "op" && !isOp) || !takes(cand, s)) continue;
      if (L.out === "f32" && !cand.sgm) continue;
      if (performance.now() > deadline) {
        log({ phase: "check", config: cand.name, case: cc.name, skipped: "time budget" });
        continue;
      }
      const row: Record<string, unknown> = { phase: "check", config: cand.name, case: cc.name, out: L.out };
      try {
        const l = launchOf(cand, s, L, cc.alpha);
        const c = await compile(rt, l);
        if (c.error) throw new Error(`compile: ${c.error}`);
        row.compile_ms = Math.round(c.ms);
        const got = await rt.scope(async () => {
          const ta = rt.tensor(a, aShape, "f16"), tb = rt.tensor(b, bShape, "f16");
          const tc = c0 ? rt.tensor(c0, [s.m, s.n], L.out) : rt.empty([s.m, s.n], L.out);
          rt.dev.dispatch(l.spec, [ta.binding, tb.binding, tc.binding], l.workgroups, l.uniforms);
          return await tc.read();
        });
        const err = normwiseError(got, ref);
        Object.assign(row, {
          max_rel_err: +err.toExponential(2),
          tol: tolerance(L.out),
          ok: err <= tolerance(L.out),
        });
      } catch (e) {
        Object.assign(row, { ok: false, error: String(e instanceof Error ? e.message : e).slice(0, 2000) });
      }
      if (!row.ok) failed.add(cand.name);
      log(row);
    }
  }
  if (!opts.quick) await check2048(rt, log, cands, failed, deadline);
  return failed;
}

/** 2048^3 A B^T with an f32 C against the register-tiled f32 kernel on the same values, plus float64 dots. */
async function check2048(rt: Runtime, log: Log, cands: Candidate[], failed: Set<string>, deadline: number) {
  const s = { m: 2048, n: 2048, k: 2048 };
  const L: SgmLayout = { transA: false, transB: true, out: "f32", accumulate: false };
  const rng = new Rng("bench-sgm-2048");
  const a = f16Values(rng, s.m * s.k), b = f16Values(rng, s.n * s.k);
  await rt.scope(async () => {
    const a16 = rt.tensor(a, [s.m, s.k], "f16"), b16 = rt.tensor(b, [s.n, s.k], "f16");
    const a32 = rt.tensor(a, [s.m, s.k], "f32"), b32 = rt.tensor(b, [s.n, s.k], "f32");
    const plain = rt.empty([s.m, s.n], "f32");
    const pl = matmulKernel(
      { ...s, batch: 1, strideA: 0, strideB: 0, strideC: 0 },
      { dtype: "f32", transA: false, transB: true, accumulate: false },
      MATMUL_LARGE,
    );
    rt.dev.dispatch(pl.spec, [a32.binding, b32.binding, plain.binding], pl.workgroups, pl.uniforms);
    const ref = await plain.read();
    const points = Array.from({ length: 32 }, () => [rng.int(s.m), rng.int(s.n)]);
    const dots = points.map(([i, j]) => {
      let acc = 0;
      for (let p = 0; p < s.k; p++) acc += a[i * s.k + p] * b[j * s.k + p];
      return acc;
    });
    log({
      phase: "check",
      config: `register-tiled f32 ${matmulConfigName(MATMUL_LARGE)}`,
      case: "2048^3 A B^T vs float64 dots",
      max_rel_err: +normwiseError(points.map(([i, j]) => ref[i * s.n + j]), dots).toExponential(2),
    });
    for (const cand of cands) {
      if (!cand.sgm || failed.has(cand.name) || !takes(cand, s)) continue;
      if (performance.now() > deadline) {
        log({ phase: "check", config: cand.name, case: "2048^3", skipped: "time budget" });
        continue;
      }
      const row: Record<string, unknown> = {
        phase: "check",
        config: cand.name,
        case: "2048^3 A B^T vs f32 kernel",
      };
      try {
        const l = launchOf(cand, s, L);
        const c = await compile(rt, l);
        if (c.error) throw new Error(`compile: ${c.error}`);
        const got = await rt.scope(async () => {
          const tc = rt.empty([s.m, s.n], "f32");
          rt.dev.dispatch(l.spec, [a16.binding, b16.binding, tc.binding], l.workgroups, l.uniforms);
          return await tc.read();
        });
        const err = normwiseError(got, ref);
        const dotErr = normwiseError(points.map(([i, j]) => got[i * s.n + j]), dots);
        const ok = err <= tolerance("f32") && dotErr <= tolerance("f32");
        Object.assign(row, {
          max_rel_err: +err.toExponential(2),
          dots_max_rel_err: +dotErr.toExponential(2),
          tol: tolerance("f32"),
          ok,
        });
      } catch (e) {
        Object.assign(row, { ok: false, error: String(e instanceof Error ? e.message : e).slice(0, 2000) });
      }
      if (!row.ok) failed.add(cand.name);
      log(row);
    }
  });
}

// ---- phase 3: timing -----------------------------------------------------------------------------------------------

interface Timing {
  /** GPU-timestamp ms per dispatch (median of 3 passes), when the adapter has timestamps. */
  gpuMs?: number;
  /** Wall ms per dispatch through the normal recorder, including one final sync. */
  wallMs: number;
  /** Dispatches per timed pass. */
  iters: number;
}

async function time(rt: Runtime, l: Launch, bufs: Tensor[], deadline: number): Promise<Timing> {
  const slices = bufs.map((t) => t.binding);
  const run = async (n: number) => {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) rt.dev.dispatch(l.spec, slices, l.workgroups, l.uniforms);
    await rt.dev.sync();
    return (performance.now() - t0) / n;
  };
  await run(1); // first use: pipeline creation, clocks
  const per = await run(2);
  const iters = Math.max(1, Math.min(200, Math.floor(400 / per)));
  // warm-up of about 0.3 s (clocks ramp up after idle), unless the budget is nearly spent
  if (deadline - performance.now() > 20_000) await run(Math.max(1, Math.min(iters, Math.ceil(300 / per))));
  const wallMs = await run(iters);
  const gpu: number[] = [];
  for (let r = 0; r < 3; r++) {
    const ms = await rt.dev.timeDispatch(
      l.spec,
      bufs.map((t) => ({ buffer: t.buffer })),
      l.workgroups,
      l.uniforms,
      iters,
    );
    if (ms !== undefined) gpu.push(ms);
  }
  gpu.sort((x, y) => x - y);
  return { gpuMs: gpu.length ? gpu[Math.floor(gpu.length / 2)] : undefined, wallMs, iters };
}

/** Largest normwise error of 16 outputs against float64 dots of the hashed inputs (seeds 1 and 2). */
async function spotCheck(rt: Runtime, c: Tensor, s: Shape, L: SgmLayout): Promise<number> {
  const rng = new Rng(`spot-${s.m}-${s.n}-${s.k}`);
  const points = [
    [0, 0],
    [s.m - 1, s.n - 1],
    ...Array.from({ length: 14 }, () => [rng.int(s.m), rng.int(s.n)]),
  ];
  const bytes = L.out === "f16" ? 2 : 4;
  const reads = await rt.dev.readMany(points.map(([i, j]) => {
    const off = (i * s.n + j) * bytes;
    return { buffer: c.buffer, offset: off - (off % 4), size: 4 };
  }));
  const f16 = (v: number) => new Float16Array([v])[0];
  const got = points.map(([i, j], p) => {
    const off = (i * s.n + j) * bytes;
    return L.out === "f16" ? new Float16Array(reads[p])[(off % 4) / 2] : new Float32Array(reads[p])[0];
  });
  const ref = points.map(([i, j]) => {
    let acc = 0;
    for (let p = 0; p < s.k; p++) {
      const ai = L.transA ? p * s.m + i : i * s.k + p, bi = L.transB ? j * s.k + p : p * s.n + j;
      acc += f16(hashValue(ai, 1)) * f16(hashValue(bi, 2));
    }
    return acc;
  });
  return normwiseError(got, ref);
}

async function timeOne(
  rt: Runtime,
  log: Log,
  cand: Candidate,
  size: number,
  L: SgmLayout,
  deadline: number,
  extra: Record<string, unknown> = {},
): Promise<number | undefined> {
  const s = { m: size, n: size, k: size };
  const row: Record<string, unknown> = {
    phase: "time",
    config: cand.name,
    size,
    layout: layoutName(L),
    out: L.out,
    ...extra,
  };
  if (performance.now() > deadline) {
    log({ ...row, skipped: "time budget" });
    return undefined;
  }
  let tflops: number | undefined;
  try {
    await rt.scope(async () => {
      const l = launchOf(cand, s, L);
      const c = await compile(rt, l);
      if (c.error) throw new Error(`compile: ${c.error}`);
      row.compile_ms = Math.round(c.ms);
      const a = hashed(rt, L.transA ? [s.k, s.m] : [s.m, s.k], "f16", 1);
      const b = hashed(rt, L.transB ? [s.n, s.k] : [s.k, s.n], "f16", 2);
      const out = rt.empty([s.m, s.n], L.out);
      const t = await time(rt, l, [a, b, out], deadline);
      const err = await spotCheck(rt, out, s, L);
      const flops = 2 * s.m * s.n * s.k;
      tflops = flops / ((t.gpuMs ?? t.wallMs) * 1e-3) / 1e12;
      Object.assign(row, {
        tflops: +tflops.toPrecision(4),
        wall_tflops: +(flops / (t.wallMs * 1e-3) / 1e12).toPrecision(4),
        gpu_timed: t.gpuMs !== undefined,
        ms: +(t.gpuMs ?? t.wallMs).toFixed(3),
        iters: t.iters,
        spot_max_rel_err: +err.toExponential(2),
        spot_ok: err <= tolerance(L.out) * 2.5,
      });
      if (!(err <= tolerance(L.out) * 2.5)) tflops = undefined; // a wrong kernel reports no speed
    });
  } catch (e) {
    row.error = String(e instanceof Error ? e.message : e).slice(0, 2000);
  }
  log(row);
  return tflops;
}

/** What {@linkcode benchSgm} measured: the best config per size, and every timed sweep result. */
export interface SgmBenchResult {
  /** Size -> [config, TFLOP/s] of the fastest correct config. */
  best: Map<number, [string, number]>;
  /** Every correct sweep measurement (C = A B^T, f16 C). */
  timed: { config: string; size: number; tflops: number }[];
}

/** Runs the phases (see the module comment). */
export async function benchSgm(rt: Runtime, log: Log, opts: SgmBenchOptions): Promise<SgmBenchResult> {
  const start = performance.now(), end = start + opts.budgetS * 1000;
  const info = {
    phase: "device",
    provider: rt.dev.provider,
    adapter: rt.dev.adapterName,
    features: rt.dev.features,
    subgroup_min_size: rt.dev.subgroupMinSize,
    subgroup_max_size: rt.dev.subgroupMaxSize,
    subgroup_matrix_configs: rt.dev.subgroupMatrixConfigs,
    op_uses_subgroup_matrix: sgmSupported(rt.dev),
    max_workgroup_storage: rt.dev.limits.maxComputeWorkgroupStorageSize,
    dawn_toggles: Deno.env.get(DAWN_TOGGLES_ENV_VAR) ?? "",
    date: new Date().toISOString(),
  };
  log(info);
  const best = new Map<number, [string, number]>();
  const timed: SgmBenchResult["timed"] = [];
  let cands = opts.candidates.filter((c) => {
    if (!c.sgm) return true;
    if (!rt.dev.features.subgroupMatrix || !rt.dev.features.f16) return false;
    try {
      validateSgmConfig(c.sgm, rt.dev.limits);
      return true;
    } catch (e) {
      log({ phase: "config", config: c.name, skipped: String(e instanceof Error ? e.message : e) });
      return false;
    }
  });
  if (!rt.dev.features.subgroupMatrix) {
    log({
      phase: "config",
      skipped: "the device has no chromium-experimental-subgroup-matrix (use --gpu dawn)",
    });
  }
  if (!rt.dev.features.f16) {
    log({ phase: "config", skipped: "the device has no shader-f16" });
    return { best, timed };
  }
  if (opts.checks) {
    // new tensors are NaN-filled during the checks, so an output element a kernel leaves unwritten fails
    rt.poisonNewTensors = true;
    const failed = await runChecks(rt, log, cands, opts, start + opts.budgetS * 400);
    rt.poisonNewTensors = false;
    cands = cands.filter((c) => !failed.has(c.name));
  }
  const nt = (out: "f32" | "f16"): SgmLayout => ({ transA: false, transB: true, out, accumulate: false });
  for (const size of opts.sizes) {
    for (const cand of cands) {
      // the slowest configs cost most at the largest size: leave time for the extras below
      const t = await timeOne(rt, log, cand, size, nt("f16"), end - 30_000);
      if (t !== undefined) timed.push({ config: cand.name, size, tflops: t });
      if (t !== undefined && (!best.has(size) || t > best.get(size)![1])) best.set(size, [cand.name, t]);
    }
  }
  const largest = opts.sizes[opts.sizes.length - 1];
  const top = best.get(largest);
  const topCand = cands.find((c) => c.name === top?.[0] && c.sgm);
  if (topCand) {
    for (
      const L of [nt("f32"), { ...nt("f16"), transB: false }, { ...nt("f16"), transA: true, transB: false }]
    ) {
      await timeOne(rt, log, topCand, largest, L, end, { extra: "best config, other layout/output" });
    }
  }
  for (const [size, [name, t]] of best) {
    log({
      phase: "summary",
      size,
      best_config: name,
      tflops: +t.toPrecision(4),
      ...(size === 8192
        ? { torch_bf16_tflops: opts.torchTflops, ratio: +(t / opts.torchTflops).toFixed(3), target: 0.35 }
        : {}),
    });
  }
  log({ phase: "done", seconds: +((performance.now() - start) / 1000).toFixed(1) });
  return { best, timed };
}

/** The candidates: every swept config, the op's configs, and the register-tiled f16 control. */
export function defaultCandidates(quick: boolean): Candidate[] {
  const sgm = (quick ? [SGM_LARGE, SGM_SMALL] : SGM_SWEEP).map((c) => ({ name: sgmConfigName(c), sgm: c }));
  const plain = quick ? MATMUL_LARGE : MATMUL_SWEEP.find((c) => matmulConfigName(c) === "128x256x8_8x16")!;
  return [...sgm, { name: `register-tiled f16 ${matmulConfigName(plain)}`, plain }];
}

if (import.meta.main) {
  const gpu = parseProviderPreference(flag("gpu") ?? "dawn", "--gpu");
  const quick = Deno.args.includes("--quick");
  const sizes = (flag("sizes") ?? (quick ? "256" : "4096,8192")).split(",").map(Number);
  const budgetS = Number(flag("budget-s") ?? (Deno.args.includes("--compare-robustness") ? 270 : 420));
  const only = flag("configs")?.split(",");
  let candidates = defaultCandidates(quick);
  if (only) candidates = candidates.filter((c) => only.includes(c.name));
  // --extra '[{"bk": 32, "buffers": 2}, ...]': experimental configs, each a change to SGM_LARGE
  const extra = flag("extra");
  if (extra) {
    for (const change of JSON.parse(extra) as Partial<SgmConfig>[]) {
      const sgm = { ...SGM_LARGE, ...change };
      validateSgmConfig(sgm);
      candidates.push({ name: sgmConfigName(sgm), sgm });
    }
  }
  const outPath = flag("out");
  const file = outPath ? await Deno.open(outPath, { write: true, create: true, append: true }) : null;
  const enc = new TextEncoder();
  const rt = new Runtime(await createDevice({ gpu }));
  const toggles = Deno.env.get(DAWN_TOGGLES_ENV_VAR);
  const log: Log = (row) => {
    const line = JSON.stringify({
      bench: "matmul_sgm",
      ...(toggles ? { dawn_toggles: toggles } : {}),
      ...row,
    });
    console.log(line);
    file?.writeSync(enc.encode(line + "\n"));
  };
  const result = await benchSgm(rt, log, {
    sizes,
    candidates,
    checks: !Deno.args.includes("--no-checks"),
    budgetS,
    torchTflops: Number(flag("torch-tflops") ?? TORCH_BF16_8192_TFLOPS),
    quick,
  });
  const provider = rt.dev.provider;
  if (Deno.args.includes("--compare-robustness") && provider !== "dawn") {
    log({ phase: "robustness", skipped: "disable_robustness is a Dawn toggle: run with --gpu dawn" });
  }
  file?.close();
  rt.dev.destroy();
  if (Deno.args.includes("--compare-robustness") && provider === "dawn" && !toggles) {
    // the 4 fastest configs at the largest size, again, with Dawn's bounds checks off (a child process: the
    // toggles are fixed when Dawn's instance is created)
    const largest = sizes[sizes.length - 1];
    const names = result.timed.filter((r) => r.size === largest).sort((x, y) => y.tflops - x.tflops)
      .slice(0, 4).map((r) => r.config);
    if (names.length > 0) {
      const args = [
        "run",
        "-A",
        new URL(import.meta.url).pathname,
        "--gpu",
        "dawn",
        "--no-checks",
        "--sizes",
        String(largest),
      ];
      args.push("--configs", names.join(","), "--budget-s", "120");
      if (outPath) args.push("--out", outPath);
      await new Deno.Command(Deno.execPath(), {
        args,
        env: { [DAWN_TOGGLES_ENV_VAR]: "disable_robustness" },
        stdout: "inherit",
        stderr: "inherit",
      }).output();
    }
  }
}
