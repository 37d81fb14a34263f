"""`data.loader=doc_packing`: the DocumentPackingLoader of the document-packing records (PR #1775).

docs/techniques.md#document-packing-loader

Like `sequential`, every micro-batch is one contiguous chunk of world_size * (local_tokens + 1)
tokens and rank r gets its r-th span of local_tokens + 1 (the +1 gives the shifted targets; spans
do not overlap, so the last token of a span is a target only). What differs is where chunks may
lie: one chunk never crosses a shard boundary. Each shard is read from its first BOS (from 0 when
it has none); when the rest of the current shard cannot hold the next chunk, that tail is skipped
and reading resumes at the next shard's first BOS, the shards cycling in sorted order. So, unlike
`sequential`, the stream depends on the world size (grad_accum = 8 // world_size changes the chunk
length). Documents inside a span are cut by the model (`model.doc_mask`, `model.doc_max_len`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.sampling import ShardSet
from pgolf.data.shards import ShardError

# The challenge's SentencePiece exports put <s> at id 1, and the records' loader hard-codes it.
BOS_ID = 1
_SCAN = 1 << 20  # tokens searched at a time for a shard's first BOS (it is near the start)


def first_bos(tokens: np.ndarray, bos_id: int = BOS_ID) -> int:
    """Position of the first `bos_id` in `tokens`, or 0 when there is none."""
    for lo in range(0, tokens.size, _SCAN):
        hits = np.flatnonzero(tokens[lo : lo + _SCAN] == bos_id)
        if hits.size:
            return lo + int(hits[0])
    return 0


class DocPackingSampler:
    def __init__(self, files: list[Path], rank: int, world_size: int):
        self.shards = ShardSet(files)
        self.rank, self.world_size = rank, world_size
        self._starts: dict[int, int] = {}  # shard -> its first BOS, found once
        self.file_idx = 0
        self.cursor = self._start(0)

    def _start(self, si: int) -> int:
        if si not in self._starts:
            self._starts[si] = first_bos(self.shards.tokens(si))
        return self._starts[si]

    def shape(self, local_tokens: int, seq_len: int) -> tuple[int, ...]:
        return (local_tokens + 1,)

    def plan(self, local_tokens: int, seq_len: int) -> list[tuple[int, int, int]]:
        """Advance past one micro-batch of every rank: this rank's span as one (shard, start, count)."""
        span = local_tokens + 1
        chunk = span * self.world_size
        skipped = 0
        while self.cursor + chunk > int(self.shards.num_tokens[self.file_idx]):
            skipped += 1
            if skipped > len(self.shards):  # every shard tried from its first BOS: none can hold it
                raise ShardError(
                    f"data.loader=doc_packing needs {chunk:,} tokens after a shard's first BOS for one "
                    f"micro-batch of all ranks, but no train shard ({self.shards.files[0]}, ...) has "
                    "that many; use longer shards or a smaller train.batch_tokens"
                )
            self.file_idx = (self.file_idx + 1) % len(self.shards)
            self.cursor = self._start(self.file_idx)
        start = self.cursor + self.rank * span
        self.cursor += chunk
        return [(self.file_idx, start, span)]

    def gather(
        self, plan: list[tuple[int, int, int]], out: np.ndarray, shards: ShardSet | None = None
    ) -> None:
        """Copy a plan's span into `out`; reads only, so worker threads may run it concurrently."""
        shards = self.shards if shards is None else shards
        (si, pos, k) = plan[0]
        out[:k] = shards.tokens(si)[pos : pos + k]

    def fill(self, out: np.ndarray, local_tokens: int, seq_len: int) -> None:
        self.gather(self.plan(local_tokens, seq_len), out)

    def state_dict(self) -> dict[str, Any]:
        return {"file_idx": self.file_idx, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.file_idx, self.cursor = int(state["file_idx"]), int(state["cursor"])


def build(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: Any) -> Any:
    """`data.loader=doc_packing` for this rank (the stream does not depend on the seed)."""
    from pgolf.data.loader import Loader  # the device side (torch); the sampler stays numpy-only

    return Loader.for_config(cfg, DocPackingSampler(files, rank, world_size), rank, world_size, device)
