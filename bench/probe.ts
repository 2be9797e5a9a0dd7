/**
 * Prints what each WebGPU provider offers on this machine: adapter, features, key limits, and subgroup-matrix
 * configurations (whose fields do not show when the objects are printed directly).
 *
 * @module
 */
import { requestProviderAdapter } from "../runtime/provider.ts";

for (const pref of ["builtin", "dawn"] as const) {
  try {
    const { provider, adapter } = await requestProviderAdapter(pref);
    const info = adapter.info as GPUAdapterInfo & { subgroupMatrixConfigs?: Record<string, unknown>[] };
    const configs = (info.subgroupMatrixConfigs ?? []).map((c) => {
      const o: Record<string, unknown> = {};
      for (const k of ["componentType", "resultComponentType", "M", "N", "K"]) {
        o[k] = (c as Record<string, unknown>)[k];
      }
      return o;
    });
    const lim = adapter.limits as unknown as Record<string, number>;
    console.log(JSON.stringify({
      provider,
      description: info.description,
      vendor: info.vendor,
      architecture: info.architecture,
      isFallback: (info as { isFallbackAdapter?: boolean }).isFallbackAdapter,
      subgroupMinSize: (info as { subgroupMinSize?: number }).subgroupMinSize,
      subgroupMaxSize: (info as { subgroupMaxSize?: number }).subgroupMaxSize,
      features: [...adapter.features],
      limits: Object.fromEntries(
        [
          "maxBufferSize",
          "maxStorageBufferBindingSize",
          "maxComputeWorkgroupStorageSize",
          "maxComputeInvocationsPerWorkgroup",
          "maxStorageBuffersPerShaderStage",
          "minStorageBufferOffsetAlignment",
          "minUniformBufferOffsetAlignment",
        ].map((k) => [k, lim[k]]),
      ),
      subgroupMatrixConfigs: configs,
    }));
  } catch (e) {
    console.log(JSON.stringify({ provider: pref, error: String(e) }));
  }
}
