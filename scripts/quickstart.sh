#!/usr/bin/env bash
# The main job on the built-in data (Python's own documentation): set up, prepare, describe.
# GPTKIT_WORKDIR puts data (and later runs) elsewhere; the README test uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work="${GPTKIT_WORKDIR:-.}"
gptkit=.venv/bin/gptkit
$gptkit prepare --out "$work/data/default" --tokenizer char --overwrite --no-progress
$gptkit info "$work/data/default"
$gptkit info configs/tiny.yaml
