#!/usr/bin/env bash
# A seed's script and its experiment profiled over the same kind of steps on one GPU: the top kernels
# of each side's training step, in the same report (bench/profile_train.py for pgolf,
# bench/profile_ref.py for the script). Both run as bench/seeds.sh runs them (its ref_env, data and
# FA3 stand-in), with PRIME priming steps per graph variant, and profile STEPS steps of their looped
# phase where the stack has one (#1532: the loop switches on at step 53 of 150).
#
#   bash bench/sp8192_prep.sh && EXP=pr1532 SIDES=ref bash bench/profile_pair.sh   # about 4-5 minutes (pr1775: 8.5)
#   EXP=pr1532 SIDES=pgolf bash bench/profile_pair.sh                                # about 3 minutes
#
# (both sides in one device call may pass its 10 minutes: give each its own, on the same machine)
#
#   EXP     the seed (default pr1532)
#   SIDES   which to profile (default "ref pgolf")
#   STEPS   profiled steps (default 10); PRIME priming steps (default 5)
#   SKIP    the script's matrix-optimizer steps before profiling: its warm-up plus training steps
#           (default 2 x PRIME + 60 for the sp8192 stacks, whose warm-up also runs the loop; PRIME + 60
#           otherwise)
#
# Writes OUT/profile_{ref,pgolf}_<EXP>.{txt,json}, prints both tables' heads and, where OUT holds both
# sides' profiles, bench/profile_compare.py's comparison.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_profile_pair}
EXP=${EXP:-pr1532}
STEPS=${STEPS:-10}
PRIME=${PRIME:-5}
SIDES=${SIDES:-ref pgolf}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
SP8192_DATA=${SP8192_DATA:-/tmp/pgolf_bench/sp8192}
SHIM=${SHIM:-$REPO/bench/fa3_varlen}
WARMDOWN=100
LOG_EVERY=50
WARMDOWN_FRAC=$(python3 -c "print($WARMDOWN / 150)")
mkdir -p "$OUT"
source "$REPO/bench/common.sh"
bench_env "$SHIM" || exit 1
bench_device_info "$OUT/gpu.txt"
TOK=$BENCH_TOK
# bench/seeds.sh's definitions of each side's run: the PR's environment, data and script
# shellcheck disable=SC1090
source <(sed -n '/^sp8192()/p; /^ref_env()/,/^}/p; /^ref_data_env()/,/^}/p; /^ref_run_env()/,/^}/p; /^pgolf_data_args()/,/^}/p; /^ref_script()/,/^}/p; /^pgolf_fused_args()/,/^}/p' "$REPO/bench/seeds.sh")
if sp8192 "$EXP"; then
  SKIP=${SKIP:-$((2 * PRIME + 60))}
  [ -f "$SP8192_DATA/datasets/fineweb10B_sp8192/fineweb_val_000000.bin" ] || {
    echo "$EXP needs bench/sp8192_prep.sh first" >&2
    exit 1
  }
else
  SKIP=${SKIP:-$((PRIME + 60))}
  bench_shards "$DATA" || exit 1
fi

profile_ref_side() {
  local script
  script=$(ref_script "$EXP") || return 1
  bench_gpu_idle || return 1
  mkdir -p /tmp/pgolf_bench/profile_ref && cd /tmp/pgolf_bench/profile_ref || return 1
  # shellcheck disable=SC2046
  timeout 560 env $(ref_run_env "$EXP" 1337 150) \
    torchrun --standalone --nproc_per_node=1 "$REPO/bench/profile_ref.py" --out "$OUT" --label "ref_$EXP" \
    --skip "$SKIP" --steps "$STEPS" "$script" > "$OUT/ref_$EXP.out" 2>&1
  echo "ref $EXP exit $?"
  cd "$REPO" || return 1
}

profile_pgolf_side() {
  bench_gpu_idle || return 1
  # shellcheck disable=SC2046
  timeout 560 python3 "$REPO/bench/profile_train.py" --out "$OUT" --label "pgolf_$EXP" --steps "$STEPS" --warm 5 -- \
    experiment="$EXP" data=shards $(pgolf_data_args "$EXP") hardware=gpu hardware.attention=fa3 \
    train.prime_steps="$PRIME" $(pgolf_fused_args) wandb.mode=disabled > "$OUT/pgolf_$EXP.out" 2>&1
  echo "pgolf $EXP exit $?"
}

for side in $SIDES; do
  case "$side" in
    ref) profile_ref_side || exit 1 ;;
    pgolf) profile_pgolf_side || exit 1 ;;
    *) echo "SIDES: '$side' is neither ref nor pgolf" >&2; exit 2 ;;
  esac
done
for side in $SIDES; do
  sed -n '1,30p' "$OUT/profile_${side}_$EXP.txt" 2> /dev/null || tail -20 "$OUT/${side}_$EXP.out"
done
# Both sides' profiles in OUT (this call's or an earlier one's on the same OUT): side by side.
if [ -f "$OUT/profile_ref_$EXP.json" ] && [ -f "$OUT/profile_pgolf_$EXP.json" ]; then
  python3 "$REPO/bench/profile_compare.py" "$OUT/profile_ref_$EXP.json" "$OUT/profile_pgolf_$EXP.json"
fi
