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
import { flag } from "./harness.ts";

const gpu = parseProviderPreference(flag("gpu", "auto"), "--gpu");
const steps = Number(flag("steps", "2000"));
const syncEvery = Number(flag("sync-every", "10"));
const mode = flag("mode", "read");
const n = Number(flag("size", String(1 << 20)));

const stepKind = flag("step", "elementwise");
const seconds = Number(flag("seconds", "0"));

const rt = new Runtime(await createDevice({ gpu }));
console.log(
  JSON.stringify({ event: "start", device: rt.dev.describe(), steps, syncEvery, mode, step: stepKind }),
);
const x = rt.full([n], 0.5).keep();
const w = rt.full([n], 0.999).keep();
const acc = rt.zeros([n]).keep();
const trainStep = stepKind === "train" ? await makeTrainStep(rt) : null;
const t0 = performance.now();
let syncMs = 0, syncs = 0;
let lastLoss = NaN;
for (let s = 1; s <= steps || (seconds > 0 && performance.now() - t0 < seconds * 1000); s++) {
  if (trainStep) {
    trainStep.record(s);
  } else {
    rt.scope(() => {
      const y = silu(mul(x, w));
      rt.axpyInPlace(acc, add(y, x), 1e-6);
    });
  }
  if (s % syncEvery === 0) {
    const ts = performance.now();
    if (mode === "done") await rt.dev.sync();
    else if (trainStep) lastLoss = await trainStep.loss();
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
      loss: lastLoss,
      seconds: +el.toFixed(2),
      steps_per_s: +(s / el).toFixed(1),
      ms_per_sync: +(syncMs / Math.max(1, syncs)).toFixed(3),
      pool_live_mb: +(rt.pool.stats.liveBytes / 2 ** 20).toFixed(1),
      buffers_created: rt.pool.stats.created,
    }));
  }
}
const v = trainStep ? await trainStep.loss() : (await acc.read())[0];
console.log(JSON.stringify({ event: "done", steps, value: v, seconds: (performance.now() - t0) / 1000 }));

/**
 * A realistic training step: the stories260K Mamba2 hybrid fixture (attention layers 1 and 3), a batch of 8 x 128
 * TinyStories tokens, forward, cross-entropy, backward into the Mamba parameters, global-norm clipping and AdamW.
 * The loss of the latest step stays on the GPU until `loss()` reads it.
 */
async function makeTrainStep(rt: Runtime) {
  const { loadModel } = await import("../models/checkpoint.ts");
  const { CausalLM } = await import("../models/causal_lm.ts");
  const { crossEntropy } = await import("../runtime/ops/loss.ts");
  const { AdamW } = await import("../runtime/optim.ts");
  const { Tokenizer } = await import("../models/tokenizer.ts");
  const dir = new URL("../fixtures/reference/hybrid_mamba2_stories260k/model", import.meta.url).pathname;
  const lm = CausalLM.fromModel(rt, await loadModel(dir), { trainable: (n) => n.includes(".mamba.") });
  const tok = await Tokenizer.fromDir(new URL("../fixtures/models/stories260K-hf", import.meta.url).pathname);
  const text = await Deno.readTextFile(new URL("../fixtures/text/tinystories_train.txt", import.meta.url));
  const all = tok.encode(text.slice(0, 200_000));
  const B = 8, T = 128;
  const opt = new AdamW(rt, lm.trainableParams(), {
    lr: 1e-3,
    betas: [0.9, 0.98],
    weightDecay: 0,
    maxGradNorm: 1,
  });
  const lossBuf = rt.zeros([1]).keep();
  return {
    record(step: number) {
      const off = (step * B * (T + 1)) % (all.length - B * (T + 1));
      const ids = new Int32Array(B * T), labels = new Int32Array(B * T);
      for (let b = 0; b < B; b++) {
        for (let t = 0; t < T; t++) {
          ids[b * T + t] = all[off + b * (T + 1) + t];
          labels[b * T + t] = all[off + b * (T + 1) + t + 1];
        }
      }
      rt.scope(() => {
        const { logits } = lm.forward(ids, B, T);
        const { loss } = crossEntropy(logits, rt.tensor(labels, [B * T], "i32"));
        rt.backward(loss);
        opt.step();
        opt.zeroGrad();
        rt.copyInto(lossBuf, loss.view([1]));
      });
    },
    async loss(): Promise<number> {
      return (await lossBuf.read())[0];
    },
  };
}
