/**
 * Device memory as the NVIDIA driver reports it, sampled by `nvidia-smi` in the background while a benchmark
 * runs. The buffer pool's high-water mark (`runtime/pool.ts`) counts the buffers Distillery creates; the driver's
 * figure adds what the WebGPU implementation and the CUDA/Vulkan context hold, so a benchmark that claims "fits
 * on the GPU" reports both. Machines without `nvidia-smi` (CI, the software adapter) get no monitor.
 *
 * @module
 */

/** One `nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits` line: MiB used, total. */
export function parseMemoryLine(line: string): { usedMiB: number; totalMiB: number } | null {
  const parts = line.split(",").map((s) => Number(s.trim()));
  if (parts.length !== 2 || !parts.every((x) => Number.isFinite(x))) return null;
  return { usedMiB: parts[0], totalMiB: parts[1] };
}

/** Samples the driver's used device memory every `intervalMs` until {@linkcode DriverMemoryMonitor.stop}. */
export class DriverMemoryMonitor {
  readonly #child: Deno.ChildProcess;
  readonly #done: Promise<void>;
  /** Used MiB of the first sample (before the benchmark allocated much), or null before any sample. */
  baselineMiB: number | null = null;
  /** Largest used MiB of any GPU in any sample so far, or null before any sample. */
  peakMiB: number | null = null;
  /** Device memory in MiB as the driver reports it, or null before any sample. */
  totalMiB: number | null = null;

  private constructor(child: Deno.ChildProcess) {
    this.#child = child;
    this.#done = this.#read();
  }

  /** Starts sampling, or returns null when `nvidia-smi` cannot be run here. */
  static start(intervalMs = 200): DriverMemoryMonitor | null {
    try {
      const child = new Deno.Command("nvidia-smi", {
        args: [
          "--query-gpu=memory.used,memory.total",
          "--format=csv,noheader,nounits",
          `-lms`,
          String(intervalMs),
        ],
        stdout: "piped",
        stderr: "null",
      }).spawn();
      return new DriverMemoryMonitor(child);
    } catch {
      return null;
    }
  }

  async #read(): Promise<void> {
    let rest = "";
    try {
      for await (const chunk of this.#child.stdout.pipeThrough(new TextDecoderStream())) {
        const lines = (rest + chunk).split("\n");
        rest = lines.pop() ?? "";
        for (const line of lines) {
          const m = parseMemoryLine(line);
          if (!m) continue;
          this.baselineMiB ??= m.usedMiB;
          this.totalMiB ??= m.totalMiB;
          this.peakMiB = Math.max(this.peakMiB ?? 0, m.usedMiB);
        }
      }
    } catch {
      // the stream ends with an error when the process is killed mid-line; the samples so far stand
    }
  }

  /** Stops sampling (after one more interval, so the last allocations are seen). */
  async stop(settleMs = 300): Promise<void> {
    await new Promise((r) => setTimeout(r, settleMs));
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // already exited
    }
    await this.#done;
    await this.#child.status;
  }
}
