/**
 * Runs the GPU kernel benchmarks in one process and writes one JSON row per measurement, so one call on a GPU
 * machine measures every family for a provider:
 *
 *   deno run -A bench/gpu_suite.ts --gpu dawn --out $OUT/dawn.jsonl [--only kernels,ssd] [--quick]
 *
 * Families: kernels (matmul sweep, GEMV, copy), attention, loss, ssd, selective_scan, conv1d, gated_rmsnorm.
 * A family that throws is logged as an error row and the suite goes on.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { flag } from "./harness.ts";

type BenchFn = (
  rt: Runtime,
  log: (row: Record<string, unknown>) => void,
  opts: { quick: boolean },
) => Promise<void>;

/** Benchmark families, in the order they run. */
export const FAMILIES: Record<string, () => Promise<BenchFn>> = {
  kernels: async () => (await import("./kernels.ts")).bench as BenchFn,
  attention: async () => (await import("./attention.ts")).bench as BenchFn,
  loss: async () => (await import("./loss.ts")).bench as BenchFn,
  ssd: async () => (await import("./ssd.ts")).bench as BenchFn,
  selective_scan: async () => (await import("./selective_scan.ts")).bench as BenchFn,
  conv1d: async () => (await import("./conv1d.ts")).bench as BenchFn,
  gated_rmsnorm: async () => (await import("./gated_rmsnorm.ts")).bench as BenchFn,
};

if (import.meta.main) {
  const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
  const quick = Deno.args.includes("--quick");
  const only = flag("only")?.split(",") ?? Object.keys(FAMILIES);
  const outPath = flag("out");
  const file = outPath ? await Deno.open(outPath, { write: true, create: true, append: true }) : null;
  const enc = new TextEncoder();
  const rt = new Runtime(await createDevice({ gpu }));
  const log = (row: Record<string, unknown>) => {
    const line = JSON.stringify({ provider: rt.dev.provider, ...row });
    console.log(line);
    file?.writeSync(enc.encode(line + "\n"));
  };
  for (const name of only) {
    const load = FAMILIES[name];
    if (!load) throw new Error(`unknown family ${name}; known: ${Object.keys(FAMILIES).join(", ")}`);
    const t0 = performance.now();
    try {
      await (await load())(rt, (r) => log({ family: name, ...r }), { quick });
    } catch (e) {
      log({ family: name, error: String(e) });
    }
    log({ family: name, suite_seconds: +((performance.now() - t0) / 1000).toFixed(1) });
  }
  file?.close();
}
