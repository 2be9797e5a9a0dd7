import assert from "node:assert/strict";

Deno.test("Deno's built-in WebGPU offers an adapter (install mesa-vulkan-drivers on CPU-only machines)", async () => {
  const adapter = await navigator.gpu.requestAdapter();
  assert.ok(adapter, "no WebGPU adapter: apt-get install mesa-vulkan-drivers");
});
