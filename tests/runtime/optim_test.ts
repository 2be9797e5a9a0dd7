import assert from "node:assert/strict";
import {
  AdamW,
  constantSchedule,
  linearDecaySchedule,
  warmupCosineSchedule,
  warmupStepsFromRatio,
} from "../../runtime/optim.ts";
import { assertClose, gpuTestOptions, randn, testRng, testRuntime } from "../helpers/gpu.ts";
import type { Rng } from "../../util/rng.ts";
import type { Runtime } from "../../runtime/runtime.ts";
import type { Tensor } from "../../runtime/tensor.ts";

/** Float64 AdamW over flat parameter arrays, PyTorch's operation order, with global-norm clipping. */
class RefAdamW {
  m: Float64Array[];
  v: Float64Array[];
  t = 0;
  constructor(
    public p: Float64Array[],
    public wd: number[],
    public lrScale: number[],
    public b1: number,
    public b2: number,
    public eps: number,
    public maxNorm: number,
  ) {
    this.m = p.map((x) => new Float64Array(x.length));
    this.v = p.map((x) => new Float64Array(x.length));
  }
  step(grads: Float64Array[], lr: number): number {
    this.t++;
    let ss = 0;
    for (const g of grads) for (const x of g) ss += x * x;
    const norm = Math.sqrt(ss);
    const clip = this.maxNorm > 0 ? Math.min(1, this.maxNorm / (norm + 1e-6)) : 1;
    const bc1 = 1 - this.b1 ** this.t, bc2 = 1 - this.b2 ** this.t;
    this.p.forEach((p, k) => {
      const a = lr * this.lrScale[k];
      for (let i = 0; i < p.length; i++) {
        const g = grads[k][i] * clip;
        p[i] *= 1 - a * this.wd[k];
        this.m[k][i] += (1 - this.b1) * (g - this.m[k][i]);
        this.v[k][i] = this.b2 * this.v[k][i] + (1 - this.b2) * g * g;
        p[i] -= (a / bc1) * this.m[k][i] / (Math.sqrt(this.v[k][i]) / Math.sqrt(bc2) + this.eps);
      }
    });
    return norm;
  }
}

const SHAPES = [[7, 5], [13]];

function setGrads(rt: Runtime, params: Tensor[], grads: Float64Array[]): void {
  params.forEach((p, i) => {
    p.grad = rt.tensor(grads[i], p.shape).keep();
  });
}

function drawGrads(rng: Rng): Float64Array[] {
  return SHAPES.map((s) => randn(rng, s.reduce((a, b) => a * b)));
}

for (const maxNorm of [0, 0.5]) {
  Deno.test(
    `AdamW vs float64 AdamW over 6 steps: weight decay, param groups, cosine lr, clipping ${
      maxNorm || "off"
    }`,
    gpuTestOptions,
    async () => {
      const rt = await testRuntime();
      const rng = testRng(`adamw-${maxNorm}`);
      const init = SHAPES.map((s) => randn(rng, s.reduce((a, b) => a * b)));
      const params = init.map((x, i) => rt.parameter(x, SHAPES[i], `p${i}`));
      const opt = new AdamW(rt, [{ params: [params[0]] }, {
        params: [params[1]],
        weightDecay: 0,
        lrScale: 0.5,
      }], {
        lr: 0.05,
        betas: [0.9, 0.98],
        eps: 1e-8,
        weightDecay: 0.1,
        maxGradNorm: maxNorm,
      });
      const ref = new RefAdamW(
        init.map((x) => Float64Array.from(x)),
        [0.1, 0],
        [1, 0.5],
        0.9,
        0.98,
        1e-8,
        maxNorm,
      );
      const schedule = warmupCosineSchedule({ lr: 0.05, warmupSteps: 2, totalSteps: 6, minRatio: 0.1 });
      let refNorm = 0;
      for (let step = 0; step < 6; step++) {
        const grads = drawGrads(rng);
        setGrads(rt, params, grads);
        opt.step(schedule(step));
        refNorm = ref.step(grads, schedule(step));
        opt.zeroGrad();
      }
      const [p0, p1, norm] = await Promise.all([params[0].read(), params[1].read(), opt.gradNorm.read()]);
      // f32 state and arithmetic over 6 steps of size <= lr: about 1e-7 relative per step
      assertClose(p0, ref.p[0], { rtol: 1e-5, atol: 1e-6 }, "param 0");
      assertClose(p1, ref.p[1], { rtol: 1e-5, atol: 1e-6 }, "param 1");
      if (maxNorm > 0) {
        assertClose([norm[0]], [refNorm], { rtol: 1e-5, atol: 0 }, "grad norm");
        assert.ok(norm[1] < 1, "clipping was active");
        assertClose([norm[1]], [maxNorm / (refNorm + 1e-6)], { rtol: 1e-5, atol: 0 }, "clip factor");
      }
      assert.equal(params[0].grad, null, "zeroGrad drops grads");
      opt.dispose();
      params.forEach((p) => p.dispose());
    },
  );
}

Deno.test(
  "AdamW state export/import resumes bit-exactly; parameters without grads are skipped",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("adamw-resume");
    const init = SHAPES.map((s) => randn(rng, s.reduce((a, b) => a * b)));
    const a = init.map((x, i) => rt.parameter(x, SHAPES[i], `p${i}`));
    const optA = new AdamW(rt, a, { lr: 0.01, maxGradNorm: 1 });
    for (let s = 0; s < 3; s++) {
      setGrads(rt, a, drawGrads(rng));
      if (s === 1) {
        a[1].grad!.dispose();
        a[1].grad = null; // p1 gets no gradient at step 1: its step count stays behind
      }
      optA.step();
      optA.zeroGrad();
    }
    const state = await optA.exportState();
    assert.deepEqual(state.steps, [3, 2]);
    assert.deepEqual(state.names, ["p0", "p1"]);
    // a second model at A's weights with the imported state must follow A exactly
    const b = await Promise.all(a.map(async (p, i) => rt.parameter(await p.read(), SHAPES[i], `p${i}`)));
    const optB = new AdamW(rt, b, { lr: 0.01, maxGradNorm: 1 });
    optB.importState(state);
    for (let s = 0; s < 2; s++) {
      const grads = drawGrads(rng);
      setGrads(rt, a, grads);
      setGrads(rt, b, grads);
      optA.step(0.02);
      optB.step(0.02);
      optA.zeroGrad();
      optB.zeroGrad();
    }
    const [a0, a1, b0, b1] = await Promise.all([...a, ...b].map((p) => p.read()));
    assert.deepEqual([...b0], [...a0]);
    assert.deepEqual([...b1], [...a1]);
    optA.dispose();
    optB.dispose();
    [...a, ...b].forEach((p) => p.dispose());
  },
);

Deno.test(
  "gradient norm without clipping; zeroGrad(setToNone false) keeps zeroed buffers",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const rng = testRng("grad-norm");
    const p = rt.parameter(randn(rng, 300), [300], "w");
    const q = rt.parameter(randn(rng, 5000), [5000], "u");
    const opt = new AdamW(rt, [p, q], { lr: 0.01 });
    const gp = randn(rng, 300), gq = randn(rng, 5000);
    setGrads(rt, [p, q], [gp, gq]);
    opt.computeGradNorm();
    const [norm, factor] = await opt.gradNorm.read();
    let ss = 0;
    for (const x of [...gp, ...gq]) ss += x * x;
    assertClose([norm, factor], [Math.sqrt(ss), 1], { rtol: 1e-5, atol: 0 }, "norm, factor");
    opt.zeroGrad({ setToNone: false });
    assert.ok((await p.grad!.read()).every((x) => x === 0));
    p.grad!.dispose();
    q.grad!.dispose();
    opt.dispose();
    p.dispose();
    q.dispose();
  },
);

Deno.test("learning-rate schedules (HF conventions)", () => {
  const c = constantSchedule({ lr: 1, warmupSteps: 4 });
  assert.deepEqual([0, 1, 4, 100].map(c), [0, 0.25, 1, 1]);
  const cos = warmupCosineSchedule({ lr: 2, warmupSteps: 10, totalSteps: 110, minRatio: 0.1 });
  assert.equal(cos(0), 0);
  assert.equal(cos(5), 1);
  assert.equal(cos(10), 2);
  assertClose(
    [cos(60), cos(110), cos(500)],
    [2 * (0.1 + 0.9 * 0.5), 0.2, 0.2],
    { rtol: 1e-12, atol: 1e-12 },
    "cosine",
  );
  const lin = linearDecaySchedule({ lr: 1, warmupSteps: 0, totalSteps: 10 });
  assertClose([lin(0), lin(5), lin(10), lin(20)], [1, 0.5, 0, 0], { rtol: 0, atol: 1e-12 }, "linear");
  assert.equal(warmupStepsFromRatio(0.01, 250), 3);
});

Deno.test(
  "AdamW on f16 parameters: f32 master weights keep updates below half an f16 step; resume restores them",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    if (!rt.dev.features.f16) return console.warn("AdamW f16: no shader-f16");
    const rng = testRng("adamw-f16-master");
    const n = 64;
    // weights near 1, where an f16 step is 2^-10: an Adam update of about lr = 1e-4 a step is under half of it
    const init = Float64Array.from(randn(rng, n, 0.01), (x) => Math.fround(new Float16Array([1 + x])[0]));
    const grads = Float64Array.from(randn(rng, n), (x) => (x >= 0 ? 1 : -1) * (0.5 + Math.abs(x)));
    const opts = { lr: 1e-4, weightDecay: 0 };
    const run = (masterWeights: boolean, steps: number) => {
      const p = rt.tensor(init, [n], "f16").keep();
      p.requiresGrad = true;
      p.name = "w";
      const opt = new AdamW(rt, [p], { ...opts, masterWeights });
      for (let s = 0; s < steps; s++) {
        p.grad = rt.tensor(grads, [n], "f16").keep();
        opt.step();
        opt.zeroGrad();
      }
      return { p, opt };
    };
    const ref = new RefAdamW([Float64Array.from(init)], [0], [1], 0.9, 0.999, 1e-8, 0);
    for (let s = 0; s < 40; s++) ref.step([Float64Array.from(grads, (g) => new Float16Array([g])[0])], 1e-4);

    const withMaster = run(true, 40);
    const state = await withMaster.opt.exportState();
    const master = state.master![0]!;
    // f32 arithmetic over 40 steps of about 1e-4 on values near 1
    assertClose(master, ref.p[0], { rtol: 0, atol: 2e-6 }, "master copy vs float64");
    // the parameter is the master rounded to f16: within half a step of 2^-10 (plus the master's own error)
    const got = await withMaster.p.read();
    assertClose(got, ref.p[0], { rtol: 0, atol: 2 ** -11 + 4e-6 }, "f16 parameter vs float64");
    const moved = got.filter((x, i) => x !== init[i]).length;
    assert.ok(moved > n / 2, `${moved} of ${n} weights moved after 40 steps`);
    // without master weights every update rounds away: nothing moves
    const without = run(false, 40);
    assert.deepEqual([...await without.p.read()], [...init].map((x) => Math.fround(x)));
    assert.equal((await without.opt.exportState()).master![0], null);

    // a resumed optimizer (parameter at the checkpoint's f16 values, imported state) continues exactly
    const resumed = rt.tensor(got, [n], "f16").keep();
    resumed.requiresGrad = true;
    resumed.name = "w";
    const optB = new AdamW(rt, [resumed], opts);
    optB.importState(state);
    for (let s = 0; s < 10; s++) {
      for (const [p, o] of [[withMaster.p, withMaster.opt], [resumed, optB]] as const) {
        p.grad = rt.tensor(grads, [n], "f16").keep();
        o.step();
        o.zeroGrad();
      }
    }
    assert.deepEqual([...await resumed.read()], [...await withMaster.p.read()], "resumed parameter");
    const [after, afterB] = [await withMaster.opt.exportState(), await optB.exportState()];
    assert.deepEqual([...afterB.master![0]!], [...after.master![0]!], "resumed master copy");
    for (const o of [withMaster.opt, without.opt, optB]) o.dispose();
    for (const p of [withMaster.p, without.p, resumed]) p.dispose();
  },
);
