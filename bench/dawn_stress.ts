/**
 * Dawn stability stress test: runs many steps of GPU work through a chosen sync pattern and reports whether the
 * process survives, how long each sync costs, and the steady-state step rate.
 *
 *   deno run -A bench/dawn_stress.ts --gpu dawn --steps 20000 --sync-every 10 --mode read
 *
 * `--mode read` waits by mapping a staging buffer (what the runtime does for metrics and sampled tokens);
 * `--mode done` waits with queue.onSubmittedWorkDone (the pattern that crashed the Dawn binding when done after
 * every submit). `--step` picks the work per step: `elementwise` (a few 1M-element kernels) or a function
 * registered by a later benchmark.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { add, mul, silu } from "../runtime/ops/elementwise.ts";

function flag(name: string, dflt: string): string {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : dflt;
}

const gpu = parseProviderPreference(flag("gpu", "auto"), "--gpu");
const steps = Number(flag("steps", "2000"));
const syncEvery = Number(flag("sync-every", "10"));
const mode = flag("mode", "read");
const n = Number(flag("size", String(1 << 20)));

const rt = new Runtime(await createDevice({ gpu }));
console.log(JSON.stringify({ event: "start", device: rt.dev.describe(), steps, syncEvery, mode, size: n }));
const x = rt.full([n], 0.5).keep();
const w = rt.full([n], 0.999).keep();
const acc = rt.zeros([n]).keep();
const t0 = performance.now();
let syncMs = 0, syncs = 0;
for (let s = 1; s <= steps; s++) {
  rt.scope(() => {
    const y = silu(mul(x, w));
    rt.axpyInPlace(acc, add(y, x), 1e-6);
  });
  if (s % syncEvery === 0) {
    const ts = performance.now();
    if (mode === "done") await rt.dev.sync();
    else await rt.dev.read(acc.buffer, 0, 4);
    syncMs += performance.now() - ts;
    syncs++;
  } else {
    rt.dev.flush();
  }
  if (s % Math.max(1, Math.floor(steps / 10)) === 0) {
    const el = (performance.now() - t0) / 1000;
    console.log(JSON.stringify({
      event: "progress",
      step: s,
      seconds: +el.toFixed(2),
      steps_per_s: +(s / el).toFixed(1),
      ms_per_sync: +(syncMs / Math.max(1, syncs)).toFixed(3),
      pool_live_mb: +(rt.pool.stats.liveBytes / 2 ** 20).toFixed(1),
      buffers_created: rt.pool.stats.created,
    }));
  }
}
const v = (await acc.read())[0];
console.log(JSON.stringify({ event: "done", steps, value: v, seconds: (performance.now() - t0) / 1000 }));
