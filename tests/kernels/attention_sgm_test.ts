// The matrix-unit attention kernels (kernels/attention_sgm.ts) only run where Dawn offers subgroup matrices (the
// H200): their numerics are checked there by attention_test.ts's f16 cases, which take them by default, and their
// WGSL compiles under Tint in sgm_tint_check.ts. Here: when they apply and which tiles fit.
import assert from "node:assert/strict";
import {
  attentionBackwardDkvSgm,
  attentionBackwardDqSgm,
  attentionForwardSgm,
  chooseSgmAttentionBackwardTiles,
  chooseSgmAttentionKeyTile,
  sgmAttentionApplies,
  sgmAttentionSharedBytes,
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
