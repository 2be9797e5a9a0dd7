/**
 * Elementwise kernels, generated from one WGSL template per arity: a map `out[i] = f(a[i], b[i])` and, for
 * training, its backward `ga[i], gb[i] = df(a[i], b[i], g[i])`. Each op is a line in {@linkcode UNARY_OPS} or
 * {@linkcode BINARY_OPS}: its forward and backward formulas side by side. All math runs in f32, whatever the
 * storage type.
 *
 * @module
 */
import {
  type DType,
  type KernelSpec,
  type LinearBinding,
  linearKernelSpec,
  linearLanes,
  linearWorkgroups,
  Uniforms,
  wgslType,
} from "./kernel.ts";
import type { Launch } from "./fill.ts";

/** A unary op: forward in terms of `x` (and the uniform scalar `s`), backward in terms of `x`, `g` and `s`. */
export interface UnaryOp {
  /** Forward expression, f32. */
  fwd: string;
  /** Gradient with respect to x, f32 (`g` is the output gradient). */
  bwd: string;
}

/** A binary op on equal shapes: forward in terms of `a`, `b`; gradients in terms of `a`, `b`, `g`. */
export interface BinaryOp {
  /** Forward expression. */
  fwd: string;
  /** Gradient with respect to a. */
  bwdA: string;
  /** Gradient with respect to b. */
  bwdB: string;
}

/** Unary ops. `s` is a per-dispatch scalar (the factor of `scale`, unused elsewhere). */
export const UNARY_OPS = {
  scale: { fwd: "s * x", bwd: "s * g" },
  silu: { fwd: "x / (1.0 + exp(-x))", bwd: "g * silu_grad(x)" },
  sigmoid: { fwd: "sigmoid(x)", bwd: "g * sigmoid(x) * (1.0 - sigmoid(x))" },
  // softplus(x) = log(1 + e^x), evaluated without overflow; PyTorch switches to x above 20 the same way
  softplus: { fwd: "select(log(1.0 + exp(x)), x, x > 20.0)", bwd: "g * sigmoid(x)" },
  exp: { fwd: "exp(x)", bwd: "g * exp(x)" },
  neg: { fwd: "-x", bwd: "-g" },
  square: { fwd: "x * x", bwd: "2.0 * x * g" },
} as const satisfies Record<string, UnaryOp>;

/** Binary ops on equal shapes. */
export const BINARY_OPS = {
  add: { fwd: "a + b", bwdA: "g", bwdB: "g" },
  sub: { fwd: "a - b", bwdA: "g", bwdB: "-g" },
  mul: { fwd: "a * b", bwdA: "g * b", bwdB: "g * a" },
  // SwiGLU's combination: silu(gate) * up, with a = gate, b = up
  swiglu: { fwd: "a / (1.0 + exp(-a)) * b", bwdA: "g * b * silu_grad(a)", bwdB: "g * a / (1.0 + exp(-a))" },
} as const satisfies Record<string, BinaryOp>;

/** Names of the unary ops. */
export type UnaryOpName = keyof typeof UNARY_OPS;
/** Names of the binary ops. */
export type BinaryOpName = keyof typeof BINARY_OPS;

const HELPERS = `
fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }
fn silu_grad(x: f32) -> f32 { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }
`;

const FIELDS = "n: u32, s: f32, _a: u32, _b: u32";

const specs = new Map<string, KernelSpec>();

/** Whether a map of `n` elements runs four to a thread ({@linkcode linearLanes}). */
function vectorized(n: number): boolean {
  return linearLanes(n) === 4;
}

/**
 * The spec of one map: `inputs` are [buffer, name] pairs read as f32 `name`s, `outputs` [buffer, expression]
 * pairs written in the storage type; `prelude` runs first (uniform lets). Vectorized, each of the four lanes of
 * a `vec4` evaluates the same expressions in a block of its own.
 */
function mapSpec(
  key: string,
  dtype: DType,
  vec: boolean,
  inputs: readonly (readonly [string, string])[],
  outputs: readonly (readonly [string, string])[],
  prelude = "",
): KernelSpec {
  const fullKey = vec ? `${key}_v4` : key;
  let s = specs.get(fullKey);
  if (!s) {
    const T = wgslType(dtype);
    const el = vec ? `vec4<${T}>` : T;
    const buffers: LinearBinding[] = [
      ...inputs.map(([buf]) => [buf, "read", el] as LinearBinding),
      ...outputs.map(([buf]) => [buf, "rw", el] as LinearBinding),
    ];
    const lane = (at: (buf: string, name: string) => string, store: (buf: string, e: string) => string) =>
      [
        ...inputs.map(([buf, name]) => `let ${name} = f32(${at(buf, name)});`),
        ...outputs.map(([buf, e]) => store(buf, `${T}(${e})`)),
      ].join(" ");
    const body = vec
      ? [
        ...inputs.map(([buf, name]) => `let ${name}4 = ${buf}[i];`),
        ...outputs.map(([buf]) => `var ${buf}4: vec4<${T}>;`),
        ...["x", "y", "z", "w"].map((c) =>
          `{ ${lane((_, name) => `${name}4.${c}`, (buf, e) => `${buf}4.${c} = ${e};`)} }`
        ),
        ...outputs.map(([buf]) => `${buf}[i] = ${buf}4;`),
      ].join("\n  ")
      : lane((buf) => `${buf}[i]`, (buf, e) => `${buf}[i] = ${e};`);
    s = linearKernelSpec(
      fullKey,
      dtype,
      buffers,
      FIELDS,
      `if (i >= p.n) { return; }\n  ${prelude}${body}`,
      HELPERS,
    );
    specs.set(fullKey, s);
  }
  return s;
}

function launch(spec: KernelSpec, n: number, scalar = 0): Launch {
  const threads = n / linearLanes(n);
  return {
    spec,
    uniforms: new Uniforms(16).u32(threads).f32(scalar).buffer,
    workgroups: linearWorkgroups(threads),
  };
}

/** Forward of a unary op. Bindings: x (read), out (rw). */
export function unaryForward(op: UnaryOpName, dtype: DType, n: number, scalar = 0): Launch {
  const spec = mapSpec(`unary_${op}_${dtype}`, dtype, vectorized(n), [["xs", "x"]], [[
    "out",
    UNARY_OPS[op].fwd,
  ]], "let s = p.s;\n  ");
  return launch(spec, n, scalar);
}

/** Backward of a unary op. Bindings: x (read), g (read), gx (rw). */
export function unaryBackward(op: UnaryOpName, dtype: DType, n: number, scalar = 0): Launch {
  const spec = mapSpec(`unary_${op}_bwd_${dtype}`, dtype, vectorized(n), [["xs", "x"], ["gs", "g"]], [[
    "gx",
    UNARY_OPS[op].bwd,
  ]], "let s = p.s;\n  ");
  return launch(spec, n, scalar);
}

/** Forward of a binary op on equal shapes. Bindings: a, b (read), out (rw). */
export function binaryForward(op: BinaryOpName, dtype: DType, n: number): Launch {
  const spec = mapSpec(`binary_${op}_${dtype}`, dtype, vectorized(n), [["as_", "a"], ["bs", "b"]], [[
    "out",
    BINARY_OPS[op].fwd,
  ]]);
  return launch(spec, n);
}

/** Backward of a binary op. Bindings: a, b, g (read), ga (rw), gb (rw). */
export function binaryBackward(op: BinaryOpName, dtype: DType, n: number): Launch {
  const spec = mapSpec(
    `binary_${op}_bwd_${dtype}`,
    dtype,
    vectorized(n),
    [["as_", "a"], ["bs", "b"], ["gs", "g"]],
    [["ga", BINARY_OPS[op].bwdA], ["gb", BINARY_OPS[op].bwdB]],
  );
  return launch(spec, n);
}
