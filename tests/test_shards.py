"""Shard format, shard-set validation, val truncation and the build -> export round trip."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from _corpus import embedded_docs
from conftest import write_tokens

from pgolf.data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    ShardError,
    check_vocab,
    load_tokens,
    read_header,
    shard_files,
    write_shard,
)
from pgolf.data.source import open_shards


def _raw_shard(
    path: Path, tokens: np.ndarray, magic: int = MAGIC, version: int = VERSION, count: int | None = None
) -> None:
    """Write a shard by hand (independent of write_shard): 256 little-endian int32 + uint16 tokens."""
    header = [magic, version, len(tokens) if count is None else count] + [0] * 253
    path.write_bytes(struct.pack("<256i", *header) + np.asarray(tokens, dtype="<u2").tobytes())


def _named(path: Path) -> str:
    return re.escape(str(path))


# ---------------------------------------------------------------------------------------------
# format round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_write_load_round_trip(tmp_path, n, mmap):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 65_536, size=n, dtype=np.int64)
    path = tmp_path / "x.bin"
    write_shard(path, tokens)
    # The bytes on disk are exactly the challenge layout.
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * n
    header = struct.unpack("<256i", raw[:HEADER_BYTES])
    assert header[:3] == (MAGIC, VERSION, n) and not any(header[3:])
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"), tokens)
    assert read_header(path) == n
    out = load_tokens(path, mmap=mmap)
    assert out.dtype == np.uint16 and out.shape == (n,)
    assert np.array_equal(np.asarray(out).astype(np.int64), tokens)
    assert not (tmp_path / "x.bin.tmp").exists()


def test_load_reads_hand_written_shard(tmp_path):
    tokens = np.arange(300, dtype=np.uint16) * 200
    _raw_shard(tmp_path / "h.bin", tokens)
    for mmap in (False, True):
        assert np.array_equal(load_tokens(tmp_path / "h.bin", mmap=mmap), tokens)


def test_mmap_is_read_only(tmp_path):
    write_tokens(tmp_path / "m.bin", [1, 2, 3])
    arr = load_tokens(tmp_path / "m.bin", mmap=True)
    with pytest.raises(ValueError):
        arr[0] = 5


def test_write_shard_rejects_out_of_range(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "big.bin", np.array([0, 65_536]))
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "neg.bin", np.array([-1, 3]))


# ---------------------------------------------------------------------------------------------
# header validation: every error names the file
# ---------------------------------------------------------------------------------------------


def test_bad_magic(tmp_path):
    p = tmp_path / "magic.bin"
    _raw_shard(p, np.arange(10), magic=12345)
    with pytest.raises(ShardError, match=_named(p) + r".*bad magic 12345"):
        read_header(p)
    with pytest.raises(ShardError, match=_named(p)):
        load_tokens(p)


def test_bad_version(tmp_path):
    p = tmp_path / "version.bin"
    _raw_shard(p, np.arange(10), version=2)
    with pytest.raises(ShardError, match=_named(p) + r".*version 2"):
        read_header(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "trunc.bin"
    _raw_shard(p, np.arange(100))
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(ShardError, match=_named(p) + r".*100 tokens.*1224 bytes.*1222 bytes"):
        read_header(p)
    with pytest.raises(ShardError, match=_named(p)):
        load_tokens(p, mmap=True)


def test_extra_bytes(tmp_path):
    p = tmp_path / "extra.bin"
    _raw_shard(p, np.arange(100))
    p.write_bytes(p.read_bytes() + b"\0\0")
    with pytest.raises(ShardError, match=_named(p) + r".*1226 bytes"):
        read_header(p)


def test_header_count_mismatch(tmp_path):
    p = tmp_path / "count.bin"
    _raw_shard(p, np.arange(100), count=101)
    with pytest.raises(ShardError, match=_named(p)):
        read_header(p)
    _raw_shard(p, np.arange(100), count=-1)
    with pytest.raises(ShardError, match=_named(p)):
        read_header(p)


@pytest.mark.parametrize("size", [0, 4, HEADER_BYTES - 1])
def test_shorter_than_header(tmp_path, size):
    p = tmp_path / "short.bin"
    p.write_bytes(struct.pack("<i", MAGIC).ljust(size, b"\0")[:size])
    with pytest.raises(ShardError, match=_named(p) + rf".*{size} bytes is shorter"):
        read_header(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.bin"
    with pytest.raises(ShardError, match=_named(p) + ".*not found"):
        read_header(p)
    with pytest.raises(ShardError, match=_named(p)):
        load_tokens(p)


# ---------------------------------------------------------------------------------------------
# shard sets
# ---------------------------------------------------------------------------------------------


def test_shard_files_sorted(tmp_path):
    for name in ["b_002.bin", "b_000.bin", "b_001.bin", "c_000.bin"]:
        write_tokens(tmp_path / name, [1])
    got = shard_files(tmp_path, "b_*.bin", "train")
    assert [p.name for p in got] == ["b_000.bin", "b_001.bin", "b_002.bin"]


def test_shard_files_empty_glob(tmp_path):
    with pytest.raises(ShardError, match=r"no train shards match .*" + re.escape("zzz_*.bin")) as e:
        shard_files(tmp_path, "zzz_*.bin", "train")
    assert str(tmp_path) in str(e.value)


def test_check_vocab(tmp_path):
    good, bad, empty = tmp_path / "good.bin", tmp_path / "bad.bin", tmp_path / "empty.bin"
    write_tokens(good, [0, 5, 399])
    write_tokens(bad, [3, 400, 7])
    write_tokens(empty, [])
    check_vocab([good, empty], 400)
    with pytest.raises(ShardError, match=_named(bad) + r".*token id 400.*400 ids"):
        check_vocab([good, bad], 400)
    with pytest.raises(ShardError, match=_named(good) + r".*token id 399"):
        check_vocab([good], 399)
    # head_tokens reads only the start of each shard: an id past it goes unseen, one inside is caught.
    tail_bad = tmp_path / "tail_bad.bin"
    write_tokens(tail_bad, [1, 2, 3, 400])
    check_vocab([tail_bad], 400, head_tokens=3)
    with pytest.raises(ShardError, match=_named(tail_bad)):
        check_vocab([tail_bad], 400, head_tokens=4)


def test_open_shards_checks_the_head_of_every_train_shard(tmp_path, tokenizer_model):
    """A later train shard written with a bigger tokenizer is caught before training."""
    folder = _shard_folder(tmp_path, train_sizes=(80, 20, 5))
    write_tokens(folder / "fineweb_train_000002.bin", [5, 7000, 9])
    with pytest.raises(
        ShardError, match=_named(folder / "fineweb_train_000002.bin") + ".*different tokenizer"
    ):
        open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)


def _shard_folder(tmp_path: Path, val_sizes=(50,), train_sizes=(80,), vocab=400) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate(val_sizes):
        write_tokens(folder / f"fineweb_val_{i:06d}.bin", rng.integers(0, vocab, n))
    for i, n in enumerate(train_sizes):
        write_tokens(folder / f"fineweb_train_{i:06d}.bin", rng.integers(0, vocab, n))
    return folder


def test_open_shards_ok(tmp_path, tokenizer_model):
    folder = _shard_folder(tmp_path, val_sizes=(50, 30), train_sizes=(80, 20, 5))
    src = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)
    assert [p.name for p in src.val_files] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert len(src.train_files) == 3
    assert src.train_tokens == 105 and src.val_tokens_total == 80
    assert src.bos_id == 1 and src.vocab_size == 400


@pytest.mark.parametrize(
    "train,val,blamed,innocent",
    [
        ("fineweb_*.bin", "fineweb_val_*.bin", "narrow data.train_pattern", "narrow data.val_pattern"),
        ("fineweb_train_*.bin", "fineweb_*.bin", "narrow data.val_pattern", "narrow data.train_pattern"),
        ("fineweb_*_000000.bin", "fineweb_val_*.bin", "disjoint", "narrow"),  # neither contains the other
    ],
)
def test_pattern_overlap_names_the_pattern_to_fix(tmp_path, tokenizer_model, train, val, blamed, innocent):
    folder = _shard_folder(tmp_path, val_sizes=(50, 30), train_sizes=(80, 20))
    with pytest.raises(ShardError) as e:
        open_shards(folder, train, val, tokenizer_model, 400)
    msg = str(e.value)
    assert f"data.train_pattern={train!r}" in msg and f"data.val_pattern={val!r}" in msg
    assert blamed in msg and innocent not in msg
    assert "fineweb_val_000000.bin" in msg or "fineweb_train_000000.bin" in msg


def test_open_shards_rejects_vocab_mismatch(tmp_path, tokenizer_model):
    folder = _shard_folder(tmp_path, vocab=300)
    with pytest.raises(ShardError) as e:
        open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 512)
    msg = str(e.value)
    assert str(tokenizer_model) in msg and "400" in msg and "512" in msg


def test_open_shards_missing_tokenizer(tmp_path):
    folder = _shard_folder(tmp_path)
    missing = tmp_path / "absent" / "tok.model"
    with pytest.raises(FileNotFoundError, match=_named(missing)):
        open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", missing, 400)


def test_open_shards_rejects_ids_beyond_vocab(tmp_path, tokenizer_model):
    folder = _shard_folder(tmp_path)
    bad = folder / "fineweb_val_000001.bin"
    write_tokens(bad, [1, 2, 450])
    with pytest.raises(ShardError, match=_named(bad) + ".*450"):
        open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)


def test_open_shards_validates_every_header(tmp_path, tokenizer_model):
    folder = _shard_folder(tmp_path, train_sizes=(10, 10))
    bad = folder / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ShardError, match=_named(bad)):
        open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)


@pytest.mark.parametrize(
    "sizes,seq_len",
    [
        ((17,), 4),
        ((16,), 4),
        ((15,), 4),
        ((5, 12), 4),
        ((1000,), 64),
        ((64, 1), 64),
        ((3, 4, 5, 6, 7), 3),
        ((2,), 1),
    ],
)
def test_val_tokens_truncation(tmp_path, tokenizer_model, sizes, seq_len):
    folder = _shard_folder(tmp_path, val_sizes=sizes)
    src = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)
    everything = np.concatenate([np.fromfile(f, dtype="<u2", offset=HEADER_BYTES) for f in src.val_files])
    n = sum(sizes)
    assert everything.size == n
    expect = 1 + ((n - 1) // seq_len) * seq_len
    got = src.val_tokens(seq_len)
    assert got.size == expect
    assert np.array_equal(got, everything[:expect])


def test_val_tokens_shorter_than_one_sequence(tmp_path, tokenizer_model):
    folder = _shard_folder(tmp_path, val_sizes=(8,))
    src = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)
    assert src.val_tokens(7).size == 8
    with pytest.raises(ShardError, match="shorter than one sequence"):
        src.val_tokens(8)


# ---------------------------------------------------------------------------------------------
# build -> export round trip
# ---------------------------------------------------------------------------------------------


def _split_docs(stream: np.ndarray, bos: int) -> list[list[int]]:
    starts = np.flatnonzero(stream == bos)
    assert starts.size and starts[0] == 0, "every split must begin with BOS"
    bounds = list(starts) + [stream.size]
    return [stream[a + 1 : b].astype(np.int64).tolist() for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("shard_tokens", [10**8, 97])
def test_export_round_trip(tmp_path, tokenizer_model, shard_tokens):
    from conftest import SAMPLE_TEXT

    from pgolf.data.build import export_shards

    docs = list(SAMPLE_TEXT) + list(embedded_docs()[:6]) + ["x", "Naïve café 😀"]
    val_docs = 3
    out = tmp_path / "export"
    counts = export_shards(tokenizer_model, docs, out, val_docs=val_docs, shard_tokens=shard_tokens)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    bos = sp.bos_id()

    def read(split: str) -> np.ndarray:
        files = sorted(out.glob(f"fineweb_{split}_*.bin"))
        assert files
        for f in files[:-1]:
            assert read_header(f) == shard_tokens
        return np.concatenate([load_tokens(f) for f in files])

    val, train = read("val"), read("train")
    assert (counts["val"], counts["train"]) == (val.size, train.size)
    val_spans, train_spans = _split_docs(val, bos), _split_docs(train, bos)
    assert len(val_spans) == val_docs and len(train_spans) == len(docs) - val_docs
    for doc, ids in zip(docs, val_spans + train_spans):
        assert ids == sp.encode(doc)
        assert sp.decode(ids) == sp.decode(sp.encode(doc))


def test_export_rejects_bad_val_docs(tmp_path, tokenizer_model):
    from pgolf.data.build import export_shards

    for val_docs in (0, 3):
        with pytest.raises(ValueError, match="val_docs"):
            export_shards(tokenizer_model, ["a", "b", "c"], tmp_path / "e", val_docs=val_docs)


def test_fixture_shards_are_valid(shard_dir, tokenizer_model, tmp_path):
    """The shared `shard_dir` fixture passes open_shards, and its val split is the first 20 docs."""
    folder = tmp_path / "copy"
    shutil.copytree(shard_dir, folder)
    src = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    val = np.concatenate([load_tokens(f) for f in src.val_files])
    spans = _split_docs(val, sp.bos_id())
    assert len(spans) == 20
    for doc, ids in zip(embedded_docs()[:20], spans):
        assert sp.decode(ids) == sp.decode(sp.encode(doc))
