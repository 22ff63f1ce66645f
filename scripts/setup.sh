#!/usr/bin/env bash
# Create .venv (if needed) and install gptkit into it, with optional extras: scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: a plain range would let pip pick a much larger CUDA build on Linux.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${GPTKIT_TORCH:-torch==2.13.0}"
extras="${1:-}"
# Reinstall only when the dependencies or extras changed since the last install.
stamp=".venv/.gptkit-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras:-core}"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
