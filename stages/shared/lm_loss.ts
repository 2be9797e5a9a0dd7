/**
 * The token-level training loss of the distill and sft stages, for one micro-batch: `ce_weight * CE(labels) +
 * kl_weight * tau^2 * KL(teacher || student)` per target token, averaged over the target tokens (method.md
 * section 2; the official code sums the KL over positions and divides by the batch size, we report and train on
 * the per-token mean so that numbers do not depend on sequence length or padding).
 *
 * The teacher's logits are computed on the fly without gradients. The loss kernel streams the vocabulary once
 * forward and once backward and writes the logits' gradient over the logits (nothing reads them afterwards).
 *
 * @module
 */
import type { MicroBatch } from "../../data/batches.ts";
import type { CausalLM } from "../../models/causal_lm.ts";
import { distillLoss } from "../../runtime/ops/loss.ts";
import type { Tensor } from "../../runtime/tensor.ts";
import { nextTokenLabels } from "./tokens.ts";

/** Loss weights of {@linkcode lmMicroStep}. */
export interface LmLossOptions {
  /** Weight of the cross-entropy on the data's next tokens (alpha). */
  ceWeight: number;
  /** Weight of the KL to the teacher (beta); needs a teacher when not 0. */
  klWeight: number;
  /** Softmax temperature of the KL (tau). */
  temperature: number;
}

/** Floats of statistics {@linkcode lmMicroStep} returns: [loss, ce, kl, target tokens]. */
export const LM_STATS = 4;

/**
 * Forward, loss and backward (seeded with `gradScale`) of one padded micro-batch; returns the loss kernel's
 * totals `[loss, mean CE, mean KL, target tokens]` as the statistics tensor.
 */
export function lmMicroStep(
  student: CausalLM,
  teacher: CausalLM | null,
  mb: MicroBatch,
  gradScale: number,
  o: LmLossOptions,
): Tensor[] {
  const rt = student.rt;
  const n = mb.rows * mb.seqLen;
  const labels = rt.tensor(nextTokenLabels(mb), [n], "i32");
  // The teacher's forward runs in its own scope: only its logits outlive it. Its per-layer activations go back
  // to the pool before the student's forward, which reuses them, instead of staying live through the student's
  // forward and backward (about 20 GiB at a 7B shape and 2048 tokens, bench/distill_fit.ts).
  const teacherLogits = teacher && o.klWeight !== 0
    ? rt.scope(() => rt.noGrad(() => teacher.forward(mb.ids, mb.rows, mb.seqLen).logits))
    : undefined;
  const logits = student.forward(mb.ids, mb.rows, mb.seqLen).logits;
  const r = distillLoss(logits, {
    labels,
    teacher: teacherLogits,
    alpha: o.ceWeight,
    beta: teacherLogits ? o.klWeight : 0,
    temperature: o.temperature,
    inPlaceGrad: true,
  });
  rt.backward(r.loss, rt.tensor([gradScale], [1]));
  return [r.totals];
}

/** A step's metrics from its micro-batches' {@linkcode lmMicroStep} statistics (token-weighted means). */
export function summarizeLm(stats: Float32Array[], withKl: boolean): Record<string, number> {
  let w = 0, loss = 0, ce = 0, kl = 0;
  for (const s of stats) {
    w += s[3];
    loss += s[0] * s[3];
    ce += s[1] * s[3];
    kl += s[2] * s[3];
  }
  const inv = w > 0 ? 1 / w : 0;
  const out: Record<string, number> = { loss: loss * inv, ce: ce * inv };
  if (withKl) out.kl = kl * inv;
  return out;
}
