"""Data sources: resolve a `data` config into validated shard files, val tokens and byte tables."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgolf.data.bpb import ByteTables, build_byte_tables
from pgolf.data.config import EmbeddedDataConfig, ShardDataConfig
from pgolf.data.shards import (
    MANIFEST,
    ShardError,
    check_tokenizer,
    check_vocab,
    load_tokens,
    read_header,
    shard_files,
)
from pgolf.results import write_json_atomic


@dataclass
class DataSource:
    train_files: list[Path]
    val_files: list[Path]
    tokenizer_path: Path
    vocab_size: int
    bytes: ByteTables
    bos_id: int
    train_tokens: int
    val_tokens_total: int
    warnings: list[str] = field(default_factory=list)  # for the run's log (an unverifiable tokenizer)

    def val_tokens(self, seq_len: int) -> np.ndarray:
        """All val shards concatenated and truncated to 1 + floor((N-1)/L)*L tokens, as the challenge does."""
        tokens = np.concatenate([load_tokens(f) for f in self.val_files])
        usable = ((tokens.size - 1) // seq_len) * seq_len
        if usable <= 0:
            raise ShardError(
                f"validation split ({tokens.size} tokens) is shorter than one sequence of {seq_len}"
            )
        return tokens[: usable + 1]


def _load_tokenizer(path: Path, vocab_size: int):
    import sentencepiece as spm

    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {path} not found; set data.tokenizer_path to the SentencePiece .model the shards were "
            "written with"
        )
    if path.suffix != ".model":
        raise ValueError(f"tokenizer {path}: expected a SentencePiece .model file")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if int(sp.vocab_size()) != vocab_size:
        raise ShardError(
            f"tokenizer {path} has {int(sp.vocab_size())} pieces but data.vocab_size={vocab_size}; "
            "point data.tokenizer_path at the tokenizer these shards were written with, or fix data.vocab_size"
        )
    return sp


def check_disjoint(train: list[Path], val: list[Path], train_pattern: str, val_pattern: str) -> None:
    """No file may be both train and validation data. The message blames the pattern that reaches
    into the other split's files (the one matching a strict superset), or both when neither does."""
    both = sorted(set(train) & set(val))
    if not both:
        return
    t, v = set(train), set(val)
    keys = {"train": f"data.train_pattern={train_pattern!r}", "val": f"data.val_pattern={val_pattern!r}"}
    example = f"{both[0].name}{', ...' if len(both) > 1 else ''}; {len(both)} file(s)"
    if v < t:  # the train pattern swallows the validation files
        raise ShardError(
            f"{keys['train']} also matches the validation files of {keys['val']} ({example}); training on "
            "validation data is not allowed: narrow data.train_pattern (e.g. 'fineweb_train_*.bin')"
        )
    if t < v:
        raise ShardError(
            f"{keys['val']} also matches the training files of {keys['train']} ({example}); scoring on "
            "training data is not allowed: narrow data.val_pattern (e.g. 'fineweb_val_*.bin')"
        )
    raise ShardError(
        f"{keys['train']} and {keys['val']} both match {example}; a shard is train or validation, never "
        "both: make the two patterns select disjoint files (e.g. 'fineweb_train_*.bin' and 'fineweb_val_*.bin')"
    )


def open_shards(
    folder: Path, train_pattern: str, val_pattern: str, tokenizer: Path, vocab_size: int
) -> DataSource:
    if not folder.is_dir():
        raise ShardError(f"data.path={folder} is not a directory; download or build shards into it first")
    train = shard_files(folder, train_pattern, "train")
    val = shard_files(folder, val_pattern, "validation")
    check_disjoint(train, val, train_pattern, val_pattern)
    train_n = sum(read_header(f) for f in train)  # headers and sizes of every shard, once
    val_n = sum(read_header(f) for f in val)
    sp = _load_tokenizer(tokenizer, vocab_size)
    unverified = check_tokenizer(folder, tokenizer)  # raises if another tokenizer wrote the shards
    check_vocab(val, vocab_size)
    # A full scan of 10B train tokens is too slow: the first shard in full, then the head of every
    # other one, which catches a folder that mixes shards of two tokenizers.
    check_vocab(train[:1], vocab_size)
    check_vocab(train[1:], vocab_size, head_tokens=1 << 20)
    return DataSource(
        train_files=train,
        val_files=val,
        tokenizer_path=tokenizer,
        vocab_size=vocab_size,
        bytes=build_byte_tables(sp, vocab_size),
        bos_id=int(sp.bos_id()),
        train_tokens=train_n,
        val_tokens_total=val_n,
        warnings=[unverified] if unverified else [],
    )


def build_shard_source(cfg: ShardDataConfig) -> DataSource:
    return open_shards(
        Path(cfg.path).expanduser(),
        cfg.train_pattern,
        cfg.val_pattern,
        Path(cfg.tokenizer_path).expanduser(),
        cfg.vocab_size,
    )


# ---------------------------------------------------------------------------------------------
# embedded corpus: built on first use, cached, safe against concurrent builders (flock)
# ---------------------------------------------------------------------------------------------


def cache_root(cfg: EmbeddedDataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("PGOLF_CACHE") or os.path.join(Path.home(), ".cache", "pgolf")
    return Path(root).expanduser()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_embedded(cfg: EmbeddedDataConfig, log=print) -> Path:
    """Build (once) the embedded corpus, its tokenizer and shards; return the shard folder."""
    from pgolf.data.build import export_shards, train_tokenizer
    from pgolf.data.embedded import collect_documents, corpus_key, source_fingerprint

    def folder_of(key: str) -> Path:
        return cache_root(cfg) / f"embedded-{key}-v{cfg.vocab_size}-val{cfg.val_docs}"

    # The documents' source files as they were when a corpus was last collected from them: that
    # corpus's key, without parsing the standard library again.
    known = cache_root(cfg) / "embedded-sources" / f"{source_fingerprint()}.json"
    if known.is_file():
        folder = folder_of(json.loads(known.read_text())["corpus_key"])
        if (folder / "DONE.json").is_file() and (folder / MANIFEST).is_file():
            return folder
    docs = collect_documents()
    key = corpus_key(docs)
    folder = folder_of(key)
    done = folder / "DONE.json"
    if done.is_file():
        if not (folder / MANIFEST).is_file():  # built before manifests: pgolf made both files here
            from pgolf.data.build import write_manifest

            with _locked(folder.parent / (folder.name + ".lock")):
                write_manifest(folder, folder / "tokenizer.model", json.loads(done.read_text()))
        _remember(known, key)
        return folder
    with _locked(folder.parent / (folder.name + ".lock")):
        if done.is_file():  # another process finished it while we waited
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        log(
            f"embedded corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB of Python documentation -> {folder}"
        )
        model = train_tokenizer(docs, cfg.vocab_size, folder / "tokenizer.model")
        log(f"embedded corpus: trained a {cfg.vocab_size}-piece SentencePiece BPE tokenizer")
        counts = export_shards(model, docs, folder, val_docs=cfg.val_docs)
        log(f"embedded corpus: {counts['train']:,} train and {counts['val']:,} val tokens")
        write_json_atomic(done, {"documents": len(docs), "bytes": n_bytes, **counts})
    _remember(known, key)
    return folder


def _remember(known: Path, key: str) -> None:
    """Record which corpus the fingerprinted sources made. Only a shortcut: a cache folder this
    process may read but not write (a shared, read-only cache) still serves the run."""
    try:
        known.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(known, {"corpus_key": key})
    except OSError:
        pass


def build_embedded_source(cfg: EmbeddedDataConfig) -> DataSource:
    folder = ensure_embedded(cfg)
    return open_shards(
        folder, "fineweb_train_*.bin", "fineweb_val_*.bin", folder / "tokenizer.model", cfg.vocab_size
    )
