#!/usr/bin/env bash
# Speed levers one at a time on one GPU: the same experiment, seed, data and steps, once per lever set,
# through bench/seeds.sh's pgolf side (same cut, same step count and warmdown), then a table of
# ms/step (the last logged step_avg), its ratio to the first set, and train loss at steps 50/100/150.
#
#   EXP=pr726 bash bench/levers.sh
#   EXP=pr726 LEVERS="base|model.fused_mlp=true|model.fused_ce=true" STEPS=60 WARMDOWN=10 bash bench/levers.sh
#
# Measured so far (docs/benchmarks.md §9e, §9h, §9i): fused_mlp 1.004 on pr726 (no gain); fused_ce
# failed to compile then (fixed since); FP8 GEMMs 2.2x slower at d=512 (bench/fp8_gemm.py, not a
# lever); fused_mlp_train 0.974 on pr1532 (now auto in the sp8192 experiments, so their "base" has it);
# hardware.mix_order_reduction=false not yet run on a GPU. For the sp8192 stacks, PRIME=5 (bench/seeds.sh)
# cuts each set's setup to a few minutes:
#
#   bash bench/sp8192_prep.sh && PRIME=5 EXP=pr1532 LEVERS="base|hardware.mix_order_reduction=false" bash bench/levers.sh
#
# LEVERS: lever sets separated by "|", each a space-separated list of overrides and of environment
# variables for the run (upper-case NAME=value, e.g. TORCHINDUCTOR_MIX_ORDER_REDUCTION=0); "base" is the
# experiment as shipped and should come first (the ratios are to the first set). On one H100 each
# sp1024 run takes about 1.5-2 minutes at 150 steps (priming compile included), so four sets fit one
# device call. The sp8192 experiments need bench/sp8192_prep.sh first (see bench/seeds.sh).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
EXP=${EXP:-pr726}
LEVERS=${LEVERS:-"base|hardware.mix_order_reduction=false|model.fused_mlp_train=true|model.fused_ce=true"}
ROOT=${OUT:-$REPO/outputs/bench_levers}
mkdir -p "$ROOT"
IFS='|' read -ra sets <<< "$LEVERS"
for i in "${!sets[@]}"; do
  extra="" envs=()
  for word in ${sets[$i]}; do
    case "$word" in
      base) ;;
      [A-Z_]*=*) envs+=("$word") ;;  # an environment variable of the run (TORCHINDUCTOR_...)
      *) extra="$extra $word" ;;     # a pgolf override
    esac
  done
  env "${envs[@]}" OUT="$ROOT/set$i" RUNS="/tmp/pgolf_bench/levers/set$i" PRS="$EXP" SIDES=pgolf PGOLF_EXTRA="$extra" \
    bash "$REPO/bench/seeds.sh" > "$ROOT/set$i.txt" 2>&1 || { echo "set $i (${sets[$i]}) failed: $ROOT/set$i.txt" >&2; }
done
python3 - "$ROOT" "$EXP" "$LEVERS" << 'EOF'
import re, sys
from pathlib import Path

root, exp, levers = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split("|")
rows, base = [], None
for i, name in enumerate(levers):
    logs = sorted((root / f"set{i}").glob(f"pgolf_{exp}_s*.out"))
    text = logs[0].read_text(errors="replace") if logs else ""
    avgs = re.findall(r"step_avg:([0-9.]+)ms", text)
    loss = {int(s): float(v) for s, v in re.findall(r"step:(\d+)/\d+ train_loss:([0-9.]+)", text)}
    ms = float(avgs[-1]) if avgs else None
    base = base if base is not None else ms
    ratio = f"{ms / base:.3f}" if ms and base else "-"
    cells = [f"{loss[s]:.4f}" if s in loss else "-" for s in (50, 100, 150)]
    # pgolf's throughput line (docs/architecture.md#throughput-and-mfu): tokens/s and MFU at the median step
    tput = re.search(r"throughput: ([0-9,]+) tokens/s at the median step.*?MFU ([0-9.]+)%", text)
    cells += [tput[1], f"{tput[2]}%"] if tput else ["-", "-"]
    rows.append(f"| {name} | {ms if ms else 'failed'} | {ratio} | " + " | ".join(cells) + " |")
print(f"{exp}: lever set | ms/step (step_avg) | ratio to the first | loss 50 | loss 100 | loss 150 | tokens/s | MFU")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(rows))
EOF
# A device call returns at most 8 files: one log per set (the console, then the run's log), one
# gpu.txt, and the set folders go.
for i in "${!sets[@]}"; do
  d=$ROOT/set$i
  [ -d "$d" ] || continue
  [ -f "$d/gpu.txt" ] && cp "$d/gpu.txt" "$ROOT/gpu.txt"
  for f in "$d"/*.out; do [ -f "$f" ] && { echo "=== $(basename "$f")"; cat "$f"; } >> "$ROOT/set$i.txt"; done
  rm -rf "$d"
done
