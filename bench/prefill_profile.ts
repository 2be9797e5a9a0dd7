/**
 * Where the time of a 2048-token prefill of the 1B-shape 50% hybrid goes: each op of one Mamba2 layer timed alone
 * at its prefill shape (copies recorded back to back, one read at the end), next to whole forward passes of the
 * hybrid and its teacher, and every dispatch of one forward of each timed alone with timestamp queries (GPU
 * milliseconds summed per kernel, slowest first).
 *
 *   deno run -A bench/prefill_profile.ts --gpu dawn [--quick]
 *
 * @module
 */
import { Runtime } from "../runtime/runtime.ts";
import { createDevice } from "../runtime/device.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { CausalLM } from "../models/causal_lm.ts";
import { makeMamba2Config } from "../models/config.ts";
import { linear } from "../runtime/ops/matmul.ts";
import { splitLastDim } from "../runtime/ops/columns.ts";
import { causalConv1d } from "../runtime/ops/conv1d.ts";
import { ssdScan } from "../runtime/ops/ssd.ts";
import { gatedRmsNorm } from "../runtime/ops/gated_norm.ts";
import type { Tensor } from "../runtime/tensor.ts";
import { flag, gpuTimeline, profileDispatches, randomTensor, timelineRow, timeRecorded } from "./harness.ts";
import { llama32OneB } from "./model.ts";

const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
const quick = Deno.args.includes("--quick");
const rt = new Runtime(await createDevice({ gpu }));
const cfg = llama32OneB(quick);
const T = quick ? 64 : 2048;
const reps = quick ? 2 : 10;

async function time(name: string, record: () => Tensor | Tensor[] | void, n = reps): Promise<void> {
  const { ms, recordMs } = await timeRecorded(rt, record, n, { scoped: true });
  console.log(JSON.stringify({
    bench: "prefill_profile",
    provider: rt.dev.provider,
    op: name,
    tokens: T,
    ms: +ms.toFixed(3),
    record_ms: +recordMs.toFixed(3),
  }));
}

const mamba = makeMamba2Config(cfg, Array.from({ length: cfg.numLayers / 2 }, (_, i) => 2 * i + 1));
const D = cfg.hiddenSize, dInner = mamba.dInner, dXb = mamba.dXb, H = mamba.nHeads, hd = mamba.headDim;
const convC = 2 * dXb + dInner, wide = dInner + convC + H;
const rand = (shape: number[], s = 0.02) => randomTensor(rt, shape, -s, s);
const u = rand([T, D], 1);
const wIn = rand([wide, D]);
const wOut = rand([D, dInner]);
const zxbcdt = rand([T, wide], 1);
const xBCraw = rand([1, T, convC], 1);
const convW = rand([convC, mamba.dConv], 0.5);
const convB = rand([convC], 0.1);
const xBC = rand([1, T, convC], 1);
const dt = rand([1, T, H], 1);
const dtBias = rand([H], 0.1);
const A = rt.full([H], -1).keep();
const Dp = rand([H], 1);
const y = rand([T, dInner], 1);
const z = rand([T, dInner], 1);
const normW = rand([dInner], 1);
const dims = { headsX: dXb / hd, headsB: dXb / hd, headsC: H, dimP: hd, dimN: mamba.dState };

await rt.noGrad(async () => {
  await time("in_proj linear", () => linear(u, wIn));
  await time("split z|xBC|dt", () => splitLastDim(zxbcdt, [dInner, convC, H]));
  await time("causal conv1d + SiLU", () => causalConv1d(xBCraw, convW, convB, { silu: true }).out);
  for (const chunkSize of [64, 128, 256]) {
    await time(`ssd scan (chunk ${chunkSize})`, () => {
      const r = ssdScan({ xBC, dims, dt, dtBias, A, D: Dp }, { chunkSize });
      return [r.y, r.finalState];
    });
  }
  await time("gated RMSNorm", () => gatedRmsNorm(y, z, normW, { group: hd, eps: 1e-5 }));
  await time("out_proj linear", () => linear(y, wOut));
  for (const which of ["teacher", "hybrid"]) {
    const lm = CausalLM.random(rt, cfg, which === "hybrid" ? mamba : null, {
      seed: 7,
      chunkSize: quick ? 16 : 64,
    });
    const ids = new Int32Array(T).map((_, i) => (i * 7919) % cfg.vocabSize);
    await time(`${which} forward, full logits`, () => rt.noGrad(() => lm.forward(ids, 1, T).logits), 3);
    // the same forward with its compute passes timestamped: GPU busy time against wall time
    const tl = await gpuTimeline(rt, () =>
      rt.scope(async () => {
        // 4 bytes, not the 1 GB of logits: the row compares the forward's GPU time with its wall time
        const logits = rt.noGrad(() => lm.forward(ids, 1, T).logits);
        await rt.dev.read(logits.buffer, 0, 4);
      }));
    if (tl) {
      console.log(JSON.stringify({
        bench: "prefill_profile",
        provider: rt.dev.provider,
        op: `${which} forward, timeline`,
        tokens: T,
        ...timelineRow(tl),
      }));
    }
    // every dispatch of one forward timed alone: which kernel the time goes to
    const kernels = await rt.scope(() => profileDispatches(rt, () => void lm.forward(ids, 1, T).logits));
    for (const k of kernels ?? []) {
      console.log(JSON.stringify({
        bench: "prefill_profile",
        provider: rt.dev.provider,
        model: which,
        tokens: T,
        ...k,
        ms: +k.ms.toFixed(3),
      }));
    }
    lm.dispose();
  }
});
