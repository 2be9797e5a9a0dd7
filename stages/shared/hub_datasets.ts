/**
 * The data layer's access to Hub dataset repositories (`hf://datasets/org/name[@revision]`), backed by the models
 * layer's Hub cache: a repository snapshot is resolved (downloaded, or found offline) once per revision and its
 * files are read from the snapshot directory. The whole repository is fetched the first time one of its files is
 * asked for, so split resolution sees every file name; hidden files (`.gitattributes`) are not data.
 *
 * @module
 */
import { basename, join } from "node:path";
import type { HubDatasetResolver } from "../../data/data_files.ts";
import { listLocalFiles } from "../../data/data_files.ts";
import { type HubOptions, resolveDatasetSource } from "../../models/hub.ts";

/** A {@linkcode HubDatasetResolver} over the standard Hub cache (`HF_HUB_OFFLINE` honoured). */
export function hubDatasetResolver(options: HubOptions = {}): HubDatasetResolver {
  const snapshots = new Map<string, Promise<string>>();
  const dirOf = (repo: string, revision: string | null): Promise<string> => {
    const ref = revision ? `${repo}@${revision}` : repo;
    let p = snapshots.get(ref);
    if (!p) {
      p = resolveDatasetSource(ref, options).then((r) => r.dir);
      snapshots.set(ref, p);
    }
    return p;
  };
  return {
    listFiles: async (repo, revision) =>
      (await listLocalFiles(await dirOf(repo, revision))).filter((f) => !basename(f).startsWith(".")),
    localPath: async (repo, revision, file) => join(await dirOf(repo, revision), file),
  };
}
