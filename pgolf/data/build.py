"""Train a SentencePiece BPE tokenizer with the challenge's settings and export shards.

Layout per document: [BOS] + encode(text), no EOS; the first `val_docs` documents form the
validation split, the rest the training split (TECHNIQUES §1.3).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterable
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pgolf.data.shards import SHARD_TOKENS, write_shard

# The challenge's tokenizer settings (data/download_hf_docs_and_tokenize.py).
SPM_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_model: str | Path) -> Path:
    """Train on `docs` and write `out_model` atomically (SentencePiece writes prefix.model)."""
    import sentencepiece as spm

    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_model.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(docs)),
            model_prefix=prefix,
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **SPM_SETTINGS,
        )
        os.replace(prefix + ".model", out_model)
    return out_model


_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_batch(texts: list[str]) -> np.ndarray:
    bos = _SP.bos_id()
    pieces = [np.asarray([bos] + ids, dtype=np.uint16) for ids in _SP.encode(texts)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def _batches(docs: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(docs), n):
        yield docs[i : i + n]


def _progress(label: str, done: int, total: int, t0: float) -> None:
    if not sys.stderr.isatty() and done != total:
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(
        f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} docs {time.time() - t0:5.1f}s"
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def tokenize_documents(
    model_path: str | Path, docs: list[str], label: str = "tokenize", workers: int = 0
) -> np.ndarray:
    """[BOS]+ids for every document, concatenated, using all cores, with a progress bar."""
    workers = workers or os.cpu_count() or 1
    batch = 256
    out: list[np.ndarray] = []
    t0 = time.time()
    done = 0
    if workers == 1 or len(docs) < 4 * batch:
        _init_worker(str(model_path))
        for b in _batches(docs, batch):
            out.append(_encode_batch(b))
            done += len(b)
            _progress(label, done, len(docs), t0)
    else:
        with get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(model_path),)
        ) as pool:
            for b, arr in zip(
                _batches(docs, batch), pool.imap(_encode_batch, _batches(docs, batch), chunksize=4)
            ):
                out.append(arr)
                done += len(b)
                _progress(label, done, len(docs), t0)
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def export_shards(
    model_path: str | Path,
    docs: list[str],
    out_dir: str | Path,
    val_docs: int,
    prefix: str = "fineweb",
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, int]:
    """Write {prefix}_{val,train}_NNNNNN.bin; returns the token count of each split."""
    if not 0 < val_docs < len(docs):
        raise ValueError(
            f"val_docs={val_docs} must be between 1 and the number of documents - 1 ({len(docs) - 1})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in (("val", docs[:val_docs]), ("train", docs[val_docs:])):
        tokens = tokenize_documents(model_path, part, label=f"{split} shards")
        for n, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
            write_shard(out_dir / f"{prefix}_{split}_{n:06d}.bin", tokens[start : start + shard_tokens])
        counts[split] = int(tokens.size)
    return counts
