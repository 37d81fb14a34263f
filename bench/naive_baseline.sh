#!/usr/bin/env bash
# Naive baseline, side by side: the challenge's root train_gpt.py vs `pgolf model=baseline`,
# same shards, tokenizer, seed (1337), global batch (524,288 tokens, seq 1024) and 300 steps.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-300}
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
bench_env || exit 1
bench_device_info "$OUT/gpu.txt"

bench_shards "$DATA" || exit 1
TOK=$BENCH_TOK

run_reference() {
  mkdir -p /tmp/pgolf_bench/ref && cd /tmp/pgolf_bench/ref || return 1
  DATA_PATH=$DATA TOKENIZER_PATH=$TOK ITERATIONS=$STEPS WARMDOWN_ITERS=1200 MAX_WALLCLOCK_SECONDS=0 \
    VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=100 SEED=1337 RUN_ID=reference \
    timeout 420 torchrun --standalone --nproc_per_node=1 "$REPO/.bench/ref/train_gpt.py" > "$OUT/reference.out" 2>&1
  echo "reference exit $?"; cp logs/reference.txt "$OUT/reference.log" 2>/dev/null
  grep -E "step:(100|200|300)/|final_int8|Total submission|peak memory" "$OUT/reference.out"
  cd "$REPO" || return 1
}

run_pgolf() {
  cd "$REPO" || return 1
  timeout 420 python3 -m pgolf.run experiment=naive_baseline data=shards data.path="$DATA" data.tokenizer_path="$TOK" \
    hardware=gpu budget.mode=steps train.iterations="$STEPS" train.log_every=100 train.val_every=0 seed=1337 \
    overwrite=true hydra.run.dir="$OUT/pgolf_run" > "$OUT/pgolf.out" 2>&1
  echo "pgolf exit $?"
  grep -E "step:(100|200|300)/|final_roundtrip|artifact:|trained|attention" "$OUT/pgolf.out"
}

case "${ORDER:-ref-first}" in
  ref-first) run_reference; run_pgolf ;;
  pgolf-first) run_pgolf; run_reference ;;
esac
cp "$OUT/pgolf_run/result.json" "$OUT/pgolf_result.json" 2>/dev/null
python3 "$REPO/bench/summarize.py" "$OUT" | tee "$OUT/summary.md"
