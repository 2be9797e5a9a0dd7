/**
 * Dawn's WGSL compiler (Tint) for tests: Dawn on its null backend parses, resolves and validates WGSL (the
 * uniformity analysis included) like the H200's provider does, and executes nothing, so kernels can be
 * compile-checked on a machine without a GPU.
 *
 * @module
 */

// Dawn's GPU object must stay referenced while its devices live: collecting it crashes the binding.
let dawnGpu: GPU | null = null;

/** A device on Dawn's null backend and its adapter. */
export interface DawnNullDevice {
  /** The device, with `required` and whichever `optional` features the adapter offers. */
  device: GPUDevice;
  /** Its adapter (limits, info). */
  adapter: GPUAdapter;
}

/**
 * Creates a device on Dawn's null backend with the adapter's full workgroup storage. Returns a reason string
 * instead when Dawn (npm:webgpu) or its null adapter is unavailable, or lacks a `required` feature.
 */
export async function dawnNullDevice(
  features: { required?: readonly GPUFeatureName[]; optional?: readonly GPUFeatureName[] } = {},
): Promise<DawnNullDevice | string> {
  try {
    if (!Deno.env.get("XDG_RUNTIME_DIR")) Deno.env.set("XDG_RUNTIME_DIR", "/tmp");
    const mod = await import("webgpu");
    // Dawn's binding does not install the GPUBufferUsage/GPUShaderStage globals the code relies on
    for (const [k, v] of Object.entries(mod.globals as Record<string, unknown>)) {
      if (!(k in globalThis)) (globalThis as Record<string, unknown>)[k] = v;
    }
    dawnGpu ??= mod.create(["enable-dawn-features=allow_unsafe_apis", "backend=null"]);
    const adapter = await dawnGpu.requestAdapter();
    if (!adapter) return "Dawn's null backend offers no adapter";
    const required = features.required ?? [];
    const missing = required.filter((f) => !adapter.features.has(f));
    if (missing.length) return `Dawn's null adapter lacks ${missing.join(", ")}`;
    const device = await adapter.requestDevice({
      requiredFeatures: [...required, ...(features.optional ?? []).filter((f) => adapter.features.has(f))],
      requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize },
    });
    return { device, adapter };
  } catch (e) {
    return `Dawn (npm:webgpu) unavailable: ${e}`;
  }
}

/**
 * The failure of one compiled module, or null: the validation error caught by the caller's error scope and
 * every non-info compiler message, with line and column.
 */
export async function compileFailure(
  name: string,
  error: GPUError | null,
  module: GPUShaderModule,
): Promise<string | null> {
  const info = await module.getCompilationInfo();
  const msgs = info.messages.filter((m) => m.type !== "info");
  if (!error && msgs.length === 0) return null;
  return `${name}: ${error?.message ?? ""}\n${
    msgs.map((m) => `  ${m.lineNum}:${m.linePos} ${m.message}`).join("\n")
  }`;
}

/** The last JSON line a Tint check script printed, run in a subprocess (a binding crash then fails one test). */
export async function runTintCheck(script: URL): Promise<Record<string, unknown>> {
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
  return JSON.parse(line);
}
