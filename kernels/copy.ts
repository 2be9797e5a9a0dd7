/**
 * A buffer-to-buffer copy as a compute dispatch: `dst[dstWord + i] = src[srcWord + i]` for i < words (4-byte
 * words). The runtime copies between storage buffers with it instead of the encoder's `copyBufferToBuffer`, which
 * must end the open compute pass: each pass boundary left the GPU idle for tens of microseconds on the H200
 * (BENCHMARKS.md), and a training step had about 90 of them.
 *
 * @module
 */
import { type KernelSpec, linearKernelSpec, linearWorkgroups, Uniforms } from "./kernel.ts";
import type { Launch } from "./fill.ts";

const specs = new Map<string, KernelSpec>();

/**
 * Copies `words` 4-byte words from word `srcWord` of the first binding to word `dstWord` of the second. Bindings:
 * src (read), dst (rw); the two must not be the same buffer. 16 bytes a thread when both offsets and the length
 * are multiples of 4 words.
 */
export function copyWordsKernel(srcWord: number, dstWord: number, words: number): Launch {
  const vec = srcWord % 4 === 0 && dstWord % 4 === 0 && words % 4 === 0;
  const key = `copy_words${vec ? "_v4" : ""}`;
  let spec = specs.get(key);
  if (!spec) {
    const el = vec ? "vec4<u32>" : "u32";
    spec = linearKernelSpec(
      key,
      "f32",
      [["src", "read", el], ["dst", "rw", el]],
      "n: u32, src_at: u32, dst_at: u32, _a: u32",
      `if (i >= p.n) { return; }\n  dst[p.dst_at + i] = src[p.src_at + i];`,
    );
    specs.set(key, spec);
  }
  const lanes = vec ? 4 : 1;
  const threads = words / lanes;
  return {
    spec,
    uniforms: new Uniforms(16).u32(threads).u32(srcWord / lanes).u32(dstWord / lanes).buffer,
    workgroups: linearWorkgroups(threads),
  };
}
