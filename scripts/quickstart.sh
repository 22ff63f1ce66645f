#!/usr/bin/env bash
# The main job on the built-in data (Python's own documentation): set up, prepare, train, sample.
# GPTKIT_WORKDIR puts data and runs elsewhere; GPTKIT_SETUP=0 uses .venv as it is; extra arguments
# go to `gptkit train` (the README test passes a shorter run). Earlier runs are kept: the run is
# named tiny, or tiny-2, tiny-3, ... when that name is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${GPTKIT_SETUP:-1}" = 0 ] || bash scripts/setup.sh
work="${GPTKIT_WORKDIR:-.}"
gptkit=.venv/bin/gptkit
$gptkit prepare --out "$work/data/default" --tokenizer char --overwrite --no-progress
name=tiny
n=1
while [ -e "$work/runs/$name" ]; do
    n=$((n + 1))
    name="tiny-$n"
done
echo "run: $work/runs/$name"
$gptkit train configs/tiny.yaml data.path="$work/data/default" runs_dir="$work/runs" name="$name" "$@"
echo "loss curve: $work/runs/$name/loss.png; report: $work/runs/$name/report.md"
