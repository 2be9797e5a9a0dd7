/**
 * Shared pieces of the benchmark scripts: command-line flags, a warm-up-then-time loop, and deterministic
 * random input tensors.
 *
 * @module
 */
import type { Runtime } from "../runtime/runtime.ts";
import type { Tensor } from "../runtime/tensor.ts";

/** The value after `--name` on the command line, or `dflt`. */
export function flag(name: string): string | undefined;
/** The value after `--name` on the command line, or `dflt`. */
export function flag(name: string, dflt: string): string;
export function flag(name: string, dflt?: string): string | undefined {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : dflt;
}

/**
 * Runs `body` (one scope per run) repeatedly for at least a second after a warm-up of 1.5 s (GPU clocks ramp up
 * after idle), syncing after growing batches, and returns milliseconds per run. `quick` skips both waits.
 */
export async function timeLoop(rt: Runtime, body: () => void, opts: { quick: boolean }): Promise<number> {
  const warmMs = opts.quick ? 0 : 1500, minMs = opts.quick ? 0 : 1000;
  const batch = async (n: number) => {
    for (let i = 0; i < n; i++) rt.scope(body);
    await rt.dev.sync();
  };
  let n = 1;
  const w0 = performance.now();
  do {
    await batch(n);
    n = Math.min(n * 2, 64);
  } while (performance.now() - w0 < warmMs);
  let runs = 0;
  const t0 = performance.now();
  do {
    await batch(n);
    runs += n;
  } while (performance.now() - t0 < minMs);
  return (performance.now() - t0) / runs;
}

/** A kept f32 tensor of uniform values in [lo, hi) from a fixed linear congruential sequence. */
export function randomTensor(rt: Runtime, shape: number[], lo: number, hi: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    data[i] = lo + (hi - lo) * (s / 2 ** 32);
  }
  return rt.tensor(data, shape).keep();
}
