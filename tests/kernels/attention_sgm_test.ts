// The matrix-unit attention kernels (kernels/attention_sgm.ts) only run where Dawn offers subgroup matrices (the
// H200): their numerics are checked there by attention_test.ts's f16 cases, which take them by default, on the CPU
// by attention_sgm_interp_test.ts (both forms), and their WGSL (both forms) compiles under Tint in
// sgm_tint_check.ts (run by matmul_sgm_test.ts). Here: when they apply, which tiles fit, and that the
// `constOffsets` form gives every fragment load and store a literal offset.
import assert from "node:assert/strict";
import {
  attentionBackwardDkvSgm,
  attentionBackwardDqSgm,
  attentionForwardSgm,
  chooseSgmAttentionBackwardTiles,
  chooseSgmAttentionKeyTile,
  SGM_ATTN_CONST_OFFSETS,
  sgmAttentionApplies,
  sgmAttentionBackwardWgslFor,
  sgmAttentionSharedBytes,
  sgmAttentionWgslFor,
  sgmDkvSharedBytes,
} from "../../kernels/attention_sgm.ts";
import type { AttentionShape } from "../../kernels/attention.ts";

const H200 = 49152;
const shape: AttentionShape = {
  B: 2,
  T: 300,
  H: 32,
  Hkv: 8,
  hd: 64,
  qoff: 0,
  kvLen: 300,
  kvBatchStride: 300 * 8 * 64,
  window: 0,
  scale: 0.125,
};

Deno.test("sgm attention: tiles fit the workgroup memory they are chosen for", () => {
  assert.deepEqual(chooseSgmAttentionBackwardTiles(64, H200), { bc: 64, br: 64 });
  assert.deepEqual(chooseSgmAttentionBackwardTiles(128, H200), { bc: 32, br: 32 });
  assert.deepEqual(chooseSgmAttentionBackwardTiles(64, 32768), { bc: 32, br: 32 });
  for (const hd of [16, 32, 48, 64, 80, 96, 112, 128]) {
    for (const limit of hd <= 64 ? [32768, H200] : [H200]) {
      const t = chooseSgmAttentionBackwardTiles(hd, limit);
      assert.ok(t, `hd ${hd} under ${limit}`);
      assert.ok(sgmAttentionSharedBytes(hd, t.bc) <= limit && sgmDkvSharedBytes(hd, t.br) <= limit);
    }
  }
  assert.equal(chooseSgmAttentionKeyTile(40, H200), 0); // not a multiple of 16
  assert.equal(chooseSgmAttentionKeyTile(256, H200), 0);
  assert.equal(chooseSgmAttentionBackwardTiles(72, H200), null);
  assert.equal(chooseSgmAttentionBackwardTiles(128, 32768), null); // the FMA kernels take it there
});

Deno.test("sgm attention: applies to causal self-attention only; launches cover every row and key", () => {
  assert.ok(sgmAttentionApplies(shape, H200));
  assert.ok(!sgmAttentionApplies({ ...shape, window: 16 }, H200));
  assert.ok(!sgmAttentionApplies({ ...shape, qoff: 5, kvLen: 305 }, H200));
  assert.ok(!sgmAttentionApplies({ ...shape, hd: 72 }, H200));
  // 300 tokens x 4 query heads per kv head = 1200 packed rows: 19 blocks of 64; 300 keys: 5 blocks of 64
  assert.deepEqual(attentionForwardSgm(shape, 64).workgroups, [19, 16]);
  assert.deepEqual(attentionBackwardDqSgm(shape, 64).workgroups, [19, 16]);
  assert.deepEqual(attentionBackwardDkvSgm(shape, 64).workgroups, [5, 16]);
  assert.throws(() => attentionForwardSgm({ ...shape, window: 4 }, 64), /without a window/);
  assert.throws(() => attentionBackwardDkvSgm(shape, 48), /row tile 48/);
});

/** The `subgroupMatrixLoad` / `subgroupMatrixStore` calls of WGSL source: the array, offset and stride arguments. */
function fragmentCalls(code: string): { array: string; offset: string; stride: string }[] {
  const calls = [];
  for (const m of code.matchAll(/subgroupMatrix(Load|Store)</g)) {
    // skip the template arguments, then split the call's arguments at top-level commas
    let i = m.index + m[0].length, depth = 1;
    while (depth) depth += code[i] === "<" ? 1 : code[i] === ">" ? -1 : 0, i++;
    assert.equal(code[i], "(");
    const args: string[] = [];
    let start = ++i;
    for (depth = 1; depth; i++) {
      const ch = code[i];
      if (ch === "(") depth++;
      else if (ch === ")") depth--;
      if ((ch === "," && depth === 1) || depth === 0) args.push(code.slice(start, i).trim()), start = i + 1;
    }
    assert.ok(args[0].startsWith("&"), args.join(", "));
    calls.push({ array: args[0].slice(1), offset: args[1], stride: args[args.length - 1] });
  }
  return calls;
}

Deno.test("sgm attention: the constOffsets form gives every fragment load and store a literal offset", () => {
  // What Tint needs to drop robustness's bounds predicate: offset and stride constants (the arrays are fixed-size).
  // All the kernels' fragment calls are on workgroup arrays.
  const literal = /^\d+u?( \+ \d+u?)*$/;
  for (const hd of [16, 64, 128]) {
    for (const tile of [32, 64]) {
      const forms = (constOffsets: boolean) => ({
        fwd: sgmAttentionWgslFor(hd, tile, constOffsets),
        dq: sgmAttentionBackwardWgslFor("dq", hd, tile, constOffsets),
        dkv: sgmAttentionBackwardWgslFor("dkv", hd, tile, constOffsets),
      });
      const plain = forms(false), konst = forms(true);
      for (const kind of ["fwd", "dq", "dkv"] as const) {
        const what = `${kind} hd${hd} tile${tile}`;
        const a = fragmentCalls(plain[kind]), b = fragmentCalls(konst[kind]);
        assert.ok(a.some((c) => !literal.test(c.offset)), `${what}: the runtime form has runtime offsets`);
        // one copy per subgroup of each call
        assert.equal(b.length, 4 * a.length, `${what}: copies`);
        for (const c of b) {
          assert.match(c.array, /^(KV|PS|SS|QD|PT)$/, what);
          assert.match(c.offset, literal, `${what}: ${c.array} offset`);
          assert.match(c.stride, literal, `${what}: ${c.array} stride`);
        }
        assert.ok(!/\bsrow\b|\bprow\b|\btrow\b/.test(konst[kind]), `${what}: row lets left`);
      }
    }
  }
  // distinct kernels per form, the default one of them
  for (const launch of [attentionForwardSgm, attentionBackwardDqSgm, attentionBackwardDkvSgm]) {
    const keys = [false, true].map((k) => launch(shape, 64, k).spec.key);
    assert.notEqual(keys[0], keys[1]);
    assert.equal(launch(shape, 64).spec.key, keys[Number(SGM_ATTN_CONST_OFFSETS)]);
  }
});
