import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { canonicalJson, hashArtifact, hashFile, sha256 } from "../../pipelines/hash.ts";
import { InputDigester } from "../../pipelines/inputs.ts";
import { Store } from "../../pipelines/store.ts";
import { StageCheckpoints } from "../../pipelines/checkpoints.ts";
import { Rng } from "../../util/rng.ts";

function tmp(): string {
  return Deno.makeTempDirSync({ prefix: "distillery-store-" });
}

Deno.test("canonicalJson sorts keys at every level and rejects what JSON cannot hold", () => {
  assert.equal(
    canonicalJson({ b: 1, a: { d: [1, { z: 0, y: -0 }], c: null } }),
    '{"a":{"c":null,"d":[1,{"y":0,"z":0}]},"b":1}',
  );
  assert.equal(canonicalJson({ a: undefined, b: 1 }), '{"b":1}');
  assert.throws(() => canonicalJson({ a: NaN }), /non-finite number at \.a/);
  assert.throws(() => canonicalJson([undefined]), /undefined/);
});

Deno.test("file digests equal sha256sum; directory digests depend on names and content, not timestamps", async () => {
  const dir = tmp();
  try {
    const rng = new Rng(1);
    const bytes = new Uint8Array(5 << 20).map(() => rng.int(256)); // > the 4 MiB read buffer
    Deno.writeFileSync(join(dir, "f.bin"), bytes);
    const h = await hashFile(join(dir, "f.bin"));
    assert.equal(h.digest, "sha256:" + createHash("sha256").update(bytes).digest("hex"));
    assert.equal(h.size, bytes.length);

    const a = join(dir, "a"), b = join(dir, "b");
    for (const d of [a, b]) {
      Deno.mkdirSync(join(d, "sub", "empty"), { recursive: true });
      Deno.writeTextFileSync(join(d, "x.txt"), "x");
      Deno.writeTextFileSync(join(d, "sub", "y.txt"), "y");
    }
    Deno.utimeSync(join(b, "x.txt"), 1, 1);
    const ha = await hashArtifact(a), hb = await hashArtifact(b);
    assert.equal(ha.digest, hb.digest, "timestamps do not count");
    assert.deepEqual(ha.entries.map((e) => `${e.type}:${e.path}`), [
      "emptydir:sub/empty",
      "file:sub/y.txt",
      "file:x.txt",
    ]);
    Deno.renameSync(join(b, "x.txt"), join(b, "z.txt"));
    assert.notEqual((await hashArtifact(b)).digest, ha.digest, "names count");
    Deno.removeSync(join(b, "sub", "empty"));
    Deno.renameSync(join(b, "z.txt"), join(b, "x.txt"));
    assert.notEqual((await hashArtifact(b)).digest, ha.digest, "empty directories count");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("InputDigester re-reads a file only when its stat stamp changed", async () => {
  const dir = tmp();
  try {
    const f = join(dir, "data.txt");
    Deno.writeTextFileSync(f, "hello");
    Deno.utimeSync(f, 1000, 1000); // old mtime: not "racy", so the digest is remembered
    const stats = join(dir, "stats.json");
    const d1 = new InputDigester(stats);
    const first = await d1.digest(f);
    assert.equal(first.digest, sha256("hello"));
    assert.equal(d1.hashedFiles, 1);
    await d1.save();
    const d2 = new InputDigester(stats);
    assert.equal((await d2.digest(f)).digest, first.digest);
    assert.equal(d2.hashedFiles, 0, "trusted from stats.json");
    Deno.writeTextFileSync(f, "HELLO"); // same size, new mtime
    const d3 = new InputDigester(stats);
    assert.equal((await d3.digest(f)).digest, sha256("HELLO"));
    assert.equal(d3.hashedFiles, 1);
    // A freshly written file is hashed but not remembered (its mtime could repeat on a quick rewrite).
    const g = join(dir, "fresh.txt");
    Deno.writeTextFileSync(g, "new");
    await d3.digest(g);
    await d3.save();
    const d4 = new InputDigester(stats);
    await d4.digest(g);
    assert.equal(d4.hashedFiles, 1);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("the store commits outputs read-only, deduplicates, and detects added, removed and changed files", async () => {
  const root = tmp();
  try {
    const store = new Store(join(root, "cache"));
    await store.init();
    const make = async (content: string) => {
      const d = join(await store.makeTempDir("sha256:" + "ab".repeat(32)), "out");
      Deno.mkdirSync(join(d, "sub"), { recursive: true });
      Deno.writeTextFileSync(join(d, "a.txt"), content);
      Deno.writeTextFileSync(join(d, "sub", "b.txt"), "b");
      return d;
    };
    const o1 = await store.commitOutput(await make("a"), "dir", "test output");
    const path = store.objectPath(o1.digest);
    assert.equal(Deno.statSync(join(path, "a.txt")).mode! & 0o222, 0, "files are read-only");
    const src2 = await make("a");
    const o2 = await store.commitOutput(src2, "dir", "test output");
    assert.equal(o2.digest, o1.digest);
    assert.throws(() => Deno.statSync(src2), "an identical output is dropped, not stored twice");
    assert.deepEqual(await store.checkObject(o1.digest, "dir"), { ok: true, rehashed: 0 });

    Deno.writeTextFileSync(join(path, "extra.txt"), "x");
    const added = await store.checkObject(o1.digest, "dir");
    assert.ok(!added.ok && /extra\.txt was added/.test(added.reason));
    Deno.removeSync(join(path, "extra.txt"));
    Deno.removeSync(join(path, "sub", "b.txt"));
    const removed = await store.checkObject(o1.digest, "dir");
    assert.ok(
      !removed.ok && /sub\/ is an unexpected empty directory|sub\/b\.txt is missing/.test(removed.reason),
      JSON.stringify(removed),
    );
    await store.removeObject(o1.digest);
    const missing = await store.checkObject(o1.digest, "dir");
    assert.ok(!missing.ok && missing.missing);

    // A touched but unchanged file is re-hashed once, then trusted again.
    const o3 = await store.commitOutput(await make("c"), "dir", "test output");
    const a = join(store.objectPath(o3.digest), "a.txt");
    Deno.utimeSync(a, 5, 5);
    assert.deepEqual(await store.checkObject(o3.digest, "dir"), { ok: true, rehashed: 1 });
    assert.deepEqual(await store.checkObject(o3.digest, "dir"), { ok: true, rehashed: 0 });
    assert.deepEqual(await store.checkObject(o3.digest, "dir", true), { ok: true, rehashed: 2 });
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("checkpoints: atomic saves, newest wins, old ones pruned, a failed save leaves the previous one", async () => {
  const dir = tmp();
  try {
    const saved: number[] = [];
    const cps = new StageCheckpoints(join(dir, "cp"), 2, (c) => saved.push(c.step));
    assert.equal(cps.latest(), null);
    for (const step of [5, 10, 15]) {
      await cps.save(step, (d) => Deno.writeTextFile(join(d, "state.json"), JSON.stringify({ step })));
    }
    assert.deepEqual(saved, [5, 10, 15]);
    const latest = cps.latest()!;
    assert.equal(latest.step, 15);
    assert.deepEqual(JSON.parse(Deno.readTextFileSync(join(latest.dir, "state.json"))), { step: 15 });
    assert.deepEqual([...Deno.readDirSync(join(dir, "cp"))].map((d) => d.name).sort(), [
      "step-000000000010",
      "step-000000000015",
    ]);
    await assert.rejects(() =>
      cps.save(20, async (d) => {
        await Deno.writeTextFile(join(d, "partial"), "x");
        throw new Error("disk full");
      }), /disk full/);
    assert.equal(cps.latest()!.step, 15);
    await assert.rejects(() => cps.save(-1, () => Promise.resolve()), /non-negative integer/);
    await cps.clear();
    assert.equal(cps.latest(), null);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
