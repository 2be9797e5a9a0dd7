/**
 * WebGPU providers: Dawn (`npm:webgpu`, the Chrome implementation) and Deno's built-in `navigator.gpu` (wgpu).
 *
 * Both hand back a standard `GPUAdapter`; everything above this file sees one WebGPU API. Choosing:
 * `dawn` and `builtin` force a provider; `auto` takes the built-in provider, because Dawn's binding has crashed
 * processes after many submit-and-wait cycles (see BENCHMARKS.md, "Dawn stability") and is opt-in until its
 * stress test passes. `DISTILLERY_GPU` sets the preference when no flag does.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { readEnv } from "../util/env.ts";

/** Which WebGPU implementation runs the kernels. */
export type ProviderName = "dawn" | "builtin";

/** The user's choice: a provider, or `auto`. */
export type ProviderPreference = ProviderName | "auto";

/** An adapter together with the provider that produced it. */
export interface ProviderAdapter {
  /** The provider that produced the adapter. */
  provider: ProviderName;
  /** The WebGPU adapter. */
  adapter: GPUAdapter;
  /** Why this provider was chosen (printed when the device is created). */
  reason: string;
}

/** Environment variable that sets the provider preference when no flag does. */
export const GPU_ENV_VAR = "DISTILLERY_GPU";

/** Dawn toggles: expose `shader-f16` on NVIDIA's Vulkan driver, and the experimental subgroup-matrix feature. */
const DAWN_TOGGLES = ["allow_unsafe_apis", "vulkan_enable_f16_on_nvidia"];

/**
 * Environment variable with extra comma-separated Dawn toggles, for benchmarks (e.g. `disable_robustness`, to
 * measure what Dawn's bounds checks cost a kernel). Not for production runs.
 */
export const DAWN_TOGGLES_ENV_VAR = "DISTILLERY_DAWN_TOGGLES";

/**
 * Environment variable naming Dawn's backend (`vulkan`, `null`, ...). `null` executes nothing but records,
 * validates and submits like a real one, so a decode loop under it measures what our code and Dawn's binding
 * cost on the CPU per dispatch on a machine without a GPU. Diagnostics only: reads return garbage, and kernels
 * needing more than 16 KiB of workgroup memory fail there.
 */
export const DAWN_BACKEND_ENV_VAR = "DISTILLERY_DAWN_BACKEND";

function dawnFlags(): string[] {
  const extra = (readEnv(DAWN_TOGGLES_ENV_VAR) ?? "").split(",").map((t) => t.trim()).filter((t) => t);
  const flags = [`enable-dawn-features=${[...DAWN_TOGGLES, ...extra].join(",")}`];
  const backend = readEnv(DAWN_BACKEND_ENV_VAR);
  if (backend) flags.push(`backend=${backend}`);
  return flags;
}

const INSTALL_HINT = "On a machine without a GPU, install Mesa's Vulkan driver (software adapter): " +
  "`sudo apt-get install -y mesa-vulkan-drivers`.";

/** Parses a provider preference from a flag or environment value; throws a UserError naming the source. */
export function parseProviderPreference(value: string | undefined, source: string): ProviderPreference {
  const v = (value ?? "auto").trim().toLowerCase();
  if (v === "auto" || v === "dawn" || v === "builtin") return v;
  throw new UserError(`${source}: expected one of auto, dawn, builtin; found "${value}"`);
}

/** The preference from `DISTILLERY_GPU`, or `auto`. */
export function providerPreferenceFromEnv(): ProviderPreference {
  return parseProviderPreference(Deno.env.get(GPU_ENV_VAR), GPU_ENV_VAR);
}

// Mesa's Vulkan loader complains on stderr when XDG_RUNTIME_DIR is unset (common in CI containers).
function quietMesa(): void {
  try {
    if (!Deno.env.get("XDG_RUNTIME_DIR")) Deno.env.set("XDG_RUNTIME_DIR", "/tmp");
  } catch {
    // no env permission: the message is harmless
  }
}

async function builtinAdapter(): Promise<GPUAdapter | null> {
  if (typeof navigator === "undefined" || !("gpu" in navigator)) return null;
  quietMesa();
  return await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
}

let dawnGpu: GPU | null | undefined;

async function dawnAdapter(): Promise<{ adapter: GPUAdapter | null; error?: string }> {
  quietMesa();
  try {
    if (dawnGpu === undefined) {
      const mod = await import("webgpu");
      // Dawn's binding does not install the GPUBufferUsage/GPUMapMode globals the rest of the code relies on
      // under Node; Deno has its own, which are numerically identical, so only fill what is missing.
      for (const [k, v] of Object.entries(mod.globals as Record<string, unknown>)) {
        if (!(k in globalThis)) (globalThis as Record<string, unknown>)[k] = v;
      }
      dawnGpu = mod.create(dawnFlags());
    }
    const adapter = await dawnGpu!.requestAdapter({ powerPreference: "high-performance" });
    return { adapter };
  } catch (e) {
    dawnGpu = null;
    return { adapter: null, error: e instanceof Error ? e.message : String(e) };
  }
}

/** Finds an adapter for the preference; throws a UserError (exit code 2) that says how to get one. */
export async function requestProviderAdapter(pref: ProviderPreference): Promise<ProviderAdapter> {
  if (pref === "dawn") {
    const { adapter, error } = await dawnAdapter();
    if (!adapter) {
      throw new UserError(
        `--gpu dawn: Dawn (npm:webgpu) found no adapter${error ? ` (${error})` : ""}. ` +
          "Dawn needs a hardware Vulkan driver; use --gpu builtin for Deno's WebGPU (also on CPU-only machines).",
      );
    }
    return { provider: "dawn", adapter, reason: "forced with --gpu dawn / DISTILLERY_GPU=dawn" };
  }
  const adapter = await builtinAdapter();
  if (!adapter) {
    throw new UserError(`No WebGPU adapter from Deno's built-in WebGPU. ${INSTALL_HINT}`);
  }
  const reason = pref === "builtin"
    ? "forced with --gpu builtin / DISTILLERY_GPU=builtin"
    : "auto: Deno's built-in WebGPU is the default; Dawn is opt-in (--gpu dawn) until its stability is proven";
  return { provider: "builtin", adapter, reason };
}
