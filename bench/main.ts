/**
 * Benchmark entry point: `deno task bench <name> [options]`. Results go into BENCHMARKS.md by hand, with the
 * device, date and command printed by each benchmark.
 *
 * | name   | what                                                                   |
 * | ------ | ---------------------------------------------------------------------- |
 * | `noop` | no-op re-run of a recipe with 1 GiB of artifacts (bench/noop_rerun.ts) |
 * | `spec` | speculative decoding on a 1B-shape hybrid (bench/spec.ts)              |
 *
 * @module
 */
import { noopRerun } from "./noop_rerun.ts";
import { specBench } from "./spec.ts";

/** Benchmarks by name. */
export const BENCHMARKS: Record<string, { doc: string; run: (args: string[]) => Promise<unknown> }> = {
  noop: { doc: "no-op re-run of a recipe whose artifacts total 1 GiB (target: under 1 s)", run: noopRerun },
  spec: {
    doc: "speculative decoding on a random-init 1B-shape hybrid (--gpu dawn, --quick)",
    run: specBench,
  },
};

if (import.meta.main) {
  const [name, ...rest] = Deno.args;
  const bench = name ? BENCHMARKS[name] : undefined;
  if (!bench) {
    console.error(
      `usage: deno task bench <name> [options]\n` +
        Object.entries(BENCHMARKS).map(([n, b]) => `  ${n.padEnd(8)} ${b.doc}`).join("\n"),
    );
    Deno.exit(name ? 2 : 0);
  }
  await bench.run(rest);
}
