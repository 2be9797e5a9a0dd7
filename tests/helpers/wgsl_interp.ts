/**
 * A CPU interpreter for the small subset of WGSL that the generated subgroup-matrix kernels use (the matmul of
 * `kernels/matmul_subgroup_matrix.ts`, the attention kernels of `kernels/attention_sgm.ts`), so their generated
 * source (not a re-implementation of it) can be executed in tests on machines without matrix units.
 *
 * Supported: `enable`/`diagnostic` directives (ignored), one uniform struct of u32/i32/f32 fields (bound to any
 * name), storage and workgroup arrays of u32, f16, f32 and vecN<u32>, module-scope `const`s, `var<private>`
 * scalars (one per invocation) and functions (`fn f(a: u32) -> u32`, without barriers or subgroup operations
 * inside), one `@compute` entry point with `workgroup_id`, `num_workgroups`, `local_invocation_index`,
 * `subgroup_id` and `subgroup_invocation_id`; statements `let`, `var`, assignment,
 * `for`, `if`/`else`, `return`, blocks and calls; u32/f32/f16/bool arithmetic (`+ - * / % & | ^`, comparisons)
 * with WGSL's wrapping and rounding, `&&`/`||` short-circuiting; `min`, `max`, `exp`, `log` (f32 rounding of the
 * exact value), `select`, conversions, `bitcast<vec2<f16>>`, `pack2x16float`, `unpack2x16float`, vector constructors, swizzles and
 * components by index; `workgroupBarrier`; `subgroupShuffleXor`; and the subgroup-matrix builtins with the
 * semantics of Dawn's proposal
 * (`subgroupMatrixLoad<T, row_major|col_major>(&arr, offset, stride)`, `subgroupMatrixStore`,
 * `subgroupMatrixMultiplyAccumulate` rounding each product to f32, `subgroupMatrixScalarMultiply`).
 *
 * Execution: every invocation of a workgroup runs as a coroutine. Subgroups are invocations `32 s .. 32 s + 31`.
 * An invocation stops at `workgroupBarrier` and at any statement containing `subgroupShuffleXor` (whose operands
 * it evaluates and posts first). The lanes of a subgroup are stepped together, in lane order, from one stop to the
 * next, and all must stop at the same statement: at a shuffle statement the subgroup exchanges the posted values
 * (lane i receives lane i ^ mask's; the mask must be subgroup-uniform) and runs on; at a barrier it waits until
 * every subgroup waits at that same barrier (or all have finished). Lanes that stop at different statements
 * (non-uniform control flow around a barrier or a shuffle) throw. Subgroup-matrix calls are computed once per
 * subgroup (by its first invocation) and the other invocations must make the same call with the same arguments: a
 * call whose offset, stride or operands differ across a subgroup (not subgroup-uniform) throws, as does any
 * out-of-bounds access. Workgroup memory starts as NaN and is checked for data races: between two barriers, a
 * slot one invocation wrote must not be read or written by another, nor a slot one read be written by another; a
 * subgroup-matrix call counts as its subgroup's access, distinct from its lanes' own (WGSL orders workgroup
 * memory only at barriers). This finds missing barriers that the sequential schedule would otherwise hide.
 *
 * @module
 */

// ---- tokens and syntax --------------------------------------------------------------------------------------

type Tok = { t: "num" | "id" | "op"; v: string };

function tokenize(src: string): Tok[] {
  const out: Tok[] = [];
  const re =
    /\s+|\/\/[^\n]*|(\d+\.\d+(?:e[+-]?\d+)?[fh]?|\d+[uif]?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||<=|>=|==|!=|\+\+|--|\+=|-=|\*=|->|[{}()[\]<>,;:.=+\-*/%&|^!@])/gy;
  let m: RegExpExecArray | null;
  while (re.lastIndex < src.length && (m = re.exec(src))) {
    if (m[1]) out.push({ t: "num", v: m[1] });
    else if (m[2]) out.push({ t: "id", v: m[2] });
    else if (m[3]) out.push({ t: "op", v: m[3] });
  }
  if (re.lastIndex < src.length) {
    throw new Error(`wgsl_interp: cannot tokenize at ${src.slice(re.lastIndex, re.lastIndex + 40)}`);
  }
  return out;
}

/** A type or template argument: a name with arguments, or a number. */
type TypeNode = { name: string; args: (TypeNode | number)[] };

type Expr =
  | { e: "num"; kind: Kind; v: number }
  | { e: "id"; name: string }
  | { e: "bin"; op: string; a: Expr; b: Expr }
  | { e: "un"; op: string; a: Expr }
  | { e: "call"; name: string; tmpl: (TypeNode | number)[]; args: Expr[] }
  | { e: "member"; a: Expr; name: string }
  | { e: "index"; a: Expr; i: Expr };

type Stmt =
  | { s: "let" | "var"; name: string; type?: TypeNode; init?: Expr }
  | { s: "assign"; target: Expr; op: string; value: Expr }
  | { s: "expr"; x: Expr }
  | { s: "block"; body: Stmt[] }
  | { s: "if"; cond: Expr; then: Stmt[]; else?: Stmt[] }
  | { s: "for"; init: Stmt; cond: Expr; update: Stmt; body: Stmt[] }
  | { s: "return"; x?: Expr };

const TEMPLATED = new Set([
  "subgroupMatrixLoad",
  "subgroupMatrixStore",
  "bitcast",
  "vec2",
  "vec3",
  "vec4",
  "array",
  "ptr",
  "subgroup_matrix_left",
  "subgroup_matrix_right",
  "subgroup_matrix_result",
]);

class Parser {
  i = 0;
  constructor(readonly toks: Tok[]) {}
  peek(o = 0): Tok | undefined {
    return this.toks[this.i + o];
  }
  next(): Tok {
    const t = this.toks[this.i++];
    if (!t) throw new Error("wgsl_interp: unexpected end of source");
    return t;
  }
  is(v: string, o = 0): boolean {
    return this.peek(o)?.v === v;
  }
  eat(v: string): boolean {
    if (this.is(v)) {
      this.i++;
      return true;
    }
    return false;
  }
  expect(v: string): void {
    const t = this.next();
    if (t.v !== v) throw new Error(`wgsl_interp: expected '${v}', found '${t.v}' (token ${this.i})`);
  }
  ident(): string {
    const t = this.next();
    if (t.t !== "id") throw new Error(`wgsl_interp: expected an identifier, found '${t.v}'`);
    return t.v;
  }
  skipTo(v: string): void {
    while (!this.eat(v)) this.next();
  }
  /** Skips a balanced parenthesised group starting at '('. */
  skipParens(): void {
    this.expect("(");
    let depth = 1;
    while (depth > 0) {
      const v = this.next().v;
      if (v === "(") depth++;
      else if (v === ")") depth--;
    }
  }
  templateArgs(): (TypeNode | number)[] {
    this.expect("<");
    const args: (TypeNode | number)[] = [];
    while (!this.eat(">")) {
      const t = this.peek()!;
      if (t.t === "num") {
        this.next();
        args.push(parseInt(t.v));
      } else args.push(this.type());
      this.eat(",");
    }
    return args;
  }
  type(): TypeNode {
    const name = this.ident();
    return { name, args: this.is("<") ? this.templateArgs() : [] };
  }
  expr(minPrec = 0): Expr {
    let a = this.unary();
    for (;;) {
      const op = this.peek()?.v ?? "";
      const prec = PREC[op];
      if (prec === undefined || prec < minPrec || this.peek()?.t !== "op") return a;
      this.next();
      a = { e: "bin", op, a, b: this.expr(prec + 1) };
    }
  }
  unary(): Expr {
    for (const op of ["-", "!", "&"]) if (this.eat(op)) return { e: "un", op, a: this.unary() };
    let a = this.primary();
    for (;;) {
      if (this.eat(".")) a = { e: "member", a, name: this.ident() };
      else if (this.eat("[")) {
        a = { e: "index", a, i: this.expr() };
        this.expect("]");
      } else return a;
    }
  }
  primary(): Expr {
    const t = this.next();
    if (t.t === "num") {
      const kind: Kind = t.v.endsWith("u")
        ? "u32"
        : t.v.endsWith("i")
        ? "i32"
        : t.v.endsWith("h")
        ? "f16"
        : t.v.includes(".") || t.v.endsWith("f")
        ? "f32"
        : "u32";
      return { e: "num", kind, v: parseFloat(t.v) };
    }
    if (t.v === "(") {
      const x = this.expr();
      this.expect(")");
      return x;
    }
    if (t.t !== "id") throw new Error(`wgsl_interp: unexpected '${t.v}'`);
    if (t.v === "true" || t.v === "false") return { e: "num", kind: "bool", v: t.v === "true" ? 1 : 0 };
    const tmpl = TEMPLATED.has(t.v) && this.is("<") ? this.templateArgs() : [];
    if (this.eat("(")) {
      const args: Expr[] = [];
      while (!this.eat(")")) {
        args.push(this.expr());
        this.eat(",");
      }
      return { e: "call", name: t.v, tmpl, args };
    }
    return { e: "id", name: t.v };
  }
  block(): Stmt[] {
    this.expect("{");
    const body: Stmt[] = [];
    while (!this.eat("}")) body.push(this.stmt());
    return body;
  }
  simple(): Stmt {
    if (this.is("let") || this.is("var")) {
      const s = this.next().v as "let" | "var";
      const name = this.ident();
      const type = this.eat(":") ? this.type() : undefined;
      const init = this.eat("=") ? this.expr() : undefined;
      return { s, name, type, init };
    }
    const target = this.expr();
    if (this.eat("++")) return { s: "assign", target, op: "+", value: { e: "num", kind: "u32", v: 1 } };
    for (const op of ["=", "+=", "-=", "*="]) {
      if (this.eat(op)) return { s: "assign", target, op: op === "=" ? "" : op[0], value: this.expr() };
    }
    return { s: "expr", x: target };
  }
  stmt(): Stmt {
    if (this.is("{")) return { s: "block", body: this.block() };
    if (this.eat("return")) {
      const x = this.is(";") ? undefined : this.expr();
      this.expect(";");
      return { s: "return", x };
    }
    if (this.eat("if")) {
      const cond = this.expr();
      const then = this.block();
      let els: Stmt[] | undefined;
      if (this.eat("else")) els = this.is("if") ? [this.stmt()] : this.block();
      return { s: "if", cond, then, else: els };
    }
    if (this.eat("for")) {
      this.expect("(");
      const init = this.simple();
      this.expect(";");
      const cond = this.expr();
      this.expect(";");
      const update = this.simple();
      this.expect(")");
      return { s: "for", init, cond, update, body: this.block() };
    }
    const s = this.simple();
    this.expect(";");
    return s;
  }
}

const PREC: Record<string, number> = {
  "||": 1,
  "&&": 2,
  "|": 3,
  "^": 3, // WGSL does not mix |, ^ and & without parentheses
  "&": 4,
  "==": 5,
  "!=": 5,
  "<": 6,
  ">": 6,
  "<=": 6,
  ">=": 6,
  "+": 7,
  "-": 7,
  "*": 8,
  "/": 8,
  "%": 8,
};

// ---- values -------------------------------------------------------------------------------------------------

type Kind = "u32" | "i32" | "f32" | "f16" | "bool";

interface Scalar {
  k: Kind;
  v: number;
}
interface Vec {
  k: "vec";
  el: Kind;
  v: number[];
}
interface Mat {
  k: "mat";
  id: number;
  use: "left" | "right" | "result";
  el: Kind;
  rows: number;
  cols: number;
  data: Float64Array;
}
interface Ref {
  k: "ref";
  arr: MemArray;
}
interface Struct {
  k: "struct";
  fields: Record<string, Value>;
}
type Value = Scalar | Vec | Mat | Ref | Struct;

const f16Buf = new Float16Array(1);
const u16Buf = new Uint16Array(f16Buf.buffer);
const toF16 = (x: number) => ((f16Buf[0] = x), f16Buf[0]);
const f16FromBits = (b: number) => ((u16Buf[0] = b), f16Buf[0]);
const f16Bits = (x: number) => ((f16Buf[0] = x), u16Buf[0]);

function roundTo(k: Kind, x: number): number {
  switch (k) {
    case "u32":
      return Math.trunc(x) >>> 0;
    case "i32":
      return Math.trunc(x) | 0;
    case "f32":
      return Math.fround(x);
    case "f16":
      return toF16(x);
    case "bool":
      return x ? 1 : 0;
  }
}

let matIds = 0;
function matrix(type: TypeNode): Mat {
  const use = type.name.replace("subgroup_matrix_", "") as Mat["use"];
  const el = (type.args[0] as TypeNode).name as Kind;
  const [a, b] = [type.args[1] as number, type.args[2] as number];
  // left<T, K, M> is M x K; right<T, N, K> is K x N; result<T, N, M> is M x N: rows are the second argument
  const [rows, cols] = [b, a];
  return { k: "mat", id: ++matIds, use, el, rows, cols, data: new Float64Array(rows * cols) };
}

function zeroOf(type: TypeNode): Value {
  if (type.name.startsWith("subgroup_matrix_")) return matrix(type);
  if (type.name.startsWith("vec")) {
    return {
      k: "vec",
      el: (type.args[0] as TypeNode).name as Kind,
      v: new Array(parseInt(type.name[3])).fill(0),
    };
  }
  return { k: type.name as Kind, v: 0 };
}

// ---- memory ---------------------------------------------------------------------------------------------------

/**
 * Who touches workgroup memory now, for finding data races: accesses between the same two barriers share an
 * epoch, and an access conflicts with another actor's write, a write with another actor's read, in one epoch.
 */
export class RaceCheck {
  /** Barriers passed so far. */
  epoch = 0;
  /** The accessing invocation's index, or workgroup size + subgroup id inside a subgroup-matrix call. */
  actor = 0;
  /** Checks accesses of workgroups of `size` invocations. */
  constructor(readonly size: number) {}
  /** An actor in words. */
  name(actor: number): string {
    if (actor === MANY) return "several invocations";
    return actor < this.size ? `invocation ${actor}` : `subgroup ${actor - this.size}'s matrix call`;
  }
}

/** Reader of a slot that several actors read in one epoch. */
const MANY = -1;

/** A storage or workgroup array: elements of one scalar type, or vecN<u32> over 32-bit words. */
export class MemArray {
  /** Vector width of an element (1 for scalars). */
  readonly width: number;
  /** Scalar type of the components. */
  readonly el: Kind;
  #writer?: Int32Array;
  #writeEpoch?: Int32Array;
  #reader?: Int32Array;
  #readEpoch?: Int32Array;
  /**
   * Creates an array over `data` (f16 arrays hold f16 values as numbers; vec arrays hold u32 words). `name`
   * appears in errors. With `race`, every access is checked for data races (workgroup memory).
   */
  constructor(
    readonly name: string,
    type: TypeNode,
    readonly data: Float64Array | Uint32Array,
    readonly race?: RaceCheck,
  ) {
    const elType = type.args[0] as TypeNode;
    this.width = elType.name.startsWith("vec") ? parseInt(elType.name[3]) : 1;
    this.el = (this.width > 1 ? (elType.args[0] as TypeNode).name : elType.name) as Kind;
    if (race) {
      this.#writer = new Int32Array(this.length);
      this.#reader = new Int32Array(this.length);
      this.#writeEpoch = new Int32Array(this.length).fill(-1);
      this.#readEpoch = new Int32Array(this.length).fill(-1);
    }
  }
  /** Number of elements. */
  get length(): number {
    return this.data.length / this.width;
  }
  #check(i: number): void {
    if (!(i >= 0 && i < this.length) || !Number.isInteger(i)) {
      throw new Error(`wgsl_interp: ${this.name}[${i}] out of bounds (length ${this.length})`);
    }
  }
  #raced(i: number, other: number, what: string): never {
    const r = this.race!;
    throw new Error(
      `wgsl_interp: data race on ${this.name}[${i}]: ${r.name(r.actor)} ${what} ${r.name(other)} without a ` +
        `barrier between (after barrier ${r.epoch})`,
    );
  }
  #read(i: number): void {
    const r = this.race!, writer = this.#writer!, reader = this.#reader!, readEpoch = this.#readEpoch!;
    if (this.#writeEpoch![i] === r.epoch && writer[i] !== r.actor) {
      this.#raced(i, writer[i], "reads what was written by");
    }
    if (readEpoch[i] !== r.epoch) {
      readEpoch[i] = r.epoch;
      reader[i] = r.actor;
    } else if (reader[i] !== r.actor) reader[i] = MANY;
  }
  #write(i: number): void {
    const r = this.race!, writer = this.#writer!, reader = this.#reader!, writeEpoch = this.#writeEpoch!;
    if (writeEpoch[i] === r.epoch && writer[i] !== r.actor) {
      this.#raced(i, writer[i], "overwrites what was written by");
    }
    if (this.#readEpoch![i] === r.epoch && reader[i] !== r.actor) {
      this.#raced(i, reader[i], "overwrites what was read by");
    }
    writeEpoch[i] = r.epoch;
    writer[i] = r.actor;
  }
  /** Element i as a value. */
  get(i: number): Value {
    this.#check(i);
    if (this.race) this.#read(i);
    if (this.width === 1) return { k: this.el, v: this.data[i] };
    return { k: "vec", el: this.el, v: Array.from(this.data.subarray(i * this.width, (i + 1) * this.width)) };
  }
  /** Stores a value at element i. */
  set(i: number, x: Value): void {
    this.#check(i);
    if (this.race) this.#write(i);
    if (x.k === "vec") { for (let j = 0; j < this.width; j++) this.data[i * this.width + j] = x.v[j]; }
    else if (x.k === "mat" || x.k === "ref" || x.k === "struct") throw new Error("wgsl_interp: bad store");
    else this.data[i] = roundTo(this.el, x.v);
  }
}

// ---- the program --------------------------------------------------------------------------------------------

/** A parsed compute shader, ready to run workgroups. */
export interface WgslProgram {
  /** Workgroup size (x). */
  workgroupSize: number;
  /** Storage bindings in order: name and declared type. */
  bindings: { name: string; type: TypeNode }[];
  /** Field names of the uniform struct, in order. */
  uniformFields: string[];
  /** Scalar type of each uniform field (u32, i32 or f32). */
  uniformTypes: Record<string, Kind>;
  /** Module-scope constants, in order: name and initializer. */
  consts: { name: string; init: Expr }[];
  /** Module-scope functions by name: parameter names and body (no barriers or subgroup operations inside). */
  functions: Record<string, { params: string[]; body: Stmt[] }>;
  /** Workgroup arrays: name, element type, length. */
  shared: { name: string; type: TypeNode; length: number }[];
  /** Statements of the entry point. */
  body: Stmt[];
  /** Names bound to builtins (e.g. `lid` -> `local_invocation_index`). */
  builtins: Record<string, string>;
  /** Name of the uniform struct variable (`p` unless declared otherwise). */
  uniformName: string;
  /** Module-scope `var<private>` variables: name and type (each invocation has its own). */
  privates: { name: string; type: TypeNode }[];
}

/** Parses the WGSL subset (see the module comment). */
export function parseWgsl(src: string): WgslProgram {
  const p = new Parser(tokenize(src));
  const prog: WgslProgram = {
    workgroupSize: 0,
    bindings: [],
    uniformFields: [],
    uniformTypes: {},
    consts: [],
    functions: {},
    shared: [],
    body: [],
    builtins: {},
    uniformName: "p",
    privates: [],
  };
  while (p.peek()) {
    if (p.eat("enable")) p.skipTo(";");
    else if (p.is("diagnostic")) {
      p.next();
      p.skipParens();
      p.expect(";");
    } else if (p.eat("struct")) {
      p.ident();
      p.expect("{");
      while (!p.eat("}")) {
        const field = p.ident();
        p.expect(":");
        prog.uniformFields.push(field);
        prog.uniformTypes[field] = p.type().name as Kind;
        p.eat(",");
      }
    } else if (p.eat("const")) {
      const name = p.ident();
      if (p.eat(":")) p.type();
      p.expect("=");
      prog.consts.push({ name, init: p.expr() });
      p.expect(";");
    } else if (p.eat("fn")) {
      const name = p.ident();
      const params: string[] = [];
      p.expect("(");
      while (!p.eat(")")) {
        params.push(p.ident());
        p.expect(":");
        p.type();
        p.eat(",");
      }
      if (p.eat("->")) p.type();
      prog.functions[name] = { params, body: p.block() };
    } else if (p.is("@")) {
      const attrs: Record<string, string> = {};
      while (p.eat("@")) {
        const a = p.ident();
        if (p.is("(")) {
          p.expect("(");
          attrs[a] = p.next().v;
          p.expect(")");
        } else attrs[a] = "";
      }
      if (p.eat("var")) {
        const space = p.templateArgs().map((x) => (x as TypeNode).name);
        const name = p.ident();
        p.expect(":");
        const type = p.type();
        p.expect(";");
        if (space[0] === "storage") prog.bindings.push({ name, type });
        else if (space[0] === "uniform") prog.uniformName = name;
      } else {
        p.expect("fn");
        p.ident();
        prog.workgroupSize = parseInt(attrs.workgroup_size);
        p.expect("(");
        while (!p.eat(")")) {
          p.expect("@");
          p.expect("builtin");
          p.expect("(");
          const b = p.ident();
          p.expect(")");
          const name = p.ident();
          p.expect(":");
          p.type();
          prog.builtins[name] = b;
          p.eat(",");
        }
        prog.body = p.block();
      }
    } else if (p.eat("var")) {
      const space = p.templateArgs().map((x) => (x as TypeNode).name);
      const name = p.ident();
      p.expect(":");
      const type = p.type();
      p.expect(";");
      if (space[0] === "private") prog.privates.push({ name, type });
      else if (space[0] === "workgroup") prog.shared.push({ name, type, length: type.args[1] as number });
      else throw new Error(`wgsl_interp: unsupported module-scope var ${name}`);
    } else throw new Error(`wgsl_interp: unexpected '${p.peek()!.v}' at module scope`);
  }
  return prog;
}

/** Counters of a run, for assertions. */
export interface RunStats {
  /** Barriers passed per workgroup (the last workgroup's count). */
  barriers: number;
  /** Subgroup-matrix multiply-accumulates (per subgroup, not per invocation). */
  mmas: number;
}

/**
 * Runs workgroups `(x, y, z)` of `grid` over `buffers` (one per binding, element data as `MemArray` expects) with
 * the uniform struct's fields. Shared memory starts as NaN, so reading a slot nobody wrote poisons the result.
 */
export function runWgsl(
  prog: WgslProgram,
  buffers: (Float64Array | Uint32Array)[],
  uniforms: Record<string, number>,
  grid: [number, number, number],
  subgroupSize = 32,
): RunStats {
  const mem = new Map<string, MemArray>();
  prog.bindings.forEach((b, i) => mem.set(b.name, new MemArray(b.name, b.type, buffers[i])));
  const fields: Record<string, Value> = {};
  for (const f of prog.uniformFields) fields[f] = { k: prog.uniformTypes[f] ?? "u32", v: uniforms[f] ?? 0 };
  const stats: RunStats = { barriers: 0, mmas: 0 };
  const T = prog.workgroupSize;
  const base = {
    globals: new Map<string, Slot>(),
    fns: prog.functions,
    mem,
    shared: new Map<string, MemArray>(),
    uniform: { k: "struct", fields } as Struct,
    uniformName: prog.uniformName,
    privates: new Map<string, Slot>(),
    stats,
  };
  const consts: Ctx = { ...base, race: new RaceCheck(T), scopes: [], lane: 0, calls: 0, sub: newSubgroup(T) };
  for (const c of prog.consts) base.globals.set(c.name, { val: evaluate(c.init, consts), mutable: false });
  for (let z = 0; z < grid[2]; z++) {
    for (let y = 0; y < grid[1]; y++) {
      for (let x = 0; x < grid[0]; x++) {
        const race = new RaceCheck(T);
        const shared = new Map<string, MemArray>();
        for (const s of prog.shared) {
          shared.set(s.name, new MemArray(s.name, s.type, new Float64Array(s.length).fill(NaN), race));
        }
        const subgroups = Array.from({ length: Math.ceil(T / subgroupSize) }, (_, sg) => newSubgroup(T + sg));
        const threads = Array.from({ length: T }, (_, lid) => {
          const sg = Math.floor(lid / subgroupSize);
          const ctx: Ctx = {
            ...base,
            shared,
            race,
            scopes: [new Map()],
            privates: new Map(),
            sub: subgroups[sg],
            lane: lid % subgroupSize,
            calls: 0,
          };
          for (const v of prog.privates) ctx.privates.set(v.name, { val: zeroOf(v.type), mutable: true });
          const b: Record<string, Value> = {
            workgroup_id: { k: "vec", el: "u32", v: [x, y, z] },
            num_workgroups: { k: "vec", el: "u32", v: [...grid] },
            local_invocation_index: { k: "u32", v: lid },
            subgroup_id: { k: "u32", v: sg },
            subgroup_invocation_id: { k: "u32", v: lid % subgroupSize },
          };
          for (const [name, builtin] of Object.entries(prog.builtins)) {
            if (!b[builtin]) throw new Error(`wgsl_interp: unsupported builtin ${builtin}`);
            ctx.scopes[0].set(name, { val: b[builtin], mutable: false });
          }
          return execBlock(prog.body, ctx);
        });
        const groups = subgroups.map((_, sg) => threads.slice(sg * subgroupSize, (sg + 1) * subgroupSize));
        stats.barriers = runWorkgroup(groups, subgroups, race);
      }
    }
  }
  return stats;
}

/**
 * Steps the invocations of a workgroup, subgroup by subgroup, from one stop to the next: every lane of a
 * subgroup must stop at the same statement (a barrier, or a statement with shuffles, whose values are then
 * exchanged), and every subgroup must reach the same barrier (or all finish) before any passes it. Returns the
 * barriers passed.
 */
function runWorkgroup(
  groups: Generator<Stmt, Flow, void>[][],
  subgroups: Subgroup[],
  race: RaceCheck,
): number {
  // per subgroup: null while it runs, else the barrier it waits at, or "done"
  const at: (Stmt | "done" | null)[] = groups.map(() => null);
  let barriers = 0;
  for (;;) {
    while (at.includes(null)) {
      groups.forEach((lanes, sg) => {
        if (at[sg] !== null) return;
        const stops = lanes.map((t, lane) => {
          race.actor = sg * groups[0].length + lane;
          const r = t.next();
          return r.done ? "done" : r.value;
        });
        const i = stops.findIndex((s) => s !== stops[0]);
        if (i >= 0) {
          throw new Error(
            `wgsl_interp: lanes of subgroup ${sg} diverge after barrier ${barriers}: lane 0 ${
              stopName(stops[0])
            }, lane ${i} ${stopName(stops[i])}`,
          );
        }
        if (stops[0] !== "done" && !isBarrier(stops[0])) exchange(subgroups[sg], sg);
        else at[sg] = stops[0];
      });
    }
    if (at.every((s) => s === "done")) return barriers;
    const i = at.findIndex((s) => s !== at[0]);
    if (i >= 0) {
      throw new Error(
        `wgsl_interp: subgroups diverge at barrier ${barriers + 1}: subgroup 0 ${
          stopName(at[0])
        }, subgroup ${i} ${stopName(at[i])}`,
      );
    }
    race.epoch = ++barriers;
    at.fill(null);
  }
}

function stopName(s: Stmt | "done" | null): string {
  return s === "done" ? "finished" : s && isBarrier(s) ? "at a barrier" : "at a shuffle";
}

function isBarrier(s: Stmt): boolean {
  return s.s === "expr" && s.x.e === "call" && s.x.name === "workgroupBarrier";
}

/**
 * A subgroup's shared state: the subgroup-matrix results its first lane computed (by call number), and the
 * values and masks each lane posted for the shuffles of the statement it stopped at, then what it receives.
 */
interface Subgroup {
  /** Its actor for race checks (see RaceCheck). */
  actor: number;
  cache: { key: string; val?: Value }[];
  posts: { v: Value; mask: number }[][];
  results: Value[][];
}

function newSubgroup(actor: number): Subgroup {
  return { actor, cache: [], posts: [], results: [] };
}

/** Every lane receives, for each shuffle, the value posted by lane `lane ^ mask`; masks must be uniform. */
function exchange(sub: Subgroup, sg: number): void {
  const lanes = sub.posts.length;
  sub.results = sub.posts.map((mine, lane) =>
    mine.map(({ mask }, i) => {
      if (mask !== sub.posts[0][i].mask) {
        throw new Error(`wgsl_interp: shuffle mask is not subgroup-uniform in subgroup ${sg}`);
      }
      if ((lane ^ mask) >= lanes) {
        throw new Error(`wgsl_interp: shuffle from lane ${lane ^ mask} of ${lanes}`);
      }
      return sub.posts[lane ^ mask][i].v;
    })
  );
}

type Slot = { val: Value; mutable: boolean };
/** How a statement ends: normally (undefined), or by `return` (with the value of a function). */
type Flow = { ret?: Value } | undefined;

interface Ctx {
  scopes: Map<string, Slot>[];
  globals: Map<string, Slot>;
  fns: WgslProgram["functions"];
  mem: Map<string, MemArray>;
  shared: Map<string, MemArray>;
  race: RaceCheck;
  uniform: Struct;
  uniformName: string;
  /** This invocation's `var<private>` variables. */
  privates: Map<string, Slot>;
  sub: Subgroup;
  lane: number;
  calls: number;
  stats: RunStats;
  /** Results of the shuffles of the statement being executed. */
  shuffled?: Map<Expr, Value>;
}

function lookup(ctx: Ctx, name: string): Slot | MemArray | Struct {
  for (let i = ctx.scopes.length - 1; i >= 0; i--) {
    const v = ctx.scopes[i].get(name);
    if (v) return v;
  }
  const v = ctx.privates.get(name) ?? ctx.globals.get(name);
  if (v) return v;
  const arr = ctx.mem.get(name) ?? ctx.shared.get(name);
  if (arr) return arr;
  if (name === ctx.uniformName) return ctx.uniform;
  throw new Error(`wgsl_interp: unknown identifier ${name}`);
}

function* execBlock(body: Stmt[], ctx: Ctx): Generator<Stmt, Flow, void> {
  ctx.scopes.push(new Map());
  try {
    for (const s of body) {
      const flow = yield* exec(s, ctx);
      if (flow) return flow;
    }
  } finally {
    ctx.scopes.pop();
  }
}

/**
 * Executes a statement, yielding the statement itself where the invocation must wait for others: a barrier, or a
 * statement with subgroup shuffles (their operands are evaluated and posted first, the statement runs after the
 * exchange).
 */
function* exec(s: Stmt, ctx: Ctx): Generator<Stmt, Flow, void> {
  switch (s.s) {
    case "let":
    case "var":
    case "assign":
    case "expr": {
      if (isBarrier(s)) {
        yield s;
        return;
      }
      const shuffles = shufflesIn(s);
      if (shuffles.length) {
        ctx.sub.posts[ctx.lane] = shuffles.map((c) => ({
          v: evaluate(c.args[0], ctx),
          mask: scalar(evaluate(c.args[1], ctx)),
        }));
        yield s;
        ctx.shuffled = new Map(shuffles.map((c, i) => [c, ctx.sub.results[ctx.lane][i]]));
      }
      try {
        execSimple(s, ctx);
      } finally {
        ctx.shuffled = undefined;
      }
      return;
    }
    case "return":
      return { ret: s.x && evaluate(s.x, ctx) };
    case "block":
      return yield* execBlock(s.body, ctx);
    case "if":
      if (truthy(evaluate(s.cond, ctx))) return yield* execBlock(s.then, ctx);
      else if (s.else) return yield* execBlock(s.else, ctx);
      return;
    case "for":
      ctx.scopes.push(new Map());
      try {
        yield* exec(s.init, ctx);
        while (truthy(evaluate(s.cond, ctx))) {
          const flow = yield* execBlock(s.body, ctx);
          if (flow) return flow;
          yield* exec(s.update, ctx);
        }
      } finally {
        ctx.scopes.pop();
      }
  }
}

/** A statement without waits: let, var, assignment or a call. */
function execSimple(s: Stmt, ctx: Ctx): void {
  switch (s.s) {
    case "let":
    case "var": {
      const type = s.type;
      const val = s.init
        ? evaluate(s.init, ctx)
        : type!.name.startsWith("subgroup_matrix_")
        ? subgroupCall(ctx, `zero ${type!.name}`, () => zeroOf(type!))
        : zeroOf(type!);
      ctx.scopes[ctx.scopes.length - 1].set(s.name, { val, mutable: s.s === "var" });
      return;
    }
    case "assign": {
      let val = evaluate(s.value, ctx);
      if (s.op) val = binary(s.op, evaluate(s.target, ctx), val);
      assign(s.target, val, ctx);
      return;
    }
    case "expr":
      evaluate(s.x, ctx);
  }
}

const shuffleCache = new WeakMap<Stmt, Extract<Expr, { e: "call" }>[]>();

/** The `subgroupShuffleXor` calls of a simple statement's own expressions. */
function shufflesIn(s: Stmt): Extract<Expr, { e: "call" }>[] {
  let found = shuffleCache.get(s);
  if (found) return found;
  found = [];
  const walk = (x: Expr | undefined): void => {
    if (!x) return;
    if (x.e === "call") {
      if (x.name === "subgroupShuffleXor") found!.push(x);
      x.args.forEach(walk);
    } else if (x.e === "bin") [x.a, x.b].forEach(walk);
    else if (x.e === "un" || x.e === "member") walk(x.a);
    else if (x.e === "index") [x.a, x.i].forEach(walk);
  };
  if (s.s === "let" || s.s === "var") walk(s.init);
  else if (s.s === "assign") [s.target, s.value].forEach(walk);
  else if (s.s === "expr") walk(s.x);
  shuffleCache.set(s, found);
  return found;
}

/** A call of a module-scope function: its own scope, no waits inside, a value returned. */
function callFunction(name: string, args: Value[], ctx: Ctx): Value {
  const fn = ctx.fns[name];
  const scope = new Map(fn.params.map((p, i) => [p, { val: args[i], mutable: false }]));
  const inner: Ctx = { ...ctx, scopes: [scope] };
  const r = execBlock(fn.body, inner).next();
  ctx.calls = inner.calls;
  if (!r.done) throw new Error(`wgsl_interp: barrier or shuffle inside function ${name}`);
  if (!r.value?.ret) throw new Error(`wgsl_interp: function ${name} returned no value`);
  return r.value.ret;
}

function truthy(v: Value): boolean {
  if (v.k !== "bool") throw new Error("wgsl_interp: condition is not a bool");
  return v.v !== 0;
}

function assign(target: Expr, val: Value, ctx: Ctx): void {
  if (target.e === "id") {
    const slot = lookup(ctx, target.name);
    if (slot instanceof MemArray || !("mutable" in slot) || !slot.mutable) {
      throw new Error(`wgsl_interp: cannot assign to ${target.name}`);
    }
    slot.val = val;
  } else if (target.e === "index" && target.a.e === "id") {
    const arr = lookup(ctx, target.a.name);
    if (!(arr instanceof MemArray)) throw new Error("wgsl_interp: indexed store into a non-array");
    arr.set(scalar(evaluate(target.i, ctx)), val);
  } else throw new Error("wgsl_interp: unsupported assignment target");
}

function scalar(v: Value): number {
  if (v.k === "vec" || v.k === "mat" || v.k === "ref" || v.k === "struct") {
    throw new Error("wgsl_interp: expected a scalar");
  }
  return v.v;
}

function binary(op: string, a: Value, b: Value): Value {
  if (a.k === "vec" || b.k === "vec" || a.k === "mat" || b.k === "mat") {
    throw new Error(`wgsl_interp: vector/matrix operator ${op} unsupported`);
  }
  const x = scalar(a), y = scalar(b);
  const k = a.k as Kind;
  if (a.k !== b.k) throw new Error(`wgsl_interp: ${a.k} ${op} ${b.k} mixes types`);
  switch (op) {
    case "+":
      return { k, v: roundTo(k, x + y) };
    case "-":
      return { k, v: roundTo(k, x - y) };
    case "*":
      return { k, v: k === "u32" ? Math.imul(x, y) >>> 0 : roundTo(k, x * y) };
    case "/":
      if (k === "u32" && y === 0) throw new Error("wgsl_interp: division by zero");
      return { k, v: roundTo(k, k === "u32" ? Math.floor(x / y) : x / y) };
    case "%":
      return { k, v: x % y };
    case "&":
      return { k, v: (x & y) >>> 0 };
    case "|":
      return { k, v: (x | y) >>> 0 };
    case "^":
      return { k, v: (x ^ y) >>> 0 };
    case "<":
      return { k: "bool", v: +(x < y) };
    case ">":
      return { k: "bool", v: +(x > y) };
    case "<=":
      return { k: "bool", v: +(x <= y) };
    case ">=":
      return { k: "bool", v: +(x >= y) };
    case "==":
      return { k: "bool", v: +(x === y) };
    case "!=":
      return { k: "bool", v: +(x !== y) };
  }
  throw new Error(`wgsl_interp: operator ${op}`);
}

/**
 * A subgroup-matrix operation: the subgroup's first invocation computes it; the others must make the same call
 * (same key) and receive the same value.
 */
function subgroupCall(ctx: Ctx, key: string, compute: () => Value): Value {
  const n = ctx.calls++;
  if (ctx.lane === 0) {
    const lane = ctx.race.actor;
    ctx.race.actor = ctx.sub.actor;
    try {
      const val = compute();
      ctx.sub.cache[n] = { key, val };
      return val;
    } finally {
      ctx.race.actor = lane;
    }
  }
  const hit = ctx.sub.cache[n];
  if (!hit || hit.key !== key) {
    throw new Error(
      `wgsl_interp: subgroup-matrix call ${n} is not subgroup-uniform:\n  ${hit?.key}\n  ${key}`,
    );
  }
  return hit.val!;
}

function matKey(v: Value): string {
  return v.k === "mat" ? `m${v.id}` : JSON.stringify(v);
}

function evaluate(x: Expr, ctx: Ctx): Value {
  switch (x.e) {
    case "num":
      return { k: x.kind, v: x.v };
    case "id": {
      const slot = lookup(ctx, x.name);
      if (slot instanceof MemArray) return { k: "ref", arr: slot };
      if ("val" in slot) return slot.val;
      return slot;
    }
    case "un": {
      if (x.op === "&") {
        const v = evaluate(x.a, ctx);
        if (v.k !== "ref") throw new Error("wgsl_interp: & of a non-array");
        return v;
      }
      const v = evaluate(x.a, ctx);
      if (x.op === "!") return { k: "bool", v: scalar(v) ? 0 : 1 };
      return { k: v.k as Kind, v: roundTo(v.k as Kind, -scalar(v)) };
    }
    case "bin": {
      if (x.op === "&&") return truthy(evaluate(x.a, ctx)) ? evaluate(x.b, ctx) : { k: "bool", v: 0 };
      if (x.op === "||") return truthy(evaluate(x.a, ctx)) ? { k: "bool", v: 1 } : evaluate(x.b, ctx);
      return binary(x.op, evaluate(x.a, ctx), evaluate(x.b, ctx));
    }
    case "member": {
      const v = evaluate(x.a, ctx);
      if (v.k === "struct") return v.fields[x.name];
      if (v.k === "vec") {
        const idx = [...x.name].map((ch) => "xyzw".indexOf(ch));
        if (idx.some((i) => i < 0 || i >= v.v.length)) {
          throw new Error(`wgsl_interp: .${x.name} of a vec${v.v.length}`);
        }
        return idx.length === 1
          ? { k: v.el, v: v.v[idx[0]] }
          : { k: "vec", el: v.el, v: idx.map((i) => v.v[i]) };
      }
      throw new Error(`wgsl_interp: .${x.name} of ${v.k}`);
    }
    case "index": {
      const a = evaluate(x.a, ctx);
      if (a.k === "vec") {
        const i = scalar(evaluate(x.i, ctx));
        if (!(i >= 0 && i < a.v.length)) throw new Error(`wgsl_interp: component ${i} of a vec${a.v.length}`);
        return { k: a.el, v: a.v[i] };
      }
      if (a.k !== "ref") throw new Error("wgsl_interp: indexing a non-array");
      return a.arr.get(scalar(evaluate(x.i, ctx)));
    }
    case "call":
      return call(x, ctx);
  }
}

function call(x: Extract<Expr, { e: "call" }>, ctx: Ctx): Value {
  const args = () => x.args.map((a) => evaluate(a, ctx));
  if (ctx.fns[x.name]) return callFunction(x.name, args(), ctx);
  switch (x.name) {
    case "min":
    case "max": {
      const [a, b] = args();
      if (a.k !== b.k) throw new Error(`wgsl_interp: ${x.name} of ${a.k} and ${b.k}`);
      return { k: a.k as Kind, v: (x.name === "min" ? Math.min : Math.max)(scalar(a), scalar(b)) };
    }
    case "exp":
    case "log": {
      const [a] = args();
      if (a.k !== "f32" && a.k !== "f16") throw new Error(`wgsl_interp: ${x.name} of ${a.k}`);
      return { k: a.k, v: roundTo(a.k, (x.name === "exp" ? Math.exp : Math.log)(scalar(a))) };
    }
    case "select": {
      const [f, t, c] = args();
      return truthy(c) ? t : f;
    }
    case "pack2x16float": {
      const [a] = args();
      if (a.k !== "vec" || a.v.length !== 2) throw new Error("wgsl_interp: pack2x16float needs a vec2");
      return { k: "u32", v: (f16Bits(a.v[0]) | (f16Bits(a.v[1]) << 16)) >>> 0 };
    }
    case "unpack2x16float": {
      const [a] = args();
      if (a.k !== "u32") throw new Error("wgsl_interp: unpack2x16float needs a u32");
      const w = a.v as number;
      return { k: "vec", el: "f32", v: [f16FromBits(w & 0xffff), f16FromBits(w >>> 16)] };
    }
    case "subgroupShuffleXor": {
      const v = ctx.shuffled?.get(x);
      if (!v) {
        throw new Error("wgsl_interp: subgroupShuffleXor only in a let, var, assignment or call statement");
      }
      return v;
    }
    case "u32":
    case "i32":
    case "f32":
    case "f16": {
      const [a] = args();
      return { k: x.name, v: a ? roundTo(x.name, scalar(a)) : 0 };
    }
    case "bitcast": {
      const [a] = args();
      const w = scalar(a);
      return { k: "vec", el: "f16", v: [f16FromBits(w & 0xffff), f16FromBits(w >>> 16)] };
    }
    case "vec2":
    case "vec3":
    case "vec4": {
      const n = parseInt(x.name[3]);
      const el = (x.tmpl[0] as TypeNode).name as Kind;
      const a = args().map(scalar);
      if (a.length !== 0 && a.length !== n) throw new Error(`wgsl_interp: ${x.name} of ${a.length} scalars`);
      return { k: "vec", el, v: a.length ? a.map((v) => roundTo(el, v)) : new Array(n).fill(0) };
    }
    case "subgroup_matrix_left":
    case "subgroup_matrix_right":
    case "subgroup_matrix_result": {
      if (x.args.length) throw new Error("wgsl_interp: only zero matrix constructors are supported");
      return subgroupCall(ctx, `zero ${x.name}`, () => matrix({ name: x.name, args: x.tmpl }));
    }
    case "subgroupMatrixLoad": {
      const [ref, off, stride] = args();
      const type = x.tmpl[0] as TypeNode, colMajor = (x.tmpl[1] as TypeNode).name === "col_major";
      if (ref.k !== "ref") throw new Error("wgsl_interp: subgroupMatrixLoad needs &array");
      const key = `load ${ref.arr.name} ${scalar(off)} ${scalar(stride)} ${colMajor} ${type.name}`;
      return subgroupCall(ctx, key, () => {
        const m = matrix(type);
        checkStride(m, colMajor, scalar(stride));
        for (let r = 0; r < m.rows; r++) {
          for (let c = 0; c < m.cols; c++) {
            const i = scalar(off) + (colMajor ? c * scalar(stride) + r : r * scalar(stride) + c);
            m.data[r * m.cols + c] = scalar(ref.arr.get(i));
          }
        }
        return m;
      });
    }
    case "subgroupMatrixStore": {
      const [ref, off, mat, stride] = args();
      const colMajor = (x.tmpl[0] as TypeNode).name === "col_major";
      if (ref.k !== "ref" || mat.k !== "mat") throw new Error("wgsl_interp: bad subgroupMatrixStore");
      const key = `store ${ref.arr.name} ${scalar(off)} ${matKey(mat)} ${scalar(stride)} ${colMajor}`;
      return subgroupCall(ctx, key, () => {
        checkStride(mat, colMajor, scalar(stride));
        for (let r = 0; r < mat.rows; r++) {
          for (let c = 0; c < mat.cols; c++) {
            const i = scalar(off) + (colMajor ? c * scalar(stride) + r : r * scalar(stride) + c);
            ref.arr.set(i, { k: ref.arr.el, v: mat.data[r * mat.cols + c] });
          }
        }
        return { k: "bool", v: 1 };
      });
    }
    case "subgroupMatrixMultiplyAccumulate": {
      const [l, r, acc] = args();
      if (l.k !== "mat" || r.k !== "mat" || acc.k !== "mat") throw new Error("wgsl_interp: bad multiply");
      return subgroupCall(ctx, `mma ${matKey(l)} ${matKey(r)} ${matKey(acc)}`, () => {
        if (l.use !== "left" || r.use !== "right" || acc.use !== "result" || l.cols !== r.rows) {
          throw new Error("wgsl_interp: multiply operands do not match");
        }
        ctx.stats.mmas++;
        const out: Mat = { ...acc, id: ++matIds, data: new Float64Array(acc.data.length) };
        for (let i = 0; i < l.rows; i++) {
          for (let j = 0; j < r.cols; j++) {
            let s = acc.data[i * r.cols + j];
            for (let t = 0; t < l.cols; t++) s += l.data[i * l.cols + t] * r.data[t * r.cols + j];
            out.data[i * r.cols + j] = roundTo(acc.el, s);
          }
        }
        return out;
      });
    }
    case "subgroupMatrixScalarMultiply": {
      const [m, s] = args();
      if (m.k !== "mat") throw new Error("wgsl_interp: bad scalar multiply");
      return subgroupCall(ctx, `scale ${matKey(m)} ${scalar(s)}`, () => {
        const out: Mat = { ...m, id: ++matIds, data: m.data.map((v) => roundTo(m.el, v * scalar(s))) };
        return out;
      });
    }
  }
  throw new Error(`wgsl_interp: unsupported function ${x.name}`);
}

function checkStride(m: Mat, colMajor: boolean, stride: number): void {
  if (stride < (colMajor ? m.rows : m.cols)) throw new Error(`wgsl_interp: stride ${stride} too small`);
}

/** f16 values to the u32 words of a `vecN<u32>`/`u32` storage array (two halves per word, low half first). */
export function packF16(values: ArrayLike<number>): Uint32Array {
  const words = new Uint32Array(Math.ceil(values.length / 2));
  for (let i = 0; i < values.length; i++) words[i >> 1] |= f16Bits(values[i]) << (16 * (i & 1));
  return words;
}
