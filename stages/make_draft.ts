/**
 * `make_draft`: a draft model for speculative decoding, made of chosen decoder layers of a teacher (method.md
 * section 3: the paper's 2- or 4-layer drafts such as layers `[0, 31]` of the 32-layer teacher) with the
 * teacher's embeddings, final norm and lm_head, written as a model artifact.
 *
 * Brief fine-tuning is a separate stage: chain the `sft` stage on the draft's output in the recipe, e.g.
 *
 * ```yaml
 * draft:
 *   kind: make_draft
 *   params: { layers: [0, 31] }
 *   inputs: { teacher: hf://HuggingFaceH4/zephyr-7b-beta }
 * draft_sft:
 *   kind: sft
 *   params: { max_steps: 500 }
 *   inputs: { model: "${draft.model}", data: ... }
 * bench:
 *   kind: spec_bench
 *   inputs: { target: "${distill.model}", draft: "${draft_sft.model}" }
 * ```
 *
 * Any other model with the same tokenizer can be the draft of `spec_bench` directly.
 *
 * @module
 */
import { defineStage } from "../pipelines/stage.ts";
import { buildDraftModel } from "../models/draft.ts";
import { countParameters } from "../models/weights.ts";
import { loadModelInput, writeModelArtifact } from "./shared/models.ts";

/** The `make_draft` stage kind. */
export const makeDraftStage = defineStage({
  kind: "make_draft",
  version: 1,
  doc:
    "Builds a small draft model for speculative decoding from chosen decoder layers of a teacher (e.g. the " +
    "first and last), with the teacher's embeddings, final norm and lm_head; the output is a model directory " +
    "(config.json with num_hidden_layers = the number of layers, tokenizer files copied). Chain the sft stage " +
    "on it for brief fine-tuning. Mamba layers chosen from a hybrid stay Mamba layers (a hybrid draft).",
  params: {
    layers: {
      type: "array",
      items: { type: "number", integer: true, min: 0, doc: "A decoder layer index of the teacher." },
      minItems: 1,
      required: true,
      doc:
        "Teacher layers to keep, ascending (e.g. [0, 31] for a 32-layer teacher); layer layers[j] becomes " +
        "layer j of the draft.",
    },
  },
  inputs: {
    teacher: {
      doc:
        "The model whose layers, embeddings and lm_head make the draft: a stage output, local directory or " +
        "hf:// reference (Llama/Mistral, or a hybrid).",
      type: "dir",
    },
  },
  outputs: {
    model: { type: "dir", doc: "The draft model directory (Hugging Face layout, float32)." },
  },
  async run(ctx) {
    const { dir, model } = await loadModelInput(ctx.inputs.teacher, "teacher");
    const draft = buildDraftModel(model, ctx.params.layers);
    ctx.log.info(
      `draft: layers [${ctx.params.layers.join(", ")}] of ${model.config.numLayers} ` +
        `(${draft.kind === "hybrid" ? "hybrid" : "Transformer"})`,
    );
    await writeModelArtifact(ctx.outputs.model, draft, dir);
    ctx.setMetrics({
      layers: ctx.params.layers.length,
      parameters: countParameters(draft.weights),
      teacher_parameters: countParameters(model.weights),
    });
  },
});
