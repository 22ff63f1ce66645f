#!/usr/bin/env bash
# The main job on the built-in data (Python's own documentation): set up, prepare, train, sample.
# GPTKIT_WORKDIR puts data and runs elsewhere; extra arguments go to `gptkit train` (the README
# test passes a shorter run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work="${GPTKIT_WORKDIR:-.}"
gptkit=.venv/bin/gptkit
$gptkit prepare --out "$work/data/default" --tokenizer char --overwrite --no-progress
rm -rf "$work/runs/tiny"
$gptkit train configs/tiny.yaml data.path="$work/data/default" runs_dir="$work/runs" "$@"
echo "loss curve: $work/runs/tiny/loss.png; report: $work/runs/tiny/report.md"
