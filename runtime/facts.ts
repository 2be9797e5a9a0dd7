/**
 * The runtime facts that change numerical results, for the cache keys of device stages: which provider and
 * adapter would run, and the dtype. `auto` is resolved exactly as {@linkcode acquireDevice} would resolve it, so a
 * run on a different provider or adapter never reuses another's results.
 *
 * @module
 */
import { type ProviderPreference, requestProviderAdapter } from "./provider.ts";

/** Facts entering the keys of device stages. */
export interface NumericFacts {
  /** `dawn` or `builtin`. */
  provider: string;
  /** Adapter description (GPU name and driver, or the software adapter's). */
  adapter: string;
  /** Storage dtype of weights and activations. */
  dtype: string;
  /** Index signature for the runner's record type. */
  [k: string]: string;
}

const cache = new Map<string, Promise<NumericFacts>>();

/** Probes the adapter the preference selects (once per preference and dtype). */
export function numericFacts(gpu: ProviderPreference, dtype: string): Promise<NumericFacts> {
  const key = `${gpu}/${dtype}`;
  let p = cache.get(key);
  if (!p) {
    p = requestProviderAdapter(gpu).then(({ provider, adapter }) => ({
      provider,
      adapter: [adapter.info.vendor, adapter.info.architecture, adapter.info.description].filter(Boolean)
        .join(" "),
      dtype,
    }));
    cache.set(key, p);
  }
  return p;
}
