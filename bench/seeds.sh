#!/usr/bin/env bash
# The seed records side by side on one GPU: each seed PR's own train_gpt.py against
# `pgolf experiment=prNNN`, same shards, tokenizer, seed, global batch and step count, both through
# the FA3 stand-in so attention runs the same SDPA kernel (`hardware.attention=fa3` on pgolf's side).
#
#   PRS="pr339 pr399 pr726" SIDES="ref pgolf" SEEDS="1337 42" bash bench/seeds.sh
#
# Each run is cut once training has finished (the reference's "peak memory" line, pgolf's "trained"
# line): these runs compare step time, train loss at steps 50/100/150 and parameter counts, and the
# exports and evals that follow would only spend device time. Everything but the step count, the
# warmdown (100 of 150 steps, so the schedule is exercised) and the wallclock cap (off) is the PR's
# own run command on the reference side and the experiment's own defaults on pgolf's side.
#
# The sp8192 seeds (pr1532, pr1775) read the tokenizer and shards that bench/sp8192_prep.sh leaves in
# SP8192_DATA (run it first, in a call of its own; the scripts take it as their DATA_DIR). Their
# scripts schedule the warmdown as a fraction (WARMDOWN_FRAC = WARMDOWN / STEPS, pgolf's
# optimizer.warmdown_frac the same), and #1775's varlen attention runs the same flex stand-in on both
# sides: bench/fa3_varlen (the .bench shim's flash_attn_func plus flash_attn_varlen_func), whose
# varlen pgolf's hardware.doc_attention=auto picks as it would FA3's.
#
#   bash bench/sp8192_prep.sh && PRS="pr1532 pr1775" bash bench/seeds.sh
#
# FUSED_MLP (default 1): each side's training MLP as shipped (#1775's script fused, as published;
# pgolf's sp8192 experiments with model.fused_mlp_train=auto); FUSED_MLP=0 runs both unfused (see
# ref_script below).
#
# #1775's script is slow to start on one H100: 416-476 s before its first step even with PRIME=5,
# so a 575 s limit cut it after step 100 (about 840 ms/step, 1.2 s once its loop is on;
# docs/benchmarks.md §9k). Give each #1775 side a device call of its own with RUN_LIMIT=575, and
# compare at steps 50/100 (or STEPS=100 for a whole run with its own warmdown).
#
# Needs (git-ignored): .refs/<pr>/train_gpt.py (the seed's script), .bench/fa3_shim,
# .bench/corpus, .bench/make_shards.py and, on an offline GPU image, the wheels in .whl/.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_seeds}      # the logs (*.out); kept small, one file a run
RUNS=${RUNS:-/tmp/pgolf_bench/runs}        # pgolf's run folders
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-150}
WARMDOWN=${WARMDOWN:-100}
PRS=${PRS:-pr339 pr399 pr726}
SIDES=${SIDES:-ref pgolf}
SEEDS=${SEEDS:-1337}
PGOLF_EXTRA=${PGOLF_EXTRA:-}
LOG_EVERY=${LOG_EVERY:-50}                 # train-loss log interval, both sides (1: where curves part)
# PRIME=N: N compile-priming steps on both sides (the scripts' WARMUP_STEPS, pgolf's train.prime_steps)
# instead of each side's own 20. Both restore weights, optimizer state and the loader after priming,
# so N changes the setup time only, never the trajectory or the timed steps; for the sp8192 stacks it
# saves 2 x 2 x (20 - N) steps of each call. #1775 is the exception: its script keeps the Muon
# momentum of its warm-up (pgolf: optimizer.keep_primed_momentum), so N also changes where training
# starts from, the same way on both sides: its losses are then comparable with each other, not with
# a run primed 20 steps.
PRIME=${PRIME:-}
case "$PRIME" in '' | [1-9] | [1-9][0-9]) ;; *) echo "PRIME=$PRIME: give a number of priming steps, 1-99 (unset: each side's own 20)" >&2; exit 2 ;; esac
case "${FUSED_MLP:-1}" in 0 | 1) ;; *) echo "FUSED_MLP=$FUSED_MLP: use 1 (both sides as shipped) or 0 (both unfused)" >&2; exit 2 ;; esac
SHIM=${SHIM:-$REPO/bench/fa3_varlen}      # the FA3 stand-in with varlen (it loads .bench/fa3_shim)
SP8192_DATA=${SP8192_DATA:-/tmp/pgolf_bench/sp8192}
mkdir -p "$OUT" "$DATA" "$RUNS"
source "$REPO/bench/common.sh"
bench_env "$SHIM" || exit 1
bench_device_info "$OUT/gpu.txt"
TOK=$BENCH_TOK
WARMDOWN_FRAC=$(python3 -c "print($WARMDOWN / $STEPS)")

sp8192() { case "$1" in pr1532 | pr1775) return 0 ;; *) return 1 ;; esac }

# The PRs' own run commands (their README / PR page), less ITERATIONS, WARMDOWN_ITERS and the cap.
ref_env() {
  case "$1" in
    pr339) echo NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=4096 MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025 SCALAR_LR=0.025 \
      TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 MUON_MOMENTUM_WARMUP_STEPS=1500 \
      EVAL_STRIDE=64 BACKOUT_ENABLED=1 BACKOUT_LAMBDA_INIT=0.2 LAWA_ENABLED=0 INT5_MLP=0 VE_ENABLED=0 ;;
    pr399) echo NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=2048 XSA_LAST_N=4 EMA_ENABLED=1 EMA_DECAY=0.997 SWA_ENABLED=0 \
      ROPE_DIMS=16 LN_SCALE=1 LATE_QAT=1 QAT_THRESHOLD=0.1 MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025 \
      SCALAR_LR=0.025 TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 \
      MUON_MOMENTUM_WARMUP_STEPS=1500 EVAL_STRIDE=64 ;;
    pr726) echo ;;  # the script's defaults are the run (its README: "SEED=1337 torchrun ...")
    pr1532) echo QK_GAIN_INIT=5.25 TTT_ENABLED=1 TTT_LR=0.005 TTT_EPOCHS=3 ;;
    pr1775) echo TTT_ENABLED=1 PHASED_TTT_ENABLED=1 PHASED_TTT_NUM_PHASES=3 PHASED_TTT_PREFIX_DOCS=2000 \
      GLOBAL_TTT_LR=0.001 GLOBAL_TTT_EPOCHS=1 SMEAR_GATE=0 GATE_ATTN_OUT=0 ;;
  esac
}

# Where each side reads its data: the sp1024 shards (DATA_PATH / TOKENIZER_PATH, warmdown in
# iterations) or the sp8192 DATA_DIR (warmdown as a fraction).
ref_data_env() {
  if sp8192 "$1"; then
    echo DATA_DIR="$SP8192_DATA" WARMDOWN_FRAC="$WARMDOWN_FRAC"
  else
    echo DATA_PATH="$DATA" TOKENIZER_PATH="$TOK" WARMDOWN_ITERS="$WARMDOWN"
  fi
}
pgolf_data_args() {
  if sp8192 "$1"; then
    echo data.path="$SP8192_DATA/datasets/fineweb10B_sp8192" \
      data.tokenizer_path="$SP8192_DATA/tokenizers/fineweb_8192_bpe.model" data.vocab_size=8192 \
      optimizer.warmdown_frac="$WARMDOWN_FRAC"
  else
    echo data.path="$DATA" data.tokenizer_path="$TOK" data.vocab_size=1024 optimizer.warmdown_iters="$WARMDOWN"
  fi
}

# The script a reference run executes. #1775 trains its MLP through its own fused Triton GEMM
# (LeakyReLU^2 in the up-projection's epilogue, forward and backward), and pgolf's sp8192
# experiments train through theirs (model.fused_mlp_train=auto). FUSED_MLP=1 (the default) runs
# both as shipped; FUSED_MLP=0 runs both unfused, for parity of the compiled paths alone: the
# reference a copy with `self.use_fused = False` in its MLP, pgolf with model.fused_mlp_train=false
# (pgolf_fused_args).
ref_script() {  # PR
  local src="$REPO/.refs/$1/train_gpt.py"
  if [ "$1" = pr1775 ] && [ "${FUSED_MLP:-1}" = 0 ]; then
    local copy=/tmp/pgolf_bench/ref_pr1775_unfused_mlp.py
    mkdir -p /tmp/pgolf_bench || return 1
    sed 's/^\( *\)self\.use_fused = True$/\1self.use_fused = False/' "$src" > "$copy"
    [ "$(grep -c '^ *self\.use_fused = False$' "$copy")" = 1 ] || { echo "ref_script: #1775's MLP switch not found" >&2; return 1; }
    src=$copy
  fi
  echo "$src"
}

pgolf_fused_args() {
  [ "${FUSED_MLP:-1}" = 0 ] && echo model.fused_mlp_train=false
}

# A reference run's environment: the PR's run command, its data, and the bench's step settings
# (ITERATIONS steps, no wallclock cap, no validation; PRIME and LOG_EVERY as above).
# bench/profile_pair.sh runs the script with the same.
ref_run_env() {  # PR SEED ITERATIONS
  # shellcheck disable=SC2046
  echo $(ref_env "$1") $(ref_data_env "$1") ${PRIME:+WARMUP_STEPS=$PRIME} SEED="$2" RUN_ID="ref_$1_$2" \
    ITERATIONS="$3" MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY="$LOG_EVERY"
}

run_reference() {  # PR SEED
  local dir=/tmp/pgolf_bench/ref_$1_$2 script
  script=$(ref_script "$1") || return 1
  mkdir -p "$dir" && cd "$dir" || return 1
  # shellcheck disable=SC2046
  # The sp8192 scripts are cut at their last train-loss line: they validate (and compile the scoring
  # graph) after it, before "peak memory", and #1775's whole setup already takes minutes on one GPU.
  local cut="peak memory allocated"
  sp8192 "$1" && cut="^$STEPS/$STEPS train_loss"
  run_cut "$OUT/ref_$1_s$2.out" "$cut" env $(ref_run_env "$1" "$2" "$STEPS") \
    torchrun --standalone --nproc_per_node=1 "$script"
  cd "$REPO" || return 1
}

run_pgolf() {  # PR SEED
  cd "$REPO" || return 1
  # As the reference: the sp8192 runs are cut at their last train-loss line, before the final
  # validation (#1775's packed nonoverlap pass over the whole val split costs minutes of the call).
  local cut="trained [0-9]+ steps in"
  sp8192 "$1" && cut="^step:$STEPS/$STEPS train_loss"
  # A fresh folder: pgolf refuses to run into one that holds an earlier (failed) run, and a rerun on
  # the same warm machine would otherwise spend its call on that refusal.
  rm -rf "$RUNS/pgolf_$1_s$2"
  # shellcheck disable=SC2086,SC2046
  run_cut "$OUT/pgolf_$1_s$2.out" "$cut" python3 -m pgolf.run experiment="$1" data=shards \
    $(pgolf_data_args "$1") hardware=gpu hardware.attention=fa3 \
    budget.mode=steps train.iterations="$STEPS" train.log_every="$LOG_EVERY" \
    train.val_every=0 ${PRIME:+train.prime_steps=$PRIME} $(pgolf_fused_args) seed="$2" hydra.run.dir="$RUNS/pgolf_$1_s$2" $PGOLF_EXTRA
}

# RUNLIST="pr339:pgolf:1337 pr726:ref:1337 ..." runs exactly those, in that order (most wanted first,
# so a device call that hits its limit still returns the runs that finished); otherwise every
# combination of PRS x SEEDS x SIDES.
if [ -z "${RUNLIST:-}" ]; then
  for pr in $PRS; do for seed in $SEEDS; do for side in $SIDES; do RUNLIST="${RUNLIST:-} $pr:$side:$seed"; done; done; done
fi
for item in $RUNLIST; do
  sp8192 "${item%%:*}" || { bench_shards "$DATA" || exit 1; break; }  # sp1024 shards, once, if any run reads them
done
for item in $RUNLIST; do
  IFS=: read -r pr side seed <<< "$item"
  if [ -n "$PRIME" ] && [ "$pr" = pr1775 ]; then
    echo "note: PRIME=$PRIME: pr1775 starts from its primed momentum, so both sides train from $PRIME + $PRIME primed steps (20 + 20 unset)" >&2
  fi
  if sp8192 "$pr" && [ ! -f "$SP8192_DATA/datasets/fineweb10B_sp8192/fineweb_val_000000.bin" ]; then
    echo "$pr needs the sp8192 tokenizer and shards in $SP8192_DATA: run bench/sp8192_prep.sh first" >&2
    exit 1
  fi
  case "$side" in
    ref) bench_gpu_idle && run_reference "$pr" "$seed" ;;
    pgolf) bench_gpu_idle && run_pgolf "$pr" "$seed" ;;
  esac || exit 1  # a busy GPU: every later timing would be shared too
done
grep -hE "(^|step:)(50|100|150)/[0-9]+ |step:(50|100|150)/|step_avg|peak memory|model_params|params:|trained " "$OUT"/*.out | cut -c1-200
