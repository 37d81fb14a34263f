#!/usr/bin/env bash
# Upload the offline wandb runs that pgolf wrote (sweeps log offline by default), e.g.
#   WANDB_API_KEY=... bash launch/wandb_sync.sh                 # every offline run under outputs/
#   bash launch/wandb_sync.sh outputs/sweeps/2026-11-22_10-00-00.123456
# Runs are found as <job>/wandb/offline-run-* and the sweep's report run as <sweep>/wandb/offline-run-*.
# `wandb sync` skips runs it already uploaded, so rerunning is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wandb >/dev/null; then
  echo "wandb is not installed (pip install \"wandb>=0.19.10,<0.32\", the range pgolf pins)" >&2
  exit 2
fi
roots=("$@")
if [ ${#roots[@]} -eq 0 ]; then
  roots=(outputs)
fi
mapfile -t runs < <(find "${roots[@]}" -type d -name 'offline-run-*' -path '*/wandb/*' | sort)
if [ ${#runs[@]} -eq 0 ]; then
  echo "no offline wandb runs under ${roots[*]}"
  exit 0
fi
echo "syncing ${#runs[@]} offline run(s)"
# Extra flags pass through, e.g. WANDB_SYNC_ARGS="--dry-run" or "-p myproject".
wandb sync ${WANDB_SYNC_ARGS:-} "${runs[@]}"
