/**
 * Test helpers for GPU code: a shared runtime that poisons new tensors, float64 comparisons with stated
 * tolerances, random inputs, and float64 finite differences for checking backward kernels.
 *
 * @module
 */
import { Runtime } from "../../runtime/runtime.ts";
import { createDevice } from "../../runtime/device.ts";
import { parseProviderPreference } from "../../runtime/provider.ts";
import { Rng } from "../../util/rng.ts";

let rtPromise: Promise<Runtime> | null = null;

/**
 * The test runtime: the provider from `DISTILLERY_GPU` (default: Deno's built-in WebGPU, the CI adapter), with
 * new tensors poisoned so unwritten outputs fail.
 */
export function testRuntime(): Promise<Runtime> {
  rtPromise ??= (async () => {
    const gpu = parseProviderPreference(Deno.env.get("DISTILLERY_GPU") ?? "builtin", "DISTILLERY_GPU");
    const rt = new Runtime(await createDevice({ gpu, announce: false }));
    rt.poisonNewTensors = true;
    return rt;
  })();
  return rtPromise;
}

/** Options for {@linkcode Deno.test} of GPU tests: the device and its pending promises outlive one test. */
export const gpuTestOptions = { sanitizeResources: false, sanitizeOps: false } as const;

/** Tolerances for comparisons: |a - e| <= atol + rtol * |e| elementwise. */
export interface Tolerance {
  /** Relative tolerance. */
  rtol: number;
  /** Absolute tolerance. */
  atol: number;
}

/** f32 kernels vs a float64 reference: about 1e-5 relative (plus a small absolute floor for values near 0). */
export const F32_TOL: Tolerance = { rtol: 1e-5, atol: 1e-6 };
/** f16 storage with f32 accumulation: about 1e-2 relative. */
export const F16_TOL: Tolerance = { rtol: 1e-2, atol: 1e-3 };

/** max|got - ref| / max|ref|, failing on any non-finite value. */
export function normwise(got: ArrayLike<number>, ref: ArrayLike<number>, what: string): number {
  if (got.length !== ref.length) throw new Error(`${what}: length ${got.length}, expected ${ref.length}`);
  let err = 0, scale = 0;
  for (let i = 0; i < got.length; i++) {
    if (!Number.isFinite(got[i])) throw new Error(`${what}[${i}] = ${got[i]}`);
    err = Math.max(err, Math.abs(got[i] - ref[i]));
    scale = Math.max(scale, Math.abs(ref[i]));
  }
  return err / scale;
}

/** Throws with the worst element when `actual` and `expected` differ beyond `tol` (NaN always fails). */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: Tolerance,
  label = "values",
): void {
  if (actual.length !== expected.length) {
    throw new Error(`${label}: length ${actual.length} != expected ${expected.length}`);
  }
  let worst = -1, worstExcess = 0, maxAbs = 0, bad = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i], e = expected[i];
    const err = Math.abs(a - e);
    if (!(err <= tol.atol + tol.rtol * Math.abs(e))) {
      bad++;
      const excess = Number.isNaN(err) ? Infinity : err / (tol.atol + tol.rtol * Math.abs(e));
      if (excess > worstExcess || worst < 0) {
        worst = i;
        worstExcess = excess;
      }
    }
    if (err > maxAbs) maxAbs = err;
  }
  if (bad > 0) {
    throw new Error(
      `${label}: ${bad}/${actual.length} elements outside rtol=${tol.rtol} atol=${tol.atol}; ` +
        `worst at ${worst}: got ${actual[worst]}, expected ${expected[worst]}; max |diff| ${maxAbs}`,
    );
  }
}

/** Largest absolute difference (NaN if any element is NaN). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (Number.isNaN(d)) return NaN;
    if (d > m) m = d;
  }
  return m;
}

/** Fresh normal random values, rounded to f32 so the GPU and the float64 reference see the same inputs. */
export function randn(rng: Rng, n: number, std = 1): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.fround(std * rng.normal());
  return out;
}

/** Fresh uniform random values in [lo, hi), rounded to f32. */
export function randu(rng: Rng, n: number, lo: number, hi: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.fround(rng.uniformRange(lo, hi));
  return out;
}

/** Values rounded to the nearest f16, so an f16 tensor and the float64 reference see the same inputs. */
export function roundF16(a: Float64Array): Float64Array {
  return Float64Array.from(new Float16Array(a));
}

/** A test Rng seeded from the test's name, so each test draws its own fresh inputs. */
export function testRng(name: string): Rng {
  return new Rng(`test:${name}`);
}

/**
 * Central finite differences of a float64 scalar function with respect to `x`, at the given indices
 * (all by default). `f` must not keep references to `x`.
 */
export function finiteDifference(
  f: () => number,
  x: Float64Array,
  indices?: number[],
  h = 1e-5,
): Float64Array {
  const idx = indices ?? Array.from(x, (_, i) => i);
  const out = new Float64Array(idx.length);
  for (let k = 0; k < idx.length; k++) {
    const i = idx[k];
    const orig = x[i];
    x[i] = orig + h;
    const fp = f();
    x[i] = orig - h;
    const fm = f();
    x[i] = orig;
    out[k] = (fp - fm) / (2 * h);
  }
  return out;
}

/** `sum(a * w)`: a scalar projection of an output, for gradient checks of non-scalar functions. */
export function dot(a: ArrayLike<number>, w: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * w[i];
  return s;
}

/** Picks `k` distinct indices in [0, n) (all of them when n <= k). */
export function sampleIndices(rng: Rng, n: number, k: number): number[] {
  if (n <= k) return Array.from({ length: n }, (_, i) => i);
  const set = new Set<number>();
  while (set.size < k) set.add(rng.int(n));
  return [...set].sort((a, b) => a - b);
}

/**
 * Runs `fn` and returns its result with the kernel keys of the dispatches it recorded, in order (the test
 * runtime's poison fills of new tensors included, as `fill_*`): for tests that pin which kernels a path takes.
 */
export async function withKernelKeys<T>(
  rt: Runtime,
  fn: () => T | Promise<T>,
): Promise<{ out: T; keys: string[] }> {
  const keys: string[] = [];
  const dev = rt.dev;
  const orig = dev.dispatch;
  dev.dispatch = function (spec, ...rest) {
    keys.push(spec.key);
    return orig.call(this, spec, ...rest);
  };
  try {
    return { out: await fn(), keys };
  } finally {
    dev.dispatch = orig;
  }
}
