#!/usr/bin/env bash
# Gathers the third-party Python sources of the PyTorch B baseline (bench/pytorch/hybrid_train.py) into .baseline/
# (git-ignored; carried to the GPU machine, which has no network, next to .gpu/):
#   mamba_ssm/  from state-spaces/mamba (Apache-2.0): the Triton SSD, gated RMSNorm and layer-norm kernels
#   mamba2/, util.py  from jxiw/MambaInLlama (Apache-2.0): the official hybrid layer and wrapper
#   einops/  from arogozhnikov/einops (MIT), which both import
# Each argument is a clone of that repository (a bare git directory works too: its HEAD is exported).
# Usage: bash bench/pytorch/baseline_sources.sh MAMBA_REPO MAMBAINLLAMA_REPO EINOPS_REPO
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 MAMBA_REPO MAMBAINLLAMA_REPO EINOPS_REPO" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/.baseline"
tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
export_paths() { # name, repo, paths...
  local name="$1" repo="$2"
  shift 2
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # file by file: a partial clone may lack objects elsewhere in the tree, which `git archive` trips on
    git -C "$repo" ls-tree -r --name-only HEAD -- "$@" | while read -r f; do
      mkdir -p "$tmp/$(dirname "$f")"
      git -C "$repo" show "HEAD:$f" >"$tmp/$f"
    done
    echo "$name $(git -C "$repo" rev-parse HEAD)" >>"$tmp/SOURCES"
  else
    for p in "$@"; do cp -r "$repo/$p" "$tmp/"; done
    echo "$name $repo (not a git repository)" >>"$tmp/SOURCES"
  fi
}
export_paths state-spaces/mamba "$1" mamba_ssm LICENSE
mv "$tmp/LICENSE" "$tmp/LICENSE.mamba"
export_paths jxiw/MambaInLlama "$2" mamba2 util.py LICENSE
mv "$tmp/LICENSE" "$tmp/LICENSE.MambaInLlama"
export_paths arogozhnikov/einops "$3" einops LICENSE
mv "$tmp/LICENSE" "$tmp/LICENSE.einops"
rm -rf "$out"
mv "$tmp" "$out"
echo "wrote $out ($(du -sh "$out" | cut -f1)):"
cat "$out/SOURCES"
