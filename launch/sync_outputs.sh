#!/usr/bin/env bash
# Copy run and sweep folders from this pod to a remote (or local) destination with rsync, e.g.
#   bash launch/sync_outputs.sh user@host:pgolf/outputs/            # everything under outputs/
#   bash launch/sync_outputs.sh user@host:pgolf/outputs/ sweeps/2026-11-22_10-00-00.123456
# Model artifacts are included (they are what a submission ships); checkpoints and compile
# caches are left out unless SYNC_CHECKPOINTS=1, since they are large and only useful here.
# Safe to rerun: rsync only sends what changed, so run it in a loop while a sweep is going.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash launch/sync_outputs.sh <dest> [path under outputs/ ...]" >&2
  exit 2
fi
dest=$1
shift
excludes=(--exclude '.cache/' --exclude '.gpu_slots/' --exclude '*.tmp')
if [ "${SYNC_CHECKPOINTS:-0}" != "1" ]; then
  excludes+=(--exclude 'checkpoint/')
fi
if [ $# -eq 0 ]; then
  set -- .
fi
cd outputs
# -R keeps the paths relative to outputs/, so sweeps land at <dest>/sweeps/<time>/...
rsync -aR --partial --info=stats1 "${excludes[@]}" "$@" "$dest"
