"""`data.loader=sequential`: the baseline's stream (docs/techniques.md#sequential-loader).

Shards are read in sorted order and wrap around. Every micro-batch consumes one contiguous chunk of
world_size * (local_tokens + 1) tokens; rank r gets the r-th span of local_tokens + 1 (the +1 gives
the shifted targets). With grad_accum = 8 // world_size, the micro-batches of all ranks over one
step are exactly the 8 micro-batches one process reads, so every world size sees the same data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.sampling import ShardSet
from pgolf.data.shards import ShardError


class SequentialSampler:
    def __init__(self, files: list[Path], rank: int, world_size: int):
        self.shards = ShardSet(files)
        if not self.shards.num_tokens.any():
            raise ShardError(f"every train shard is empty ({self.shards.files[0]}, ...); re-export them")
        self.rank, self.world_size = rank, world_size
        self.file_idx = 0
        self.pos = 0

    def shape(self, local_tokens: int, seq_len: int) -> tuple[int, ...]:
        return (local_tokens + 1,)

    def _advance(self, n: int, segments: list[tuple[int, int, int]] | None = None) -> None:
        """Move n tokens along the wrapping stream, recording their (shard, start, count) pieces in
        `segments` when given."""
        done = 0
        while done < n:
            k = min(n - done, int(self.shards.num_tokens[self.file_idx]) - self.pos)
            if k <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.shards)
                self.pos = 0
                continue
            if segments is not None:
                segments.append((self.file_idx, self.pos, k))
            self.pos += k
            done += k

    def plan(self, local_tokens: int, seq_len: int) -> list[tuple[int, int, int]]:
        """Advance past one micro-batch of every rank: this rank's span as (shard, start, count) pieces."""
        span = local_tokens + 1
        segments: list[tuple[int, int, int]] = []
        self._advance(self.rank * span)  # the spans of lower ranks: skipped, never copied
        self._advance(span, segments)
        self._advance((self.world_size - 1 - self.rank) * span)
        return segments

    def gather(
        self, plan: list[tuple[int, int, int]], out: np.ndarray, shards: ShardSet | None = None
    ) -> None:
        """Copy a plan's pieces into `out`; reads only, so worker threads may run it concurrently."""
        shards = self.shards if shards is None else shards
        done = 0
        for si, pos, k in plan:
            out[done : done + k] = shards.tokens(si)[pos : pos + k]
            done += k

    def fill(self, out: np.ndarray, local_tokens: int, seq_len: int) -> None:
        self.gather(self.plan(local_tokens, seq_len), out)

    def state_dict(self) -> dict[str, Any]:
        return {"file_idx": self.file_idx, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.file_idx, self.pos = int(state["file_idx"]), int(state["pos"])


def build(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: Any) -> Any:
    """`data.loader=sequential` for this rank (the stream does not depend on the seed)."""
    from pgolf.data.loader import Loader  # the device side (torch); the sampler stays numpy-only

    return Loader.for_config(cfg, SequentialSampler(files, rank, world_size), rank, world_size, device)
