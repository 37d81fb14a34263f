"""`data.loader=doc_packing` against PR #1775's DocumentPackingLoader rule, written out plainly.

The rule (the PR's train_gpt.py, DocumentPackingLoader._init_shard / _prepare_batch): the cursor
starts at the shard's first BOS (0 without one); a call takes world * (local + 1) tokens from the
cursor, rank r the r-th local + 1 of them; when the cursor plus that count passes the shard's end,
the next shard (cycling in sorted order) is loaded and the cursor goes to its first BOS. The
reference below keeps every shard as a Python list and finds the BOS with list.index.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tokens

from pgolf.data.doc_packing import BOS_ID, first_bos
from pgolf.data.loader import build_loader
from pgolf.data.shards import ShardError
from pgolf.models.docmask import segment_ids

CPU = torch.device("cpu")
# Shards of random non-BOS ids with documents starting at random places. Shard 0 starts mid
# document, shard 2 has no BOS at all, shard 3 is too short for most chunks.
SHARD_SPECS = [(1900, 7), (1300, 0), (1500, None), (90, 0), (2200, 31)]


def make_shard(rng: np.random.Generator, n: int, first: int | None) -> np.ndarray:
    tokens = rng.integers(2, 900, size=n)
    if first is not None:
        tokens[first] = BOS_ID
        docs = rng.choice(np.arange(first + 1, n), size=max(1, n // 150), replace=False)
        tokens[docs] = BOS_ID
    return tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[Path], list[list[int]]]:
    folder = tmp_path_factory.mktemp("doc_packing_shards")
    rng = np.random.default_rng(1775)
    files, lists = [], []
    for s, (n, first) in enumerate(SHARD_SPECS):
        tokens = make_shard(rng, n, first)
        path = folder / f"fineweb_train_{s:06d}.bin"
        write_tokens(path, tokens)
        files.append(path)
        lists.append(tokens.tolist())
    return files, lists


def script_rule(shards: list[list[int]], world: int, grad_accum: int, global_tokens: int, calls: int):
    """[call][rank] -> the tokens (inputs + the last target) the script's loader hands that rank."""
    local = global_tokens // (world * grad_accum)
    per_rank = local + 1
    whole = per_rank * world

    def bos_or_zero(tokens: list[int]) -> int:
        return tokens.index(BOS_ID) if BOS_ID in tokens else 0

    shard = 0
    cursor = bos_or_zero(shards[0])
    out = []
    for _ in range(calls):
        while cursor + whole > len(shards[shard]):
            shard = (shard + 1) % len(shards)
            cursor = bos_or_zero(shards[shard])
        out.append([shards[shard][cursor + r * per_rank : cursor + (r + 1) * per_rank] for r in range(world)])
        cursor += whole
    return out


def data_cfg(loader: str, prefetch: int = 0, threads: int = 1) -> SimpleNamespace:
    return SimpleNamespace(loader=loader, prefetch=prefetch, prefetch_threads=threads, vocab_size=1024)


def spans(files, loader: str, rank: int, world: int, global_tokens: int, seq_len: int, calls: int, **kw):
    grad_accum = 8 // world
    with build_loader(data_cfg(loader, **kw), files, seed=0, rank=rank, world_size=world, device=CPU) as ld:
        got = []
        for _ in range(calls):
            x, y = ld.next_batch(global_tokens, seq_len, grad_accum)
            assert torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
            got.append(torch.cat((x.reshape(-1), y.reshape(-1)[-1:])).tolist())
    return got


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("rows", [1, 3])  # one long row per rank (PR #1775) or several rows
def test_doc_packing_yields_the_scripts_batches(shards, world, rows):
    files, lists = shards
    seq_len = 24
    global_tokens = seq_len * rows * 8  # 8 micro-batches of one process, split over the ranks
    calls = 60  # crosses every shard, skips tails, and cycles the shard list
    ref = script_rule(lists, world, 8 // world, global_tokens, calls)
    for rank in range(world):
        got = spans(files, "doc_packing", rank, world, global_tokens, seq_len, calls)
        assert got == [call[rank] for call in ref]


def test_the_old_sequential_stream_differs(shards):
    """The experiment's previous loader: shard 0 read from token 0 and chunks crossing shards."""
    files, lists = shards
    ref = script_rule(lists, 8, 1, 64 * 8, 40)
    got = spans(files, "sequential", 0, 8, 64 * 8, 64, 40)
    assert got != [call[0] for call in ref]


@pytest.mark.parametrize("prefetch,threads", [(3, 1), (4, 3)])
def test_prefetch_gives_the_same_batches(shards, prefetch, threads):
    files, _ = shards
    plain = spans(files, "doc_packing", 1, 2, 48 * 8, 48, 30)
    assert spans(files, "doc_packing", 1, 2, 48 * 8, 48, 30, prefetch=prefetch, threads=threads) == plain


def test_state_dict_resumes_exactly(shards):
    files, _ = shards
    cfg = data_cfg("doc_packing")
    with build_loader(cfg, files, seed=0, rank=0, world_size=2, device=CPU) as ld:
        for _ in range(17):
            ld.next_batch(32 * 8, 32, 4)
        state = ld.state_dict()
        rest = [ld.next_batch(32 * 8, 32, 4)[0] for _ in range(20)]
    with build_loader(cfg, files, seed=5, rank=0, world_size=2, device=CPU) as ld:
        ld.load_state_dict(state)
        assert all(torch.equal(a, ld.next_batch(32 * 8, 32, 4)[0]) for a in rest)


def test_document_cuts_are_the_scripts(shards):
    """The model's segments of a doc_packing row: a segment at the row start, at every BOS, and
    every max_len tokens from each of those (the script's _build_cu_seqlens with max_doc_len)."""
    files, lists = shards
    max_len = 40
    for span in spans(files, "doc_packing", 0, 1, 200 * 8, 200, 12):
        x = span[:-1]
        starts = []
        bos = [i for i, t in enumerate(x) if t == BOS_ID]
        heads = ([0] if not bos or bos[0] != 0 else []) + bos
        for a, b in zip(heads, heads[1:] + [len(x)]):
            starts += list(range(a, b, max_len))
        seg = segment_ids(torch.tensor([x]), BOS_ID, max_len)[0]
        got = [0] + [i for i in range(1, len(x)) if seg[i] != seg[i - 1]]
        assert got == starts


def test_first_bos_scans_past_the_first_block():
    tokens = np.full(3 * (1 << 20) + 5, 7, dtype=np.uint16)
    assert first_bos(tokens) == 0  # none: from the start
    tokens[(1 << 20) + 3] = BOS_ID
    assert first_bos(tokens) == (1 << 20) + 3


def test_too_short_shards_fail_clearly(shards):
    files, _ = shards
    with build_loader(data_cfg("doc_packing"), files, seed=0, rank=0, world_size=1, device=CPU) as ld:
        with pytest.raises(ShardError, match="no train shard"):
            ld.next_batch(2400 * 8, 2400, 8)
