/**
 * The torch.save reader against files written by PyTorch 2.11 (tests/models/testdata/torch, made by
 * make_oracle.py): every tensor must equal the same tensor written by safetensors from the same process.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { isUserError } from "../../util/errors.ts";
import { openTorchCheckpoint } from "../../models/torch_pickle.ts";
import { openSafetensors } from "../../models/safetensors.ts";
import { openModelTensors } from "../../models/weights.ts";

const DIR = new URL("./testdata/torch", import.meta.url).pathname;
const FLOATS = ["f32", "f16", "bf16", "f64", "tr", "sl", "sa", "sb", "sc"];
const INTS = ["i64", "i32", "u8", "bool"];

Deno.test("torch .bin: every tensor equals PyTorch's own values (dtypes, views, shared storage, scalar)", async () => {
  const bin = await openTorchCheckpoint(join(DIR, "tensors.bin"));
  const expected = await openSafetensors(join(DIR, "tensors_expected.safetensors"));
  assert.deepEqual(bin.names(), [...FLOATS, ...INTS].sort());
  assert.deepEqual(
    Object.fromEntries(bin.names().map((n) => [n, bin.info(n).dtype])),
    {
      f32: "F32",
      f16: "F16",
      bf16: "BF16",
      f64: "F64",
      tr: "F32",
      sl: "F32",
      sa: "F32",
      sb: "F32",
      sc: "F32",
      i64: "I64",
      i32: "I32",
      u8: "U8",
      bool: "BOOL",
    },
  );
  for (const n of FLOATS) {
    assert.deepEqual(bin.info(n).shape, expected.info(n).shape, n);
    // F64 is narrowed to float32 on load, as safetensors' F32 copy was by torch's .float().
    assert.deepEqual(await bin.readFloat32(n), await expected.readFloat32(n), n);
  }
  for (const n of INTS) {
    assert.deepEqual(bin.info(n).shape, expected.info(n).shape, n);
    assert.deepEqual(await bin.readInt32(n), await expected.readInt32(n), n);
  }
  assert.deepEqual(bin.info("tr").shape, [3, 4]); // a transposed view: strides resolved
  assert.deepEqual(bin.info("sc").shape, []); // 0-d tensor
  assert.deepEqual([...await bin.readInt32("u8")], [1, 255]);
  const param = await openTorchCheckpoint(join(DIR, "param.bin"));
  assert.deepEqual(param.names(), ["p"]);
  assert.deepEqual(await param.readFloat32("p"), await expected.readFloat32("p"));
});

Deno.test("torch .bin: legacy format, damaged files and unknown globals are refused", async () => {
  const refused = (...fragments: string[]) => (e: Error) => {
    assert.ok(isUserError(e), String(e));
    for (const f of fragments) assert.ok(e.message.includes(f), `"${f}" missing from: ${e.message}`);
    return true;
  };
  await assert.rejects(openTorchCheckpoint(join(DIR, "legacy.bin")), refused("pre-1.6", "save_file"));
  const good = await Deno.readFile(join(DIR, "tensors.bin"));
  const tmp = await Deno.makeTempDir({ prefix: "distillery-torch-" });
  try {
    const write = async (name: string, bytes: Uint8Array) => {
      await Deno.writeFile(join(tmp, name), bytes);
      return join(tmp, name);
    };
    await assert.rejects(
      openTorchCheckpoint(await write("cut.bin", good.subarray(0, 2000))),
      refused("cut.bin"),
    );
    // The pickle names a global that is not a tensor constructor: refused, never called.
    const text = new TextDecoder("latin1").decode(good);
    const at = text.indexOf("torch._utils\n_rebuild_tensor_v2\n");
    assert.ok(at > 0);
    const evil = good.slice();
    evil.set(new TextEncoder().encode("torch._utils\n_rebuild_evil_v2xx\n"), at);
    await assert.rejects(
      openTorchCheckpoint(await write("evil.bin", evil)),
      refused("_rebuild_evil_v2xx", "only tensors"),
    );
    await assert.rejects(
      openTorchCheckpoint(await write("text.bin", new TextEncoder().encode("hello"))),
      refused("not a PyTorch zip"),
    );
    // Model directories: pytorch_model.bin, and a sharded pytorch_model.bin.index.json.
    const single = join(tmp, "single");
    await Deno.mkdir(single);
    await Deno.copyFile(join(DIR, "tensors.bin"), join(single, "pytorch_model.bin"));
    assert.deepEqual((await openModelTensors(single)).names(), [...FLOATS, ...INTS].sort());
    const sharded = join(tmp, "sharded");
    await Deno.mkdir(sharded);
    await Deno.copyFile(join(DIR, "tensors.bin"), join(sharded, "pytorch_model-00001-of-00002.bin"));
    await Deno.copyFile(join(DIR, "param.bin"), join(sharded, "pytorch_model-00002-of-00002.bin"));
    await Deno.writeTextFile(
      join(sharded, "pytorch_model.bin.index.json"),
      JSON.stringify({
        weight_map: { f32: "pytorch_model-00001-of-00002.bin", p: "pytorch_model-00002-of-00002.bin" },
      }),
    );
    const src = await openModelTensors(sharded);
    assert.deepEqual(src.names(), ["f32", "p"]);
    const expected = await openSafetensors(join(DIR, "tensors_expected.safetensors"));
    assert.deepEqual(await src.readFloat32("p"), await expected.readFloat32("p"));
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
