#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (kept if already installed, e.g. a CUDA build on a
# GPU pod; otherwise the 2.13.0 CPU build we test with), then pgolf in editable mode.
#   bash launch/setup.sh        # runtime
#   bash launch/setup.sh dev    # + pytest and ruff
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if [ "${1:-}" = "dev" ]; then
  "$PY" -m pip install -q -e ".[dev]"
else
  "$PY" -m pip install -q -e .
fi
"$PY" -c "import torch, pgolf; print(f'pgolf {pgolf.__version__} with torch {torch.__version__}')"
