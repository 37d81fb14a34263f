"""eval.nonoverlap_packed against PR #1775's eval_val rule, written out plainly.

The rule (the PR's train_gpt.py, eval_val): a rank scores val_batch_tokens / (world * grad_accum)
tokens per forward, i.e. that many // L sequences of L = EVAL_SEQ_LEN; the (N-1)//L sequences are
split contiguously over ranks, each rank's share is cut down to whole batches, and a batch is one
row x[None] of all its tokens (documents inside it are cut by BOS and every L tokens from each
document start, by the model's document mask).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.bpb import ByteTables
from pgolf.eval import val as val_mod
from pgolf.eval.config import EvalConfig
from pgolf.eval.val import ByteLUT, evaluate
from pgolf.registry import ConfigError

CPU = torch.device("cpu")
VOCAB = 64


def script_rows(tokens: list[int], L: int, val_batch_tokens: int, world: int, rank: int) -> list[list[int]]:
    """The token spans (inputs + the last target) the script scores on `rank`, one per forward."""
    grad_accum = 8 // world
    per_forward = val_batch_tokens // (world * grad_accum) // L
    n_seqs = (len(tokens) - 1) // L
    lo, hi = n_seqs * rank // world, n_seqs * (rank + 1) // world
    hi = lo + ((hi - lo) // per_forward) * per_forward  # the script's "TODO: Don't truncate this."
    return [tokens[b * L : min(b + per_forward, hi) * L + 1] for b in range(lo, hi, per_forward)]


def tables() -> ByteLUT:
    base = np.arange(VOCAB, dtype=np.int16) % 3 + 1
    lead = np.zeros(VOCAB, dtype=bool)
    boundary = np.zeros(VOCAB, dtype=bool)
    return ByteLUT(ByteTables(base, lead, boundary), CPU)


def scored(
    stream: np.ndarray, L: int, val_batch_tokens: int, world: int, rank: int, packed: bool, monkeypatch
):
    monkeypatch.setattr(val_mod.dist, "all_reduce", lambda t: None)  # one rank's sums only
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), y.clone()))
        return torch.ones(y.shape)

    batch_seqs = max(1, val_batch_tokens // (world * (8 // world) * L))  # the trainer's _val_batch_seqs
    res = evaluate(spy, stream, L, batch_seqs, tables(), CPU, torch.float32, rank, world, packed=packed)
    return seen, res


@pytest.mark.parametrize("world", [1, 3, 8])
def test_packed_nonoverlap_scores_the_scripts_rows(world, monkeypatch):
    rng = np.random.default_rng(world)
    L, val_batch_tokens = 16, 16 * 4 * 8  # 4 sequences per forward and rank
    stream = rng.integers(0, VOCAB, size=16 * 103 + 1).astype(
        np.uint16
    )  # 103: ranks' shares not whole batches
    total = 0
    for rank in range(world):
        seen, res = scored(stream, L, val_batch_tokens, world, rank, True, monkeypatch)
        ref = script_rows(stream.astype(np.int64).tolist(), L, val_batch_tokens, world, rank)
        assert [(x.shape[0], x.reshape(-1).tolist() + y.reshape(-1)[-1:].tolist()) for x, y in seen] == [
            (1, r) for r in ref
        ]
        assert all(torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1]) for x, y in seen)
        assert res.tokens == sum(len(r) - 1 for r in ref)
        total += res.tokens
    assert total < 16 * 103  # the script drops each rank's remainder


def test_unpacked_rows_are_not_the_scripts(monkeypatch):
    """The previous behaviour: one row per sequence and every sequence scored."""
    stream = np.random.default_rng(0).integers(0, VOCAB, size=16 * 103 + 1).astype(np.uint16)
    seen, res = scored(stream, 16, 16 * 4 * 8, 1, 0, False, monkeypatch)
    assert {x.shape for x, _ in seen} >= {torch.Size([4, 16])}
    assert res.tokens == 16 * 103
    ref = script_rows(stream.astype(np.int64).tolist(), 16, 16 * 4 * 8, 1, 0)
    assert res.tokens != sum(len(r) - 1 for r in ref)


def test_nonoverlap_seq_len_defaults_to_the_train_length():
    assert EvalConfig().nonoverlap_len(1024) == 1024
    assert EvalConfig(nonoverlap_seq_len=2048).nonoverlap_len(98304) == 2048
    with pytest.raises(ConfigError, match="nonoverlap_seq_len"):
        EvalConfig(nonoverlap_seq_len=-1).validate("eval")
