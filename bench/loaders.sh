#!/usr/bin/env bash
# Loader benchmark on one GPU (issue 3): the baseline model at the record batch (786,432 tokens,
# seq 2048, grad accum 8) with each data.loader, prefetch off and on, against synthetic on-device
# tokens; ms/step and each sampler's host throughput. One process, one compile: about 6-7 minutes
# on an H100 (shards are built on first use, as in bench/naive_baseline.sh). Prints a markdown table.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench/loaders}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-40}
PREFETCH=${PREFETCH:-4}
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
bench_env || exit 1
bench_device_info "$OUT/gpu.txt"

bench_shards "$DATA" || exit 1

cd "$REPO" || exit 1
timeout 480 python3 bench/loader_bench.py --data "$DATA" --tokenizer "$REPO/.bench/corpus/fineweb_1024_bpe.model" \
  --steps "$STEPS" --prefetch "$PREFETCH" --out "$OUT" 2>&1 | tee "$OUT/loaders.out"
exit "${PIPESTATUS[0]}"
