import assert from "node:assert/strict";
import { refForward } from "./model_f64.ts";
import { type FIXTURE_MODELS, loadReferenceModel, openOracle } from "./fixtures.ts";
import { maxAbsDiff } from "../helpers/gpu.ts";

// The float64 reference is an oracle for other tests, so it is itself pinned to the HF / MambaInLlama fixtures,
// with the tolerances fixtures/reference/README.md suggests for an fp32 re-implementation.
const CASES: [keyof typeof FIXTURE_MODELS, string[], number][] = [
  ["llama", ["p0", "p1", "p2", "p3"], 2e-4],
  ["mistral", ["p0", "p1"], 2e-4],
  ["hybrid", ["p0", "p1", "p2", "p3"], 2e-3],
];

for (const [name, prompts, tol] of CASES) {
  Deno.test(`float64 reference matches the ${name} fixture logits and layer outputs`, async () => {
    const { cfg, w } = await loadReferenceModel(name);
    const oracle = await openOracle(name);
    for (const p of prompts) {
      const ids = [...await oracle.readInt32(`${p}.input_ids`)];
      const out = refForward(cfg, w, ids);
      const logitsErr = maxAbsDiff(out.logits, await oracle.readFloat32(`${p}.logits`));
      assert.ok(logitsErr <= tol, `${name} ${p}: logits max|diff| ${logitsErr} > ${tol}`);
      for (let l = 0; l < cfg.nLayers; l++) {
        const ref = await oracle.readFloat32(`${p}.layer_out.${l}`);
        const scale = ref.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
        const err = maxAbsDiff(out.layerOut[l], ref);
        assert.ok(err <= 1e-3 * scale, `${name} ${p} layer ${l}: max|diff| ${err} > 1e-3 * ${scale}`);
      }
    }
  });
}
