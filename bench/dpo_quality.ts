/**
 * DPO quality on the fixture teacher (issue 5 acceptance): preference pairs from the cloze train split (chosen =
 * the true ending, rejected = a wrong one) train stories260K with the real stages (tokenize -> ref_logprobs ->
 * dpo, run by the recipe runner); then the held-out split is scored with the same stages: reward accuracy of the
 * policy against the reference (two ref_logprobs stages, the teacher's and the policy's, on the held-out pairs)
 * and cloze accuracy of policy and teacher (two evaluate stages).
 *
 * ```sh
 * deno run -A bench/dpo_quality.ts                  # the acceptance settings (sized for the H200)
 * deno run -A bench/dpo_quality.ts --quick          # a small run, about 7 minutes on a 2-core CPU (llvmpipe)
 * deno run -A bench/dpo_quality.ts --lr 3e-4 --beta 0.1 --epochs 2 --pairs-per-item 3 --json dpo.json
 * deno run -A bench/dpo_quality.ts --quick --rpo-alpha 1     # with TRL's RPO term against the log-prob drift
 * ```
 *
 * Split: the cloze file's last `--held-out` items (default 400 of 1,600) are held out, the others are the train
 * split. The items are cut from consecutive validation stories, so a tail split keeps whole stories apart
 * (an `index % 4` split would put neighbouring sentences of one story on both sides).
 *
 * Overlap: the wrong endings of the fixture are sentences of other items, about half of them the true ending of
 * another item, drawn from the whole file. A naive split therefore trains "chosen = S" for sentences S that are
 * the *rejected* ending of a held-out pair (and the reverse) - about 80% of the held-out pairs share a sentence
 * with the train pairs in that conflicting way, and memorising train sentences works against held-out reward
 * accuracy (BENCHMARKS.md measures how much). `--overlap drop` (the default) drops every train pair whose
 * chosen or rejected ending is any ending of a held-out item, so the held-out split shares neither context nor
 * completion with the training data; `--overlap keep` trains on all train pairs (the naive split) for contrast.
 *
 * Pairs follow the evaluate stage's cloze convention: prompt = ctx, chosen/rejected = " " + ending, no EOS
 * after the ending (a cloze ending is the next sentence, not the end of the story); the tokenize stage prepends
 * BOS to the prompt, as for every preference pair. The held-out pairs use all three wrong endings of each item,
 * whatever `--pairs-per-item` is. Reward accuracy counts ties as wrong (TRL), so it is 0 before training; chance
 * is 0.5.
 *
 * Generated data (pairs and the two task files) goes to `<dir>/data/`, the project (cache, runs) to `--dir`;
 * results are printed as a table and JSON (also to `--json`, and to `$OUT/dpo_quality.json` when `$OUT` is set).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join, resolve } from "node:path";
import { main } from "../main.ts";
import { listRuns } from "../pipelines/runs.ts";
import { resolveStateDirs } from "../pipelines/paths.ts";
import { openSafetensors } from "../models/safetensors.ts";
import { TokenFileReader } from "../data/token_file.ts";

const FIXTURES = new URL("../fixtures/", import.meta.url).pathname;
const TEACHER = join(FIXTURES, "models/stories260K-hf");
const CLOZE = join(FIXTURES, "eval/tinystories_cloze.jsonl");

/** Options of the benchmark (command-line flags of the same names, kebab-case). */
export interface DpoQualityOptions {
  /** Peak learning rate. */
  lr: number;
  /** DPO beta. */
  beta: number;
  /** TRL's rpo_alpha (0: plain DPO): weight of the chosen tokens' NLL added to the loss. */
  rpoAlpha: number;
  /** Passes over the train pairs (when `steps` is 0). */
  epochs: number;
  /** Optimizer steps; 0: `epochs` passes. */
  steps: number;
  /** Pairs per micro-batch. */
  batch: number;
  /** Warm-up ratio. */
  warmup: number;
  /** Pairs per train item: 1 (one wrong ending, rotating by item index) or 3 (every wrong ending). */
  pairsPerItem: number;
  /** Items held out at the end of the cloze file. */
  heldOut: number;
  /** Train items used (the first N of the train split; 0: all). */
  trainItems: number;
  /** `drop`: no train pair shares an ending with a held-out item; `keep`: the naive split. */
  overlap: "drop" | "keep";
  /** Longest pair sequence (prompt + completion), tokens. */
  maxLength: number;
  /** Prompt tokens kept when a pair is longer than `maxLength`. */
  maxPromptLength: number;
  /** Also score the policy on the train pairs (memorisation vs generalisation). */
  scoreTrain: boolean;
  /** Train items also evaluated for cloze accuracy, for contrast (0: all). */
  evalTrain: number;
  /** WebGPU provider. */
  gpu: string;
  /** Project directory (cache, runs, generated data). */
  dir: string;
  /** Seed of the data order. */
  seed: number;
}

/**
 * Defaults: the acceptance run (1,269 train pairs, 1 epoch = 80 steps of 16 pairs); about 15 minutes on the
 * CPU (llvmpipe, 2 cores), a small fraction of that on the H200. BENCHMARKS.md has the CPU results.
 */
export const DEFAULTS: DpoQualityOptions = {
  lr: 5e-4,
  beta: 0.1,
  rpoAlpha: 0,
  epochs: 1,
  steps: 0,
  batch: 16,
  warmup: 0.1,
  pairsPerItem: 3,
  heldOut: 400,
  trainItems: 0,
  overlap: "drop",
  maxLength: 128,
  maxPromptLength: 96,
  scoreTrain: true,
  evalTrain: 0,
  gpu: "auto",
  dir: ".distillery/bench/dpo_quality",
  seed: 0,
};

/** `--quick`: 400 train items (850 pairs, 54 steps), 120 held out; about 7 minutes on the 2-core CPU. */
export const QUICK: Partial<DpoQualityOptions> = {
  trainItems: 400,
  heldOut: 120,
  evalTrain: 120,
  scoreTrain: false,
  dir: ".distillery/bench/dpo_quality_quick",
};

/** A cloze item as in the fixture. */
export interface ClozeItem {
  /** Item id. */
  id?: string;
  /** Story context. */
  ctx: string;
  /** Four candidate next sentences. */
  endings: string[];
  /** Index of the true ending. */
  label: number;
}

/** A preference record as the tokenize stage reads it (format: preference). */
export interface PairRecord {
  /** The cloze context. */
  prompt: string;
  /** " " + the true ending. */
  chosen: string;
  /** " " + a wrong ending. */
  rejected: string;
  /** Item id and wrong-ending index, for reading results back. */
  id: string;
}

/** The benchmark's data: train and held-out items and pairs. */
export interface DpoSplit {
  /** Train items (before dropping pairs). */
  trainItems: ClozeItem[];
  /** Held-out items. */
  heldItems: ClozeItem[];
  /** Train pairs (after the overlap rule). */
  trainPairs: PairRecord[];
  /** Held-out pairs (every wrong ending of every held-out item). */
  heldPairs: PairRecord[];
  /** The held-out pairs without their context (prompt "", endings without the leading space). */
  heldPairsNoContext: PairRecord[];
  /** Train pairs dropped because an ending is also a held-out ending. */
  dropped: number;
  /** Held-out pairs whose rejected ending is a train chosen ending or whose chosen is a train rejected one. */
  heldConflicts: boolean[];
}

/** The pairs of one item: the true ending against `wrong` (indices into the wrong endings, 0..2). */
function pairsOf(item: ClozeItem, index: number, wrong: number[]): PairRecord[] {
  const others = item.endings.map((_, j) => j).filter((j) => j !== item.label);
  return wrong.map((w) => ({
    prompt: item.ctx,
    chosen: " " + item.endings[item.label],
    rejected: " " + item.endings[others[w]],
    id: `${item.id ?? index}/${others[w]}`,
  }));
}

/** Splits the cloze items and builds the pairs (see the module documentation). */
export function splitCloze(items: ClozeItem[], o: DpoQualityOptions): DpoSplit {
  if (o.heldOut < 1 || o.heldOut >= items.length) {
    throw new Error(`--held-out: expected 1..${items.length - 1} items, found ${o.heldOut}`);
  }
  if (o.pairsPerItem !== 1 && o.pairsPerItem !== 3) {
    throw new Error(`--pairs-per-item: expected 1 or 3, found ${o.pairsPerItem}`);
  }
  const cut = items.length - o.heldOut;
  let trainItems = items.slice(0, cut);
  if (o.trainItems > 0) trainItems = trainItems.slice(0, o.trainItems);
  const heldItems = items.slice(cut);
  const heldEndings = new Set(heldItems.flatMap((it) => it.endings.map((e) => " " + e)));
  const all = trainItems.flatMap((it, i) => pairsOf(it, i, o.pairsPerItem === 3 ? [0, 1, 2] : [i % 3]));
  const trainPairs = o.overlap === "drop"
    ? all.filter((p) => !heldEndings.has(p.chosen) && !heldEndings.has(p.rejected))
    : all;
  const heldPairs = heldItems.flatMap((it, i) => pairsOf(it, cut + i, [0, 1, 2]));
  const heldPairsNoContext = heldPairs.map((p) => ({
    ...p,
    prompt: "",
    chosen: p.chosen.slice(1),
    rejected: p.rejected.slice(1),
  }));
  const trainChosen = new Set(trainPairs.map((p) => p.chosen));
  const trainRejected = new Set(trainPairs.map((p) => p.rejected));
  const heldConflicts = heldPairs.map((p) => trainChosen.has(p.rejected) || trainRejected.has(p.chosen));
  return {
    trainItems,
    heldItems,
    trainPairs,
    heldPairs,
    heldPairsNoContext,
    dropped: all.length - trainPairs.length,
    heldConflicts,
  };
}

const jsonl = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).join("\n") + "\n";

/** The recipe: pairs, reference, DPO, held-out scoring and cloze evaluation of teacher and policy. */
export function dpoRecipe(o: DpoQualityOptions, data: string): string {
  const pairs = (file: string) =>
    `    kind: tokenize
    params: { format: preference, template: none, add_eos: false, max_length: ${o.maxLength}, max_prompt_length: ${o.maxPromptLength} }
    inputs: { tokenizer: ${TEACHER}, data: [${join(data, file)}] }`;
  const budget = o.steps > 0 ? `max_steps: ${o.steps}` : `num_train_epochs: ${o.epochs}`;
  const evaluate = (model: string, name: string) =>
    `    kind: evaluate
    params: { model_name: ${name}, batch_size: 64 }
    inputs: { model: ${model}, tasks: [${join(data, "cloze_heldout.jsonl")}, ${
      join(data, "cloze_train.jsonl")
    }] }`;
  const scores = (model: string, port: string) =>
    `    kind: ref_logprobs
    params: { per_device_batch_size: 64 }
    inputs: { model: ${model}, pairs: "\${${port}.tokens}" }`;
  return `name: dpo_quality
description: DPO of stories260K on cloze pairs, held-out reward accuracy and cloze accuracy (bench/dpo_quality.ts)
settings: { seed: ${o.seed}, keep_checkpoints: 1 }
stages:
  train_pairs:
${pairs("train_pairs.jsonl")}
  held_pairs:
${pairs("heldout_pairs.jsonl")}
  noctx_pairs:
${pairs("heldout_pairs_no_context.jsonl")}
  ref_train:
${scores(TEACHER, "train_pairs")}
  dpo:
    kind: dpo
    params: { beta: ${o.beta},${
    o.rpoAlpha > 0 ? ` rpo_alpha: ${o.rpoAlpha},` : ""
  } learning_rate: ${o.lr}, warmup_ratio: ${o.warmup}, ${budget}, per_device_train_batch_size: ${o.batch}, gradient_accumulation_steps: 1, logging_steps: 10, save_steps: 1000 }
    inputs: { model: ${TEACHER}, pairs: "\${train_pairs.tokens}", ref: "\${ref_train.ref}" }
  ref_held:
${scores(TEACHER, "held_pairs")}
  policy_held:
${scores('"${dpo.model}"', "held_pairs")}
  ref_noctx:
${scores(TEACHER, "noctx_pairs")}
  policy_noctx:
${scores('"${dpo.model}"', "noctx_pairs")}
${o.scoreTrain ? `  policy_train:\n${scores('"${dpo.model}"', "train_pairs")}\n` : ""}  eval_teacher:
${evaluate(TEACHER, "teacher")}
  eval_policy:
${evaluate('"${dpo.model}"', "dpo")}
`;
}

/** Reward statistics of the policy against the reference on a set of pairs. */
export interface RewardStats {
  /** Pairs scored. */
  pairs: number;
  /** Fraction with reward(chosen) > reward(rejected) (ties count as wrong, as in TRL). */
  accuracy: number;
  /** Mean of reward(chosen) - reward(rejected). */
  margin: number;
  /** Mean beta * (logp_pol(chosen) - logp_ref(chosen)). */
  chosen: number;
  /** Mean beta * (logp_pol(rejected) - logp_ref(rejected)). */
  rejected: number;
}

/** Implicit DPO rewards of `policy` against `ref` (ref_logprobs outputs), over the pairs `keep` selects. */
export function rewardStats(
  policy: { chosen: Float32Array; rejected: Float32Array },
  ref: { chosen: Float32Array; rejected: Float32Array },
  beta: number,
  keep: (i: number) => boolean = () => true,
): RewardStats {
  let n = 0, acc = 0, margin = 0, rc = 0, rr = 0;
  for (let i = 0; i < ref.chosen.length; i++) {
    if (!keep(i)) continue;
    const c = beta * (policy.chosen[i] - ref.chosen[i]), r = beta * (policy.rejected[i] - ref.rejected[i]);
    n++;
    acc += c > r ? 1 : 0;
    margin += c - r;
    rc += c;
    rr += r;
  }
  const d = Math.max(1, n);
  return { pairs: n, accuracy: acc / d, margin: margin / d, chosen: rc / d, rejected: rr / d };
}

/** Completion lengths in tokens (the loss-masked tokens) of every pair of a tokenize output. */
export async function pairLengths(dir: string): Promise<{ chosen: Int32Array; rejected: Int32Array }> {
  const reader = await TokenFileReader.open(join(dir, "tokens.bin"));
  try {
    const n = reader.numPairs;
    const chosen = new Int32Array(n), rejected = new Int32Array(n);
    const count = (m: Uint8Array) => m.reduce((a, b) => a + b, 0);
    for (let i = 0; i < n; i++) {
      const p = reader.readPair(i);
      chosen[i] = count(p.chosen.mask);
      rejected[i] = count(p.rejected.mask);
    }
    return { chosen, rejected };
  } finally {
    reader.close();
  }
}

/**
 * Reward accuracy by length: a policy that only learned "shorter completions are better" (or only lowered the
 * log-probability of every token alike) wins exactly the pairs whose chosen completion is shorter. Reported:
 * the accuracy on pairs with the chosen shorter, longer and equal in tokens, their mean over the shorter and
 * longer groups (length-balanced), and the accuracy of the "shorter wins" rule itself.
 */
export function lengthControl(
  policy: { chosen: Float32Array; rejected: Float32Array },
  ref: { chosen: Float32Array; rejected: Float32Array },
  len: { chosen: Int32Array; rejected: Int32Array },
  beta: number,
  keep: (i: number) => boolean = () => true,
): LengthControl {
  const g = { shorter: [0, 0], longer: [0, 0], equal: [0, 0] };
  for (let i = 0; i < ref.chosen.length; i++) {
    if (!keep(i)) continue;
    const c = beta * (policy.chosen[i] - ref.chosen[i]), r = beta * (policy.rejected[i] - ref.rejected[i]);
    const k = len.chosen[i] < len.rejected[i]
      ? "shorter"
      : len.chosen[i] > len.rejected[i]
      ? "longer"
      : "equal";
    g[k][0]++;
    g[k][1] += c > r ? 1 : 0;
  }
  const acc = (x: number[]) => (x[0] ? x[1] / x[0] : NaN);
  const n = g.shorter[0] + g.longer[0] + g.equal[0];
  return {
    chosen_shorter: { pairs: g.shorter[0], accuracy: acc(g.shorter) },
    chosen_longer: { pairs: g.longer[0], accuracy: acc(g.longer) },
    equal_length: { pairs: g.equal[0], accuracy: acc(g.equal) },
    balanced_accuracy: (acc(g.shorter) + acc(g.longer)) / 2,
    shorter_wins_rule: g.shorter[0] / Math.max(1, n),
  };
}

/** See {@linkcode lengthControl}. */
export interface LengthControl {
  /** Pairs whose chosen completion has fewer tokens than the rejected one. */
  chosen_shorter: { pairs: number; accuracy: number };
  /** Pairs whose chosen completion has more tokens. */
  chosen_longer: { pairs: number; accuracy: number };
  /** Pairs of equal length. */
  equal_length: { pairs: number; accuracy: number };
  /** Mean of the shorter and longer groups' accuracies. */
  balanced_accuracy: number;
  /** Reward accuracy of the rule "the shorter completion wins" (ties count as wrong). */
  shorter_wins_rule: number;
}

async function readScores(dir: string): Promise<{ chosen: Float32Array; rejected: Float32Array }> {
  const f = await openSafetensors(join(dir, "logprobs.safetensors"));
  return { chosen: await f.readFloat32("chosen"), rejected: await f.readFloat32("rejected") };
}

/** Cloze accuracy of one model on one split. */
export interface ClozeScores {
  /** Items. */
  n: number;
  /** Accuracy (summed log-likelihood). */
  acc: number;
  /** Its standard error. */
  acc_stderr: number;
  /** Accuracy with the log-likelihood per character. */
  acc_norm: number;
  /** Its standard error. */
  acc_norm_stderr: number;
}

async function readCloze(dir: string, task: string): Promise<ClozeScores> {
  const r = JSON.parse(await Deno.readTextFile(join(dir, "results.json")));
  const s = r.results[task];
  return {
    n: r["n-samples"]?.[task]?.effective ?? NaN,
    acc: s["acc,none"],
    acc_stderr: s["acc_stderr,none"],
    acc_norm: s["acc_norm,none"],
    acc_norm_stderr: s["acc_norm_stderr,none"],
  };
}

/** What the benchmark reports. */
export interface DpoQualityResult {
  /** Pair and item counts. */
  data: {
    train_items: number;
    train_pairs: number;
    dropped_for_overlap: number;
    heldout_items: number;
    heldout_pairs: number;
    heldout_conflicting_pairs: number;
  };
  /** Policy vs reference on the held-out pairs (all, and those sharing no sentence with a train pair). */
  heldout_rewards: RewardStats;
  /** Held-out pairs with no conflicting sentence in the train pairs (all of them with --overlap drop). */
  heldout_rewards_clean: RewardStats;
  /** Held-out reward accuracy by the chosen completion's length relative to the rejected one. */
  heldout_length_control: LengthControl;
  /**
   * The held-out pairs scored without their context: what the policy learned about endings alone (style,
   * names, length) rather than about which ending fits the story.
   */
  heldout_rewards_no_context: RewardStats;
  /** The same on the train pairs (to see memorisation vs generalisation); null when not scored. */
  train_rewards: RewardStats | null;
  /** Cloze accuracy, held-out and train splits, of the teacher (= reference) and the DPO policy. */
  cloze: { teacher: Record<string, ClozeScores>; dpo: Record<string, ClozeScores> };
  /** The dpo stage's final metrics (last logging window, train batches). */
  dpo_metrics: Record<string, unknown>;
  /** dpo stage wall time, seconds (its first run's, when cached). */
  train_s: number;
  /** Whole run wall time, seconds. */
  wall_s: number;
}

/** Writes the data, runs the recipe and collects the results. */
export async function dpoQuality(o: DpoQualityOptions): Promise<DpoQualityResult> {
  const dir = resolve(o.dir);
  const data = join(dir, "data");
  await Deno.mkdir(data, { recursive: true });
  const items: ClozeItem[] = (await Deno.readTextFile(CLOZE)).trim().split("\n").map((l) => JSON.parse(l));
  const split = splitCloze(items, o);
  const evalTrain = o.evalTrain > 0 ? split.trainItems.slice(0, o.evalTrain) : split.trainItems;
  await Deno.writeTextFile(join(data, "train_pairs.jsonl"), jsonl(split.trainPairs));
  await Deno.writeTextFile(join(data, "heldout_pairs.jsonl"), jsonl(split.heldPairs));
  await Deno.writeTextFile(join(data, "heldout_pairs_no_context.jsonl"), jsonl(split.heldPairsNoContext));
  await Deno.writeTextFile(join(data, "cloze_heldout.jsonl"), jsonl(split.heldItems));
  await Deno.writeTextFile(join(data, "cloze_train.jsonl"), jsonl(evalTrain));
  const conflicts = split.heldConflicts.filter((c) => c).length;
  console.log(
    `split: ${split.trainItems.length} train items -> ${split.trainPairs.length} pairs (${split.dropped} dropped ` +
      `for sharing an ending with the held-out items); ${split.heldItems.length} held-out items -> ` +
      `${split.heldPairs.length} pairs (${conflicts} with a sentence trained the other way)`,
  );
  const recipe = join(dir, "dpo_quality.yaml");
  await Deno.writeTextFile(recipe, dpoRecipe(o, data));
  console.log(`recipe: ${recipe}`);
  const t0 = performance.now();
  const code = await main(["run", recipe, "--gpu", o.gpu]);
  if (code !== 0) throw new Error(`the recipe failed (exit ${code}); see the output above`);
  const wall_s = (performance.now() - t0) / 1000;
  // the runner keeps its runs at the project root (the git root above the recipe, else the recipe's folder)
  const run = listRuns(resolveStateDirs(recipe).runs, "dpo_quality")[0]?.record;
  if (!run) throw new Error(`no finished dpo_quality run under ${resolveStateDirs(recipe).runs}`);
  const out = (stage: string, port: string) => {
    const p = run.stages.find((s) => s.stage === stage)?.outputs[port]?.path;
    if (!p) throw new Error(`no ${port} output of stage ${stage} in run ${run.run_id}`);
    return p;
  };
  const [refHeld, polHeld, refNoCtx, polNoCtx] = await Promise.all([
    readScores(out("ref_held", "ref")),
    readScores(out("policy_held", "ref")),
    readScores(out("ref_noctx", "ref")),
    readScores(out("policy_noctx", "ref")),
  ]);
  const train = o.scoreTrain
    ? rewardStats(
      await readScores(out("policy_train", "ref")),
      await readScores(out("ref_train", "ref")),
      o.beta,
    )
    : null;
  const dpo = run.stages.find((s) => s.stage === "dpo")!;
  const cloze = { teacher: {} as Record<string, ClozeScores>, dpo: {} as Record<string, ClozeScores> };
  for (const [who, stage] of [["teacher", "eval_teacher"], ["dpo", "eval_policy"]] as const) {
    for (const task of ["cloze_heldout", "cloze_train"]) {
      cloze[who][task] = await readCloze(out(stage, "results"), task);
    }
  }
  return {
    data: {
      train_items: split.trainItems.length,
      train_pairs: split.trainPairs.length,
      dropped_for_overlap: split.dropped,
      heldout_items: split.heldItems.length,
      heldout_pairs: split.heldPairs.length,
      heldout_conflicting_pairs: conflicts,
    },
    heldout_rewards: rewardStats(polHeld, refHeld, o.beta),
    heldout_rewards_clean: rewardStats(polHeld, refHeld, o.beta, (i) => !split.heldConflicts[i]),
    heldout_length_control: lengthControl(
      polHeld,
      refHeld,
      await pairLengths(out("held_pairs", "tokens")),
      o.beta,
    ),
    heldout_rewards_no_context: rewardStats(polNoCtx, refNoCtx, o.beta),
    train_rewards: train,
    cloze,
    dpo_metrics: dpo.metrics,
    train_s: dpo.wall_s,
    wall_s,
  };
}

/** The result as Markdown tables. */
export function dpoTable(r: DpoQualityResult): string {
  const f = (x: number, d = 3) => (Number.isFinite(x) ? x.toFixed(d) : "-");
  const rw = (name: string, s: RewardStats) =>
    `| ${name} | ${s.pairs} | ${f(s.accuracy)} | ${f(s.margin, 4)} | ${f(s.chosen, 4)} | ${
      f(s.rejected, 4)
    } |`;
  const cz = (name: string, s: ClozeScores) =>
    `| ${name} | ${s.n} | ${f(s.acc)} ± ${f(s.acc_stderr)} | ${f(s.acc_norm)} ± ${f(s.acc_norm_stderr)} |`;
  const lc = r.heldout_length_control;
  return [
    "| pairs | n | reward acc | margin | rewards/chosen | rewards/rejected |",
    "| --- | --- | --- | --- | --- | --- |",
    rw("held-out", r.heldout_rewards),
    ...(r.heldout_rewards_clean.pairs !== r.heldout_rewards.pairs
      ? [rw("held-out, no conflicting sentence", r.heldout_rewards_clean)]
      : []),
    rw("held-out, context removed", r.heldout_rewards_no_context),
    ...(r.train_rewards ? [rw("train", r.train_rewards)] : []),
    "",
    "| held-out pairs by length (tokens) | n | reward acc |",
    "| --- | --- | --- |",
    `| chosen shorter | ${lc.chosen_shorter.pairs} | ${f(lc.chosen_shorter.accuracy)} |`,
    `| chosen longer | ${lc.chosen_longer.pairs} | ${f(lc.chosen_longer.accuracy)} |`,
    `| equal | ${lc.equal_length.pairs} | ${f(lc.equal_length.accuracy)} |`,
    `| length-balanced (mean of shorter, longer) | | ${f(lc.balanced_accuracy)} |`,
    `| rule "shorter wins" | | ${f(lc.shorter_wins_rule)} |`,
    "",
    "| cloze | items | acc | acc_norm |",
    "| --- | --- | --- | --- |",
    cz("held-out, teacher", r.cloze.teacher.cloze_heldout),
    cz("held-out, dpo", r.cloze.dpo.cloze_heldout),
    cz("train, teacher", r.cloze.teacher.cloze_train),
    cz("train, dpo", r.cloze.dpo.cloze_train),
  ].join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      lr: { type: "string" },
      beta: { type: "string" },
      "rpo-alpha": { type: "string" },
      epochs: { type: "string" },
      steps: { type: "string" },
      batch: { type: "string" },
      warmup: { type: "string" },
      "pairs-per-item": { type: "string" },
      "held-out": { type: "string" },
      "train-items": { type: "string" },
      overlap: { type: "string" },
      "max-length": { type: "string" },
      "max-prompt-length": { type: "string" },
      "eval-train": { type: "string" },
      "score-train": { type: "boolean" },
      "no-score-train": { type: "boolean" },
      gpu: { type: "string" },
      dir: { type: "string" },
      seed: { type: "string" },
      json: { type: "string" },
      quick: { type: "boolean" },
    },
  });
  const base = { ...DEFAULTS, ...(values.quick ? QUICK : {}) };
  const num = (k: keyof typeof values, d: number) => {
    if (values[k] === undefined) return d;
    const v = Number(values[k]);
    if (!Number.isFinite(v)) throw new Error(`--${k}: expected a number, found ${values[k]}`);
    return v;
  };
  const overlap = String(values.overlap ?? base.overlap);
  if (overlap !== "drop" && overlap !== "keep") throw new Error(`--overlap: expected drop or keep`);
  const o: DpoQualityOptions = {
    lr: num("lr", base.lr),
    beta: num("beta", base.beta),
    rpoAlpha: num("rpo-alpha", base.rpoAlpha),
    epochs: num("epochs", base.epochs),
    steps: num("steps", base.steps),
    batch: num("batch", base.batch),
    warmup: num("warmup", base.warmup),
    pairsPerItem: num("pairs-per-item", base.pairsPerItem),
    heldOut: num("held-out", base.heldOut),
    trainItems: num("train-items", base.trainItems),
    overlap,
    maxLength: num("max-length", base.maxLength),
    maxPromptLength: num("max-prompt-length", base.maxPromptLength),
    evalTrain: num("eval-train", base.evalTrain),
    scoreTrain: values["score-train"] ? true : values["no-score-train"] ? false : base.scoreTrain,
    gpu: String(values.gpu ?? base.gpu),
    dir: String(values.dir ?? base.dir),
    seed: num("seed", base.seed),
  };
  const r = await dpoQuality(o);
  const report = { bench: "dpo_quality", date: new Date().toISOString(), options: o, ...r };
  console.log("\n" + dpoTable(r) + "\n");
  console.log(JSON.stringify(report, null, 2));
  const out = Deno.env.get("OUT");
  for (const path of [values.json, out ? join(out, "dpo_quality.json") : undefined]) {
    if (path) await Deno.writeTextFile(String(path), JSON.stringify(report, null, 2) + "\n");
  }
}
