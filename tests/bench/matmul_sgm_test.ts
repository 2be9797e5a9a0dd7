// The subgroup-matrix benchmark's verdicts (bench/matmul_sgm.ts): its error measure cannot pass a kernel that
// wrote NaN or garbage, and its candidate list holds every swept config plus the register-tiled control.
import assert from "node:assert/strict";
import { defaultCandidates, normwiseError, tolerance } from "../../bench/matmul_sgm.ts";
import { SGM_SWEEP } from "../../kernels/matmul_subgroup_matrix.ts";

Deno.test("matmul_sgm bench: the normwise error flags NaN, garbage and f16-sized rounding correctly", () => {
  const ref = [1, -2, 3, 0.5];
  assert.equal(normwiseError(ref, ref), 0);
  assert.equal(normwiseError([1, NaN, 3, 0.5], ref), Infinity);
  assert.ok(normwiseError([1, -2, 3, 0.5 + 3 * 2 ** -11], ref) <= tolerance("f16"));
  assert.ok(normwiseError([1, -2, 3, 0.5 + 3 * 2 ** -11], ref) > tolerance("f32"));
  assert.ok(normwiseError([0, 0, 0, 0], ref) > tolerance("f16"));
});

Deno.test("matmul_sgm bench: every swept config is a candidate, with the register-tiled control last", () => {
  const cands = defaultCandidates(false);
  assert.equal(cands.length, SGM_SWEEP.length + 1);
  assert.equal(new Set(cands.map((c) => c.name)).size, cands.length, "candidate names are unique");
  assert.ok(cands.at(-1)!.plain && !cands.at(-1)!.sgm);
});
