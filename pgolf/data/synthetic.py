"""`data.loader=synthetic`: uniform random tokens generated on the device. For benchmarks only.

It does no host work at all, so its step time is the floor that a real loader is measured
against (bench/loaders.sh). Training on it learns nothing about text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class SyntheticLoader:
    def __init__(self, vocab_size: int, seed: int, rank: int, world_size: int, device: torch.device):
        self.vocab_size, self.rank, self.world_size, self.device = vocab_size, rank, world_size, device
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.batches = 0

    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = global_tokens // (self.world_size * grad_accum * seq_len)
        # Seeded per batch from (seed, rank, index): deterministic, resumable from a batch count,
        # and the seeding is a host-side integer write, not a device sync.
        self.generator.manual_seed(
            ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.batches) % (1 << 63)
        )
        self.batches += 1
        t = torch.randint(
            0, self.vocab_size, (rows, seq_len + 1), device=self.device, generator=self.generator
        )
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "loader": "synthetic",
            "rank": self.rank,
            "world_size": self.world_size,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])

    def close(self) -> None:
        pass  # nothing runs in the background

    def __enter__(self) -> SyntheticLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: torch.device):
    """`data.loader=synthetic` for this rank (the shard files are not read)."""
    return SyntheticLoader(cfg.vocab_size, seed=seed, rank=rank, world_size=world_size, device=device)
