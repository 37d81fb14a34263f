#!/usr/bin/env bash
# A 3-seed sweep of a short `model=baseline` run on one 2- or 4-GPU machine, then its report.
# With hydra-joblib-launcher installed, the seeds run in parallel as single-GPU jobs
# (launcher=gpus: one GPU slot per job); without it, one after another as torchrun jobs over
# 2 GPUs each (launcher=local). Same shards as bench/naive_baseline.sh; ~5-8 minutes on H100s.
#   bash bench/sweep_seeds.sh
#   SEEDS=1,2,3,4 STEPS=300 BASELINE=1.6854 bash bench/sweep_seeds.sh   # optional published val_bpb
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
TOK=${TOK:-$REPO/.bench/corpus/fineweb_1024_bpe.model}
STEPS=${STEPS:-150}
SEEDS=${SEEDS:-1337,42,2025}
SWEEP=${SWEEP:-$REPO/outputs/sweeps/seeds_$(date +%Y-%m-%d_%H-%M-%S)}
source "$REPO/bench/common.sh"
bench_env || exit 1
mkdir -p "$DATA" "$(dirname "$SWEEP")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -lt 2 ]; then
  echo "sweep_seeds.sh wants 2 or more GPUs, found $NGPU" >&2
  exit 2
fi

bench_shards "$DATA" || exit 1

if python3 -c "import hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then
  LAUNCH=(launcher=gpus hardware=gpu hardware.nproc_per_node=1)
  echo "launcher=gpus: seeds $SEEDS in parallel, one GPU each, on $NGPU GPUs"
else
  LAUNCH=(launcher=local hardware=gpu hardware.nproc_per_node=2)
  echo "launcher=local: seeds $SEEDS one after another, torchrun over 2 GPUs each (install .[parallel] for launcher=gpus)"
fi

t0=$(date +%s)
cd "$REPO" || exit 1
timeout 480 python3 -m pgolf.run -m experiment=naive_baseline data=shards data.path="$DATA" \
  data.tokenizer_path="$TOK" budget.mode=steps train.iterations="$STEPS" train.log_every=50 \
  train.val_every=0 wandb.mode=disabled seed="$SEEDS" "${LAUNCH[@]}" hydra.sweep.dir="$SWEEP" \
  > "$SWEEP.out" 2>&1
echo "sweep exit $? after $(( $(date +%s) - t0 ))s; log: $SWEEP.out"
grep -E "holds GPU slot|final_roundtrip|job failed" "$SWEEP.out"

# The multirun already wrote the summary; rerun the report to add the optional baseline.
python3 -m pgolf.report "$SWEEP" ${BASELINE:+--baseline "$BASELINE"} > /dev/null
echo "==================== $SWEEP/summary.md"
cat "$SWEEP/summary.md"
