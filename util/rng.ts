/**
 * A small, seedable, serialisable pseudo-random number generator (xoshiro128**).
 *
 * Every random choice Distillery makes (new parameter initialisation, data order, sampling) draws from an
 * {@linkcode Rng} so that runs are reproducible and a checkpoint can store the exact generator state.
 *
 * @module
 */

/** Mixes a 32-bit value (splitmix32 finaliser); used to expand seeds into generator state. */
function splitmix32(x: number): number {
  x = (x + 0x9e3779b9) | 0;
  let z = x;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** Hashes a string seed (FNV-1a) into 32 bits. */
function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** Serialisable generator state: four unsigned 32-bit words, plus a cached second normal deviate. */
export interface RngState {
  /** xoshiro128** state words. */
  s: [number, number, number, number];
  /** The Box-Muller spare value, or null. */
  spare: number | null;
}

/** xoshiro128** generator with helpers for uniform, normal and integer draws. */
export class Rng {
  #s = new Uint32Array(4);
  #spare: number | null = null;

  /** Seeds from a number or a string; equal seeds give equal streams. */
  constructor(seed: number | string = 0) {
    let x = typeof seed === "string" ? hashString(seed) : (seed >>> 0) ^ Math.floor(seed / 2 ** 32);
    for (let i = 0; i < 4; i++) {
      x = splitmix32(x + i);
      this.#s[i] = x;
    }
    if (this.#s.every((v) => v === 0)) this.#s[0] = 1;
  }

  /** A generator for a named sub-stream, independent of this one's position (e.g. `rng.fork("layer3")`). */
  fork(name: string): Rng {
    return new Rng(`${this.#s.join(",")}/${name}`);
  }

  /** Next unsigned 32-bit integer. */
  nextU32(): number {
    const s = this.#s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform float in [0, 1) with 53 random bits. */
  uniform(): number {
    const hi = this.nextU32() >>> 5; // 27 bits
    const lo = this.nextU32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Uniform float in [lo, hi). */
  uniformRange(lo: number, hi: number): number {
    return lo + (hi - lo) * this.uniform();
  }

  /** Standard normal deviate (Box-Muller, both values used). */
  normal(): number {
    if (this.#spare !== null) {
      const v = this.#spare;
      this.#spare = null;
      return v;
    }
    let u = 0;
    while (u === 0) u = this.uniform();
    const v = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** Uniform integer in [0, n) without modulo bias. */
  int(n: number): number {
    if (!(n > 0 && n <= 2 ** 32)) throw new RangeError(`Rng.int: n must be in (0, 2^32], got ${n}`);
    const limit = 2 ** 32 - (2 ** 32 % n);
    let x: number;
    do x = this.nextU32(); while (x >= limit);
    return x % n;
  }

  /** Fisher-Yates shuffle in place; returns the array. */
  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
  }

  /** Fills a new Float32Array with uniform values in [lo, hi). */
  uniformArray(n: number, lo = 0, hi = 1): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.uniformRange(lo, hi);
    return out;
  }

  /** Fills a new Float32Array with normal values of the given mean and standard deviation. */
  normalArray(n: number, mean = 0, std = 1): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + std * this.normal();
    return out;
  }

  /** Snapshot of the state, for checkpoints. */
  getState(): RngState {
    return { s: [this.#s[0], this.#s[1], this.#s[2], this.#s[3]], spare: this.#spare };
  }

  /** Restores a snapshot taken with {@linkcode Rng.getState}. */
  setState(state: RngState): void {
    this.#s.set(state.s);
    this.#spare = state.spare;
  }

  /** A generator restored from a snapshot. */
  static fromState(state: RngState): Rng {
    const r = new Rng(0);
    r.setState(state);
    return r;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
