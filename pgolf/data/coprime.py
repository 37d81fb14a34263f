"""`data.loader=coprime`: coprime-stride multi-shard memmap loader (docs/techniques.md#coprime-stride-loader).

Every rank computes the same global plan from one RNG, so no communication is needed:

* Each shard has a cursor over its T-token blocks: a random phase in [0, T-1], the block count
  bc = (N - 1 - phase) // T, a random start and a random stride coprime to bc. Block k of the
  cursor is (start + k * stride) mod bc, so every block is visited exactly once before the cursor
  is redrawn (a new phase, start and stride).
* Each global batch mixes `mix` distinct shards, sampled without replacement with weights
  remaining_blocks ** alpha. Over the first `ramp` batches mix grows from max(mix_start, W) to
  max(mix_end, mix_start * W) and alpha falls from alpha_start to alpha_end, so early batches
  favour big untouched shards and later ones spread evenly.
* Each chosen shard gets one sequence plus a multinomial share of the rest; its blocks are
  shuffled, the shards interleaved in random round-robin order, and the global list of windows is
  dealt out with stride W (rank r takes windows r, r + W, ...).

The record seeds its RNG with a hash of the shard paths only. By default the file *names* (so a
copy of the data elsewhere gives the same plan) and the run seed (so seeds differ) are both mixed
in; `data.coprime_seed=paths` seeds it as PR #726 does (see `paths_seed`), so given the same path
strings the plan is PR #726's batch for batch, whatever the run seed. A shard whose cursor has
run out weighs 1 in the next draw (`coprime_exhausted=one`, the 2026-03-29 record) or as much as
an untouched shard (`fresh`, PR #726).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.sampling import ShardSet, check_seq_len, rng_from_state
from pgolf.data.shards import ShardError

_CURSOR_FIELDS = ("phase", "blocks", "taken", "start", "stride")


def fnv1a64(names: list[str]) -> int:
    """64-bit FNV-1a over the concatenated names: the same on every rank and machine."""
    h = 0xCBF29CE484222325
    for name in names:
        for b in name.encode():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# PR #726's hash is FNV-1a started from 1469598103934665603: the standard 64-bit offset basis
# (14695981039346656037) with its last digit missing. Its seeds follow from that value.
PR726_FNV_OFFSET = 1469598103934665603


def _pr726_hash(text: str) -> int:
    h = PR726_FNV_OFFSET
    for b in text.encode("utf-8", errors="surrogatepass"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def paths_seed(pattern: str, paths: list[str], num_tokens: list[int]) -> int:
    """PR #726's loader seed: its hash of the train glob pattern, then per shard XOR the hash of its
    path string and (token count * 0x9E3779B97F4A7C15) mod 2**64. The strings are the reference's
    os.path.join(DATA_PATH, pattern) and its sorted glob results, so the same DATA_PATH string
    (e.g. an absolute path) gives the same seed."""
    seed = _pr726_hash(pattern)
    for path, n in zip(paths, num_tokens):
        seed ^= _pr726_hash(path)
        seed ^= (int(n) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return seed


class CoprimeSampler:
    def __init__(
        self,
        files: list[Path],
        seed: int,
        rank: int,
        world_size: int,
        ramp_batches: int = 1800,
        mix_start: int = 8,
        mix_end: int = 32,
        alpha_start: float = 0.90,
        alpha_end: float = 0.50,
        exhausted: str = "one",
        pattern: str | None = None,
    ):
        """`pattern` (the train glob joined to data.path, as a string) switches to PR #726's
        seeding (`paths_seed` over it and the shard paths under data.path; `seed` is then unused)."""
        if exhausted not in ("one", "fresh"):
            raise ValueError(f"data.coprime_exhausted={exhausted!r} must be one or fresh")
        self.shards = ShardSet(files)
        self.rank, self.world_size = rank, world_size
        self.ramp_batches, self.mix_start, self.mix_end = ramp_batches, mix_start, mix_end
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.exhausted = exhausted
        if pattern is None:
            bits = np.random.PCG64([fnv1a64([Path(f).name for f in files]), seed])
        else:
            folder = os.path.dirname(pattern)
            paths = [os.path.join(folder, Path(f).name) for f in files]
            bits = np.random.PCG64(paths_seed(pattern, paths, self.shards.num_tokens.tolist()))
        self.rng = np.random.Generator(bits)
        n = len(self.shards)
        self.cursor = {k: np.zeros(n, dtype=np.int64) for k in _CURSOR_FIELDS}
        self.live = np.zeros(n, dtype=bool)  # cursor drawn at least once
        self.batches_built = 0
        self.seq_len: int | None = None

    def shape(self, local_tokens: int, seq_len: int) -> tuple[int, ...]:
        return (local_tokens // seq_len, seq_len + 1)

    # ------------------------------------------------------------------------------ cursors
    def _coprime_stride(self, bc: int) -> int:
        if bc <= 1:
            return 1
        while True:
            s = int(self.rng.integers(1, bc))
            if math.gcd(s, bc) == 1:
                return s

    def _redraw(self, si: int, seq_len: int) -> None:
        n = int(self.shards.num_tokens[si])
        max_phase = min(seq_len - 1, max(0, n - seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        bc = (n - 1 - phase) // seq_len
        c = self.cursor
        c["phase"][si], c["blocks"][si], c["taken"][si] = phase, bc, 0
        c["start"][si] = int(self.rng.integers(bc)) if bc > 1 else 0
        c["stride"][si] = self._coprime_stride(bc)
        self.live[si] = True

    def _take(self, si: int, seq_len: int, count: int) -> np.ndarray:
        """Start offsets of the next `count` blocks of shard si, redrawing the cursor when it runs out."""
        c, parts = self.cursor, []
        while count > 0:
            if not self.live[si] or c["taken"][si] >= c["blocks"][si]:
                self._redraw(si, seq_len)
            bc, k0 = int(c["blocks"][si]), int(c["taken"][si])
            k = min(count, bc - k0)
            order = (int(c["start"][si]) + np.arange(k0, k0 + k, dtype=np.int64) * int(c["stride"][si])) % bc
            parts.append(int(c["phase"][si]) + order * seq_len)
            c["taken"][si] = k0 + k
            count -= k
        return np.concatenate(parts)

    # ------------------------------------------------------------------------------ the plan
    def _global_windows(self, seq_len: int, global_seqs: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, start) of every window of the next global batch, in dealing order."""
        eligible = np.flatnonzero((self.shards.num_tokens - 1) // seq_len > 0)
        if eligible.size == 0:
            raise ShardError(
                f"no train shard holds more than seq_len={seq_len} tokens (largest: "
                f"{int(self.shards.num_tokens.max())}); use longer shards or a shorter train.seq_len"
            )
        c = self.cursor
        progress = min(self.batches_built / self.ramp_batches, 1.0)
        fresh = (self.shards.num_tokens[eligible] - 1) // seq_len
        left = c["blocks"][eligible] - c["taken"][eligible]
        # a run-out cursor (left == 0) is redrawn when next picked; until then it weighs 1 or fresh
        left = np.where(left > 0, left, 1 if self.exhausted == "one" else fresh)
        remaining = np.where(self.live[eligible], left, fresh).astype(np.float64)
        alpha = self.alpha_start + (self.alpha_end - self.alpha_start) * progress
        weights = remaining**alpha
        total = float(weights.sum())
        if not math.isfinite(total) or total <= 0.0:
            weights, total = np.ones_like(weights), float(weights.size)
        probs = weights / total

        ec, ws = int(eligible.size), self.world_size
        low = min(max(self.mix_start, ws), ec, global_seqs)
        high = min(max(self.mix_end, self.mix_start * ws), ec, global_seqs)
        mix = max(1, min(int(round(low + progress * (high - low))), ec, global_seqs))
        picked = self.rng.choice(ec, size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if global_seqs > mix:
            share = probs[picked] / probs[picked].sum()
            counts += self.rng.multinomial(global_seqs - mix, share)
        order = self.rng.permutation(mix)
        picked, counts = picked[order], counts[order]

        buckets: list[tuple[int, list[int]]] = []
        for p, cnt in zip(picked.tolist(), counts.tolist()):
            si = int(eligible[p])
            starts = self._take(si, seq_len, cnt)
            if starts.size > 1:
                starts = starts[self.rng.permutation(starts.size)]
            buckets.append((si, starts.tolist()))
        # Random round-robin: each round visits every non-empty shard once, in a fresh order,
        # so consecutive windows (and hence one rank's rows) come from different shards.
        shard_ids: list[int] = []
        window_starts: list[int] = []
        active = list(range(len(buckets)))
        while active:
            still = []
            for j in self.rng.permutation(len(active)).tolist():
                b = active[j]
                shard_ids.append(buckets[b][0])
                window_starts.append(buckets[b][1].pop())
                if buckets[b][1]:
                    still.append(b)
            active = still
        return np.asarray(shard_ids, dtype=np.int64), np.asarray(window_starts, dtype=np.int64)

    def plan(self, local_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance the plan by one global batch: this rank's rows as (shard ids, window starts)."""
        check_seq_len(self.seq_len, seq_len, "coprime")
        self.seq_len = seq_len
        rows = local_tokens // seq_len
        shard_ids, starts = self._global_windows(seq_len, rows * self.world_size)
        mine = slice(self.rank, None, self.world_size)
        self.batches_built += 1
        return shard_ids[mine], starts[mine]

    def gather(
        self, plan: tuple[np.ndarray, np.ndarray], out: np.ndarray, shards: ShardSet | None = None
    ) -> None:
        """Copy a plan's windows into `out`; reads only, so worker threads may run it concurrently."""
        (self.shards if shards is None else shards).read_windows(*plan, out)

    def fill(self, out: np.ndarray, local_tokens: int, seq_len: int) -> None:
        self.gather(self.plan(local_tokens, seq_len), out)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "cursor": {k: v.tolist() for k, v in self.cursor.items()},
            "live": self.live.tolist(),
            "batches_built": self.batches_built,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.cursor = {k: np.asarray(state["cursor"][k], dtype=np.int64) for k in _CURSOR_FIELDS}
        self.live = np.asarray(state["live"], dtype=bool)
        self.batches_built = int(state["batches_built"])
        self.seq_len = state["seq_len"]


def _paths_pattern(cfg: Any) -> str | None:
    """The train glob as PR #726 hashes it (data.coprime_seed=paths), else None."""
    if getattr(cfg, "coprime_seed", "run") != "paths":
        return None
    if not hasattr(cfg, "path"):
        raise ValueError(
            "data.coprime_seed=paths hashes the shard paths under data.path, which this data source has "
            "not; use data=shards (or fineweb_*) or data.coprime_seed=run"
        )
    return os.path.join(str(cfg.path), cfg.train_pattern)


def build(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: Any) -> Any:
    """`data.loader=coprime` for this rank, with its `cfg.coprime_*` settings."""
    from pgolf.data.loader import Loader  # the device side (torch); the sampler stays numpy-only

    sampler = CoprimeSampler(
        files,
        seed,
        rank,
        world_size,
        ramp_batches=cfg.coprime_mix_ramp_batches,
        mix_start=cfg.coprime_mix_start,
        mix_end=cfg.coprime_mix_end,
        alpha_start=cfg.coprime_alpha_start,
        alpha_end=cfg.coprime_alpha_end,
        exhausted=getattr(cfg, "coprime_exhausted", "one"),
        pattern=_paths_pattern(cfg),
    )
    return Loader.for_config(cfg, sampler, rank, world_size, device)
