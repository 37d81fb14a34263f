"""A token id >= vocab past the head that open_shards scans is refused by file and offset when a batch
reads it, with every loader, prefetch on or off (one or several threads), instead of an IndexError inside the embedding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tokens

from pgolf.data.loader import build_loader
from pgolf.data.shards import HEADER_BYTES, ShardError
from pgolf.data.source import open_shards

VOCAB = 400
HEAD = 1 << 20  # what open_shards reads of every train shard after the first
BAD_AT = HEAD + 5_000  # past the head
SHARD = HEAD + 8_192


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_tail")
    rng = np.random.default_rng(0)
    write_tokens(out / "fineweb_val_000000.bin", rng.integers(0, VOCAB, 4096))
    write_tokens(out / "fineweb_train_000000.bin", rng.integers(0, VOCAB, 4096))
    tokens = rng.integers(0, VOCAB, SHARD)
    tokens[BAD_AT] = 1000  # written with another tokenizer, say
    write_tokens(out / "fineweb_train_000001.bin", tokens)
    return out


def _cfg(loader: str, prefetch: int, threads: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        loader=loader,
        prefetch=prefetch,
        prefetch_threads=threads,
        vocab_size=VOCAB,
        coprime_mix_ramp_batches=10,
        coprime_mix_start=2,
        coprime_mix_end=4,
        coprime_alpha_start=0.9,
        coprime_alpha_end=0.5,
        shuffled_seed="run",
    )


@pytest.mark.parametrize("prefetch, threads", [(0, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("loader", ["sequential", "coprime", "shuffled"])
def test_an_id_beyond_vocab_is_named_by_file_and_offset(folder, tokenizer_model, loader, prefetch, threads):
    src = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, VOCAB)  # passes
    ld = build_loader(
        _cfg(loader, prefetch, threads),
        src.train_files,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
    )
    emb = torch.nn.Embedding(VOCAB, 4)
    seen = 0
    with pytest.raises((ShardError, RuntimeError)) as e:
        while seen < 4 * (SHARD + 4096):  # every token several times over: the bad one is met
            x, _ = ld.next_batch(65_536, 64, 1)
            emb(x)  # what the model would do with the batch
            seen += x.numel()
    ld.close()
    msg = str(e.value)
    bad = folder / "fineweb_train_000001.bin"
    assert f"{bad}: token id 1000 at token offset {BAD_AT:,} (byte {HEADER_BYTES + 2 * BAD_AT:,})" in msg
    assert "data.vocab_size=400" in msg and "re-export it" in msg


def test_the_check_costs_no_replay_on_clean_batches(folder, monkeypatch):
    """The replay (checking reads) runs only for a failing batch: clean ones cost one max()."""
    from pgolf.data import sampling

    def no_replay(*a, **k):
        raise AssertionError("a clean batch was replayed")

    monkeypatch.setattr(sampling._CheckedShards, "__init__", no_replay)
    files = [folder / "fineweb_train_000000.bin"]
    ld = build_loader(_cfg("sequential", 0), files, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    for _ in range(5):
        ld.next_batch(4096, 64, 1)
    ld.close()
