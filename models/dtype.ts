/**
 * Element types of stored tensors and conversion of the half-precision float formats to and from float32.
 *
 * F16 is IEEE 754 binary16; BF16 is the top 16 bits of a float32. Conversions to the narrow types round to
 * nearest, ties to even, as PyTorch's `.to(torch.float16)` / `.to(torch.bfloat16)` do, so files written here
 * hold the same bits PyTorch would write for the same float32 values.
 *
 * @module
 */

/** Tensor element types of the safetensors format (the names are the format's own). */
export type Dtype =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U64"
  | "U32"
  | "U16"
  | "U8"
  | "BOOL"
  | "F8_E4M3"
  | "F8_E5M2";

/** Bytes per element of every {@linkcode Dtype}. */
export const DTYPE_SIZE: Readonly<Record<Dtype, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
};

/** True when `s` names a {@linkcode Dtype}. */
export function isDtype(s: unknown): s is Dtype {
  return typeof s === "string" && Object.hasOwn(DTYPE_SIZE, s);
}

/** The floating-point dtypes that load as float32 (F8 formats are recognised but not converted). */
export const FLOAT_DTYPES: readonly Dtype[] = ["F64", "F32", "F16", "BF16"];

/** The integer dtypes (and BOOL) that load as int32 when their values fit. */
export const INT_DTYPES: readonly Dtype[] = ["I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"];

let f16Table: Float32Array | null = null;

/** float32 value of every binary16 bit pattern; built once (256 KiB) because table lookup beats bit math in JS. */
function halfTable(): Float32Array {
  if (f16Table) return f16Table;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) t[h] = sign * frac * 2 ** -24;
    else if (exp === 31) t[h] = frac === 0 ? sign * Infinity : NaN;
    else t[h] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  f16Table = t;
  return t;
}

/** Converts binary16 bit patterns to float32 values (exact: every half is a float). */
export function f16BitsToF32(bits: Uint16Array): Float32Array {
  const t = halfTable();
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = t[bits[i]];
  return out;
}

/** Converts bfloat16 bit patterns to float32 values (exact: a bfloat16 is a truncated float32). */
export function bf16BitsToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return out;
}

/** Rounds float32 values to bfloat16 bit patterns (nearest, ties to even; NaN stays a quiet NaN). */
export function f32ToBf16Bits(values: Float32Array): Uint16Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = u[i];
    if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) {
      out[i] = ((x >>> 16) | 0x40) & 0xffff;
      continue;
    }
    out[i] = ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

/** Rounds float32 values to binary16 bit patterns (nearest, ties to even; overflow to ±Inf, subnormals kept). */
export function f32ToF16Bits(values: Float32Array): Uint16Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = u[i];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    if (exp === 0xff) {
      out[i] = sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
      continue;
    }
    const e = exp - 127 + 15;
    if (e >= 31) {
      out[i] = sign | 0x7c00;
      continue;
    }
    if (e <= 0) {
      // Subnormal half (or zero): shift the full significand, then round to nearest even.
      if (e < -10) {
        out[i] = sign;
        continue;
      }
      mant |= 0x800000;
      const shift = 14 - e;
      const half = 1 << (shift - 1);
      const rest = mant & ((1 << shift) - 1);
      let h = mant >>> shift;
      if (rest > half || (rest === half && (h & 1))) h++;
      out[i] = sign | h;
      continue;
    }
    let h = (e << 10) | (mant >>> 13);
    const rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h++; // a carry into the exponent is the right result
    out[i] = sign | h;
  }
  return out;
}
