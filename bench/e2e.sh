#!/usr/bin/env bash
# Each seed experiment end to end on one GPU, as a user runs it: `experiment=prNNN hardware=gpu` on
# the bench corpus with a short `budget.train_seconds`, through every phase the experiment has
# (priming, training, calibration, export, every eval mode, TTT) to `result.json` and the rules
# verdict. Everything but the data, the hardware group and the training seconds is the experiment's
# own default; the eval budget stays the experiment's, so a slow phase shows in the verdict rather
# than being hidden by a longer limit.
#
#   EXPERIMENTS="pr339 pr399 pr726" TRAIN_SECONDS=60 bash bench/e2e.sh
#   bash bench/sp8192_prep.sh && EXPERIMENTS="pr1532 pr1775" bash bench/e2e.sh
#
# Copies each run's train.log and result.json to OUT/<experiment>/ and prints each run's phase
# times, bytes and verdict. RUN_LIMIT=S stops a run after S seconds (its process tree, torchrun's
# workers included) and still copies and prints what it got: the phases it finished, from train.log.
# #1775 on one H100 needs more than a 10-minute device call (§9l: 100-226 s of priming, 128 s of
# export before its eval warm-up), so give it RUN_LIMIT a little under the call's limit, then time
# its eval and TTT in the next call on the same warm machine with RESCORE=1: each experiment's run
# folder from the call before is scored again (score_artifact=, no priming, training or export)
# into RUNS/<experiment>-rescore, and that folder is what gets copied and printed.
#
#   RUN_LIMIT=560 TRAIN_SECONDS=60 EXPERIMENTS=pr1775 bash bench/e2e.sh    # call 1: to the artifact
#   RESCORE=1 EXPERIMENTS=pr1775 bash bench/e2e.sh                         # call 2: eval + TTT
#
# Needs (git-ignored): .bench/corpus, .bench/make_shards.py and, on an offline GPU image, the
# wheels in .whl/.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_e2e}
RUNS=${RUNS:-/tmp/pgolf_bench/e2e}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
SP8192_DATA=${SP8192_DATA:-/tmp/pgolf_bench/sp8192}
EXPERIMENTS=${EXPERIMENTS:-pr339 pr399 pr726}
TRAIN_SECONDS=${TRAIN_SECONDS:-60}
SEED=${SEED:-1337}
PGOLF_EXTRA=${PGOLF_EXTRA:-}
mkdir -p "$OUT" "$RUNS"
source "$REPO/bench/common.sh"
bench_env || exit 1
bench_device_info "$OUT/gpu.txt"

data_args() {
  case "$1" in
    pr1532 | pr1775)
      if [ ! -f "$SP8192_DATA/datasets/fineweb10B_sp8192/fineweb_val_000000.bin" ]; then
        echo "$1 needs the sp8192 tokenizer and shards in $SP8192_DATA: run bench/sp8192_prep.sh first" >&2
        return 1
      fi
      echo data.path="$SP8192_DATA/datasets/fineweb10B_sp8192" \
        data.tokenizer_path="$SP8192_DATA/tokenizers/fineweb_8192_bpe.model" data.vocab_size=8192 ;;
    *)
      bench_shards "$DATA" > /dev/null || return 1
      echo data.path="$DATA" data.tokenizer_path="$BENCH_TOK" data.vocab_size=1024 ;;
  esac
}

for exp in $EXPERIMENTS; do
  args=$(data_args "$exp") || exit 1
  dir="$RUNS/$exp"
  if [ "${RESCORE:-0}" = 1 ]; then
    if [ ! -f "$dir/artifact/final_model.ptz" ]; then
      echo "RESCORE=1: $dir/artifact/final_model.ptz is missing; run the experiment first on this machine" >&2
      exit 1
    fi
    args="$args score_artifact=$dir"
    dir="$RUNS/$exp-rescore"
  fi
  rm -rf "$dir"
  bench_gpu_idle || exit 1
  t0=$(date +%s)
  # shellcheck disable=SC2086
  cmd=(python3 -m pgolf.run experiment="$exp" data=shards $args hardware=gpu
    budget.train_seconds="$TRAIN_SECONDS" seed="$SEED" hydra.run.dir="$dir" $PGOLF_EXTRA)
  if [ -n "${RUN_LIMIT:-}" ]; then
    run_cut "$OUT/$exp.out" "" "${cmd[@]}"
    rc=$(test -f "$dir/result.json" && echo "see result.json" || echo "stopped at RUN_LIMIT=$RUN_LIMIT")
  else
    "${cmd[@]}" > "$OUT/$exp.out" 2>&1
    rc=$?
  fi
  echo "$exp: rc $rc in $(($(date +%s) - t0))s"
  mkdir -p "$OUT/$exp"
  cp "$dir/train.log" "$dir/result.json" "$OUT/$exp/" 2> /dev/null
  # the phases it finished, also when it was stopped before result.json
  grep -h "^phase:.* done in" "$dir/train.log" 2> /dev/null | sed 's/^/  /'
  python3 - "$OUT/$exp/result.json" << 'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"  no result.json: {e}")
    raise SystemExit(0)
print(f"  status {r.get('status')}  val_bpb {r.get('val_bpb')} ({r.get('final_mode')})  steps {r.get('steps')}"
      f"  ms/step {r.get('ms_per_step')}  bytes {r.get('bytes')}")
for key in ("timings", "metrics", "rules", "throughput", "error"):
    if key in r:
        print(f"  {key}: {json.dumps(r[key])[:900]}")
EOF
done
