import assert from "node:assert/strict";
import { join } from "node:path";
import { isUserError } from "../../util/errors.ts";
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits } from "../../models/dtype.ts";
import {
  encodeSafetensors,
  openSafetensors,
  openShardedSafetensors,
  type TensorToWrite,
  writeSafetensors,
} from "../../models/safetensors.ts";

const FIXTURE_TEACHER =
  new URL("../../fixtures/models/stories260K-hf/model.safetensors", import.meta.url).pathname;

/** Builds raw safetensors bytes from a header object and a data section, for corruption tests. */
function rawFile(header: unknown, data: Uint8Array, lengthOverride?: bigint): Uint8Array {
  const json = new TextEncoder().encode(typeof header === "string" ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthOverride ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "distillery-st-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function expectRefused(bytes: Uint8Array, ...fragments: string[]): Promise<void> {
  await withTempDir(async (dir) => {
    const path = join(dir, "bad.safetensors");
    await Deno.writeFile(path, bytes);
    await assert.rejects(openSafetensors(path), (e: Error) => {
      assert.ok(isUserError(e), `expected a UserError, got ${e}`);
      assert.ok(e.message.includes(path), `message should name the file: ${e.message}`);
      for (const f of fragments) {
        assert.ok(e.message.includes(f), `message should mention "${f}": ${e.message}`);
      }
      return true;
    });
  });
}

Deno.test("safetensors: round trip of F32/F16/BF16/I32/I64/U8 tensors and metadata", async () => {
  await withTempDir(async (dir) => {
    const a = Float32Array.from([1, -2.5, 3.25, 0, 1e-3, 65504]);
    const tensors: Record<string, TensorToWrite> = {
      "b.f16": { shape: [2, 3], data: a, dtype: "F16" },
      "a.f32": { shape: [3, 2], data: a },
      "c.bf16": { shape: [6], data: a, dtype: "BF16" },
      "ids": { shape: [4], data: BigInt64Array.from([1n, 403n, 407n, 261n]), dtype: "I64" },
      "i32": { shape: [2, 2], data: Int32Array.from([-1, 2, -3, 4]), dtype: "I32" },
      "mask": { shape: [3], data: Uint8Array.from([1, 0, 1]), dtype: "U8" },
      "scalar": { shape: [], data: Float32Array.from([7]) },
      "empty": { shape: [0, 4], data: new Float32Array(0) },
    };
    const path = join(dir, "t.safetensors");
    await writeSafetensors(path, tensors, { format: "pt", note: "x" });
    const f = await openSafetensors(path);
    assert.deepEqual(f.metadata, { format: "pt", note: "x" });
    assert.deepEqual(f.names(), ["a.f32", "b.f16", "c.bf16", "empty", "i32", "ids", "mask", "scalar"]);
    assert.deepEqual(await f.readFloat32("a.f32"), a);
    assert.deepEqual(f.info("b.f16").shape, [2, 3]);
    assert.equal(f.info("b.f16").dtype, "F16");
    // 1e-3 is not exact in F16/BF16: compare with the rounded values.
    assert.deepEqual(await f.readFloat32("b.f16"), f16BitsToF32(f32ToF16Bits(a)));
    assert.deepEqual(await f.readFloat32("c.bf16"), bf16BitsToF32(f32ToBf16Bits(a)));
    assert.deepEqual([...await f.readInt32("ids")], [1, 403, 407, 261]);
    assert.deepEqual([...await f.readInt32("i32")], [-1, 2, -3, 4]);
    assert.deepEqual([...await f.readInt32("mask")], [1, 0, 1]);
    assert.deepEqual([...await f.readFloat32("scalar")], [7]);
    assert.deepEqual(f.info("scalar").shape, []);
    assert.equal((await f.readFloat32("empty")).length, 0);
    await assert.rejects(f.readFloat32("ids"), /not a floating-point type/);
    await assert.rejects(f.readInt32("a.f32"), /not an integer type/);
    await assert.rejects(f.readFloat32("nope"), (e: Error) => isUserError(e) && e.message.includes('"nope"'));
    // No temporary files are left behind.
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["t.safetensors"]);
  });
});

Deno.test("safetensors: writer output is deterministic, sorted and 8-byte aligned", async () => {
  await withTempDir(async (dir) => {
    const x = Float32Array.from([1, 2, 3]);
    const t1 = new Map<string, TensorToWrite>([["z", { shape: [3], data: x }], ["a", {
      shape: [1],
      data: x.slice(0, 1),
    }]]);
    const t2 = new Map<string, TensorToWrite>([["a", { shape: [1], data: x.slice(0, 1) }], ["z", {
      shape: [3],
      data: x,
    }]]);
    await writeSafetensors(join(dir, "1.safetensors"), t1, { b: "2", a: "1" });
    await writeSafetensors(join(dir, "2.safetensors"), t2, { a: "1", b: "2" });
    const b1 = await Deno.readFile(join(dir, "1.safetensors"));
    const b2 = await Deno.readFile(join(dir, "2.safetensors"));
    assert.deepEqual(b1, b2);
    assert.deepEqual(encodeSafetensors(t1, { a: "1", b: "2" }), b1);
    const n = Number(new DataView(b1.buffer).getBigUint64(0, true));
    assert.equal(n % 8, 0);
    const header = new TextDecoder().decode(b1.subarray(8, 8 + n)).trimEnd();
    assert.equal(
      header,
      '{"__metadata__":{"a":"1","b":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' +
        '"z":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}}',
    );
  });
});

Deno.test("safetensors: BF16 and F16 decode to hand-computed values", () => {
  const bf = bf16BitsToF32(
    Uint16Array.from([0x3f80, 0xc040, 0x3fc0, 0x4049, 0x7f80, 0xff80, 0x0001, 0x8000]),
  );
  assert.deepEqual([...bf.slice(0, 6)], [1, -3, 1.5, 3.140625, Infinity, -Infinity]);
  assert.equal(bf[6], 2 ** -133); // smallest bf16 subnormal
  assert.ok(Object.is(bf[7], -0));
  const h = f16BitsToF32(
    Uint16Array.from([0x3c00, 0xc000, 0x7bff, 0x0001, 0x3555, 0x7c00, 0xfc00, 0x0400, 0x7e00]),
  );
  assert.deepEqual([...h.slice(0, 8)], [
    1,
    -2,
    65504,
    2 ** -24,
    0.333251953125,
    Infinity,
    -Infinity,
    2 ** -14,
  ]);
  assert.ok(Number.isNaN(h[8]));
});

Deno.test("safetensors: F32 -> F16/BF16 rounds to nearest, ties to even", () => {
  const bf = f32ToBf16Bits(
    Float32Array.from([1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2, NaN]),
  );
  assert.deepEqual([...bf.slice(0, 5)], [0x3f80, 0x3f80, 0x3f82, 0x3f81, 0xc000]);
  assert.ok(Number.isNaN(bf16BitsToF32(bf.slice(5))[0]));
  const h = f32ToF16Bits(
    Float32Array.from([
      1,
      1 + 2 ** -11,
      1 + 3 * 2 ** -11,
      65504,
      65520,
      2 ** -25,
      3 * 2 ** -26,
      2 ** -14,
      -0,
      1e-10,
    ]),
  );
  assert.deepEqual([...h], [0x3c00, 0x3c00, 0x3c02, 0x7bff, 0x7c00, 0x0000, 0x0001, 0x0400, 0x8000, 0x0000]);
  // Every finite half survives F16 -> F32 -> F16 unchanged.
  const all = new Uint16Array(65536).map((_, i) => i);
  const back = f32ToF16Bits(f16BitsToF32(all));
  for (let i = 0; i < 65536; i++) {
    if ((i & 0x7c00) === 0x7c00 && (i & 0x3ff)) continue; // NaN payloads may differ
    assert.equal(back[i], i, `half 0x${i.toString(16)}`);
  }
});

Deno.test("safetensors: F16/BF16 written by PyTorch decode to torch's values; our rounding gives torch's bits", async () => {
  const f = await openSafetensors(
    new URL("./testdata/torch/torch_dtypes.safetensors", import.meta.url).pathname,
  );
  assert.equal(f.info("f16").dtype, "F16");
  assert.equal(f.info("bf16").dtype, "BF16");
  const x = await f.readFloat32("x");
  assert.equal(x.length, 10019);
  // torch's x.half() / x.bfloat16() bits equal ours for every value (normal, subnormal, ties, overflow, NaN).
  const h = new Uint16Array((await f.readBytes("f16")).buffer);
  const b = new Uint16Array((await f.readBytes("bf16")).buffer);
  const ourH = f32ToF16Bits(x), ourB = f32ToBf16Bits(x);
  for (let i = 0; i < x.length; i++) {
    if (Number.isNaN(x[i])) {
      assert.ok(
        Number.isNaN(f16BitsToF32(ourH.slice(i, i + 1))[0]) &&
          Number.isNaN(bf16BitsToF32(ourB.slice(i, i + 1))[0]),
      );
      continue;
    }
    assert.equal(ourH[i], h[i], `f16 of x[${i}] = ${x[i]}`);
    assert.equal(ourB[i], b[i], `bf16 of x[${i}] = ${x[i]}`);
  }
  // Decoding: torch's upcast of a half is exact, so our f32 must equal the half's value; spot-check by re-rounding.
  const hx = await f.readFloat32("f16"), bx = await f.readFloat32("bf16");
  assert.deepEqual(
    f32ToF16Bits(hx).filter((_, i) => !Number.isNaN(x[i])),
    h.filter((_, i) => !Number.isNaN(x[i])),
  );
  assert.deepEqual(
    f32ToBf16Bits(bx).filter((_, i) => !Number.isNaN(x[i])),
    b.filter((_, i) => !Number.isNaN(x[i])),
  );
  assert.equal(hx[x.indexOf(65520)], Infinity);
  assert.equal(hx[x.indexOf(65504)], 65504);
});

Deno.test("safetensors: reads the fixture teacher (real file written by Python safetensors)", async () => {
  const f = await openSafetensors(FIXTURE_TEACHER);
  const e = f.info("model.embed_tokens.weight");
  assert.equal(e.dtype, "F32");
  assert.deepEqual(e.shape, [512, 64]);
  const w = await f.readFloat32("model.embed_tokens.weight");
  assert.equal(w.length, 512 * 64);
  assert.ok(w.every(Number.isFinite));
  assert.ok(w.some((v) => v !== 0));
});

Deno.test("safetensors: a tensor is read without reading the rest of a huge (sparse) file", async () => {
  await withTempDir(async (dir) => {
    const big = 3 * 2 ** 30; // 3 GiB of F32 that is never read
    const header = {
      small: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
      huge: { dtype: "F32", shape: [big / 4], data_offsets: [8, 8 + big] },
    };
    const head = rawFile(header, Uint8Array.from(new Uint8Array(new Float32Array([4.5, -1]).buffer)));
    const path = join(dir, "huge.safetensors");
    await Deno.writeFile(path, head);
    await Deno.truncate(path, head.length + big); // sparse: no disk used
    const f = await openSafetensors(path);
    assert.equal(f.info("huge").byteLength, big);
    assert.deepEqual([...await f.readFloat32("small")], [4.5, -1]);
  });
});

Deno.test("safetensors: every malformation is refused with a message naming the file and tensor", async () => {
  const ok = { w: { dtype: "F32", shape: [2, 2], data_offsets: [0, 16] } };
  const data16 = new Uint8Array(16);
  await expectRefused(new Uint8Array(5), "shorter than the 8-byte header length");
  await expectRefused(rawFile(ok, data16).subarray(0, 30), "runs past the end"); // truncated header
  await expectRefused(rawFile(ok, data16, 10_000n), "runs past the end"); // header length beyond file
  await expectRefused(rawFile(ok, data16, 2n ** 40n), "larger than the");
  await expectRefused(rawFile(ok, data16, 0n), "too small");
  await expectRefused(rawFile('{"w": {"dtype": "F32",', data16), "not valid UTF-8 JSON");
  await expectRefused(rawFile("[1,2]", data16), "not an object");
  await expectRefused(
    rawFile({ w: { dtype: "F31", shape: [4], data_offsets: [0, 16] } }, data16),
    '"w"',
    "unknown dtype",
  );
  await expectRefused(
    rawFile({ w: { dtype: "F32", shape: [3], data_offsets: [0, 16] } }, data16),
    '"w"',
    "needs 12 bytes",
  );
  await expectRefused(
    rawFile({ w: { dtype: "F32", shape: [-1], data_offsets: [0, 16] } }, data16),
    '"w"',
    "shape",
  );
  await expectRefused(
    rawFile({ w: { dtype: "F32", shape: [4], data_offsets: [16, 0] } }, data16),
    '"w"',
    "data_offsets",
  );
  await expectRefused(
    rawFile({ w: { dtype: "F32", shape: [8], data_offsets: [0, 32] } }, data16),
    '"w"',
    "run past the 16-byte data section",
  );
  await expectRefused(
    rawFile({
      a: { dtype: "F32", shape: [3], data_offsets: [0, 12] },
      b: { dtype: "F32", shape: [2], data_offsets: [8, 16] },
    }, data16),
    '"b"',
    "overlaps",
    '"a"',
  );
  await expectRefused(
    rawFile({
      a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
      b: { dtype: "F32", shape: [1], data_offsets: [12, 16] },
    }, data16),
    '"b"',
    "hole",
  );
  await expectRefused(rawFile(ok, new Uint8Array(20)), "trailing bytes");
  await expectRefused(rawFile({ __metadata__: { a: 1 }, ...ok }, data16), "__metadata__");
  const badUtf8 = rawFile("{}", new Uint8Array(0));
  badUtf8[8] = 0xff;
  await expectRefused(badUtf8, "UTF-8");
});

Deno.test("safetensors: a missing file is a UserError naming it", async () => {
  await assert.rejects(openSafetensors("/nonexistent/x.safetensors"), (e: Error) => {
    return isUserError(e) && e.message.includes("/nonexistent/x.safetensors") &&
      e.message.includes("not found");
  });
});

Deno.test("safetensors: a file truncated after opening gives a clear error on read", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "t.safetensors");
    await writeSafetensors(path, { w: { shape: [1024], data: new Float32Array(1024).fill(1) } });
    const f = await openSafetensors(path);
    await Deno.truncate(path, 200);
    await assert.rejects(f.readFloat32("w"), (e: Error) => isUserError(e) && e.message.includes("truncated"));
  });
});

Deno.test("safetensors: sharded checkpoint through model.safetensors.index.json", async () => {
  await withTempDir(async (dir) => {
    const x = Float32Array.from([1, 2, 3, 4]);
    await writeSafetensors(join(dir, "model-00001-of-00002.safetensors"), {
      "a": { shape: [4], data: x },
      "b": { shape: [2, 2], data: x, dtype: "BF16" },
    });
    await writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), {
      "c": { shape: [1], data: x.slice(3) },
    });
    const index = {
      metadata: { total_size: 28 },
      weight_map: {
        a: "model-00001-of-00002.safetensors",
        b: "model-00001-of-00002.safetensors",
        c: "model-00002-of-00002.safetensors",
      },
    };
    const indexPath = join(dir, "model.safetensors.index.json");
    await Deno.writeTextFile(indexPath, JSON.stringify(index));
    const s = await openShardedSafetensors(indexPath);
    assert.deepEqual(s.names(), ["a", "b", "c"]);
    assert.equal(s.shards.size, 2);
    assert.deepEqual(s.metadata, { total_size: 28 });
    assert.deepEqual([...await s.readFloat32("b")], [1, 2, 3, 4]);
    assert.deepEqual([...await s.readFloat32("c")], [4]);
    assert.equal(s.info("c").file, join(dir, "model-00002-of-00002.safetensors"));

    // A tensor mapped to the wrong shard, a missing shard, and a path escaping the directory are refused.
    const bad = async (weightMap: Record<string, string>, fragment: string) => {
      await Deno.writeTextFile(indexPath, JSON.stringify({ weight_map: weightMap }));
      await assert.rejects(openShardedSafetensors(indexPath), (e: Error) => {
        assert.ok(isUserError(e), String(e));
        assert.ok(e.message.includes(fragment), e.message);
        return true;
      });
    };
    await bad({ c: "model-00001-of-00002.safetensors" }, 'tensor "c"');
    await bad({ a: "model-00003-of-00003.safetensors" }, "model-00003-of-00003.safetensors: file not found");
    await bad({ a: "../x.safetensors" }, "not a file name inside");
    await Deno.writeTextFile(indexPath, "{not json");
    await assert.rejects(openShardedSafetensors(indexPath), /not valid JSON/);
  });
});
