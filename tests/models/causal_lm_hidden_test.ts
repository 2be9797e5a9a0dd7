import assert from "node:assert/strict";
import { CausalLM } from "../../models/causal_lm.ts";
import { loadModel } from "../../models/checkpoint.ts";
import { LM_HEAD } from "../../models/weights.ts";
import { headLoss } from "../../runtime/ops/head_loss.ts";
import { distillLoss } from "../../runtime/ops/loss.ts";
import { linear } from "../../runtime/ops/matmul.ts";
import { FIXTURE_MODELS, fixturePath, openOracle } from "../reference/fixtures.ts";
import { assertClose, gpuTestOptions, maxAbsDiff, testRuntime } from "../helpers/gpu.ts";

Deno.test(
  "CausalLM.hidden + lm_head reproduces forward's logits; headLoss on it trains like the unfused loss",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const model = await loadModel(fixturePath(FIXTURE_MODELS.llama.dir));
    // a trainable final norm: its gradient flows through hidden() and the fused head's dHidden
    const lm = CausalLM.fromModel(rt, model, { trainable: (n) => n === "model.norm.weight" });
    const oracle = await openOracle("llama");
    try {
      const ids = await oracle.readInt32("p0.input_ids");
      const T = ids.length;
      const labels = new Int32Array(T).map((_, i) => (i + 1 < T ? ids[i + 1] : -100));
      const norm = lm.param("model.norm.weight");
      const readGrad = async () => {
        const g = await norm.grad!.read();
        norm.grad!.dispose();
        norm.grad = null;
        return g;
      };
      let unfused: { logits: ArrayLike<number>; loss: ArrayLike<number>; grad: ArrayLike<number> };
      {
        const r = await rt.scope(async () => {
          const logits = lm.forward(ids, 1, T).logits;
          const res = distillLoss(logits, { labels: rt.tensor(labels, [T], "i32") });
          rt.backward(res.loss);
          return { logits: await logits.read(), loss: await res.loss.read() };
        });
        unfused = { ...r, grad: await readGrad() };
      }
      const fused = await rt.scope(async () => {
        const h = lm.hidden(ids, 1, T);
        assert.deepEqual([...h.shape], [T, lm.config.hiddenSize]);
        const logits = rt.noGrad(() => linear(h, lm.param(LM_HEAD)));
        const res = headLoss(h, lm.param(LM_HEAD), { labels: rt.tensor(labels, [T], "i32"), chunkRows: 3 });
        rt.backward(res.loss);
        return { logits: await logits.read(), loss: await res.loss.read() };
      });
      const fusedGrad = await readGrad();
      // same kernels on the same inputs up to the lm_head; the chunked loss sums in another order
      assert.ok(maxAbsDiff(fused.logits, unfused.logits) <= 1e-5, "logits of hidden() @ lm_head");
      assert.ok(
        maxAbsDiff(fused.logits, await oracle.readFloat32("p0.logits")) <= 2e-4,
        "logits vs reference",
      );
      assertClose(fused.loss, unfused.loss, { rtol: 1e-5, atol: 1e-6 }, "loss");
      assertClose(fusedGrad, unfused.grad, { rtol: 1e-4, atol: 1e-6 }, "final norm gradient");
    } finally {
      lm.dispose();
    }
  },
);
