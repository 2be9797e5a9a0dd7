// The other kernel tests run on Deno's WebGPU (wgpu/Naga). The H200 runs Dawn, whose WGSL compiler (Tint) is
// stricter in places (it rejects, for one, a decimal literal that rounds past the f32 range, which Naga took).
// dense_tint_check.ts compiles every variant of the dense kernels, the benchmark's large tiles included, with
// Tint on Dawn's null backend; it runs in a subprocess (see its module comment for why).
import assert from "node:assert/strict";

Deno.test("every dense kernel variant compiles under Dawn's WGSL compiler (Tint, null backend)", async () => {
  const script = new URL("./dense_tint_check.ts", import.meta.url);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script.pathname],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  const line = text.split("\n").findLast((l) => l.startsWith("{"));
  if (!line) {
    throw new Error(
      `Tint check printed no result (exit ${out.code}):\n${new TextDecoder().decode(out.stderr)}`,
    );
  }
  const result = JSON.parse(line) as { skipped?: string; variants?: number; failures?: string[] };
  if (result.skipped) {
    console.warn(`dense Tint check skipped: ${result.skipped}`);
    return;
  }
  assert.ok(result.variants! > 200, `only ${result.variants} variants checked`);
  assert.deepEqual(result.failures, [], `variants failing under Tint:\n${result.failures!.join("\n")}`);
});
