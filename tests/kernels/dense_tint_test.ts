// The other kernel tests run on Deno's WebGPU (wgpu/Naga). The H200 runs Dawn, whose WGSL compiler (Tint) is
// stricter in places (it rejects, for one, a decimal literal that rounds past the f32 range, which Naga took).
// dense_tint_check.ts compiles every variant of the dense kernels, the benchmark's large tiles included, with
// Tint on Dawn's null backend; it runs in a subprocess (see its module comment for why).
import assert from "node:assert/strict";
import { runTintCheck } from "../helpers/tint.ts";

Deno.test("every dense kernel variant compiles under Dawn's WGSL compiler (Tint, null backend)", async () => {
  const result = await runTintCheck(new URL("./dense_tint_check.ts", import.meta.url)) as {
    skipped?: string;
    variants?: number;
    failures?: string[];
  };
  if (result.skipped) {
    console.warn(`dense Tint check skipped: ${result.skipped}`);
    return;
  }
  assert.ok(result.variants! > 200, `only ${result.variants} variants checked`);
  assert.deepEqual(result.failures, [], `variants failing under Tint:\n${result.failures!.join("\n")}`);
});
