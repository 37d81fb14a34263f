"""Train a SentencePiece BPE tokenizer with the challenge's settings and export shards.

The format: docs/techniques.md#data-format, docs/techniques.md#tokenizers

Layout per document: [BOS] + encode(text), no EOS; the first `val_docs` documents form the
validation split, the rest the training split. Documents stream through: memory stays at about
one shard plus the batches in flight, so a FineWeb-sized jsonl exports on an ordinary machine.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pgolf.data.shards import MANIFEST, SHARD_TOKENS, write_shard
from pgolf.results import sha256_file

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
_BATCH_DOCS = 256
# SentencePiece skips, without a word, every training sentence longer than this many bytes (its
# default max_sentence_length, which the challenge's tokenizer run keeps). See tokenizer_sentences.
SPM_MAX_SENTENCE_BYTES = 4192

# ---------------------------------------------------------------------------------------------
# reading documents
# ---------------------------------------------------------------------------------------------

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def _open_text(path: Path):
    opener = _OPENERS.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def is_jsonl(path: Path) -> bool:
    """`.jsonl`, optionally compressed (`.jsonl.xz`, ...): one document per line; else a whole file."""
    return (Path(path.stem).suffix if path.suffix in _OPENERS else path.suffix) == ".jsonl"


def read_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents from files, in order. `.jsonl` (optionally .xz/.gz/.bz2): one JSON object per
    line, its `text_field` is the document. Any other file (e.g. `.txt`): the whole file is one."""
    for path in map(Path, paths):
        if is_jsonl(path):
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"{path}:{lineno}: expected a JSON object with a string field {text_field!r} "
                            f"({type(e).__name__}: {e}); pick the field with --text-field"
                        ) from None
        else:
            with _open_text(path) as f:
                yield f.read()


def check_val_docs(docs: Iterable[str], val_docs: int, inputs: str = "the input") -> None:
    """Fail before any expensive step unless more than `val_docs` documents exist (at least one is
    left for training). Reads only the first val_docs + 1 documents."""
    if val_docs < 1:
        raise ValueError(f"--val-docs {val_docs}: must be >= 1 (the first N documents are validation)")
    n = sum(1 for _ in itertools.islice(docs, val_docs + 1))
    if n <= val_docs:
        raise ValueError(
            f"--val-docs {val_docs}: {inputs} holds only {n} document(s), and the first --val-docs of them are "
            f"validation with at least one left for training; pass --val-docs {max(n - 1, 1)} or less, or more "
            "documents (a text file is one document; .jsonl holds one per line)"
        )


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _fitting_units(text: str, limit: int) -> Iterator[str]:
    """`text` as consecutive pieces of at most `limit` UTF-8 bytes: whole lines where they fit,
    else words, else byte cuts at a character boundary."""
    for line in text.splitlines(keepends=True):
        if len(line.encode("utf-8")) <= limit:
            yield line
            continue
        for word in re.split(r"(?<=\s)", line):  # each word keeps the whitespace after it
            raw = word.encode("utf-8")
            while len(raw) > limit:
                cut = limit
                while raw[cut] & 0xC0 == 0x80:  # a continuation byte: step back to the character start
                    cut -= 1
                yield raw[:cut].decode("utf-8")
                raw = raw[cut:]
            if raw:
                yield raw.decode("utf-8")


def split_for_tokenizer(text: str, limit: int = SPM_MAX_SENTENCE_BYTES) -> Iterator[str]:
    """`text` cut at line breaks into chunks of at most `limit` UTF-8 bytes; they join back to `text`."""
    chunk: list[str] = []
    size = 0
    for unit in _fitting_units(text, limit):
        n = len(unit.encode("utf-8"))
        if chunk and size + n > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(unit)
        size += n
    if chunk:
        yield "".join(chunk)


def tokenizer_sentences(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """The text the tokenizer trains on, in document order.

    A JSONL document goes to SentencePiece as it is, as in the challenge's own tokenizer run, so one
    longer than SPM_MAX_SENTENCE_BYTES is skipped there exactly as it was for the published
    tokenizers. A whole file is a corpus rather than one web page: given whole, SentencePiece would
    skip every file over 4 KB and then stop with `!sentences_.empty()`, so it is cut at line breaks
    into chunks that fit. Only tokenizer training sees the chunks; the shards hold every document
    whole ([BOS] + the ids of the file)."""
    for path in map(Path, paths):
        if is_jsonl(path):
            yield from read_documents([path], text_field)
        else:
            with _open_text(path) as f:
                yield from split_for_tokenizer(f.read())


def train_tokenizer(
    docs: Iterable[str], vocab_size: int, out_model: str | Path, max_docs: int | None = None
) -> Path:
    """Train on the first `max_docs` of `docs` (all if None) with every core; write `out_model`
    atomically. Like the challenge, training starts at the first document (validation included)."""
    import sentencepiece as spm

    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    seen = {"docs": 0, "too_long": 0}

    def counted() -> Iterator[str]:
        for doc in itertools.islice(docs, max_docs):
            seen["docs"] += 1
            seen["too_long"] += len(doc.encode("utf-8")) > SPM_MAX_SENTENCE_BYTES
            yield doc

    with tempfile.TemporaryDirectory(dir=out_model.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=counted(),
                model_prefix=prefix,
                vocab_size=vocab_size,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                max_sentence_length=SPM_MAX_SENTENCE_BYTES,
                **SPM_SETTINGS,
            )
        except RuntimeError as e:
            if "sentences_.empty()" not in str(e):
                raise
            raise ValueError(
                f"tokenizer training got no usable text: {seen['too_long']} of {seen['docs']} document(s) are "
                f"longer than SentencePiece's max_sentence_length ({SPM_MAX_SENTENCE_BYTES} bytes, the "
                "challenge's setting) and were skipped, the rest are empty; give long texts as .txt files "
                "(cut at line breaks for tokenizer training) or pass --tokenizer MODEL"
            ) from None
        os.replace(prefix + ".model", out_model)
        vocab = out_model.with_suffix(".vocab")
        os.replace(prefix + ".vocab", vocab)
    return out_model


# ---------------------------------------------------------------------------------------------
# tokenizing on every core
# ---------------------------------------------------------------------------------------------

_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_batch(texts: list[str]) -> np.ndarray:
    bos = _SP.bos_id()
    pieces = [np.asarray([bos] + ids, dtype=np.uint16) for ids in _SP.encode(texts)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


class Progress:
    """A one-line progress bar on a terminal; a single summary line otherwise (logs stay short)."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.t0 = label, total, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, tokens: int, final: bool = False) -> None:
        if not (self.tty or final):
            return
        dt = max(time.time() - self.t0, 1e-9)
        if self.total:
            filled = int(30 * done / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} docs"
        else:
            bar = f"{done} docs"
        sys.stderr.write(
            f"\r{self.label} {bar} {tokens:,} tokens {dt:5.1f}s ({tokens / dt / 1e6:.2f}M tok/s)"
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def encode_stream(
    model_path: str | Path, batches: Iterable[list[str]], workers: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, [BOS]+ids of each, concatenated) per batch, in input order, on `workers` cores.

    At most 4 batches per worker are in flight: Pool.imap would read the whole input ahead."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(str(model_path))
        for b in batches:
            yield len(b), _encode_batch(b)
        return
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append((len(b), pool.apply_async(_encode_batch, (b,))))
            if len(pending) >= 4 * workers:
                n, res = pending.popleft()
                yield n, res.get()
        while pending:
            n, res = pending.popleft()
            yield n, res.get()


def tokenize_documents(model_path: str | Path, docs: list[str], workers: int = 0) -> np.ndarray:
    """[BOS]+ids of every document, concatenated (small inputs; export_shards streams)."""
    batches = (docs[i : i + _BATCH_DOCS] for i in range(0, len(docs), _BATCH_DOCS))
    out = [arr for _, arr in encode_stream(model_path, batches, workers or _workers_for(len(docs)))]
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def _workers_for(n_docs: int | None) -> int:
    # Spawning a pool costs ~1 s; below a few thousand documents one process is faster.
    return 1 if n_docs is not None and n_docs < 4 * _BATCH_DOCS else 0


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


class ShardWriter:
    """Cuts one split's token stream into {prefix}_{split}_NNNNNN.bin files of `shard_tokens`."""

    def __init__(self, out_dir: Path, prefix: str, split: str, shard_tokens: int):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.files = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            k = min(tokens.size, self.buf.size - self.fill)
            self.buf[self.fill : self.fill + k] = tokens[:k]
            self.fill += k
            self.tokens += k
            tokens = tokens[k:]
            if self.fill == self.buf.size:
                self._flush()

    def _flush(self) -> None:
        write_shard(self.out_dir / f"{self.prefix}_{self.split}_{self.files:06d}.bin", self.buf[: self.fill])
        self.files += 1
        self.fill = 0

    def close(self) -> None:
        if self.fill or not self.files:
            self._flush()


def write_manifest(folder: str | Path, tokenizer: str | Path, counts: dict) -> None:
    """Record in `<folder>/manifest.json` which tokenizer (by sha256 of its .model file) wrote the
    shards, so a run can refuse another tokenizer of the same vocabulary size (its bpb is wrong)."""
    data = {
        "version": "pgolf-shards-1",
        "tokenizer": {"file": Path(tokenizer).name, "sha256": sha256_file(tokenizer)},
        "splits": counts,
    }
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / MANIFEST)


def _split_batches(docs: Iterable[str], val_docs: int) -> Iterator[tuple[str, list[str]]]:
    """("val"|"train", batch) with no batch crossing the split point."""
    it = iter(docs)
    for split, limit in (("val", val_docs), ("train", None)):
        remaining = limit
        while remaining is None or remaining > 0:
            n = _BATCH_DOCS if remaining is None else min(_BATCH_DOCS, remaining)
            batch = list(itertools.islice(it, n))
            if not batch:
                break
            if remaining is not None:
                remaining -= len(batch)
            yield split, batch


def export_shards(
    model_path: str | Path,
    docs: Iterable[str],
    out_dir: str | Path,
    val_docs: int,
    prefix: str = "fineweb",
    shard_tokens: int = SHARD_TOKENS,
    workers: int = 0,
    total_docs: int | None = None,
) -> dict[str, int]:
    """Write {prefix}_{val,train}_NNNNNN.bin; return the token, document and file counts per split."""
    if isinstance(docs, (list, tuple)):
        total_docs = len(docs)
    if val_docs < 1 or (total_docs is not None and val_docs >= total_docs):
        raise ValueError(
            f"val_docs={val_docs} must be between 1 and the number of documents - 1 ({(total_docs or 0) - 1})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Shards are written into a staging folder and moved in only once the export is complete, so a
    # failure (too few documents, a bad line, Ctrl-C, a full disk) leaves the previous export, or none.
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-export-", dir=out_dir))
    try:
        stats = _export_into(model_path, docs, staging, val_docs, prefix, shard_tokens, workers, total_docs)
        _commit_export(staging, out_dir, prefix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def _commit_export(staging: Path, out_dir: Path, prefix: str) -> None:
    """Replace the previous export's shards and manifest with the staged ones (renames within one
    folder). The old manifest goes first and the new one comes in last: a commit cut short leaves
    shards with no manifest (runs warn that the tokenizer is unverified), never new shards under
    the old export's tokenizer hash."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in ("val", "train"):
        for stale in out_dir.glob(f"{prefix}_{split}_*.bin"):  # a shorter re-export leaves no old tail
            stale.unlink()
    for shard in sorted(staging.glob(f"{prefix}_*.bin")):
        os.replace(shard, out_dir / shard.name)
    os.replace(staging / MANIFEST, out_dir / MANIFEST)


def _export_into(
    model_path: str | Path,
    docs: Iterable[str],
    out_dir: Path,
    val_docs: int,
    prefix: str,
    shard_tokens: int,
    workers: int,
    total_docs: int | None,
) -> dict[str, int]:
    writers = {s: ShardWriter(out_dir, prefix, s, shard_tokens) for s in ("val", "train")}
    doc_counts = {"val": 0, "train": 0}
    # The split of each batch travels beside it (encode_stream only sees texts, in order).
    splits: deque[str] = deque()

    def texts() -> Iterator[list[str]]:
        for split, batch in _split_batches(docs, val_docs):
            splits.append(split)
            yield batch

    progress = Progress("tokenize", total_docs)
    done = 0
    workers = workers or _workers_for(total_docs)
    for n, arr in encode_stream(model_path, texts(), workers):
        split = splits.popleft()
        writers[split].add(arr)
        doc_counts[split] += n
        done += n
        progress.update(done, sum(w.tokens for w in writers.values()))
    if doc_counts["val"] < val_docs or doc_counts["train"] == 0:
        raise ValueError(
            f"val_docs={val_docs} must be between 1 and the number of documents - 1 ({done - 1}); "
            "nothing was exported"
        )
    for w in writers.values():
        w.close()
    progress.update(done, sum(w.tokens for w in writers.values()), final=True)
    counts = {
        "val": writers["val"].tokens,
        "train": writers["train"].tokens,
        "docs_val": doc_counts["val"],
        "docs_train": doc_counts["train"],
        "files_val": writers["val"].files,
        "files_train": writers["train"].files,
    }
    write_manifest(out_dir, model_path, counts)  # the tokenizer's hash: runs check it before training
    return counts
