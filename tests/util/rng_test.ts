import assert from "node:assert/strict";
import { Rng } from "../../util/rng.ts";

Deno.test("Rng: equal seeds give equal streams, different seeds differ", () => {
  const a = new Rng(42), b = new Rng(42), c = new Rng(43);
  const xa = Array.from({ length: 8 }, () => a.nextU32());
  const xb = Array.from({ length: 8 }, () => b.nextU32());
  const xc = Array.from({ length: 8 }, () => c.nextU32());
  assert.deepEqual(xa, xb);
  assert.notDeepEqual(xa, xc);
});

Deno.test("Rng: state round-trips mid-stream, including the normal spare", () => {
  const a = new Rng("seed");
  a.normal();
  const st = a.getState();
  const next = [a.normal(), a.uniform(), a.int(1000)];
  const b = Rng.fromState(structuredClone(st));
  assert.deepEqual([b.normal(), b.uniform(), b.int(1000)], next);
});

Deno.test("Rng: uniform mean and normal moments are plausible over 200k draws", () => {
  const r = new Rng(7);
  const n = 200_000;
  let su = 0, sn = 0, sn2 = 0;
  for (let i = 0; i < n; i++) {
    su += r.uniform();
    const z = r.normal();
    sn += z;
    sn2 += z * z;
  }
  // Standard errors: uniform mean 0.00065, normal mean 0.0022, normal var 0.0032; allow 5 sigma.
  assert.ok(Math.abs(su / n - 0.5) < 0.0033, `uniform mean ${su / n}`);
  assert.ok(Math.abs(sn / n) < 0.011, `normal mean ${sn / n}`);
  assert.ok(Math.abs(sn2 / n - 1) < 0.016, `normal var ${sn2 / n}`);
});

Deno.test("Rng: int covers its range without bias beyond chance", () => {
  const r = new Rng(1);
  const counts = new Array(6).fill(0);
  for (let i = 0; i < 60_000; i++) counts[r.int(6)]++;
  for (const c of counts) assert.ok(Math.abs(c - 10_000) < 500, `counts ${counts}`);
});
