#!/usr/bin/env bash
# The eval and TTT phase times of the sp8192 seed experiments (pr1775, pr1532) on one GPU, in one
# device call. On one H100, #1775's priming, training and export leave no room in a 10-minute call
# for its phased TTT (docs/benchmarks.md §9l), so the artifact is made on a CPU first: a 0-step run
# of the experiment (same model, quantizer and blob format; untrained weights), exported and copied
# with the full sp8192 val split into one small folder that a device call can carry (~27 MB). The
# device call then scores each artifact with the experiment's own eval modes and TTT
# (`score_artifact=`), and prints each phase's time. What it measures is the time of each phase,
# which does not depend on the weights' values; the scores and the byte verdict are those of an
# untrained model and mean nothing.
#
#   bash bench/sp8192_prep.sh .bench/sp8192_full          # CPU, ~1 minute: tokenizer and shards
#   PREP=1 bash bench/eval_phases.sh                      # CPU, ~5 minutes: artifacts -> .bench/gpu_in
#   bash bench/eval_phases.sh                             # device call, carry [".whl", ".bench/gpu_in"]
#
# EXPERIMENTS (default "pr1775 pr1532"), TOTAL (seconds for all, default 560) and PER (at most for
# one, default 380) bound the device call; each run's log and result.json land in $OUT/<exp>/.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
EXPERIMENTS=${EXPERIMENTS:-pr1775 pr1532}
FULL=${SP8192_DATA:-.bench/sp8192_full}
IN=.bench/gpu_in
SHARDS=datasets/fineweb10B_sp8192
TOK=tokenizers/fineweb_8192_bpe.model

if [ "${PREP:-0}" = 1 ]; then
  [ -f "$FULL/$SHARDS/fineweb_val_000000.bin" ] || { echo "run bench/sp8192_prep.sh $FULL first" >&2; exit 1; }
  mkdir -p "$IN/sp8192/$SHARDS" "$IN/sp8192/tokenizers"
  # A small train shard (the run needs one) from the first train documents, with the same tokenizer.
  docs=$(mktemp --suffix=.jsonl)
  xz -dc .bench/corpus/docs_val.jsonl.xz | head -50 > "$docs"
  xz -dc .bench/corpus/docs_train.jsonl.xz | head -1500 >> "$docs"
  python3 -m pgolf.data build --input "$docs" --val-docs 50 --root "$IN/mini" --vocab-size 8192 \
    --tokenizer "$FULL/$TOK" || exit 1
  cp "$FULL/$SHARDS/fineweb_val_000000.bin" "$IN/sp8192/$SHARDS/"
  cp "$IN/mini/$SHARDS/fineweb_train_000000.bin" "$IN/sp8192/$SHARDS/"
  cp "$FULL"/tokenizers/* "$IN/sp8192/tokenizers/"
  # The full val split with the small train shard: the manifest says so, or the run refuses the shards.
  python3 - "$FULL/$SHARDS/manifest.json" "$IN/mini/$SHARDS/manifest.json" "$IN/sp8192/$SHARDS/manifest.json" << 'EOF'
import json, sys
full, mini = (json.load(open(p)) for p in sys.argv[1:3])
for key in ("train", "docs_train", "files_train"):
    full["splits"][key] = mini["splits"][key]
json.dump(full, open(sys.argv[3], "w"), indent=2)
EOF
  for exp in $EXPERIMENTS; do
    run=$(mktemp -d)
    # 0 steps, one calibration batch, no pruning and a cap that cannot refuse: only the blob matters.
    # The mini val split keeps the CPU scoring short; the run is stopped once the artifact is written.
    python3 -m pgolf.run experiment="$exp" data=shards data.path="$IN/mini/$SHARDS" data.tokenizer_path="$IN/mini/$TOK" \
      data.vocab_size=8192 hardware=cpu train.iterations=0 train.prime_steps=0 budget.mode=steps \
      train.seq_len=8192 train.batch_tokens=65536 quant.calibration.batches=1 quant.prune_to_fit=false \
      budget.artifact_bytes=99000000 eval.nonoverlap_packed=false hydra.run.dir="$run" > "$run.log" 2>&1 &
    pid=$!
    until [ -f "$run/artifact/final_model.ptz" ] && grep -q "^artifact:" "$run/train.log" 2> /dev/null; do
      kill -0 $pid 2> /dev/null || { echo "$exp: the CPU run ended without an artifact: $run.log" >&2; exit 1; }
      sleep 5
    done
    kill $pid 2> /dev/null
    mkdir -p "$IN/$exp"
    cp "$run/artifact/final_model.ptz" "$run/artifact/train_gpt.py" "$IN/$exp/"
    echo "$exp: $(grep '^artifact:' "$run/train.log") -> $IN/$exp"
  done
  rm -f "$IN/mini/$SHARDS/fineweb_train_000000.bin" "$docs"
  du -sh "$IN"
  exit 0
fi

source bench/common.sh
bench_env || exit 1
OUT=${OUT:-$REPO/outputs/bench_eval_phases}
mkdir -p "$OUT"
bench_device_info "$OUT/gpu.txt"
start=$(date +%s)
for exp in $EXPERIMENTS; do
  left=$((${TOTAL:-560} - ($(date +%s) - start)))
  limit=$((left < ${PER:-380} ? left : ${PER:-380}))
  [ "$limit" -gt 30 ] || break
  t0=$(date +%s)
  timeout -k 5 "$limit" python3 -m pgolf.run experiment="$exp" data=shards data.path="$IN/sp8192/$SHARDS" \
    data.tokenizer_path="$IN/sp8192/$TOK" data.vocab_size=8192 hardware=gpu \
    score_artifact="$IN/$exp/final_model.ptz" hydra.run.dir="$OUT/$exp" > "$OUT/$exp.out" 2>&1
  echo "$exp: rc $? in $(($(date +%s) - t0))s (limit $limit)"
  grep -h "phase:.* done in\|^phases\|^eval\|^ttt" "$OUT/$exp/train.log" 2> /dev/null | sed 's/^/  /'
done
