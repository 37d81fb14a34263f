#!/usr/bin/env bash
# Record architecture, side by side on one GPU: the 2026-03-23 record script (R0323: banks, Parallel
# Muon, XSA-4, partial RoPE, SmearGate, BigramHash 1536, VE) vs `pgolf model=banked optimizer=muon`,
# same shards, tokenizer, seed (1337), global batch (786,432 tokens = 8 x 48 x 2048 on one GPU) and
# step count (150), both through the FA3 shim so attention runs the same SDPA kernel.
#
# Equalized on purpose (pgolf's Muon/Adam have no weight decay yet, and late QAT/SWA are not in
# pgolf): the reference runs with MUON_WD=0 ADAM_WD=0 LATE_QAT_THRESHOLD=0 SWA_ENABLED=0. Its EMA
# cannot be switched off; it only changes what the reference evaluates after the last step, so the
# comparable quality figures are the train losses and the pre-quant val_bpb at the last step.
# The reference also runs a stride-64 sliding eval after training (about a minute); ONLY=ref or
# ONLY=pgolf runs one side per call when a device call has a time limit.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_models}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-150}
WARMDOWN=${WARMDOWN:-100}   # linear warmdown over the last 100 of 150 steps, same formula in both
REF=${REF:-$REPO/.bench/ref/r0323_train_gpt.py}
SHIM=${SHIM:-$REPO/.bench/fa3_shim}
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
bench_env "$SHIM" || exit 1
bench_device_info "$OUT/gpu.txt"

bench_shards "$DATA" || exit 1
TOK=$BENCH_TOK
LOGS="step:(50|100|150)/|val_bpb|Total submission|peak memory|model_params|trained|artifact:|attention"

run_reference() {
  mkdir -p /tmp/pgolf_bench/ref0323 && cd /tmp/pgolf_bench/ref0323 || return 1
  env "${R0323_SHAPE[@]}" "${R0323_OPTIM[@]}" \
    DATA_PATH=$DATA TOKENIZER_PATH=$TOK SEED=1337 RUN_ID=reference ITERATIONS=$STEPS WARMDOWN_ITERS=$WARMDOWN \
    MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 TRAIN_SEQ_LEN=2048 TRAIN_BATCH_TOKENS=786432 \
    MUON_WD=0 ADAM_WD=0 LATE_QAT_THRESHOLD=0 SWA_ENABLED=0 \
    TTT_ENABLED=0 EVAL_STRIDE=64 \
    timeout 900 torchrun --standalone --nproc_per_node=1 "$REF" > "$OUT/reference.out" 2>&1
  echo "reference exit $?"
  grep -E "$LOGS" "$OUT/reference.out"
  cd "$REPO" || return 1
}

run_pgolf() {
  cd "$REPO" || return 1
  timeout 900 python3 -m pgolf.run experiment=none model=banked optimizer=muon data=shards data.path="$DATA" \
    data.tokenizer_path="$TOK" data.vocab_size=1024 hardware=gpu hardware.attention=fa3 budget.mode=steps \
    train.iterations="$STEPS" train.seq_len=2048 train.batch_tokens=786432 train.prime_steps=20 train.log_every=50 \
    train.val_every=0 train.val_batch_tokens=524288 seed=1337 \
    optimizer.matrix_lr=0.025 optimizer.scalar_lr=0.025 optimizer.tied_embed_lr=0.035 optimizer.muon_momentum=0.99 \
    optimizer.muon_momentum_warmup_start=0.92 optimizer.muon_momentum_warmup_steps=1500 \
    optimizer.warmdown_iters="$WARMDOWN" optimizer.grad_clip_norm=0.3 \
    overwrite=true hydra.run.dir="$OUT/pgolf_run" > "$OUT/pgolf.out" 2>&1
  echo "pgolf exit $?"
  grep -E "$LOGS" "$OUT/pgolf.out"
  cp "$OUT/pgolf_run/result.json" "$OUT/pgolf_result.json" 2>/dev/null
}

case "${ONLY:-both}" in
  ref) run_reference ;;
  pgolf) run_pgolf ;;
  *) case "${ORDER:-ref-first}" in
       ref-first) run_reference; run_pgolf ;;
       pgolf-first) run_pgolf; run_reference ;;
     esac ;;
esac
python3 "$REPO/bench/summarize.py" "$OUT" --steps 50,100,150 | tee "$OUT/summary.md"
