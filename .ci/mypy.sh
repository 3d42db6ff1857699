#!/usr/bin/env bash
# mypy over the package as it is installed: scheduler/ and workers/ checked as flexkv.scheduler and
# flexkv.workers (mypy names modules by path, so a bare run would see modules 'scheduler.*').
# Builds a throw-away symlink tree  $tmp/flexkv/{<flexkv/*>, scheduler, workers} (+ tests, benchmarks,
# examples beside it), runs mypy there with the repository's pyproject settings, and prints paths as
# they are in the repository.
#   .ci/mypy.sh                 check flexkv, scheduler, workers, tests, benchmarks, examples
#   .ci/mypy.sh flexkv          check only these (paths inside the tree: flexkv, flexkv/scheduler, tests...)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/flexkv-mypy.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/flexkv"
for entry in "$repo"/flexkv/*; do
  ln -s "$entry" "$tmp/flexkv/$(basename "$entry")"
done
ln -s "$repo/scheduler" "$tmp/flexkv/scheduler"
ln -s "$repo/workers" "$tmp/flexkv/workers"
targets=(flexkv)
for dir in tests benchmarks examples; do
  if [ -d "$repo/$dir" ]; then
    ln -s "$repo/$dir" "$tmp/$dir"
    targets+=("$dir")
  fi
done
[ $# -gt 0 ] && targets=("$@")

cd "$tmp"
python3 -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache/ci" "${targets[@]}" 2>&1 \
  | sed -e 's#^flexkv/scheduler/#scheduler/#' -e 's#^flexkv/workers/#workers/#'
