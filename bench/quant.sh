#!/usr/bin/env bash
# Export side by side on the same trained weights (issue 7): the 2026-04-09 record script's
# GPTQ + SDClip + byte-shuffle + brotli export vs pgolf's quant=r0409, on one GPU.
#  1. ref: the R0409 script at VOCAB_SIZE=1024 on the shared sp1024 corpus trains a short run
#     (STEPS steps, loops on from 35%, no sliding eval, no TTT), saves final_model.pt and logs its
#     own export: Hessian seconds, quantized+brotli bytes, code bytes, roundtrip val_bpb.
#  2. pgolf: `init_from=` loads that final_model.pt into model=sp8192_recur (the R0409
#     architecture) at data.vocab_size=1024, trains 0 steps, and exports with quant=r0409
#     (64 calibration micro-batches of BATCH/8 tokens, as the record's 1-GPU calibration at the same
#     TRAIN_BATCH_TOKENS); result.json holds bytes, roundtrip val_bpb and the artifact seconds.
#  The record logs no export time, so the ref side also times its own serialize() (Hessians + GPTQ
#  + brotli + write) on its final_model.pt in a second process (ref_export.out).
# Both evaluate the full val split at seq 2048 without sliding window. ~3 min GPU per side.
# ONLY=ref|pgolf runs one side; pgolf needs the ref's final_model.pt (REF_DIR).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/outputs/bench_quant}
DATA=${DATA:-/tmp/pgolf_bench/sp1024}
STEPS=${STEPS:-200}
BATCH=${BATCH:-196608}        # training tokens per step for the short ref run (8 x 12 x 2048)
CAL_BATCHES=${CAL_BATCHES:-64}
REF=${REF:-$REPO/.bench/ref/r0409_train_gpt.py}
REF_DIR=${REF_DIR:-/tmp/pgolf_bench/ref0409}
SHIM=${SHIM:-$REPO/.bench/fa3_shim}
HW=${HW:-"hardware=gpu hardware.attention=fa3"}
SEQ=${SEQ:-2048}
VAL_TOKENS=${VAL_TOKENS:-524288}
PGOLF_EXTRA=${PGOLF_EXTRA:-}  # extra overrides (the CPU dry run shrinks the model with these)
mkdir -p "$OUT" "$DATA"
source "$REPO/bench/common.sh"
if [ -z "${DRY_RUN:-}" ]; then
  bench_env "$SHIM" || exit 1
  bench_device_info "$OUT/gpu.txt"
  bench_shards "$DATA" || exit 1
fi
TOK=${TOK:-$BENCH_TOK}
LOGS="model_params|GPTQ:collected|Serialized model|Total submission|Code size|quantized val_bpb|pre-quantization|val_bpb|artifact:|calibration:|eval_time"

run_reference() {
  # The record reads DATA_DIR/datasets/fineweb10B_sp1024/ and DATA_DIR/tokenizers/fineweb_1024_bpe.model.
  mkdir -p "$REF_DIR/data/datasets" "$REF_DIR/data/tokenizers" && cd "$REF_DIR" || return 1
  ln -sfn "$DATA" "$REF_DIR/data/datasets/fineweb10B_sp1024"
  ln -sfn "$TOK" "$REF_DIR/data/tokenizers/fineweb_1024_bpe.model"
  DATA_DIR=$REF_DIR/data/ VOCAB_SIZE=1024 SEED=1337 RUN_ID=reference ITERATIONS=$STEPS MAX_WALLCLOCK_SECONDS=0 \
    TRAIN_BATCH_TOKENS=$BATCH TRAIN_LOG_EVERY=50 VAL_LOSS_EVERY=0 SLIDING_WINDOW_ENABLED=0 TTT_ENABLED=0 \
    ETLB_ENABLED=0 GPTQ_CALIBRATION_BATCHES=$CAL_BATCHES COMPRESSOR=brotli \
    timeout 900 torchrun --standalone --nproc_per_node=1 "$REF" > "$OUT/reference.out" 2>&1
  echo "reference exit $?"
  grep -E "$LOGS" "$OUT/reference.out"
  # The record logs no export time; time its own serialize() on its own final_model.pt (same env).
  DATA_DIR=$REF_DIR/data/ VOCAB_SIZE=1024 SEED=1337 RUN_ID=ref_export TRAIN_BATCH_TOKENS=$BATCH \
    GPTQ_CALIBRATION_BATCHES=$CAL_BATCHES COMPRESSOR=brotli REF="$REF" timeout 600 python3 - > "$OUT/ref_export.out" 2>&1 <<'PY'
import importlib.util, os, shutil, time
import torch
ref = os.environ["REF"]
spec = importlib.util.spec_from_file_location("r0409", ref)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)  # Hyperparameters reads the env at import
h = m.Hyperparameters()
m.set_logging_hparams(h)
os.makedirs("logs", exist_ok=True)
torch.cuda.set_device(0)
model = m.GPT(h).cuda().bfloat16()
m.restore_fp32_params(model)
model.load_state_dict(torch.load(h.model_path, map_location="cuda"))
model.looping_active = h.num_loops > 0
shutil.copyfile(h.model_path, h.model_path + ".bak")  # serialize() rewrites it; keep the trained copy
torch.cuda.synchronize()
t0 = time.perf_counter()
total, model_bytes = m.serialize(h, model, open(ref, encoding="utf-8").read())
torch.cuda.synchronize()
print(f"ref_export_seconds:{time.perf_counter() - t0:.2f} model_bytes:{model_bytes} total:{total}")
PY
  echo "reference export timing exit $?"
  grep -E "ref_export_seconds" "$OUT/ref_export.out"
  cd "$REPO" || return 1
}

run_pgolf() {
  cd "$REPO" || return 1
  if [ ! -f "$REF_DIR/final_model.pt" ] && [ -z "${DRY_RUN:-}" ]; then
    echo "no $REF_DIR/final_model.pt: run ONLY=ref first"; return 1
  fi
  local init="init_from=$REF_DIR/final_model.pt"
  [ -n "${DRY_RUN:-}" ] && init=""  # the CPU dry run checks every other key
  # shellcheck disable=SC2086
  timeout 900 python3 -m pgolf.run experiment=none model=sp8192_recur model.enable_looping_at=0 data=shards \
    data.path="$DATA" data.tokenizer_path="$TOK" data.vocab_size="${VOCAB:-1024}" $HW $init \
    budget.mode=steps train.iterations=0 train.prime_steps=0 train.seq_len="$SEQ" train.batch_tokens="$BATCH" \
    train.val_batch_tokens="$VAL_TOKENS" train.log_every=50 seed=1337 \
    quant=r0409 quant.calibration.batches="$CAL_BATCHES" quant.report_compressors=true $PGOLF_EXTRA \
    overwrite=true hydra.run.dir="$OUT/pgolf_run" > "$OUT/pgolf.out" 2>&1
  echo "pgolf exit $?"
  grep -E "$LOGS" "$OUT/pgolf.out"
  cp "$OUT/pgolf_run/result.json" "$OUT/pgolf_result.json" 2>/dev/null
}

summarize() {
  python3 - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
ref = out / "reference.out"
if ref.exists():
    t = ref.read_text(errors="replace")
    g = lambda pat: (re.findall(pat, t, re.M) or [None])[-1]  # noqa: E731
    rows.append(("r0409 script", g(r"Serialized model quantized\+\w+: (\d+) bytes"), g(r"Code size: (\d+) bytes"),
                 g(r"Total submission size quantized\+\w+: (\d+) bytes"), g(r"^quantized val_loss:\S+ val_bpb:(\S+)"),
                 g(r"pre-quantization post-ema val_loss:\S+ val_bpb:(\S+)"), g(r"GPTQ:collected \d+ Hessians in ([\d.]+)s"),
                 None))
    te = out / "ref_export.out"
    if te.exists():
        sec = re.findall(r"ref_export_seconds:([\d.]+)", te.read_text(errors="replace"))
        rows[-1] = rows[-1][:-1] + ((sec[-1] + " (serialize)") if sec else None,)
res = out / "pgolf_result.json"
if res.exists():
    r = json.loads(res.read_text())
    b, q = r.get("bytes", {}), r.get("quant", {})
    # export seconds = calibration + quantize (incl. GPTQ) + compress; the compressor comparison
    # (report_compressors) is timed apart and left out, like the ref's serialize() timing
    export_s = sum(x for x in (r.get("calibration_seconds"), q.get("quantize_seconds"), q.get("compress_seconds")) if x)
    rows.append(("pgolf quant=r0409", b.get("model"), b.get("code"), b.get("total"), r.get("val_bpb"),
                 r.get("metrics", {}).get("pre_quant", {}).get("val_bpb"), r.get("calibration_seconds"),
                 f"{export_s:.2f} (calib+quant+compress)"))
    if q.get("compressors"):
        print("pgolf payload under each compressor:", q["compressors"])
print("| export | model bytes | code bytes | total | roundtrip val_bpb | pre-quant val_bpb | Hessian s | export s |")
print("|---|---|---|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row) + " |")
PY
}

case "${ONLY:-both}" in
  ref) run_reference ;;
  pgolf) run_pgolf ;;
  summary) ;;
  *) run_reference; run_pgolf ;;
esac
summarize | tee "$OUT/summary.md"
