/**
 * The CPU cost of a decode step per dispatch: the 16-layer 1B-shape teacher and its 50% hybrid with tiny widths
 * (hidden 64, vocab 256), so the GPU's work per dispatch is small. Reports the GPU-resident greedy loop's wall time
 * per token, the part of it spent outside the awaits of its reads (`cpu_ms_per_token`: recording, submitting and
 * the provider's per-dispatch work; on a real GPU the wall time also holds each tiny kernel's GPU time), and the
 * time inside `GpuDevice.dispatch` (our bookkeeping plus the binding's setPipeline/setBindGroup/dispatchWorkgroups).
 *
 *   deno run -A bench/decode_overhead.ts --gpu dawn [--tokens 128] [--dtype f16]
 *   DISTILLERY_DAWN_BACKEND=null deno run -A bench/decode_overhead.ts --gpu dawn   # no GPU needed
 *
 * It says how much of a decode step's time the CPU side alone costs.
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { makeMamba2Config } from "../models/config.ts";
import { greedyResident } from "../models/generate.ts";
import { llama32OneB } from "./model.ts";
import { flag, hostCpu } from "./harness.ts";

const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
const rt = new Runtime(await createDevice({ gpu }));
const cfg = {
  ...llama32OneB(false),
  hiddenSize: 64,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 16,
  intermediateSize: 128,
  vocabSize: 256,
};
const newTokens = Number(flag("tokens") ?? 128);
const dtype = (flag("dtype") ?? "f32") as "f32" | "f16";
const dev = rt.dev;
const dispatch = dev.dispatch.bind(dev);
let inDispatch = 0;
dev.dispatch = (...args: Parameters<typeof dispatch>) => {
  const t = performance.now();
  dispatch(...args);
  inDispatch += performance.now() - t;
};
// Time the loop spends awaiting its reads (the GPU still running): on a real GPU, wall time minus that is the
// CPU's share. Reads overlap the next chunk's recording, so only the wait after recording counts.
const readMany = dev.readMany.bind(dev);
let waiting = 0;
dev.readMany = async (...args: Parameters<typeof readMany>) => {
  const pending = readMany(...args);
  const t = performance.now();
  try {
    return await pending;
  } finally {
    waiting += performance.now() - t;
  }
};
for (const which of ["teacher", "hybrid"]) {
  const attn = Array.from({ length: cfg.numLayers / 2 }, (_, i) => 2 * i + 1);
  const lm = CausalLM.random(rt, cfg, which === "hybrid" ? makeMamba2Config(cfg, attn) : null, {
    seed: 1,
    chunkSize: 16,
    dtype,
  });
  const prompt = new Int32Array(16).map((_, i) => i + 3);
  try {
    await greedyResident(lm, prompt, { maxNewTokens: 32, chunk: 32 }); // compiles every pipeline
  } catch (e) {
    // a kernel the device's limits refuse: report it and go on with the other model
    console.log(
      JSON.stringify({ bench: "decode_overhead", provider: dev.provider, model: which, error: String(e) }),
    );
    lm.dispose();
    continue;
  }
  const d0 = dev.stats.dispatches;
  inDispatch = 0;
  waiting = 0;
  const t0 = performance.now();
  await greedyResident(lm, prompt, { maxNewTokens: newTokens, chunk: 32 });
  const ms = performance.now() - t0;
  const dispatches = (dev.stats.dispatches - d0) / newTokens;
  console.log(JSON.stringify({
    bench: "decode_overhead",
    provider: dev.provider,
    device: dev.describe(),
    host: hostCpu(),
    model: which,
    dtype,
    layers: cfg.numLayers,
    new_tokens: newTokens,
    ms_per_token: +(ms / newTokens).toFixed(3),
    dispatches_per_token: +dispatches.toFixed(1),
    us_per_dispatch: +((ms * 1000) / newTokens / dispatches).toFixed(1),
    us_in_dispatch_call: +((inDispatch * 1000) / newTokens / dispatches).toFixed(1),
    // wall time outside the awaits of reads: recording and submitting (where the GPU keeps up, all of the time)
    cpu_ms_per_token: +((ms - waiting) / newTokens).toFixed(3),
  }));
  lm.dispose();
}
