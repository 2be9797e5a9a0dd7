/**
 * Paces Dawn's event polling under Deno, so that waiting on the GPU stops flooding Deno's finalizer list.
 *
 * While a Dawn promise is pending (a buffer map, `onSubmittedWorkDone`, an error scope), Dawn's Node binding
 * polls for its completion from `setImmediate`. Every poll creates a fresh native function, and each one
 * carries a Node-API finalizer. Polls come about once a microsecond, so a 400 ms wait leaves some 400,000
 * finalizers behind. Deno keeps them in one array and removes each collected entry by a linear search and
 * shift (`RefTracker::remove` in Deno's `ext/napi`, Deno 2.9). Collecting a long wait's polls therefore holds
 * the main thread for seconds, while the GPU idles.
 *
 * On an H200 (BENCHMARKS.md, "Where the wall time went") 60-77% of the main thread's samples were in that
 * removal loop, in every workload: a 2048-token f16 forward pass took 1.4 s of wall time for 64 ms of GPU
 * work, and a 2,000-step training run stood still for 23 s once. With the pacing below the same forward takes
 * 74 ms, the run 24 s instead of 50-97 s, and the loop's share of samples is 0-4%.
 *
 * The fix replaces `globalThis.setImmediate` with a version that lets JavaScript callbacks through untouched.
 * A native callback (Dawn's poll) runs at full rate for the first 100 µs of a polling streak. After that it
 * waits, synchronously, 5% of the time polled so far, up to 1 ms, before being queued. A wait of T then makes
 * O(log T) polls instead of T/1 µs, and adds at most 5% or 1 ms to it.
 *
 * @module
 */

/** Polls at full rate for this long into a streak (ms). */
const FREE_MS = 0.1;
/** After that, sleep this fraction of the streak's age before each poll... */
const SLEEP_FRACTION = 0.05;
/** ...but never longer than this (ms). */
const MAX_SLEEP_MS = 1;
/** A native poll more than this long after the previous one starts a new streak (ms). */
const STREAK_GAP_MS = 5;

type SetImmediate = (callback: (...args: unknown[]) => void, ...args: unknown[]) => unknown;

/** Counters of the pacing, for benchmarks and tests. */
export interface DawnSpinStats {
  /** Native polls seen. */
  polls: number;
  /** Polls that slept before being queued. */
  paced: number;
  /** Milliseconds slept in total. */
  sleptMs: number;
}

/** The counters since {@linkcode installDawnSpinPacing} ran (zeros before). */
export const dawnSpinStats: DawnSpinStats = { polls: 0, paced: 0, sleptMs: 0 };

let installed = false;
const sleeper = new Int32Array(new SharedArrayBuffer(4));

function isNative(fn: unknown): boolean {
  return typeof fn === "function" && Function.prototype.toString.call(fn).endsWith("{ [native code] }");
}

/**
 * Installs the pacing `setImmediate` once per process (later calls do nothing). Returns false outside Deno
 * (Node's finalizer list is a linked list: nothing to pace) or where there is no `setImmediate` to wrap.
 */
export function installDawnSpinPacing(): boolean {
  if (installed) return true;
  if (typeof (globalThis as { Deno?: unknown }).Deno === "undefined") return false;
  const g = globalThis as unknown as { setImmediate?: SetImmediate };
  const original = g.setImmediate;
  if (typeof original !== "function") return false;
  let streakStart = -Infinity, last = -Infinity;
  g.setImmediate = function pacedSetImmediate(callback, ...args) {
    if (isNative(callback)) {
      dawnSpinStats.polls++;
      let now = performance.now();
      if (now - last > STREAK_GAP_MS) streakStart = now;
      const age = now - streakStart;
      if (age > FREE_MS) {
        const ms = Math.min(MAX_SLEEP_MS, SLEEP_FRACTION * age);
        Atomics.wait(sleeper, 0, 0, ms);
        dawnSpinStats.paced++;
        dawnSpinStats.sleptMs += ms;
        now = performance.now();
      }
      last = now;
    }
    return original.call(this, callback, ...args);
  };
  installed = true;
  return true;
}
