#!/usr/bin/env bash
# The sp8192 side of the seed benchmarks (experiment=pr1532 / pr1775 against their own scripts): an
# 8192-piece SentencePiece BPE tokenizer trained on the bench corpus with the challenge's settings
# (data/download_hf_docs_and_tokenize.py: bpe, character_coverage 0.999, byte_fallback,
# split_digits, nmt_nfkc, no dummy prefix, pad/bos/eos/unk = 0/1/2/3, hard_vocab_limit off, docs over
# 4192 bytes skipped), then the corpus as challenge shards ([BOS] + ids per document, no EOS).
# `python -m pgolf.data build` does both; this script picks the inputs and skips what exists.
#
#   bash bench/sp8192_prep.sh [OUT]     # OUT default /tmp/pgolf_bench/sp8192
#
# OUT is laid out as the records' DATA_DIR: OUT/tokenizers/fineweb_8192_bpe.model and
# OUT/datasets/fineweb10B_sp8192/fineweb_{val,train}_NNNNNN.bin. docs_val.jsonl.xz goes first and
# is exactly the val split (--val-docs = its line count), so val is the same documents as the
# sp1024 bench shards. The tokenizer trains on the first TOK_DOCS documents, val first as the
# challenge's run also starts at document 0; the default, 0, takes the whole corpus (92,005
# documents, of which SentencePiece keeps those up to 4192 bytes, about 130 MB): 29 s on a 2-core
# machine, so the bound is the corpus itself. The export encodes every document (about 200 MB;
# 0.58 M tokens/s on 2 cores, so well under a minute on 16). Whole prep: about 1-2 minutes.
#
# Needs: .bench/corpus (docs_train.jsonl.xz, docs_val.jsonl.xz), sentencepiece.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-${SP8192_DATA:-/tmp/pgolf_bench/sp8192}}
CORPUS=${CORPUS:-$REPO/.bench/corpus}
TOK_DOCS=${TOK_DOCS:-0}
VOCAB=8192
MODEL=$OUT/tokenizers/fineweb_${VOCAB}_bpe.model
SHARDS=$OUT/datasets/fineweb10B_sp${VOCAB}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ -f "$MODEL" ] && [ -f "$SHARDS/fineweb_val_000000.bin" ] && [ -f "$SHARDS/fineweb_train_000000.bin" ]; then
  echo "sp8192 prep: $MODEL and $SHARDS exist; nothing to do"
  exit 0
fi
t0=$(date +%s)
VAL_DOCS=$(xz -dc "$CORPUS/docs_val.jsonl.xz" | wc -l)
args=(--input "$CORPUS/docs_val.jsonl.xz" "$CORPUS/docs_train.jsonl.xz" --val-docs "$VAL_DOCS"
  --root "$OUT" --vocab-size "$VOCAB")
tok="trained on ${TOK_DOCS/#0/all} docs"
if [ -f "$MODEL" ]; then
  args+=(--tokenizer "$MODEL") # trained by an earlier call: only the shards are missing
  tok="reused"
elif [ "$TOK_DOCS" -gt 0 ]; then
  args+=(--tokenizer-train-docs "$TOK_DOCS")
fi
python3 -m pgolf.data build "${args[@]}"
echo "sp8192 prep: $(($(date +%s) - t0))s ($VAL_DOCS val docs, tokenizer $tok) -> $OUT"
