# Shared set-up of the GPU bench scripts; `source "$REPO/bench/common.sh"` after setting REPO.
# GPU machines here are offline: Python packages arrive as wheels in .whl/, data in .bench/.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BENCH_TOK="$REPO/.bench/corpus/fineweb_1024_bpe.model"
# The 2026-03-23 record's shape and optimizer (PR #549) as its script's environment
# variables, shared by the benchmarks that run that script: `env "${R0323_SHAPE[@]}" ... torchrun`.
R0323_SHAPE=(NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=1536 XSA_LAST_N=4 ROPE_DIMS=16 LN_SCALE=1 VE_ENABLED=1 VE_DIM=128 VE_LAYERS=9,10)
R0323_OPTIM=(MATRIX_LR=0.025 SCALAR_LR=0.025 TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92
  MUON_MOMENTUM_WARMUP_STEPS=1500 GRAD_CLIP_NORM=0.3)

# bench_env [EXTRA_PYTHONPATH]: install the carried wheels (if any) and set PYTHONPATH.
bench_env() {
  local path="$REPO${1:+:$1}"
  if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$REPO"/.whl/*.whl || return 1
    path="/tmp/site:$path"
  fi
  export PYTHONPATH=$path
}

# bench_device_info FILE: GPU name, memory, driver and torch version, to FILE and stdout.
bench_device_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$1"
  python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$1"
}

# bench_shards DIR: the shared corpus as sp1024 challenge shards in DIR (once).
bench_shards() {
  if [ ! -f "$1/fineweb_val_000000.bin" ]; then
    mkdir -p "$1"
    local t0
    t0=$(date +%s)
    python3 "$REPO/.bench/make_shards.py" "$BENCH_TOK" "$1" \
      --train "$REPO/.bench/corpus/docs_train.jsonl.xz" --val "$REPO/.bench/corpus/docs_val.jsonl.xz" || return 1
    echo "shards: $(( $(date +%s) - t0 ))s"
  fi
}

# bench_gpu_idle: return 1 (after waiting up to GPU_IDLE_WAIT seconds, default 120) while another
# process holds memory on the GPU. A run that shares the GPU measures both: a pgolf run left going by
# an earlier device call made the next call's `experiment=pr339` run at 1440 ms/step, 2.1x its
# 680 ms alone. Memory is used rather than the process list, which a container's PID namespace hides.
bench_gpu_idle() {
  command -v nvidia-smi > /dev/null || return 0
  bench_end_strays
  local waited=0 used
  while true; do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | sort -n | tail -1)
    if (( ${used:-0} <= ${GPU_IDLE_MIB:-1024} )); then
      return 0
    fi
    if (( waited >= ${GPU_IDLE_WAIT:-120} )); then
      echo "GPU busy: ${used} MiB held by another process after ${waited}s; its timings would be shared." \
        "A run left by an earlier call? Give the machine back (or end that process) and run again." >&2
      nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader >&2
      return 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
}

# bench_end_strays: end the GPU processes of this bench that an earlier device call left running.
# A call that runs out of time has its session's processes ended, but torchrun's workers run in
# sessions of their own: one held 23 GB of the GPU into the next call, which then refused to time
# beside it (docs/benchmarks.md §9h). Only this bench's runs are ended, those whose command line
# names this repo or whose folder is under /tmp/pgolf_bench; anything else still makes
# bench_gpu_idle wait and refuse. BENCH_END_STRAYS=0 ends none.
bench_end_strays() {
  [ "${BENCH_END_STRAYS:-1}" = 1 ] || return 0
  local pid cmd
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2> /dev/null); do
    pid=${pid%,}
    [ -r "/proc/$pid/cmdline" ] || continue
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline") $(readlink "/proc/$pid/cwd" 2> /dev/null)"
    case "$cmd" in
      *"$REPO/"* | */tmp/pgolf_bench*)
        echo "ending a run an earlier call left on the GPU: $pid $cmd" >&2
        kill -9 "$pid" 2> /dev/null
        ;;
    esac
  done
}

# run_cut LOG PATTERN CMD...: run CMD in its own process group, stop it once LOG matches PATTERN
# (an empty PATTERN: never) or after RUN_LIMIT seconds (default 420). The group stays in this
# shell's session: job control (set -m), never setsid. The device machine ends every process of a
# command's session when the command returns or runs out of time, but a new session runs on until
# the machine goes back: a run started with setsid by a call that hit its limit kept the GPU busy
# into the next call.
# kill_tree SIGNAL PID: SIGNAL to PID and every descendant, children first. torchrun starts its workers
# in sessions of their own, so neither its process group nor the end of the device command reaches
# them: a run KILLed at its time limit left its worker holding 23 GB of the GPU into the next run.
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$2" 2> /dev/null); do
    kill_tree "$1" "$child"
  done
  kill "-$1" "$2" 2> /dev/null
}

# stop_tree PID: TERM the tree (torchrun forwards it and tears its workers down), then KILL whatever
# is left after STOP_GRACE seconds (default 30).
stop_tree() {
  local pids waited=0
  pids="$1 $(descendants "$1")"
  kill_tree TERM "$1"
  while ((waited < ${STOP_GRACE:-30})); do
    local alive=0 p
    for p in $pids; do kill -0 "$p" 2> /dev/null && alive=1; done
    ((alive)) || return 0
    sleep 1
    waited=$((waited + 1))
  done
  for p in $pids; do kill -KILL "$p" 2> /dev/null; done
}

# descendants PID: every descendant's pid, collected before anything is signalled (an orphan is
# re-parented and could no longer be found from PID).
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2> /dev/null); do
    echo "$child"
    descendants "$child"
  done
}

run_cut() {
  local log=$1 pattern=$2
  shift 2
  set -m # the next background job leads a process group of its own: kill -- -PID reaches its workers
  "$@" > "$log" 2>&1 &
  local pid=$! t0
  set +m
  t0=$(date +%s)
  while kill -0 "$pid" 2> /dev/null; do
    if [ -n "$pattern" ] && grep -qE "$pattern" "$log"; then
      sleep 1
      stop_tree "$pid"
      break
    fi
    if (($(date +%s) - t0 > ${RUN_LIMIT:-420})); then
      echo "time limit: stopping $log"
      stop_tree "$pid"
      break
    fi
    sleep 1
  done
  wait "$pid" 2> /dev/null
  echo "$(basename "$log"): $(($(date +%s) - t0))s"
}
