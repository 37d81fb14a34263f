"""The challenge's shard format: 256 little-endian int32 header, then uint16 tokens.

header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = token count, rest zero.
Every reader validates the header and the exact file size and names the file in its error.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

from pgolf.results import atomic_file, sha256_file

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 10**8  # tokens per shard in the challenge exports (the last one is shorter)


class ShardError(ValueError):
    """A shard file or shard set is malformed; the message names the file and the fix."""


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file not found") from None
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; re-export it"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise ShardError(
            f"{path}: bad magic {int(header[0])} (expected {MAGIC}); not a Parameter Golf shard, "
            "re-export it with `python -m pgolf.data build` or the challenge's downloader"
        )
    if int(header[1]) != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise ShardError(
            f"{path}: header says {n} tokens, so the file should be {expected} bytes, but it is {size} bytes "
            "(truncated or corrupt download); delete it and download/export it again"
        )
    return n


def load_tokens(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Return a shard's tokens as uint16 (a read-only memmap if `mmap`)."""
    n = read_header(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens atomically (temp file + rename), so a crash never leaves a half shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 65_536):
        raise ShardError(f"{path}: token ids must fit uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with atomic_file(path, needed=HEADER_BYTES + 2 * tokens.size, tmp_name=Path(path).name + ".tmp") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def shard_files(folder: str | Path, pattern: str, role: str) -> list[Path]:
    """Sorted shard paths matching `pattern` in `folder`; an empty match is an error."""
    full = os.path.join(str(folder), pattern)
    files = [Path(p) for p in sorted(glob.glob(full))]
    if not files:
        raise ShardError(
            f"no {role} shards match {full}; check data.path (download with the challenge's "
            "cached_challenge_fineweb.py or build with `python -m pgolf.data build`)"
        )
    return files


def check_vocab(files: list[Path], vocab_size: int, head_tokens: int | None = None) -> None:
    """Reject any shard holding an id >= vocab_size (the model's embedding would index out of range).

    With `head_tokens`, only that many tokens at the start of each shard are read (2 MB per
    million): enough to catch a shard written with another tokenizer, cheap on 100+ shards."""
    for f in files:
        tokens = load_tokens(f, mmap=True)[:head_tokens]
        if tokens.size == 0:
            continue
        top = int(tokens.max())
        if top >= vocab_size:
            raise ShardError(
                f"{f}: holds token id {top} but the vocabulary has {vocab_size} ids; these shards were written "
                "with a different tokenizer than data.tokenizer_path/data.vocab_size"
            )


MANIFEST = "manifest.json"


def manifest_tokenizer_hashes(folder: str | Path) -> set[str]:
    """The tokenizer sha256 values `<folder>/manifest.json` vouches for: pgolf's own shard manifest,
    or the challenge's layout (`tokenizers` entries, narrowed to the dataset of this folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return set()
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); delete it or rebuild the shards") from None
    entries = [m.get("tokenizer") or {}]
    toks = m.get("tokenizers", [])
    ds = next((d for d in m.get("datasets", []) if d.get("name") == Path(folder).name), None)
    if ds and ds.get("tokenizer_name"):
        toks = [t for t in toks if t.get("name") == ds["tokenizer_name"]]
    return {t["sha256"] for t in entries + toks if t.get("sha256")}


def check_tokenizer(folder: str | Path, tokenizer: str | Path) -> str | None:
    """Refuse a tokenizer that did not write the shards in `folder`; return a warning (None if
    verified) when the folder's manifest records no tokenizer hash (older exports, some downloads)."""
    want = manifest_tokenizer_hashes(folder)
    if not want:
        return (
            f"{Path(folder) / MANIFEST} records no tokenizer sha256, so {tokenizer} cannot be checked "
            "against the shards; rebuild them with `python -m pgolf.data build` or re-run the download"
        )
    got = sha256_file(tokenizer)
    if got not in want:
        raise ShardError(
            f"tokenizer {tokenizer} (sha256 {got[:12]}...) is not the one that wrote the shards in {folder} "
            f"({Path(folder) / MANIFEST} records sha256 {', '.join(h[:12] + '...' for h in sorted(want))}); "
            "its bpb would be wrong: point data.tokenizer_path at the .model those shards were built with"
        )
    return None
