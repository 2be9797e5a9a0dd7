/**
 * Splitting and joining along the last dimension, and taking rows: differentiable copies that let a model keep one
 * fused projection (Mamba2's in_proj) while its parts go to different kernels.
 *
 * @module
 */
import { gatherColumns, repeatGroups, scatterColumns, splitColumns3 } from "../../kernels/columns.ts";
import { biasColumnSums, biasForward } from "../../kernels/bias.ts";
import { shapeStr, type Tensor } from "../tensor.ts";

/** Splits x [..., sum(widths)] into tensors [..., widths[i]]. Differentiable. */
export function splitLastDim(x: Tensor, widths: readonly number[]): Tensor[] {
  const rt = x.rt;
  const wide = x.dim(-1);
  if (widths.reduce((a, b) => a + b, 0) !== wide) {
    throw new Error(
      `splitLastDim: widths ${widths.join("+")} do not sum to the last dim of ${shapeStr(x.shape)}`,
    );
  }
  const rows = x.size / wide;
  const lead = x.shape.slice(0, -1);
  const outs: Tensor[] = [];
  if (widths.length === 3 && widths.every((w) => w > 0)) {
    // one pass for three parts (Mamba2's z | xBC | dt in every layer and decoding step)
    for (const w of widths) outs.push(rt.empty([...lead, w], x.dtype));
    const l = splitColumns3(x.dtype, rows, wide, widths[0], widths[0] + widths[1]);
    rt.dev.dispatch(l.spec, [x.binding, ...outs.map((o) => o.binding)], l.workgroups, l.uniforms);
  } else {
    let c0 = 0;
    for (const w of widths) {
      const o = rt.empty([...lead, w], x.dtype);
      const l = gatherColumns(x.dtype, rows, wide, c0, w);
      rt.dev.dispatch(l.spec, [x.binding, o.binding], l.workgroups, l.uniforms);
      outs.push(o);
      c0 += w;
    }
  }
  rt.record("splitLastDim", [x], outs, (gs) => {
    // parts without a gradient contribute zeros
    const gx = gs.every((g) => g) ? rt.empty(x.shape, x.dtype) : rt.zeros(x.shape, x.dtype);
    let c = 0;
    widths.forEach((w, i) => {
      const g = gs[i];
      if (g) {
        const l = scatterColumns(x.dtype, rows, wide, c, w);
        rt.dev.dispatch(l.spec, [g.binding, gx.binding], l.workgroups, l.uniforms);
      }
      c += w;
    });
    return [gx];
  });
  return outs;
}

/** Joins tensors [..., w_i] (same leading shape and dtype) into [..., sum(w_i)]. Differentiable. */
export function concatLastDim(parts: readonly Tensor[]): Tensor {
  const first = parts[0];
  const rt = first.rt;
  const lead = first.shape.slice(0, -1);
  const rows = first.size / first.dim(-1);
  for (const p of parts) {
    if (p.dtype !== first.dtype || p.size / p.dim(-1) !== rows) {
      throw new Error(`concatLastDim: ${p} does not match ${first} in leading shape or dtype`);
    }
  }
  const widths = parts.map((p) => p.dim(-1));
  const wide = widths.reduce((a, b) => a + b, 0);
  const out = rt.empty([...lead, wide], first.dtype);
  let c0 = 0;
  parts.forEach((p, i) => {
    const l = scatterColumns(p.dtype, rows, wide, c0, widths[i]);
    rt.dev.dispatch(l.spec, [p.binding, out.binding], l.workgroups, l.uniforms);
    c0 += widths[i];
  });
  rt.record("concatLastDim", [...parts], [out], ([g]) => {
    let c = 0;
    return parts.map((p, i) => {
      const gp = rt.empty(p.shape, p.dtype);
      const l = gatherColumns(p.dtype, rows, wide, c, widths[i]);
      rt.dev.dispatch(l.spec, [g!.binding, gp.binding], l.workgroups, l.uniforms);
      c += widths[i];
      return gp;
    });
  });
  return out;
}

/**
 * Rows [start, start + count) of x viewed as [rows, rowWidth] (e.g. the last token's hidden state). A copy;
 * not differentiable (inference only).
 */
export function takeRows(x: Tensor, start: number, count: number, rowWidth = x.dim(-1)): Tensor {
  const rt = x.rt;
  const rows = x.size / rowWidth;
  if (start < 0 || count < 0 || start + count > rows) {
    throw new Error(`takeRows: rows ${start}..${start + count} outside ${rows} rows of ${x}`);
  }
  const bytesPerRow = (x.dtype === "f16" ? 2 : 4) * rowWidth;
  if ((start * bytesPerRow) % 4 !== 0 || (count * bytesPerRow) % 4 !== 0) {
    throw new Error("takeRows: f16 rows of odd width are not 4-byte aligned");
  }
  const out = rt.empty([count, rowWidth], x.dtype);
  rt.dev.copyBuffer(x.buffer, start * bytesPerRow, out.buffer, 0, count * bytesPerRow);
  return out;
}

/**
 * Repeats groups of `width` columns `rep` times each, interleaved (output group j = input group floor(j / rep)),
 * as repeat_kv does for key/value heads: x [..., G*width] -> [..., G*rep*width]. Differentiable.
 */
export function repeatGroupsLastDim(x: Tensor, width: number, rep: number): Tensor {
  const rt = x.rt;
  const cols = x.dim(-1);
  if (cols % width !== 0) {
    throw new Error(`repeatGroupsLastDim: last dim ${cols} is not a multiple of ${width}`);
  }
  const groups = cols / width, rows = x.size / cols;
  const out = rt.empty([...x.shape.slice(0, -1), cols * rep], x.dtype);
  const f = repeatGroups(x.dtype, "forward", rows, groups, width, rep);
  rt.dev.dispatch(f.spec, [x.binding, out.binding], f.workgroups, f.uniforms);
  rt.record("repeatGroups", [x], [out], ([g]) => {
    const gx = rt.empty(x.shape, x.dtype);
    const b = repeatGroups(x.dtype, "backward", rows, groups, width, rep);
    rt.dev.dispatch(b.spec, [g!.binding, gx.binding], b.workgroups, b.uniforms);
    return [gx];
  });
  return out;
}

/** `x + s * b` with b [C] broadcast over the rows of x [..., C]. Differentiable in x and b. */
export function addBias(x: Tensor, b: Tensor, s = 1): Tensor {
  const rt = x.rt;
  const cols = x.dim(-1), rows = x.size / cols;
  if (b.size !== cols || b.dtype !== x.dtype) throw new Error(`addBias: bias ${b} does not match ${x}`);
  const out = rt.empty(x.shape, x.dtype);
  const f = biasForward(x.dtype, rows, cols, s);
  rt.dev.dispatch(f.spec, [x.binding, b.binding, out.binding], f.workgroups, f.uniforms);
  rt.record("addBias", [x, b], [out], ([g]) => {
    let gb: Tensor | null = null;
    if (b.requiresGrad) {
      gb = rt.empty(b.shape, b.dtype);
      const k = biasColumnSums(x.dtype, rows, cols, s);
      rt.dev.dispatch(k.spec, [g!.binding, gb.binding], k.workgroups, k.uniforms);
    }
    return [g, gb];
  });
  return out;
}
