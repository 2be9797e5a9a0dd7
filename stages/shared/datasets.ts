/**
 * Dataset inputs of stage kinds: turning an input artifact (a local file, directory or glob, another stage's
 * output, or an `hf://datasets/...` reference) into the data layer's {@linkcode DatasetSpec}. The Hub dataset
 * resolver for `hf://` addresses is in `hub_datasets.ts`.
 *
 * @module
 */
import type { Artifact } from "../../pipelines/stage.ts";
import type { DatasetSpec, RecordFileType, TextMode } from "../../data/records.ts";
import { UserError } from "../../util/errors.ts";

/** How to read a dataset input (the reading options shared by the stages that take data). */
export interface DatasetReadOptions {
  /** Split of a directory or Hub repository (default `train`). */
  split?: string;
  /** Subset/config name. */
  subset?: string | null;
  /** Plain text: how to cut records. */
  textMode?: TextMode;
  /** JSON: the field holding the records. */
  field?: string | null;
  /** Force a reader. */
  type?: RecordFileType | null;
  /** Records to skip first. */
  offset?: number;
  /** At most this many records. */
  limit?: number | null;
}

/** The {@linkcode DatasetSpec} of a data input (local path, stage output or `hf://datasets/...`). */
export function datasetSpecOf(input: Artifact, opts: DatasetReadOptions = {}, port = "data"): DatasetSpec {
  let path: string;
  if (input.kind === "hub") {
    if (!input.hub || input.hub.repoType !== "dataset") {
      throw new UserError(
        `input ${port}: ${input.ref} is a model repository; datasets are written hf://datasets/org/name`,
      );
    }
    path = input.ref.startsWith("hf://") ? input.ref : `hf://datasets/${input.hub.repo}`;
  } else {
    if (!input.path) throw new UserError(`input ${port}: ${input.ref} has no local path`);
    path = input.path;
  }
  const spec: DatasetSpec = { path };
  if (opts.split !== undefined) spec.split = opts.split;
  if (opts.subset) spec.subset = opts.subset;
  if (opts.textMode) spec.textMode = opts.textMode;
  if (opts.field) spec.field = opts.field;
  if (opts.type) spec.type = opts.type;
  if (opts.offset) spec.offset = opts.offset;
  if (opts.limit !== undefined && opts.limit !== null) spec.limit = opts.limit;
  return spec;
}
