#!/usr/bin/env bash
# A seed record side by side on one GPU (issue 15): PR=339|399|726 runs the PR's own train_gpt.py
# (.bench/ref/pr${PR}_train_gpt.py) with its run command's settings, for each seed in REF_SEEDS
# (two seeds give the reference's own seed-to-seed spread), then `pgolf experiment=pr${PR}` with
# the first seed. Both: the bench shards and tokenizer, global batch 786,432 tokens (8 x 48 x 2048
# on one GPU), STEPS steps with a linear warmdown over the last WARMDOWN (step-based in both:
# MAX_WALLCLOCK_SECONDS=0 / budget.mode=steps), and attention through the same SDPA stand-in
# (.bench/fa3_shim as flash_attn_interface; pgolf takes it with hardware.attention=fa3).
#
# Only the slow tails are cut: the reference's sliding eval (EVAL_SEQ_LEN=64 with EVAL_STRIDE=64
# skips both of its sliding passes; its roundtrip then scores 64-token sequences) and #726's TTT
# (TTT_ENABLED=0); pgolf scores nonoverlap only (eval.modes=[nonoverlap], ttt=none). Train losses
# at 50/100/150, ms/step, model_params and the artifact bytes are printed before those.
# For #726, data.path and DATA_PATH are the same string, so both loaders draw the same batches.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PR=${PR:?set PR=339, 399 or 726}
OUT=${OUT:-$REPO/outputs/bench_seeds_pr$PR}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-150}
WARMDOWN=${WARMDOWN:-100}
REF_SEEDS=${REF_SEEDS:-1337 42}
REF=${REF:-$REPO/.bench/ref/pr${PR}_train_gpt.py}
SHIM=${SHIM:-$REPO/.bench/fa3_shim}
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
bench_env "$SHIM" || exit 1
bench_device_info "$OUT/gpu.txt"
bench_shards "$DATA" || exit 1
TOK=$BENCH_TOK
LOGS="step:(50|100|150)/|val_bpb|Total submission|peak memory|model_params|trained|artifact:|attention|swa|ema"

# Each PR's run command, less what the bench sets (steps, warmdown, clock, eval stride).
case "$PR" in
  339) PR_ENV=(NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=4096 MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025 SCALAR_LR=0.025
         TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 MUON_MOMENTUM_WARMUP_STEPS=1500
         BACKOUT_ENABLED=1 BACKOUT_LAMBDA_INIT=0.2 LAWA_ENABLED=0 INT5_MLP=0 VE_ENABLED=0) ;;
  399) PR_ENV=(NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=2048 XSA_LAST_N=4 EMA_ENABLED=1 EMA_DECAY=0.997 SWA_ENABLED=0
         ROPE_DIMS=16 LN_SCALE=1 LATE_QAT=1 QAT_THRESHOLD=0.1 MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025
         SCALAR_LR=0.025 TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92
         MUON_MOMENTUM_WARMUP_STEPS=1500) ;;
  726) PR_ENV=(TTT_ENABLED=0) ;;  # its run command sets only SEED; TTT is eval, cut here
  *) echo "PR=$PR: choose 339, 399 or 726"; exit 2 ;;
esac

run_reference() {
  local seed=$1
  mkdir -p "/tmp/pgolf_bench/ref_pr${PR}_$seed" && cd "/tmp/pgolf_bench/ref_pr${PR}_$seed" || return 1
  env "${PR_ENV[@]}" DATA_PATH="$DATA" TOKENIZER_PATH="$TOK" SEED="$seed" RUN_ID=reference \
    ITERATIONS="$STEPS" WARMDOWN_ITERS="$WARMDOWN" MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 \
    EVAL_SEQ_LEN=64 EVAL_STRIDE=64 \
    timeout 1200 torchrun --standalone --nproc_per_node=1 "$REF" > "$OUT/reference_seed$seed.out" 2>&1
  echo "reference seed $seed exit $?"
  grep -E "$LOGS" "$OUT/reference_seed$seed.out"
  cd "$REPO" || return 1
}

run_pgolf() {
  local seed=$1
  cd "$REPO" || return 1
  timeout 1200 python3 -m pgolf.run experiment="pr$PR" data.path="$DATA" data.tokenizer_path="$TOK" \
    hardware=gpu hardware.attention=fa3 budget.mode=steps train.iterations="$STEPS" \
    optimizer.warmdown_iters="$WARMDOWN" train.val_every=0 train.log_every=50 seed="$seed" \
    eval.modes=[nonoverlap] ttt=none \
    hydra.run.dir="$OUT/pgolf_run" > "$OUT/pgolf.out" 2>&1
  echo "pgolf exit $?"
  grep -E "$LOGS" "$OUT/pgolf.out"
  cp "$OUT/pgolf_run/result.json" "$OUT/pgolf_result.json" 2>/dev/null
}

# Bytes on the same weights: pgolf exports the reference's final_model.pt (its EMA/SWA weights, as
# its own artifact saw them) without training, and prints model + code bytes.
run_pgolf_same_weights() {
  local seed=$1
  cd "$REPO" || return 1
  timeout 900 python3 -m pgolf.run experiment="pr$PR" data.path="$DATA" data.tokenizer_path="$TOK" \
    hardware=gpu hardware.attention=fa3 budget.mode=steps train.iterations=0 seed="$seed" \
    init_from="/tmp/pgolf_bench/ref_pr${PR}_$seed/final_model.pt" eval.modes=[nonoverlap] ttt=none \
    hydra.run.dir="$OUT/pgolf_same_weights" > "$OUT/pgolf_same_weights.out" 2>&1
  echo "pgolf (reference weights) exit $?"
  grep -E "artifact:|init_from" "$OUT/pgolf_same_weights.out"
  grep -E "Total submission size" "$OUT/reference_seed$seed.out"
}

FIRST=${REF_SEEDS%% *}
case "${ONLY:-both}" in
  ref) for s in $REF_SEEDS; do run_reference "$s"; done ;;
  pgolf) run_pgolf "$FIRST" ;;
  bytes) run_pgolf_same_weights "$FIRST" ;;
  *) for s in $REF_SEEDS; do run_reference "$s"; done; run_pgolf "$FIRST"; run_pgolf_same_weights "$FIRST" ;;
esac
# summarize.py compares reference.out (the first seed) with pgolf.out; the other seeds' losses
# give the reference's seed-to-seed spread.
cp "$OUT/reference_seed$FIRST.out" "$OUT/reference.out" 2>/dev/null
python3 "$REPO/bench/summarize.py" "$OUT" --steps 50,100,150 | tee "$OUT/summary.md"
for s in $REF_SEEDS; do
  echo "reference seed $s: $(grep -oE 'step:(50|100|150)/[0-9]+ train_loss:[0-9.]+' "$OUT/reference_seed$s.out" | tr '\n' ' ')"
done | tee -a "$OUT/summary.md"
