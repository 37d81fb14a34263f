#!/usr/bin/env bash
# The 2026-04-09 stack, side by side on one GPU: the record script (R0409: 11L MLP4x, XSA on all
# layers, QK-gain 5.25, gated U-Net skips, GPT-J parallel residuals from layer 7, layers 3-5 looped
# twice more from 35% of training) vs `pgolf model=sp8192_recur data.vocab_size=1024`, on the shared
# sp1024 corpus (the record's SP8192 tokenizer is not available offline), the same batches (the
# record's shuffled loader on both sides, see pgolf_cmd), global batch (786,432 tokens = 8 x 48 x
# 2048), step count (150), warmdown (last 72% of the steps) and loop switch (at step 53 of 150),
# both through the FA3 shim so attention runs the same SDPA kernel, and (SAME_INIT=1, the default)
# the record's own initial weights on both sides (see run_pgolf).
#
# EQUALIZE=1 (default): what pgolf's optimizer lacks today is switched off in the reference
# (MUON_WD=0 ADAM_WD=0 EMBED_WD=0 MUON_ROW_NORMALIZE=0, and EMA_DECAY=0, which makes its EMA the
# identity), so both sides train the same recipe. EQUALIZE=0: the record's own optimizer, with
# PGOLF_R0409_EXTRA appended to the pgolf command (the record's WD, MuonEq-R and EMA keys).
# The reference's sliding-window eval and TTT are off; its GPTQ export still runs after training
# (16 calibration batches, lzma) and it leaves final_model.pt in $OUT/reference_final_model.pt for the
# quantization benchmark (`init_from=` / `python -m pgolf.models.convert` read it directly).
# ONLY=ref or ONLY=pgolf runs one side per call when a device call has a time limit.
# GPU time: about 2-3 minutes per side on an H100 (150 steps + priming of both loop variants).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # also when sourced (tests)
OUT=${OUT:-$REPO/outputs/bench_models_r0409}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-150}
EQUALIZE=${EQUALIZE:-1}
REF=${REF:-$REPO/.bench/ref/r0409_train_gpt.py}
SHIM=${SHIM:-$REPO/.bench/fa3_shim}
# EQUALIZE=0: the record's own optimizer on both sides (MuonEq-R, Muon WD 0.095, embedding WD 0.085,
# AdamW WD 0.02 on scalars, EMA 0.9965 applied before the final eval and the export).
PGOLF_R0409_EXTRA=${PGOLF_R0409_EXTRA:-"optimizer.row_normalize=true optimizer.muon_wd=0.095 optimizer.embed_wd=0.085 optimizer.scalar_wd=0.02 optimizer.ema_decay=0.9965"}
HW=${HW:-hardware=gpu hardware.attention=fa3}
LOG_EVERY=10
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
TOK=${TOK:-$BENCH_TOK}
LOGS="(step:)?(50|100|150)/$STEPS (train_loss|val_loss)|val_bpb|Total submission|peak memory|model_params|trained|artifact:|attention|layer_loop|graph_variant|init_from"

# The record's model (with VOCAB_SIZE and SEED, all its init depends on).
R0409_SHAPE=(NUM_LAYERS=11 MLP_MULT=4 XSA_LAST_N=11 QK_GAIN_INIT=5.25 ROPE_DIMS=16 ROPE_TRAIN_SEQ_LEN=2048 LN_SCALE=1
  SKIP_GATES_ENABLED=1 PARALLEL_RESIDUAL_START=7 NUM_LOOPS=2 LOOP_START=3 LOOP_END=5 ENABLE_LOOPING_AT=0.35)

run_reference() {
  # The record reads DATA_DIR/datasets/fineweb10B_sp<V>/ and DATA_DIR/tokenizers/fineweb_<V>_bpe.model.
  local work=${REF_WORK:-/tmp/pgolf_bench/ref0409}
  mkdir -p "$work/data/datasets" "$work/data/tokenizers" && cd "$work" || return 1
  ln -sfn "$DATA" "$work/data/datasets/fineweb10B_sp1024"
  ln -sfn "$TOK" "$work/data/tokenizers/fineweb_1024_bpe.model"
  local equal=()
  [ "$EQUALIZE" = 1 ] && equal=(MUON_WD=0 ADAM_WD=0 EMBED_WD=0 MUON_ROW_NORMALIZE=0 EMA_DECAY=0)
  env "${equal[@]}" DATA_DIR="$work/data/" VOCAB_SIZE=1024 SEED=1337 RUN_ID=reference ITERATIONS="$STEPS" \
    MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=20 WARMDOWN_FRAC=0.72 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=$LOG_EVERY \
    TRAIN_SEQ_LEN=2048 EVAL_SEQ_LEN=2048 TRAIN_BATCH_TOKENS=786432 VAL_BATCH_TOKENS=524288 \
    "${R0409_SHAPE[@]}" \
    MATRIX_LR=0.022 SCALAR_LR=0.02 TIED_EMBED_LR=0.03 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 \
    MUON_MOMENTUM_WARMUP_STEPS=1500 GRAD_CLIP_NORM=0.3 MIN_LR=0 \
    SLIDING_WINDOW_ENABLED=0 TTT_ENABLED=0 ETLB_ENABLED=0 GPTQ_CALIBRATION_BATCHES=16 COMPRESSOR=lzma \
    timeout 900 torchrun --standalone --nproc_per_node=1 "$REF" > "$OUT/reference.out" 2>&1
  echo "reference exit $?"
  grep -E "$LOGS" "$OUT/reference.out"
  cp "$work/final_model.pt" "$OUT/reference_final_model.pt" 2>/dev/null && echo "kept $OUT/reference_final_model.pt"
  cd "$REPO" || return 1
}

# Data order: the record always trains on its ShuffledSequenceLoader, whose RNG is seeded with the
# rank alone (PCG64(0) here); pgolf's `data.loader=shuffled` is the same sampler seeded with
# (seed, rank), and PCG64([0, 0]) is PCG64(0), so seed=0 hands pgolf the record's exact batches.
# (pgolf's default sequential stream reads the shard in order and, on this one 74M-token shard,
# repeats it in the same order from step 94.) The seed cannot make the inits equal anyway: the
# record draws default inits in its constructors before re-initializing.
pgolf_cmd() {  # the pgolf side; extra arguments are appended (the CPU dry run shrinks it this way)
  # shellcheck disable=SC2086  # HW and PGOLF_R0409_EXTRA are lists of overrides
  timeout 900 python3 -m pgolf.run experiment=none model=sp8192_recur optimizer=muon data=shards data.path="$DATA" \
    data.tokenizer_path="$TOK" data.vocab_size=1024 data.loader=shuffled $HW budget.mode=steps \
    train.iterations="$STEPS" train.seq_len=2048 train.batch_tokens=786432 train.prime_steps=20 \
    train.log_every=$LOG_EVERY train.val_every=0 train.val_batch_tokens=524288 seed=0 \
    optimizer.matrix_lr=0.022 optimizer.scalar_lr=0.02 optimizer.tied_embed_lr=0.03 optimizer.muon_momentum=0.99 \
    optimizer.muon_momentum_warmup_start=0.92 optimizer.muon_momentum_warmup_steps=1500 \
    optimizer.warmdown_frac=0.72 optimizer.min_lr=0 optimizer.grad_clip_norm=0.3 \
    $([ "$EQUALIZE" = 1 ] || echo "$PGOLF_R0409_EXTRA") "$@"
}

# SAME_INIT=1 (default): pgolf starts from the record's exact initial weights, rebuilt on the CPU
# by bench/r0409_init.py (seconds), so with the same batches only kernels and op order differ.
# SAME_INIT=0: pgolf's own init from seed 0.
run_pgolf() {
  cd "$REPO" || return 1
  local init=()
  if [ "${SAME_INIT:-1}" = 1 ]; then
    env "${R0409_SHAPE[@]}" VOCAB_SIZE=1024 SEED=1337 TRAIN_SEQ_LEN=2048 \
      python3 "$REPO/bench/r0409_init.py" "$REF" "$OUT/reference_init.pt" || return 1
    init=(init_from="$OUT/reference_init.pt")
  fi
  pgolf_cmd "${init[@]}" overwrite=true hydra.run.dir="$OUT/pgolf_run" > "$OUT/pgolf.out" 2>&1
  echo "pgolf exit $?"
  grep -E "$LOGS" "$OUT/pgolf.out"
  cp "$OUT/pgolf_run/result.json" "$OUT/pgolf_result.json" 2>/dev/null
}

# Sourced (tests/test_r0409_parity.py): the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

# DRY_RUN=1 HW=hardware=cpu DATA=<shards> TOK=<tokenizer> [V=<vocab>]: the pgolf command on CPU with
# tiny shapes, to check every key above without a GPU.
if [ "${DRY_RUN:-0}" = 1 ]; then
  pgolf_cmd data.vocab_size="${V:-1024}" train.iterations=4 train.seq_len=64 train.batch_tokens=1024 \
    train.prime_steps=1 train.log_every=1 train.val_batch_tokens=4096 model.num_layers=6 model.model_dim=64 \
    model.num_heads=2 model.num_kv_heads=1 model.loop_start=2 model.loop_end=3 model.parallel_start_layer=4 \
    model.xsa_last_n=6 overwrite=true hydra.run.dir="$OUT/dry_run"
  exit $?
fi
bench_env "$SHIM" || exit 1
bench_device_info "$OUT/gpu.txt"
bench_shards "$DATA" || exit 1

case "${ONLY:-both}" in
  ref) run_reference ;;
  pgolf) run_pgolf ;;
  *) run_reference; run_pgolf ;;
esac
python3 "$REPO/bench/summarize.py" "$OUT" --steps 50,100,150 --batch-tokens 786432 --after 20 | tee "$OUT/summary.md"
