/**
 * Does a distill step of a 7B-shape hybrid fit on one GPU, and how fast is it? Issue 9's target: "A 7B-shape
 * hybrid (Zephyr shapes, random init) fits on one H200 for a distill step at sequence 2048; record memory and
 * tokens/s."
 *
 * The teacher is a random-init Zephyr-7B (Mistral-7B shapes, `ZEPHYR_7B_CONFIG`: 7,241,732,096 parameters); the
 * student is its 50% Mamba2 hybrid (attention kept on layers 1, 3, ..., 31; d_inner 4096, d_xb 1024, d_state 128,
 * 32 heads, ngroups 32: `makeMamba2Config`, the mapping the 1B benchmark and the stages use), both initialised on
 * the GPU (`CausalLM.random`). A step is the distill stage's step, run by the stage's own code: `runTrainLoop`
 * (stages/shared/train_loop.ts) around `lmMicroStep` (stages/shared/lm_loss.ts): teacher forward without
 * gradients, student forward, fused CE + KL loss, backward, global-norm clip, AdamW on the Mamba parameters, with
 * the stage's defaults read from its schema (ce 1, kl 0.1, temperature 1, lr 8e-5 held at its peak, betas
 * 0.9/0.98, clip 0.1, no weight decay, trainable `mamba`). Every step is read back (logging_steps 1), so each
 * printed row is one step's wall time with its GPU work.
 *
 * Memory budget on paper (f32, batch 1 x 2048; GiB = 2^30 bytes of pool buffers, i.e. rounded up to the pool's
 * size classes; `memoryPlan` computes it and the run prints it before allocating). As in the distill stage, the
 * student borrows the teacher's frozen tensors (`CausalLM`'s `ShareFrom`: views of the teacher's buffers, group
 * `shared` in the plan); `--share false` gives it copies, the last column:
 *
 * | what                                                                              | params  | GiB  | unshared |
 * | --------------------------------------------------------------------------------- | ------- | ---- | -------- |
 * | teacher: embed 0.5, lm_head 0.5, attention 5.0, MLP 21.0, norms                    | 7.242 B | 27.0 | 27.0     |
 * | student, shared with the teacher: embed, lm_head, MLP, norms, 16 attention layers  | 6.571 B | 0    | 24.5     |
 * | student, its own: 16 Mamba2 layers                                                 | 0.942 B | 4.0  | 4.0      |
 * | gradients of the Mamba parameters (f32)                                            | 0.942 B | 4.0  | 4.0      |
 * | AdamW m and v (f32)                                                                | 1.884 B | 8.0  | 8.0      |
 * | static total                                                                       |         | 43.0 | 67.5     |
 * | teacher forward activations, logits included (back to the pool before the student) |         | 20.6 | 20.6     |
 * | student forward activations, logits included (live until the step ends)            |         | 23.2 | 23.2     |
 * | estimated peak: static + teacher logits + student activations + one layer's grads  |         | 67.3 | 91.8     |
 *
 * (A Mamba2 in_proj is 160.5 MiB and takes a 192 MiB size class: 0.5 GiB of the Mamba row, and as much again in
 * its gradient and in each moment.) An attention layer's forward keeps 6D + 3 H hd + 3 Hkv hd + 3I = 82,944 values
 * per token (648 MiB at 2048 tokens; the MLP's gate, up and product are half of it), a Mamba2 layer 112,464 (879
 * MiB). The estimate counts those tensors and was within 2.5% of the measured pool high-water mark at the
 * software adapter's shapes (hidden 64-512, 2-4 layers, 32-512 tokens, head_dim 128 included). Until
 * `lmMicroStep` ran the teacher's forward in its own scope, the teacher's 20 GiB of activations stayed live through
 * the student's forward and backward (peak about 112 GiB). Unshared, an f32 teacher, an f32 student and AdamW
 * fit the H200's 139 GiB with about 45 GiB to spare (measured 2026-11-29: 92.3 GiB at the peak); sharing the
 * 6.57 B frozen parameters, which with `trainable: mamba` stay bit-identical to the teacher's for the whole stage,
 * takes 24.5 GiB off the static memory and the peak. With `trainable: mamba_mlp` only the norms, embeddings,
 * lm_head and kept attention are shared (3.5 GiB); with `all` nothing.
 *
 * `--teacher-dtype f16` stores the frozen teacher and its activations in f16 (13.5 GiB less than an unshared f32
 * teacher; peak estimated 88.3 GiB because the freed f16 buffers mostly do not fit the f32 student's sizes). The
 * f32 student cannot borrow f16 tensors, so with sharing an f16 teacher costs memory (88.3 against 67.3 GiB) and
 * is kept only for comparison. The student stays f32: an f16 hybrid does not run yet (`ssdScan` takes f32 inputs
 * only).
 *
 * Run on one H200 (one call; Dawn through npm:webgpu):
 *
 * ```sh
 * deno run -A bench/distill_fit.ts --gpu dawn --shape zephyr-7b --out $OUT/distill_fit.jsonl
 * # optional, in a second process each: two full copies (as measured on 2026-11-29), the f16 teacher
 * deno run -A bench/distill_fit.ts --gpu dawn --shape zephyr-7b --share false --out $OUT/distill_fit.jsonl
 * deno run -A bench/distill_fit.ts --gpu dawn --shape zephyr-7b --teacher-dtype f16 --out $OUT/distill_fit.jsonl
 * ```
 *
 * Time on the H200: a step is about 97 TFLOP (teacher forward 30, student forward 31, student backward 36: the
 * activations' gradients through every layer plus the Mamba weights' gradients); at the 25 TFLOP/s that the 1B
 * teacher's prefill reached in f32, 4 s. The attention backward comes on top: 129 ms per layer at the 1B shape
 * (hd 64, 0.33 TFLOP/s), so perhaps 0.25-0.5 s per layer at hd 128, 16 layers. About 5-12 s a step; with the
 * warm-up step (pipeline compilation) and 3 timed steps, 0.5-1.5 minutes after the device is up. `--budget-s`
 * (default 300) skips a step that would end later than that many seconds after the start, so a slow kernel
 * still leaves rows behind; every row is appended to `--out` as soon as it is known.
 *
 * Rows (JSON lines, `bench: "distill_fit"`): `device` (adapter and buffer limits), `tensor_group` (parameters and
 * pool bytes per holder and group, before anything is allocated; the student's `shared` group holds none), `plan`
 * (static bytes, shared bytes, activation estimates, estimated peak), `allocated` (pool bytes after both models
 * and the optimizer, against the plan), `step` (per step: ms, tokens/s, loss, ce, kl, grad_norm, pool high-water
 * mark), `distill_step` (the summary: median of the timed steps, tokens/s, pool high-water mark), `driver_memory`
 * (nvidia-smi's used MiB at the start and at its highest, where nvidia-smi exists: the pool's figure plus what
 * Dawn and the driver hold). A tensor larger than the device's maxBufferSize, or a parameter, gradient or moment
 * larger than one storage binding, stops the run before anything is allocated, naming the tensor; an
 * out-of-memory error is reported with the phase and the plan.
 *
 * No PyTorch twin for the fit itself. The official hybrid's step time on random weights, back to back, is
 * `bench/pytorch/hybrid_train.py` (mamba_ssm and MambaInLlama sources carried in `.baseline/`).
 *
 * @module
 */
import { BatchIterator } from "../data/batches.ts";
import type { SequenceData, SequenceSource } from "../data/token_file.ts";
import type { DType } from "../kernels/kernel.ts";
import { CausalLM } from "../models/causal_lm.ts";
import {
  makeMamba2Config,
  type MambaConfig,
  parseTransformerConfig,
  type TransformerConfig,
} from "../models/config.ts";
import { LLAMA_3_2_1B_CONFIG, ZEPHYR_7B_CONFIG } from "../models/random_init.ts";
import { EMBED, hybridWeightShapes, LM_HEAD, transformerWeightShapes } from "../models/weights.ts";
import { createDevice } from "../runtime/device.ts";
import { AdamW, type AdamWOptions } from "../runtime/optim.ts";
import { sizeClass } from "../runtime/pool.ts";
import { parseProviderPreference } from "../runtime/provider.ts";
import { Runtime } from "../runtime/runtime.ts";
import { distillStage } from "../stages/distill.ts";
import { LM_STATS, lmMicroStep, summarizeLm } from "../stages/shared/lm_loss.ts";
import { runTrainLoop, type TrainLoopContext } from "../stages/shared/train_loop.ts";
import { trainablePredicate, type TrainableSet } from "../stages/shared/training.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/rng.ts";
import { DriverMemoryMonitor } from "./gpu_memory.ts";
import { flag } from "./harness.ts";

const GIB = 2 ** 30;

/** A teacher and its 50% Mamba2 hybrid. */
export interface FitShape {
  /** The name given on the command line. */
  name: string;
  /** The teacher's configuration. */
  teacher: TransformerConfig;
  /** The hybrid's Mamba configuration (attention on every second layer, 1, 3, ...). */
  mamba: MambaConfig;
}

/** Shape names {@linkcode fitShape} knows. */
export const FIT_SHAPES = ["zephyr-7b", "llama-1b", "tiny"] as const;

/**
 * config.json of a tiny Mistral (hidden 64, 2 layers, 4/2 heads of 16, intermediate 128, vocab 512, untied, the
 * 4096 window): Zephyr's structure at a size the software adapter runs in milliseconds.
 */
export const TINY_MISTRAL_CONFIG: Readonly<Record<string, unknown>> = Object.freeze({
  architectures: ["MistralForCausalLM"],
  model_type: "mistral",
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 512,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
});

/** The teacher of a shape name and its 50% hybrid (attention on layers 1, 3, ...); a UserError for others. */
export function fitShape(name: string): FitShape {
  const json = name === "zephyr-7b"
    ? ZEPHYR_7B_CONFIG
    : name === "llama-1b"
    ? LLAMA_3_2_1B_CONFIG
    : name === "tiny"
    ? TINY_MISTRAL_CONFIG
    : null;
  if (!json) throw new UserError(`--shape: expected one of ${FIT_SHAPES.join(", ")}, found "${name}"`);
  const teacher = parseTransformerConfig({ ...json }, `${name} shape`);
  const attn = Array.from({ length: Math.floor(teacher.numLayers / 2) }, (_, i) => 2 * i + 1);
  return { name, teacher, mamba: makeMamba2Config(teacher, attn) };
}

/** Who holds a planned tensor. */
export type TensorOwner = "teacher" | "student" | "optimizer" | "activation";

/** One tensor the step will allocate. */
export interface PlannedTensor {
  /** Holder. */
  owner: TensorOwner;
  /** Parameter name (with `.grad`, `.exp_avg`, `.exp_avg_sq` for optimizer tensors) or activation name. */
  name: string;
  /** Group it is counted in (embed, lm_head, attention, mlp, norms, mamba, gradients, adam, ...). */
  group: string;
  /** Elements. */
  elements: number;
  /** Bytes of data. */
  bytes: number;
  /** Bytes of the pool buffer holding it (its size class). */
  poolBytes: number;
  /** Kernels bind it whole (parameters, gradients, moments), so it must fit one storage binding. */
  wholeBinding: boolean;
}

/** Totals of one group of planned tensors. */
export interface TensorGroup {
  /** Holder. */
  owner: TensorOwner;
  /** Group name. */
  group: string;
  /** Tensors in the group. */
  tensors: number;
  /** Elements (parameters for parameter groups). */
  elements: number;
  /** Pool bytes. */
  poolBytes: number;
}

/** The memory a distill step needs, computed from the shapes before anything is allocated. */
export interface MemoryPlan {
  /** Every parameter, gradient and moment, and the largest activations (for the limit checks). */
  tensors: PlannedTensor[];
  /** Totals per holder and group, parameters and optimizer state only. */
  groups: TensorGroup[];
  /** Pool bytes of both models' parameters. */
  paramBytes: number;
  /** Pool bytes of the trainable parameters' gradients. */
  gradBytes: number;
  /** Pool bytes of AdamW's two moments. */
  momentBytes: number;
  /** paramBytes + gradBytes + momentBytes: what is live at the end of a backward (the gradients go after the step). */
  staticBytes: number;
  /** Trainable parameters. */
  trainableParams: number;
  /** Student parameters borrowed from the teacher (group `shared`: counted in elements, not in pool bytes). */
  sharedParams: number;
  /** Pool bytes the shared parameters would take as the student's own copies: what sharing saves. */
  sharedBytes: number;
  /** Estimated live activation bytes of the teacher's forward, which `lmMicroStep` frees before the student's. */
  teacherActivationBytes: number;
  /** Estimated activation bytes of the student's forward, live until the step ends (logits included). */
  studentActivationBytes: number;
  /**
   * Estimated pool high-water mark: static + teacher logits + max(teacher activations, student activations + one
   * layer's gradients) when both models share the dtype; the sum of the two with an f16 teacher.
   */
  estimatedPeakBytes: number;
}

function groupOf(name: string): string {
  if (name === EMBED) return "embed";
  if (name === LM_HEAD) return "lm_head";
  if (name.includes(".mamba.")) return "mamba";
  if (name.includes(".self_attn.")) return "attention";
  if (name.includes(".mlp.")) return "mlp";
  return "norms";
}

function elementBytes(dtype: DType): number {
  return dtype === "f16" ? 2 : 4;
}

/** Activations of one decoder layer's full-sequence forward: [name, elements per token, f32 whatever the dtype]. */
function layerActivations(
  c: TransformerConfig,
  m: MambaConfig | null,
): [string, number, boolean][] {
  const D = c.hiddenSize, I = c.intermediateSize, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const mixer: [string, number, boolean][] = m
    ? [
      ["in_proj", 2 * m.dInner + 2 * m.dXb + m.nHeads, false],
      ["z", m.dInner, false],
      ["xBC", 2 * m.dXb + m.dInner, false],
      ["dt", m.nHeads, false],
      ["conv", 2 * m.dXb + m.dInner, false],
      ["ssd_y", m.dInner, true],
      ["gated_norm", m.dInner, false],
      ["out_proj", D, false],
    ]
    : [
      ["q", q, false],
      ["k", kv, false],
      ["v", kv, false],
      ["q_rope", q, false],
      ["k_rope", kv, false],
      ["attention", q, false],
      ["lse", c.numHeads, true],
      ["o_proj", D, false],
    ];
  return [
    ["input_norm", D, false],
    ...mixer,
    ["residual", D, false],
    ["post_norm", D, false],
    ["mlp_gate", I, false],
    ["mlp_up", I, false],
    ["mlp_act", I, false],
    ["mlp_down", D, false],
    ["layer_out", D, false],
  ];
}

/** Pool bytes of one layer's activations for `tokens` tokens. */
function layerBytes(acts: [string, number, boolean][], tokens: number, dtype: DType): number {
  return acts.reduce((a, [, w, f32]) => a + sizeClass(tokens * w * (f32 ? 4 : elementBytes(dtype))), 0);
}

/**
 * The memory plan of a distill step of `shape` at `batch` x `seqLen` tokens: every parameter of the teacher and
 * the student, the trainable ones' gradients and AdamW moments (f32), per group; and an estimate of the
 * activations (see the module comment for the per-layer count). With `share` (default true, as the distill stage
 * does) the student's frozen parameters are the teacher's tensors and take no pool bytes of their own; an f16
 * teacher shares nothing with the f32 student.
 */
export function memoryPlan(
  shape: FitShape,
  o: {
    teacherDtype?: DType;
    batch: number;
    seqLen: number;
    trainable: (name: string) => boolean;
    share?: boolean;
  },
): MemoryPlan {
  const c = shape.teacher;
  // the student trains in f32 (the project's training storage); the frozen teacher may be stored in f16
  const tDtype = o.teacherDtype ?? "f32";
  // the student borrows the teacher's frozen tensors (CausalLM's ShareFrom) when both store the same dtype
  const share = (o.share ?? true) && tDtype === "f32";
  const elOf = (owner: TensorOwner) => owner === "teacher" ? elementBytes(tDtype) : 4;
  const tensors: PlannedTensor[] = [];
  const add = (
    owner: TensorOwner,
    name: string,
    group: string,
    elements: number,
    bytesPer: number,
    whole = true,
  ) => {
    const bytes = elements * bytesPer;
    tensors.push({
      owner,
      name,
      group,
      elements,
      bytes,
      poolBytes: sizeClass(Math.max(4, bytes)),
      wholeBinding: whole,
    });
  };
  let trainableParams = 0, sharedParams = 0, sharedBytes = 0;
  const teacherShapes = transformerWeightShapes(c);
  const models: [TensorOwner, Map<string, number[]>][] = [
    ["teacher", teacherShapes],
    ["student", hybridWeightShapes({ teacher: c, mamba: shape.mamba })],
  ];
  for (const [owner, shapes] of models) {
    for (const [name, s] of shapes) {
      if (name === LM_HEAD && c.tieWordEmbeddings) continue;
      const n = s.reduce((a, b) => a * b, 1);
      if (
        owner === "student" && share && !o.trainable(name) && teacherShapes.get(name)?.join() === s.join()
      ) {
        // a view of the teacher's tensor: no buffer of its own (the teacher's was checked against the limits)
        sharedParams += n;
        sharedBytes += sizeClass(Math.max(4, n * 4));
        tensors.push({
          owner,
          name,
          group: "shared",
          elements: n,
          bytes: 0,
          poolBytes: 0,
          wholeBinding: false,
        });
        continue;
      }
      add(owner, name, groupOf(name), n, elOf(owner));
      if (owner === "student" && o.trainable(name)) {
        trainableParams += n;
        add("optimizer", `${name}.grad`, "gradients", n, 4);
        add("optimizer", `${name}.exp_avg`, "adam_moments", n, 4);
        add("optimizer", `${name}.exp_avg_sq`, "adam_moments", n, 4);
      }
    }
  }
  const groups: TensorGroup[] = [];
  for (const t of tensors) {
    let g = groups.find((x) => x.owner === t.owner && x.group === t.group);
    if (!g) groups.push(g = { owner: t.owner, group: t.group, tensors: 0, elements: 0, poolBytes: 0 });
    g.tensors++;
    g.elements += t.elements;
    g.poolBytes += t.poolBytes;
  }
  const sum = (f: (t: PlannedTensor) => boolean) => tensors.filter(f).reduce((a, t) => a + t.poolBytes, 0);
  const paramBytes = sum((t) => t.owner === "teacher" || t.owner === "student");
  const gradBytes = sum((t) => t.group === "gradients");
  const momentBytes = sum((t) => t.group === "adam_moments");

  // activations (estimate): embedding, every layer, final norm, logits
  const N = o.batch * o.seqLen;
  const attn = layerActivations(c, null), mamba = layerActivations(c, shape.mamba);
  const ends = (dtype: DType) => 2 * sizeClass(N * c.hiddenSize * elementBytes(dtype));
  const teacherLogits = sizeClass(N * c.vocabSize * elementBytes(tDtype));
  const nAttn = shape.mamba.attnLayers.length, nMamba = c.numLayers - nAttn;
  const teacherActivationBytes = c.numLayers * layerBytes(attn, N, tDtype) + ends(tDtype) + teacherLogits;
  const attnLayer = layerBytes(attn, N, "f32"), mambaLayer = layerBytes(mamba, N, "f32");
  const studentActivationBytes = nAttn * attnLayer + nMamba * mambaLayer + ends("f32") +
    sizeClass(N * c.vocabSize * 4);
  const backwardLayer = Math.max(attnLayer, mambaLayer);
  // The teacher's activations go back to the pool before the student's forward; in the student's dtype the
  // student reuses those buffers, in another dtype (f16 teacher) their size classes differ and mostly stay free.
  const teacherFreed = teacherActivationBytes - teacherLogits;
  const studentNeeds = studentActivationBytes + backwardLayer;
  const estimatedPeakBytes = paramBytes + gradBytes + momentBytes + teacherLogits +
    (tDtype === "f32" ? Math.max(teacherFreed, studentNeeds) : teacherFreed + studentNeeds);
  // the largest activations, for the buffer-size check (the matmuls and the loss split them across bindings)
  add("activation", "logits", "activations", N * c.vocabSize, 4, false);
  for (const [name, w] of [...attn, ...mamba]) {
    if (!tensors.some((t) => t.name === name)) add("activation", name, "activations", N * w, 4, false);
  }
  return {
    tensors,
    groups: groups.filter((g) => g.owner !== "activation"),
    paramBytes,
    gradBytes,
    momentBytes,
    staticBytes: paramBytes + gradBytes + momentBytes,
    trainableParams,
    sharedParams,
    sharedBytes,
    teacherActivationBytes,
    studentActivationBytes,
    estimatedPeakBytes,
  };
}

/**
 * Throws a {@linkcode UserError} naming the first planned tensor larger than the device's `maxBufferSize`, or the
 * first one kernels bind whole (parameters, gradients, moments) larger than `maxStorageBufferBindingSize`.
 */
export function checkDeviceLimits(
  plan: MemoryPlan,
  limits: Pick<GPUSupportedLimits, "maxBufferSize" | "maxStorageBufferBindingSize">,
): void {
  const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;
  for (const t of plan.tensors) {
    const what = `${t.owner} tensor ${t.name} (${t.elements} elements, ${mib(t.poolBytes)} as a pool buffer)`;
    if (t.poolBytes > limits.maxBufferSize) {
      const hint = t.owner === "activation"
        ? "a shorter batch or sequence shrinks it"
        : "f16 storage of the teacher halves its tensors; the student trains in f32";
      throw new UserError(
        `${what} exceeds the device's maxBufferSize of ${mib(limits.maxBufferSize)} (${hint})`,
      );
    }
    if (t.wholeBinding && t.bytes > limits.maxStorageBufferBindingSize) {
      throw new UserError(
        `${what} exceeds the device's maxStorageBufferBindingSize of ${
          mib(limits.maxStorageBufferBindingSize)
        }, and kernels bind parameters, gradients and moments whole`,
      );
    }
  }
}

/** Options of {@linkcode runDistillFit}. */
export interface DistillFitOptions {
  /** Teacher and hybrid shapes. */
  shape: FitShape;
  /**
   * Storage dtype of the frozen teacher and its activations (default f32). The student is f32: the hybrid's
   * Mamba2 scan takes f32 inputs only (`ssdScan` rejects f16), so an f16 student does not run yet.
   */
  teacherDtype?: "f32" | "f16";
  /** Sequences per step (default 1). */
  batch?: number;
  /** Tokens per sequence (default 2048). */
  seqLen?: number;
  /** Steps before the timed ones (pipeline compilation, clocks; default 1). */
  warmupSteps?: number;
  /** Timed steps (default 3). */
  steps?: number;
  /** Learning rate (default: the distill stage's peak learning_rate). */
  lr?: number;
  /** What trains (default: the distill stage's, `mamba`). */
  trainable?: TrainableSet;
  /**
   * Let the student borrow the teacher's frozen tensors, as the distill stage does (default true; only with an
   * f32 teacher, the student's dtype). False measures two full copies.
   */
  share?: boolean;
  /** Don't start a step expected to end later than this many ms after the call started (default: no limit). */
  budgetMs?: number;
  /** Seed of the weights and tokens (default 7). */
  seed?: number;
  /** Receives every row as it is known. */
  log?: (row: Record<string, unknown>) => void;
}

/** One optimizer step's figures. */
export interface FitStep {
  /** 1-based step. */
  step: number;
  /** A warm-up step (not in the summary). */
  warmup: boolean;
  /** Wall time of the step including its read-back, ms. */
  ms: number;
  /** The stage's metrics for the step: loss, ce, kl, grad_norm, lr, tokens_per_s. */
  metrics: Record<string, number>;
  /** The pool's high-water mark after the step, bytes. */
  peakBytes: number;
  /** Pool bytes handed out after the step (parameters, moments, loop buffers; gradients dropped). */
  liveBytes: number;
}

/** What {@linkcode runDistillFit} measured. */
export interface DistillFitResult {
  /** The plan it printed before allocating. */
  plan: MemoryPlan;
  /** Pool bytes the teacher, the student and the optimizer took (parameters and moments). */
  allocatedBytes: number;
  /** Every step run. */
  steps: FitStep[];
  /** The pool's high-water mark over the run (reset at its start, so it includes what the pool held then). */
  peakBytes: number;
  /** Median wall time of the timed steps, ms (null when none ran). */
  medianStepMs: number | null;
  /** batch x seqLen / median step time (null when no timed step ran). */
  tokensPerS: number | null;
  /** True when the time budget stopped the run before all steps. */
  stoppedEarly: boolean;
}

/** Sequences of random tokens kept in memory, as the batches read a token file. */
class RandomSequences implements SequenceSource {
  readonly numSequences: number;
  readonly #seqs: Uint32Array[];
  constructor(n: number, length: number, vocab: number, seed: number) {
    const rng = new Rng(seed);
    this.numSequences = n;
    this.#seqs = Array.from({ length: n }, () => Uint32Array.from({ length }, () => rng.int(vocab)));
  }
  sequenceLength(i: number): number {
    return this.#seqs[i].length;
  }
  read(i: number): SequenceData {
    const ids = this.#seqs[i];
    return { ids, mask: new Uint8Array(ids.length).fill(1), docStarts: [0], docRecords: [0xffffffff] };
  }
}

class BudgetReached extends Error {}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b), h = Math.floor(s.length / 2);
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
}

/** The distill stage's loss and optimizer defaults (its parameter schema's defaults). */
export function distillDefaults(): {
  loss: { ceWeight: number; klWeight: number; temperature: number };
  adamw: AdamWOptions;
  trainable: TrainableSet;
} {
  const p = distillStage.params;
  return {
    loss: {
      ceWeight: p.ce_weight.default,
      klWeight: p.kl_weight.default,
      temperature: p.temperature.default,
    },
    adamw: {
      lr: p.learning_rate.default,
      betas: [p.adam_beta1.default, p.adam_beta2.default],
      eps: p.adam_epsilon.default,
      weightDecay: p.weight_decay.default,
      maxGradNorm: p.max_grad_norm.default,
    },
    trainable: p.trainable.default,
  };
}

/**
 * Plans, checks, allocates and runs warm-up + timed distill steps of `o.shape` on `rt` (see the module comment),
 * logging rows through `o.log` as it goes. The models and the optimizer are released before it returns.
 */
export async function runDistillFit(rt: Runtime, o: DistillFitOptions): Promise<DistillFitResult> {
  const t0 = performance.now();
  const log = o.log ?? (() => {});
  const teacherDtype = o.teacherDtype ?? "f32", B = o.batch ?? 1, T = o.seqLen ?? 2048;
  const warmup = o.warmupSteps ?? 1, timed = o.steps ?? 3, seed = o.seed ?? 7;
  const d = distillDefaults();
  const trainable = trainablePredicate(o.trainable ?? d.trainable);
  const { teacher: cfg, mamba } = o.shape;
  const gib = (b: number) => +(b / GIB).toFixed(3);

  const share = (o.share ?? true) && teacherDtype === "f32";
  const plan = memoryPlan(o.shape, { teacherDtype, batch: B, seqLen: T, trainable, share });
  for (const g of plan.groups) {
    log({
      what: "tensor_group",
      owner: g.owner,
      group: g.group,
      tensors: g.tensors,
      elements: g.elements,
      gib: gib(g.poolBytes),
    });
  }
  log({
    what: "plan",
    shape: o.shape.name,
    teacher_dtype: teacherDtype,
    student_dtype: "f32",
    batch: B,
    seq: T,
    attn_layers: mamba.attnLayers,
    trainable_params: plan.trainableParams,
    share,
    shared_params: plan.sharedParams,
    shared_gib: gib(plan.sharedBytes),
    params_gib: gib(plan.paramBytes),
    grads_gib: gib(plan.gradBytes),
    adam_gib: gib(plan.momentBytes),
    static_gib: gib(plan.staticBytes),
    teacher_activations_gib: gib(plan.teacherActivationBytes),
    student_activations_gib: gib(plan.studentActivationBytes),
    estimated_peak_gib: gib(plan.estimatedPeakBytes),
    largest_tensor: plan.tensors.reduce((a, t) => (t.poolBytes > a.poolBytes ? t : a)).name,
  });
  checkDeviceLimits(plan, rt.dev.limits);

  // Out-of-memory errors of buffer creation are caught by an error scope around each phase (allocation, steps):
  // without one WebGPU reports them only as an uncaptured event, and the run fails later on an invalid buffer.
  const gpu = rt.dev.gpu;
  const outOfMemory = async (phase: string, cause?: unknown) => {
    const err = await gpu.popErrorScope();
    if (err) {
      throw new UserError(
        `out of device memory ${phase}: ${err.message} (pool: ${gib(rt.pool.stats.liveBytes)} GiB live, ` +
          `high-water ${gib(rt.pool.stats.peakBytes)} GiB; plan: ${
            gib(plan.staticBytes)
          } GiB static, about ` +
          `${gib(plan.estimatedPeakBytes)} GiB at peak)`,
        { cause: cause ?? err },
      );
    }
    if (cause !== undefined) throw cause;
  };
  const live0 = rt.pool.stats.liveBytes;
  rt.pool.resetPeak();
  let teacher: CausalLM | null = null, student: CausalLM | null = null;
  let optimizer: AdamW | null = null;
  try {
    gpu.pushErrorScope("out-of-memory");
    try {
      teacher = CausalLM.random(rt, cfg, null, { seed, dtype: teacherDtype });
      student = CausalLM.random(rt, cfg, mamba, {
        seed: seed + 1000,
        trainable,
        share: share ? { owner: teacher } : undefined,
      });
      if (share && student.borrowed.size !== plan.tensors.filter((t) => t.group === "shared").length) {
        throw new Error(`the student borrowed ${student.borrowed.size} tensors, the plan shares others`);
      }
      optimizer = new AdamW(rt, student.trainableParams(), { ...d.adamw, lr: o.lr ?? d.adamw.lr });
      await rt.dev.sync();
    } catch (e) {
      await outOfMemory("allocating the teacher, the student and the optimizer", e);
    }
    await outOfMemory("allocating the teacher, the student and the optimizer");
    const allocatedBytes = rt.pool.stats.liveBytes - live0;
    log({
      what: "allocated",
      gib: gib(allocatedBytes),
      planned_gib: gib(plan.paramBytes + plan.momentBytes),
      ms: Math.round(performance.now() - t0),
    });

    const source = new RandomSequences(B, T, cfg.vocabSize, seed);
    const batches = new BatchIterator(source, {
      batchSize: B,
      seqLen: T,
      seed,
      shuffle: false,
      maxSteps: warmup + timed,
    });
    const steps: FitStep[] = [];
    const abort = new AbortController();
    let last = performance.now();
    const ctx: TrainLoopContext = {
      signal: abort.signal,
      checkpoints: { keep: 1, latest: () => null, save: () => Promise.resolve() },
      progress: {
        start() {},
        update() {
          const ms = steps.length > 0 ? steps[steps.length - 1].ms : 0;
          if (o.budgetMs !== undefined && performance.now() + ms - t0 > o.budgetMs) {
            abort.abort(new BudgetReached());
          }
        },
      },
      log: {
        metric(step, rec) {
          const now = performance.now();
          const s: FitStep = {
            step,
            warmup: step <= warmup,
            ms: now - last,
            metrics: rec as Record<string, number>,
            peakBytes: rt.pool.stats.peakBytes,
            liveBytes: rt.pool.stats.liveBytes,
          };
          last = now;
          steps.push(s);
          log({
            what: "step",
            step,
            warmup: s.warmup,
            ms: Math.round(s.ms),
            tokens_per_s: Math.round((B * T) / (s.ms / 1000)),
            loss: s.metrics.loss,
            ce: s.metrics.ce,
            kl: s.metrics.kl,
            grad_norm: s.metrics.grad_norm,
            peak_gib: gib(s.peakBytes),
            live_gib: gib(s.liveBytes),
          });
        },
        info() {},
        warn(message) {
          log({ what: "warning", message });
        },
      },
    };
    const { ceWeight, klWeight, temperature } = d.loss;
    const [lm, tm, opt] = [student!, teacher!, optimizer!];
    last = performance.now();
    gpu.pushErrorScope("out-of-memory");
    try {
      await runTrainLoop({
        rt,
        ctx,
        optimizer: opt,
        schedule: () => o.lr ?? d.adamw.lr,
        batches,
        totalSteps: warmup + timed,
        gradAccumSteps: 1,
        statsSize: LM_STATS,
        weightOf: (mb) => mb.targetTokens,
        microStep: (mb, scale) => lmMicroStep(lm, tm, mb, scale, { ceWeight, klWeight, temperature }),
        summarize: (stats) => summarizeLm(stats, klWeight !== 0),
        loggingSteps: 1,
        saveSteps: Number.MAX_SAFE_INTEGER,
        lastLoop: true,
        save: () => Promise.resolve(),
      });
    } catch (e) {
      if (!(e instanceof BudgetReached)) await outOfMemory(`in distill step ${steps.length + 1}`, e);
    }
    await outOfMemory("in the distill steps");
    const timedMs = steps.filter((s) => !s.warmup).map((s) => s.ms);
    const medianStepMs = timedMs.length > 0 ? median(timedMs) : null;
    return {
      plan,
      allocatedBytes,
      steps,
      peakBytes: rt.pool.stats.peakBytes,
      medianStepMs,
      tokensPerS: medianStepMs === null ? null : (B * T) / (medianStepMs / 1000),
      stoppedEarly: steps.length < warmup + timed,
    };
  } finally {
    optimizer?.dispose();
    student?.dispose();
    teacher?.dispose();
  }
}

if (import.meta.main) {
  const outPath = flag("out");
  const write = (line: string) => {
    console.log(line);
    if (outPath) Deno.writeTextFileSync(outPath, line + "\n", { append: true });
  };
  const base: Record<string, unknown> = { bench: "distill_fit" };
  const log = (row: Record<string, unknown>) => write(JSON.stringify({ ...base, ...row }));
  const monitor = DriverMemoryMonitor.start();
  let code = 0;
  try {
    const shape = fitShape(flag("shape", "zephyr-7b"));
    const teacherDtype = flag("teacher-dtype", "f32");
    if (teacherDtype !== "f32" && teacherDtype !== "f16") {
      throw new UserError(`--teacher-dtype: expected f32 or f16, found ${teacherDtype}`);
    }
    const int = (name: string, dflt: number) => {
      const v = Number(flag(name, String(dflt)));
      if (!Number.isInteger(v) || v < 0) throw new UserError(`--${name}: expected an integer >= 0`);
      return v;
    };
    const trainable = flag("trainable", distillDefaults().trainable);
    const share = flag("share", "true");
    if (share !== "true" && share !== "false") {
      throw new UserError(`--share: expected true or false, found ${share}`);
    }
    if (!["mamba", "mamba_mlp", "all"].includes(trainable)) {
      throw new UserError(`--trainable: expected mamba, mamba_mlp or all, found ${trainable}`);
    }
    const gpu = parseProviderPreference(flag("gpu") ?? "auto", "--gpu");
    const rt = new Runtime(await createDevice({ gpu }));
    base.provider = rt.dev.provider;
    log({
      what: "device",
      device: rt.dev.describe(),
      max_buffer_gib: +(rt.dev.limits.maxBufferSize / GIB).toFixed(3),
      max_binding_gib: +(rt.dev.limits.maxStorageBufferBindingSize / GIB).toFixed(3),
      date: new Date().toISOString(),
    });
    const batch = int("batch", 1), seqLen = int("seq", 2048), steps = int("steps", 3);
    const r = await runDistillFit(rt, {
      shape,
      teacherDtype,
      batch,
      seqLen,
      warmupSteps: int("warmup", 1),
      steps,
      trainable: trainable as TrainableSet,
      share: share === "true",
      budgetMs: int("budget-s", 300) * 1000,
      log,
    });
    log({
      what: "distill_step",
      shape: shape.name,
      teacher_dtype: teacherDtype,
      share: share === "true" && teacherDtype === "f32",
      batch,
      seq: seqLen,
      timed_steps: r.steps.filter((s) => !s.warmup).length,
      median_ms: r.medianStepMs === null ? null : Math.round(r.medianStepMs),
      tokens_per_s: r.tokensPerS === null ? null : Math.round(r.tokensPerS),
      peak_gib: +(r.peakBytes / GIB).toFixed(3),
      peak_bytes: r.peakBytes,
      static_gib: +(r.plan.staticBytes / GIB).toFixed(3),
      estimated_peak_gib: +(r.plan.estimatedPeakBytes / GIB).toFixed(3),
      stopped_early: r.stoppedEarly,
      loss: "ce + 0.1 kl, teacher forward included (stages/shared/lm_loss.ts lmMicroStep)",
    });
  } catch (e) {
    code = 1;
    log({ what: "error", error: e instanceof UserError ? e.message : String((e as Error)?.stack ?? e) });
  } finally {
    if (monitor) {
      await monitor.stop();
      log({
        what: "driver_memory",
        baseline_mib: monitor.baselineMiB,
        peak_mib: monitor.peakMiB,
        total_mib: monitor.totalMiB,
      });
    }
  }
  Deno.exit(code);
}
