/**
 * Benchmark: a no-op re-run of a recipe whose artifacts total 1 GiB must finish in under a second.
 *
 * Creates a temporary project whose `testing.bytes` stage writes `--size-mb` MiB (default 1024) over 8 files plus
 * a small text stage, runs it once (hashing the outputs once, on commit), then times `deno run -A main.ts run
 * <recipe>` as a fresh subprocess `--repeats` times. Every re-run must report all stages cached. Prints the
 * figures and a Markdown row for BENCHMARKS.md.
 *
 * ```sh
 * deno task bench noop [--size-mb 1024] [--repeats 5]
 * ```
 *
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";

const MAIN = new URL("../main.ts", import.meta.url).pathname;

async function cli(
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string; seconds: number }> {
  const t0 = performance.now();
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const seconds = (performance.now() - t0) / 1000;
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr), seconds };
}

function cpuName(): string {
  try {
    const m = /model name\s*:\s*(.+)/.exec(Deno.readTextFileSync("/proc/cpuinfo"));
    if (m) return `${m[1].trim()} (${navigator.hardwareConcurrency} threads)`;
  } catch {
    // not Linux
  }
  return `${Deno.build.os}/${Deno.build.arch}`;
}

/** Runs the benchmark; returns the median no-op time in seconds. */
export async function noopRerun(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: { "size-mb": { type: "string", default: "1024" }, repeats: { type: "string", default: "5" } },
  });
  const sizeMb = Number(values["size-mb"]);
  const repeats = Number(values.repeats);
  const dir = await Deno.makeTempDir({ prefix: "distillery-bench-" });
  try {
    const recipe = join(dir, "big.yaml");
    await Deno.writeTextFile(
      recipe,
      `name: big
description: no-op re-run benchmark
stages:
  data:
    kind: testing.bytes
    params: { size_mb: ${sizeMb}, files: 8 }
  note:
    kind: testing.text
    params: { text: "the data is ${sizeMb} MiB" }
`,
    );
    console.log(`first run: writing and hashing ${sizeMb} MiB ...`);
    const first = await cli(["run", recipe]);
    if (first.code !== 0) throw new Error(`first run failed:\n${first.stderr}`);
    console.log(`first run: ${first.seconds.toFixed(2)} s`);

    const times: number[] = [];
    for (let i = 0; i < repeats; i++) {
      const r = await cli(["run", recipe]);
      if (r.code !== 0 || !/0 to run, 2 cached/.test(r.stderr)) {
        throw new Error(`re-run ${i + 1} was not a no-op:\n${r.stderr}`);
      }
      times.push(r.seconds);
    }
    times.sort((a, b) => a - b);
    const median = times[Math.floor(times.length / 2)];
    console.log(
      `no-op re-runs (${repeats}, subprocess wall time incl. Deno start-up): ` +
        `min ${times[0].toFixed(3)} s, median ${median.toFixed(3)} s, max ${
          times[times.length - 1].toFixed(3)
        } s`,
    );
    console.log(`target < 1 s: ${median < 1 ? "met" : "NOT MET"}`);
    console.log("\nBENCHMARKS.md row:");
    console.log(
      `| no-op re-run, ${sizeMb} MiB of artifacts | ${median.toFixed(3)} s median of ${repeats} ` +
        `(min ${times[0].toFixed(3)} s; first run ${first.seconds.toFixed(1)} s) | ${cpuName()} | ` +
        `${new Date().toISOString().slice(0, 10)} | \`deno task bench noop --size-mb ${sizeMb}\` |`,
    );
    return median;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await noopRerun(Deno.args);
