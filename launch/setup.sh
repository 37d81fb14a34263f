#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (kept if already installed, e.g. a CUDA build on a
# GPU pod; otherwise the 2.13.0 CPU build we test with), then pgolf in editable mode.
#   bash launch/setup.sh        # runtime
#   bash launch/setup.sh sweep  # + the parallel-GPU launcher (joblib) and matplotlib for report plots
#   bash launch/setup.sh dev    # + pytest, ruff and every optional launcher, so all tests run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
case "${1:-}" in
  dev) "$PY" -m pip install -q -e ".[dev,parallel,slurm,analysis]" ;;
  sweep) "$PY" -m pip install -q -e ".[parallel,analysis]" ;;
  *) "$PY" -m pip install -q -e . ;;
esac
"$PY" -c "import torch, pgolf; print(f'pgolf {pgolf.__version__} with torch {torch.__version__}')"
