"""Exact byte accounting (val_bpb denominator) and the evaluation loop's sums."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
from _corpus import embedded_docs
from conftest import SAMPLE_TEXT

from pgolf.data.bpb import build_byte_tables
from pgolf.eval.val import ByteLUT, evaluate

BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")
SPECIAL_IDS = {0, 1, 2, 3}  # pad, bos, eos, unk (pgolf.data.build.SPM_SETTINGS)


@pytest.fixture(scope="module")
def sp(tokenizer_model):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    extra = ["a", "é", "😀😀 x", "word  word", "12 34", "\u6f22\u5b57\u6f22\u5b57 and more", "tab\there"]
    return list(SAMPLE_TEXT) + list(embedded_docs()[:30]) + extra


def _reference_tables(sp, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-piece bytes written from the piece strings alone."""
    base = np.zeros(size, dtype=np.int64)
    lead = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i in SPECIAL_IDS:
            assert piece in ("<pad>", "<s>", "</s>", "<unk>")
            continue
        boundary[i] = False
        if BYTE_PIECE.match(piece):
            base[i] = 1
            continue
        if piece[0] == "\u2581":
            lead[i] = True
            piece = piece[1:]
        base[i] = sum(
            1 if ord(ch) < 0x80 else 2 if ord(ch) < 0x800 else 3 if ord(ch) < 0x10000 else 4 for ch in piece
        )
    return base, lead, boundary


def _reference_bytes(sp, prev: np.ndarray, target: np.ndarray, size: int | None = None) -> int:
    base, lead, boundary = _reference_tables(sp, size or sp.get_piece_size())
    return int((base[target] + (lead[target] & ~boundary[prev])).sum())


def test_tables_match_pieces(sp):
    for size in (400, 512):
        t = build_byte_tables(sp, size)
        base, lead, boundary = _reference_tables(sp, size)
        assert t.base_bytes.shape == t.has_leading_space.shape == t.is_boundary.shape == (size,)
        assert np.array_equal(t.base_bytes.astype(np.int64), base)
        assert np.array_equal(t.has_leading_space, lead)
        assert np.array_equal(t.is_boundary, boundary)
    # The tokenizer really has the piece kinds the accounting distinguishes.
    assert base[4:260].tolist() == [1] * 256
    assert lead.any() and (base[~boundary & ~lead] >= 1).all() and (base > 1).any()


def test_per_document_bytes(sp, docs):
    tables = build_byte_tables(sp, 400)
    bos = sp.bos_id()
    for doc in docs:
        ids = np.asarray(sp.encode(doc), dtype=np.int64)
        assert sp.unk_id() not in ids
        prev = np.concatenate([[bos], ids[:-1]])
        got = tables.token_bytes(prev, ids)
        assert got.dtype == np.int64
        decoded = len(sp.decode(ids.tolist()).encode("utf-8"))
        assert int(got.sum()) == decoded, doc[:40]
        assert _reference_bytes(sp, prev, ids) == decoded


def test_concatenated_stream_bytes(sp, docs):
    tables = build_byte_tables(sp, 400)
    bos = sp.bos_id()
    stream = np.concatenate([np.asarray([bos] + sp.encode(d), dtype=np.int64) for d in docs])
    prev, target = stream[:-1], stream[1:]
    per_token = tables.token_bytes(prev, target)
    assert (per_token[target == bos] == 0).all()
    expected = sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
    assert int(per_token.sum()) == expected


def test_ids_beyond_tokenizer_are_zero_byte_boundaries(sp):
    tables = build_byte_tables(sp, 450)
    lead_id = next(
        i for i in range(400) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1
    )
    prev = np.array([420, 449, 5])
    target = np.array([lead_id, 430, lead_id])
    got = tables.token_bytes(prev, target)
    n = len(sp.id_to_piece(lead_id)[1:].encode("utf-8"))
    assert got.tolist() == [n, 0, n + 1]


# ---------------------------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------------------------


def _fake_nll(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    assert x.shape == y.shape and x.dtype == torch.int64
    return ((y % 7 + 1).float() * 0.1).to(torch.float32)


def _stream(sp, docs, n: int, vocab: int = 400) -> np.ndarray:
    bos = sp.bos_id()
    s = np.concatenate([np.asarray([bos] + sp.encode(d), dtype=np.uint16) for d in docs])
    assert s.size >= n
    out = s[:n].copy()
    if vocab > 400:  # sprinkle ids the tokenizer lacks (0-byte boundaries)
        out[::37] = 400 + np.arange(out[::37].size) % (vocab - 400)
    return out


@pytest.mark.parametrize(
    "n,seq_len,batch_seqs,vocab",
    [(1001, 16, 8, 400), (1001, 16, 62, 400), (1001, 16, 7, 400), (1001, 16, 1000, 400), (4097, 64, 5, 400),
     (4096, 64, 3, 400), (777, 32, 4, 416), (33, 32, 2, 400)],
)  # fmt: skip
def test_evaluate_matches_numpy(sp, docs, n, seq_len, batch_seqs, vocab):
    stream = _stream(sp, docs, n, vocab)
    tables = build_byte_tables(sp, vocab)
    res = evaluate(
        _fake_nll,
        stream,
        seq_len,
        batch_seqs,
        ByteLUT(tables, torch.device("cpu")),
        torch.device("cpu"),
        torch.float32,
    )

    n_seq = (n - 1) // seq_len
    x = stream[: n_seq * seq_len].astype(np.int64)
    y = stream[1 : n_seq * seq_len + 1].astype(np.int64)
    nll = ((y % 7 + 1).astype(np.float32) * np.float32(0.1)).astype(np.float64)
    n_bytes = _reference_bytes(sp, x, y, vocab)
    assert res.tokens == n_seq * seq_len
    assert res.bytes == n_bytes
    assert res.val_loss == pytest.approx(nll.sum() / y.size, rel=1e-12)
    assert res.val_bpb == pytest.approx(nll.sum() / (math.log(2.0) * n_bytes), rel=1e-12)


def test_evaluate_sees_every_sequence_once(sp, docs):
    """The (x, y) batches handed to token_nll tile the truncated stream in order, no overlap."""
    stream = _stream(sp, docs, 1001, 400)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(x, y):
        seen.append((x.numpy().copy(), y.numpy().copy()))
        return torch.zeros(y.shape)

    tables = build_byte_tables(sp, 400)
    evaluate(spy, stream, 16, 7, ByteLUT(tables, torch.device("cpu")), torch.device("cpu"), torch.float32)
    assert [b[0].shape[0] for b in seen] == [7] * 8 + [6]
    xs = np.concatenate([b[0] for b in seen]).reshape(-1)
    ys = np.concatenate([b[1] for b in seen]).reshape(-1)
    assert np.array_equal(xs, stream[:992]) and np.array_equal(ys, stream[1:993])
