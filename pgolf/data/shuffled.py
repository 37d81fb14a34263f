"""`data.loader=shuffled`: the ShuffledSequenceLoader of the 2026-04-05+ records.

docs/techniques.md#shuffled-sequence-loader

Rank r owns the shards files[r::W] (no shard is shared, so ranks never see the same token) and its
own RNG. Each shard gets a random phase in [0, T-1] and a random permutation of its T-token windows
starting at phase + k*T. Each row of a batch picks a shard with probability proportional to the
windows it has left and pops one; when all of the rank's windows are used, every shard is redrawn.
So within one such epoch each window of the rank's shards is seen exactly once.

The record seeds rank r's RNG with r alone; here it is (seed, rank), so seeds differ too.
`record_batches` draws the record's own stream (RNG from the rank alone), which PR #1775 calibrates
GPTQ on (quant.calibration.source=shuffled).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.sampling import ShardSet, check_seq_len, rng_from_state
from pgolf.data.shards import ShardError


class ShuffledSampler:
    def __init__(
        self, files: list[Path], seed: int, rank: int, world_size: int, rng_key: int | list[int] | None = None
    ):
        """`rng_key` seeds the RNG instead of (seed, rank): the record's rank alone, say."""
        mine = list(files)[rank::world_size]
        if not mine:
            raise ShardError(
                f"data.loader=shuffled gives each rank its own shards, but there are {len(files)} train "
                f"shard(s) for {world_size} ranks; use more shards or data.loader=coprime"
            )
        self.shards = ShardSet(mine)
        self.rng = np.random.Generator(np.random.PCG64([seed, rank] if rng_key is None else rng_key))
        n = len(self.shards)
        self.starts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        self.left = np.zeros(n, dtype=np.int64)  # windows not yet popped; they are starts[:left]
        # The RNG state just before each shard's last redraw: its permutation can be rebuilt from
        # it, so the state dict stays a few hundred bytes instead of every shard's window list.
        self.redraw_states: list[dict | None] = [None] * n
        self.seq_len: int | None = None

    def shape(self, local_tokens: int, seq_len: int) -> tuple[int, ...]:
        return (local_tokens // seq_len, seq_len + 1)

    def _draw(self, si: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        n = int(self.shards.num_tokens[si])
        max_phase = min(seq_len - 1, max(0, n - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = max((n - 1 - phase) // seq_len, 0)
        return phase + rng.permutation(count).astype(np.int64) * seq_len

    def _redraw_all(self, seq_len: int) -> None:
        for si in range(len(self.shards)):
            self.redraw_states[si] = self.rng.bit_generator.state
            self.starts[si] = self._draw(si, seq_len, self.rng)
            self.left[si] = self.starts[si].size
        if not self.left.any():
            raise ShardError(
                f"no train shard of rank's subset ({self.shards.files[0]}, ...) holds more than "
                f"seq_len={seq_len} tokens; use longer shards or a shorter train.seq_len"
            )

    def plan(self, local_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance the RNG and window lists by one micro-batch: its rows' (shard ids, starts)."""
        check_seq_len(self.seq_len, seq_len, "shuffled")
        if self.seq_len is None:
            self.seq_len = seq_len
            self._redraw_all(seq_len)
        n = len(self.shards)
        rows = local_tokens // seq_len
        shard_ids = np.empty(rows, dtype=np.int64)
        starts = np.empty(rows, dtype=np.int64)
        for row in range(rows):
            total = int(self.left.sum())
            if total == 0:
                self._redraw_all(seq_len)
                total = int(self.left.sum())
            si = int(self.rng.choice(n, p=self.left / total))
            self.left[si] -= 1
            shard_ids[row] = si
            starts[row] = self.starts[si][self.left[si]]  # pop from the end, as list.pop() does
        return shard_ids, starts

    def gather(
        self, plan: tuple[np.ndarray, np.ndarray], out: np.ndarray, shards: ShardSet | None = None
    ) -> None:
        """Copy a plan's windows into `out`; reads only, so worker threads may run it concurrently."""
        (self.shards if shards is None else shards).read_windows(*plan, out)

    def fill(self, out: np.ndarray, local_tokens: int, seq_len: int) -> None:
        self.gather(self.plan(local_tokens, seq_len), out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "left": self.left.tolist(),
            "redraw_states": list(self.redraw_states),
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seq_len = state["seq_len"]
        self.redraw_states = list(state["redraw_states"])
        for si, saved in enumerate(self.redraw_states):
            if saved is not None and self.seq_len is not None:
                self.starts[si] = self._draw(si, self.seq_len, rng_from_state(saved))
        self.left = np.asarray(state["left"], dtype=np.int64)
        self.rng = rng_from_state(state["rng"])


def record_batches(
    files: list[Path],
    world_size: int,
    batches: int,
    local_tokens: int,
    seq_len: int,
    share: int = 0,
    shares: int = 1,
) -> Iterator[np.ndarray]:
    """The first `batches` micro-batches rank 0 of a `world_size`-rank record run draws from a fresh
    ShuffledSequenceLoader (shards 0::world_size, RNG from rank 0 alone), as uint16 (rows, T+1)
    windows of local_tokens // seq_len rows; only those with index = share mod shares are read and
    yielded, so `shares` processes split the stream between them and every draw stays in order."""
    if local_tokens < seq_len:
        raise ValueError(
            f"a micro-batch of {local_tokens} tokens holds no {seq_len}-token row; lower "
            "quant.calibration.shuffled_seq_len or raise train.batch_tokens"
        )
    sampler = ShuffledSampler(files, 0, 0, world_size, rng_key=0)
    for i in range(batches):
        plan = sampler.plan(local_tokens, seq_len)
        if i % shares == share:
            out = np.empty(sampler.shape(local_tokens, seq_len), dtype=np.uint16)
            sampler.gather(plan, out)
            yield out


def build(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: Any) -> Any:
    """`data.loader=shuffled` for this rank."""
    from pgolf.data.loader import Loader  # the device side (torch); the sampler stays numpy-only

    rng_key = rank if cfg.shuffled_seed == "rank" else None  # the records key by rank alone
    sampler = ShuffledSampler(files, seed, rank, world_size, rng_key=rng_key)
    return Loader.for_config(cfg, sampler, rank, world_size, device)
