// The kernel tests run on llvmpipe, which offers 32 KiB of workgroup memory; WebGPU's default (Dawn's null
// backend, many mobile GPUs) is 16 KiB, which the `wide` SSD row products exceed. ssd_tint_check.ts builds every
// Mamba2 scan pipeline on a default-limits Dawn null device; it runs in a subprocess (see dense_tint_check.ts).
import assert from "node:assert/strict";
import { runTintCheck } from "../helpers/tint.ts";

Deno.test("every Mamba2 scan kernel but the wide row products compiles within 16 KiB under Tint; the sgm ones compile", async () => {
  const result = await runTintCheck(new URL("./ssd_tint_check.ts", import.meta.url)) as {
    skipped?: string;
    limit?: number;
    kernels?: number;
    failures?: string[];
    wideRefused?: string[];
    sgm?: { skipped?: string; modules?: number; failures?: string[] };
  };
  if (result.skipped) {
    console.warn(`SSD Tint check skipped: ${result.skipped}`);
    return;
  }
  assert.equal(result.limit, 16384);
  assert.deepEqual(result.failures, [], `kernels failing under Tint:\n${result.failures!.join("\n")}`);
  // the control: the limit is enforced, so the narrow kernels passing means they fit
  assert.deepEqual(result.wideRefused!.toSorted(), [
    "ssd_rows_dB",
    "ssd_rows_dC",
    "ssd_rows_dx",
    "ssd_rows_y",
  ]);
  assert.ok(result.kernels! >= 18, `only ${result.kernels} kernels checked`);
  // the matrix-unit row products: every variant under test with U dims of 16, 32, 48 and 64
  const sgm = result.sgm!;
  if (sgm.skipped) console.warn(`SSD sgm Tint check skipped: ${sgm.skipped}`);
  else {
    assert.deepEqual(sgm.failures, [], `sgm row products failing under Tint:\n${sgm.failures!.join("\n")}`);
    assert.equal(sgm.modules, 16);
  }
});
