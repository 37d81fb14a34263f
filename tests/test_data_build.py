"""`pgolf.data build` on whole-file documents, the up-front --val-docs check, exports that are never
left half-written, and `download` copies that are independent of the hub they came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from _corpus import embedded_docs
from conftest import REPO

from pgolf.data import build as build_mod
from pgolf.data.build import (
    SPM_MAX_SENTENCE_BYTES,
    export_shards,
    split_for_tokenizer,
    tokenizer_sentences,
    train_tokenizer,
)
from pgolf.data.shards import load_tokens
from pgolf.results import sha256_file


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgolf.data", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _long_files(folder: Path, n: int = 4, size: int = 40_000) -> list[Path]:
    """`n` text files of about `size` characters each: every one far over SentencePiece's 4192 bytes."""
    text = "\n\n".join(embedded_docs())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"book{i}.txt"
        p.write_text(text[i * size : (i + 1) * size] + " caf\u00e9 \u6f22\u5b57", encoding="utf-8")
        paths.append(p)
    return paths


def _docs_of(folder: Path, split: str, bos: int) -> list[list[int]]:
    stream = np.concatenate([load_tokens(f) for f in sorted(folder.glob(f"fineweb_{split}_*.bin"))])
    starts = list(np.flatnonzero(stream == bos)) + [stream.size]
    return [stream[a + 1 : b].tolist() for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------------------------
# long whole-file documents
# ---------------------------------------------------------------------------------------------


def test_build_on_long_whole_file_documents(tmp_path):
    files = _long_files(tmp_path / "in")
    root = tmp_path / "root"
    proc = _cli(
        "build", "--input", *map(str, files), "--root", str(root), "--vocab-size", "512",
        "--val-docs", "1", "--shard-tokens", "20000",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers/fineweb_512_bpe.model"))
    assert sp.vocab_size() == 512
    folder = root / "datasets/fineweb10B_sp512"
    docs = _docs_of(folder, "val", sp.bos_id()) + _docs_of(folder, "train", sp.bos_id())
    # Each file is one document in the shards, whole: chunks exist only for tokenizer training.
    assert len(docs) == len(files)
    for path, ids in zip(files, docs):
        assert sp.decode(ids) == sp.normalize(path.read_text(encoding="utf-8")).replace("\u2581", " ")


def test_split_for_tokenizer_fits_and_joins_back():
    text = (
        "short line\n"
        + "word " * 3000  # one line over the limit: cut between words
        + "\n"
        + "\u00e9" * 5000  # no whitespace, 2-byte characters: cut at a character boundary
        + "\nend"
    )
    for limit in (SPM_MAX_SENTENCE_BYTES, 101):
        pieces = list(split_for_tokenizer(text, limit))
        assert "".join(pieces) == text
        assert all(0 < len(p.encode("utf-8")) <= limit for p in pieces)
        assert len(pieces) > 1
    assert list(split_for_tokenizer("a\nb\n")) == ["a\nb\n"]  # short text: one piece, lines kept together


def test_jsonl_documents_reach_the_tokenizer_unchanged(tmp_path):
    """The challenge's rule for JSONL (a document over max_sentence_length is skipped) is kept: only
    whole files are cut."""
    long_doc = "lorem ipsum " * 1000
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": long_doc}) + "\n" + json.dumps({"text": "hi"}) + "\n"
    )
    (tmp_path / "t.txt").write_text(long_doc)
    out = list(tokenizer_sentences([tmp_path / "d.jsonl", tmp_path / "t.txt"]))
    assert out[:2] == [long_doc, "hi"]
    assert "".join(out[2:]) == long_doc and len(out) > 3


def test_only_too_long_documents_give_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"2 of 2 document\(s\) are longer than .*max_sentence_length"):
        train_tokenizer(["x" * 5000, "y " * 3000], 300, tmp_path / "t.model")
    assert not list(tmp_path.glob("*.model"))


# ---------------------------------------------------------------------------------------------
# --val-docs checked first; no half-written export
# ---------------------------------------------------------------------------------------------


def test_val_docs_is_checked_before_the_tokenizer_trains(tmp_path, monkeypatch, capsys):
    from pgolf.data import cli

    files = _long_files(tmp_path / "in", n=3, size=2000)

    def must_not_train(*a, **k):
        raise AssertionError("the tokenizer trained before --val-docs was checked")

    monkeypatch.setattr(build_mod, "train_tokenizer", must_not_train)
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as e:
        cli.main(["build", "--input", *map(str, files), "--root", str(root), "--val-docs", "3"])
    msg = str(e.value)
    assert "--val-docs 3" in msg and "only 3 document(s)" in msg and "--val-docs 2 or less" in msg
    assert not root.exists()


def test_a_failed_export_leaves_the_previous_one_untouched(tmp_path, tokenizer_model):
    docs = list(embedded_docs()[:40])
    out = tmp_path / "export"
    stats = export_shards(tokenizer_model, docs, out, val_docs=5, shard_tokens=3000, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) > 4
    # The manifest comes out of the staging folder with the shards: it names this tokenizer.
    manifest = json.loads(before["manifest.json"])
    assert manifest["tokenizer"]["sha256"] == sha256_file(tokenizer_model)
    assert manifest["splits"] == stats

    def fails_midway():
        yield from docs[:30]  # several shards' worth are written before the failure
        raise ValueError("bad line in the input")

    with pytest.raises(ValueError, match="bad line"):
        export_shards(tokenizer_model, fails_midway(), out, val_docs=5, shard_tokens=1000, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either
    # Too few documents, found only at the end of a stream (no len): nothing is written.
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="nothing was exported"):
        export_shards(tokenizer_model, iter(docs[:5]), fresh, val_docs=5, shard_tokens=1000, workers=1)
    assert list(fresh.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# download --local-hub copies
# ---------------------------------------------------------------------------------------------


def test_local_hub_download_is_a_copy_not_a_link(tmp_path, tokenizer_model):
    from pgolf.data.download import LocalHub, download

    # A hub built by `build` (the documented way to serve a root as --local-hub).
    root = tmp_path / "hub"
    files = _long_files(tmp_path / "in", n=3, size=3000)
    proc = _cli(
        "build", "--input", *map(str, files), "--root", str(root), "--tokenizer", str(tokenizer_model),
        "--val-docs", "1", "--name", "sp1024",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "data"
    download(copy, "sp1024", 1, source=LocalHub(root), remote_root="", log=lambda _: None)
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin"):
        hub_file = root / "datasets/fineweb10B_sp1024" / name
        mine = copy / "datasets/fineweb10B_sp1024" / name
        original = hub_file.read_bytes()
        assert not os.path.samefile(hub_file, mine) and hub_file.stat().st_nlink == 1
        with open(mine, "r+b") as f:  # damage the copy in place (what a link would share)
            f.seek(2000)
            f.write(b"\xff\xff\xff\xff")
        assert hub_file.read_bytes() == original
        assert mine.read_bytes() != original
