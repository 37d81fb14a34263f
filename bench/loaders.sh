#!/usr/bin/env bash
# Loader benchmark on one GPU (issue 3): the baseline model at the record batch (786,432 tokens,
# seq 2048, grad accum 8) with each data.loader, prefetch off and on, against synthetic on-device
# tokens; ms/step and each sampler's host throughput. One process, one compile: about 6-7 minutes
# on an H100 (shards are built on first use, as in bench/naive_baseline.sh). Prints a markdown table.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench/loaders}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-60}
PREFETCH=${PREFETCH:-4}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
if [ -d "$REPO/.whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$REPO
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

if [ ! -f "$DATA/fineweb_val_000000.bin" ]; then
  t0=$(date +%s)
  python3 "$REPO/.bench/make_shards.py" "$REPO/.bench/corpus/fineweb_1024_bpe.model" "$DATA" \
    --train "$REPO/.bench/corpus/docs_train.jsonl.xz" --val "$REPO/.bench/corpus/docs_val.jsonl.xz"
  echo "shards: $(( $(date +%s) - t0 ))s"
fi

cd "$REPO" || exit 1
timeout 480 python3 bench/loader_bench.py --data "$DATA" --tokenizer "$REPO/.bench/corpus/fineweb_1024_bpe.model" \
  --steps "$STEPS" --prefetch "$PREFETCH" --out "$OUT" 2>&1 | tee "$OUT/loaders.out"
exit "${PIPESTATUS[0]}"
