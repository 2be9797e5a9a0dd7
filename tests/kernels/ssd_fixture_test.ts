import { ssdScan } from "../../runtime/ops/ssd.ts";
import { assertClose, gpuTestOptions, testRuntime } from "../helpers/gpu.ts";

// The official MambaInLlama hybrid (fixtures/reference, section 2.3): layer 0 of prompt p0 is a Mamba2 layer. The
// test computes the mixer's projections, conv and gate in float64 on the CPU, runs the recurrence with the GPU scan
// on the packed conv output (fused softplus(dt + dt_bias), grouped x and B), and compares the prefill state with
// the fixture's `ssm_state` [nheads, headdim (p, from x), d_state (n, from B)] and the layer output with
// `layer_out.0`. This pins the state layout and the group convention against the reference implementation.

const DIR = new URL("../../fixtures/reference/hybrid_mamba2_stories260k/", import.meta.url);

async function loadSafetensors(url: URL): Promise<Map<string, { shape: number[]; data: Float64Array }>> {
  const bytes = await Deno.readFile(url);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const out = new Map<string, { shape: number[]; data: Float64Array }>();
  for (
    const [k, v] of Object.entries(header) as [
      string,
      { dtype: string; shape: number[]; data_offsets: number[] },
    ][]
  ) {
    if (k === "__metadata__" || v.dtype !== "F32") continue;
    const [a, b] = v.data_offsets;
    const f = new Float32Array(bytes.slice(8 + n + a, 8 + n + b).buffer);
    out.set(k, { shape: v.shape, data: Float64Array.from(f) });
  }
  return out;
}

const sig = (v: number) => 1 / (1 + Math.exp(-v));
const silu = (v: number) => v * sig(v);

/** rows [T, K] @ w^T with w [M, K] -> [T, M]. */
function linear(x: Float64Array, T: number, K: number, w: Float64Array, M: number): Float64Array {
  const y = new Float64Array(T * M);
  for (let t = 0; t < T; t++) {
    for (let m = 0; m < M; m++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[t * K + k] * w[m * K + k];
      y[t * M + m] = s;
    }
  }
  return y;
}

/** RMSNorm over groups of `g` values of each row, times weight. */
function rmsnorm(x: Float64Array, rowLen: number, g: number, w: Float64Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let o = 0; o < x.length; o += g) {
    let ss = 0;
    for (let i = 0; i < g; i++) ss += x[o + i] ** 2;
    const r = 1 / Math.sqrt(ss / g + eps);
    for (let i = 0; i < g; i++) y[o + i] = x[o + i] * r * w[(o + i) % rowLen];
  }
  return y;
}

Deno.test(
  "ssd scan inside the official Mamba2 layer: prefill state and layer output match the fixture",
  gpuTestOptions,
  async () => {
    const rt = await testRuntime();
    const model = await loadSafetensors(new URL("model/model.safetensors", DIR));
    const fx = await loadSafetensors(new URL("fixtures.safetensors", DIR));
    const w = (k: string) => model.get(`model.layers.0.${k}`)!.data;
    const D_MODEL = 64, H = 8, HKV = 4, HD = 8, D_INNER = 64, D_XB = 32, CONV = 2 * D_XB + D_INNER;
    const embed = fx.get("p0.embed")!.data;
    const T = embed.length / D_MODEL;

    const u = rmsnorm(embed, D_MODEL, D_MODEL, w("input_layernorm.weight"), 1e-5);
    const zxbcdt = linear(u, T, D_MODEL, w("mamba.in_proj.weight"), 2 * D_INNER + 2 * D_XB + H);
    const W = 2 * D_INNER + 2 * D_XB + H;
    const cw = w("mamba.conv1d.weight"), cb = w("mamba.conv1d.bias");
    const xbc = new Float64Array(T * CONV), z = new Float64Array(T * D_INNER), dt = new Float64Array(T * H);
    for (let t = 0; t < T; t++) {
      for (let c = 0; c < CONV; c++) {
        let s = cb[c];
        for (let k = 0; k < 4; k++) {
          const ti = t - 3 + k;
          if (ti >= 0) s += cw[c * 4 + k] * zxbcdt[ti * W + D_INNER + c];
        }
        xbc[t * CONV + c] = silu(s);
      }
      for (let i = 0; i < D_INNER; i++) z[t * D_INNER + i] = zxbcdt[t * W + i];
      for (let h = 0; h < H; h++) dt[t * H + h] = zxbcdt[t * W + D_INNER + CONV + h];
    }
    const A = w("mamba.A_log").map((v) => -Math.exp(v));

    await rt.scope(async () => {
      const out = ssdScan({
        xBC: rt.tensor(xbc, [1, T, CONV]),
        dims: { headsX: HKV, headsB: HKV, headsC: H, dimP: HD, dimN: HD },
        dt: rt.tensor(dt, [1, T, H]),
        A: rt.tensor(A, [H]),
        D: rt.tensor(w("mamba.D"), [H]),
        dtBias: rt.tensor(w("mamba.dt_bias"), [H]),
      }, { chunkSize: 4 });
      const [yf, state] = await Promise.all([out.y.read(), out.finalState.read()]);
      const want = fx.get("p0.prefill_state.layer0.ssm_state")!.data;
      assertClose(state, want, { rtol: 1e-4, atol: 1e-5 }, "prefill ssm_state [H, P, N]");

      // rest of the layer in float64: gate, grouped RMSNorm, out_proj, residual, MLP
      const g = new Float64Array(T * D_INNER);
      for (let i = 0; i < g.length; i++) g[i] = yf[i] * silu(z[i]);
      const gn = rmsnorm(g, D_INNER, HD, w("mamba.norm.weight"), 1e-5);
      const mix = linear(gn, T, D_INNER, w("mamba.out_proj.weight"), D_MODEL);
      const hres = embed.map((v, i) => v + mix[i]);
      const n2 = rmsnorm(hres, D_MODEL, D_MODEL, w("post_attention_layernorm.weight"), 1e-5);
      const gate = linear(n2, T, D_MODEL, w("mlp.gate_proj.weight"), 172);
      const up = linear(n2, T, D_MODEL, w("mlp.up_proj.weight"), 172);
      const act = gate.map((v, i) => silu(v) * up[i]);
      const down = linear(act, T, 172, w("mlp.down_proj.weight"), D_MODEL);
      const layerOut = hres.map((v, i) => v + down[i]);
      assertClose(layerOut, fx.get("p0.layer_out.0")!.data, { rtol: 1e-4, atol: 1e-5 }, "layer 0 output");
    });
  },
);
