#!/usr/bin/env bash
# Training-step profiles of the record stacks on one GPU (bench/profile_train.py): each experiment as
# shipped (its own attention backend and defaults; no FA3 shim unless SHIM=1), compiled with a few
# priming steps, WARM steps, then STEPS profiled steps. Writes OUT/profile_<label>.txt (+ .json).
#
#   EXPERIMENTS  experiments to profile (default "r0409 pr726")
#   STEPS / WARM / PRIME  profiled steps (20), warm steps after priming (5), priming steps per graph
#                variant (3: enough to compile; the profile never includes them)
#   EXTRA        more pgolf overrides for every experiment (e.g. "hardware.train_cudnn_attention=false")
#   SHIM=1       put the FA3 stand-in first on PYTHONPATH (what bench/optim.sh and seeds.sh time)
#
# Data: the shared bench corpus as sp1024 shards (the record's SP8192 tokenizer is not available
# offline), so experiment=r0409 runs with data.vocab_size=1024: its LM head is 1024 x 512 here, not
# 8192 x 512 (the FLOPs of a token drop by 2 x 3 x 7168 x 512, 5% of its 426 MFLOP looped).
# GPU time: about 2-3 minutes per experiment on an H100 (compile + 28 steps).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_profile_train}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
EXPERIMENTS=${EXPERIMENTS:-r0409 pr726}
STEPS=${STEPS:-20}
WARM=${WARM:-5}
PRIME=${PRIME:-3}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
if [ "${SHIM:-0}" = 1 ]; then bench_env "$REPO/.bench/fa3_shim" || exit 1; else bench_env || exit 1; fi
bench_device_info "$OUT/gpu.txt"
bench_shards "$DATA" || exit 1
bench_gpu_idle || exit 1
for exp in $EXPERIMENTS; do
  # shellcheck disable=SC2086  # EXTRA is a list of overrides
  timeout 580 python3 "$REPO/bench/profile_train.py" --out "$OUT" --steps "$STEPS" --warm "$WARM" -- \
    experiment="$exp" hardware=gpu data=shards data.path="$DATA" data.tokenizer_path="$BENCH_TOK" \
    data.vocab_size=1024 train.prime_steps="$PRIME" wandb.mode=disabled $EXTRA > "$OUT/$exp.out" 2>&1
  echo "$exp exit $?"
  sed -n '1,20p' "$OUT/profile_$exp.txt" 2> /dev/null || tail -20 "$OUT/$exp.out"
done
