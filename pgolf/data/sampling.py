"""What every host-side batch sampler shares: the interface and memmapped shard access.

A sampler decides *which* tokens form the next micro-batch of one rank and copies them into a
uint16 buffer; `pgolf.data.loader` owns everything after that (threads, pinned memory, the device
copy). Keeping samplers pure numpy makes them deterministic, thread-agnostic and testable on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pgolf.data.shards import HEADER_BYTES, ShardError, load_tokens, read_header


class HostSampler(Protocol):
    def shape(self, local_tokens: int, seq_len: int) -> tuple[int, ...]:
        """Shape of the uint16 buffer one micro-batch needs: (local+1,) for a span, (rows, T+1) for windows."""
        ...

    def fill(self, out: np.ndarray, local_tokens: int, seq_len: int) -> None:
        """Write the next micro-batch of this rank into `out` and advance."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position, as plain values: loading it makes the next `fill` repeat exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PlannedSampler(HostSampler, Protocol):
    """A sampler whose `fill` is `gather(plan(...))`: every decision (RNG draws, cursors) is in
    `plan`, and `gather` only reads shards. Plans made in order on one thread and gathered by any
    number of threads give exactly the batches of `fill` (`data.prefetch_threads`)."""

    def plan(self, local_tokens: int, seq_len: int) -> Any:
        """Advance by one micro-batch and return what `gather` needs to copy its tokens."""
        ...

    def gather(self, plan: Any, out: np.ndarray, shards: ShardSet | None = None) -> None:
        """Copy a plan's tokens into `out` (from `shards` if given); never changes the sampler."""
        ...


class ShardSet:
    """Token counts of every shard (headers read once) and lazily opened read-only memmaps."""

    def __init__(self, files: list[Path]):
        if not files:
            raise ShardError("no train shards given to the loader; check data.path and data.train_pattern")
        self.files = list(files)
        self.num_tokens = np.array([read_header(f) for f in self.files], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def tokens(self, i: int) -> np.ndarray:
        mm = self._maps.get(i)
        if mm is None:
            # Opening costs nothing until pages are touched, so 100+ shards of 200 MB stay cheap.
            mm = self._maps[i] = load_tokens(self.files[i], mmap=True)
        return mm

    def read_windows(self, shard_ids: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
        """out[k] = shard[shard_ids[k]][starts[k] : starts[k] + out.shape[1]]."""
        width = out.shape[1]
        for k, (si, pos) in enumerate(zip(shard_ids.tolist(), starts.tolist())):
            out[k] = self.tokens(si)[pos : pos + width]


def check_seq_len(expected: int | None, seq_len: int, loader: str) -> None:
    # Window plans are laid out in units of seq_len; a change would silently mix two plans.
    if expected is not None and expected != seq_len:
        raise ValueError(
            f"data.loader={loader} was started with seq_len={expected} and cannot switch to {seq_len}; "
            "build a new loader for a new sequence length"
        )


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    bitgen = np.random.PCG64()
    bitgen.state = state
    return np.random.Generator(bitgen)


# ---------------------------------------------------------------------------------------------
# token ids beyond the vocabulary
# ---------------------------------------------------------------------------------------------
# open_shards reads only the head of each train shard, so an id >= vocab further in would reach the
# embedding (an IndexError on CPU, a device-side assert on CUDA). Every batch is checked on the host
# with one max() (microseconds, in the producer thread when prefetching); only when it fails is the
# batch replayed through checking reads, to name the shard file and offset.


def check_batch_vocab(
    sampler: Any, out: np.ndarray, key: tuple[int, int], vocab_size: int, before: dict[str, Any] | None
) -> None:
    """Raise a ShardError naming the file and offset if `out` (just filled from sampler state
    `before`) holds a token id >= vocab_size."""
    if out.size == 0 or int(out.max()) < vocab_size:
        return
    top = int(out.max())
    shards = getattr(sampler, "shards", None)
    if before is not None and isinstance(shards, ShardSet):
        sampler.load_state_dict(before)
        sampler.shards = _CheckedShards(shards, vocab_size)
        try:
            sampler.fill(np.empty(out.shape, dtype=np.uint16), *key)
        except ShardError as e:
            raise e from None
        finally:
            sampler.shards = shards
    raise _vocab_error(top, vocab_size)


def check_planned_vocab(sampler: Any, plan: Any, out: np.ndarray, vocab_size: int) -> None:
    """`check_batch_vocab` for a batch gathered from `plan`: the replay gathers the plan again
    through checking reads, leaving the sampler (which may have planned further) untouched."""
    if out.size == 0 or int(out.max()) < vocab_size:
        return
    top = int(out.max())
    if isinstance(sampler.shards, ShardSet):
        sampler.gather(plan, np.empty(out.shape, dtype=np.uint16), _CheckedShards(sampler.shards, vocab_size))
    raise _vocab_error(top, vocab_size)


def _vocab_error(top: int, vocab_size: int) -> ShardError:
    return ShardError(
        f"a training batch holds token id {top} but data.vocab_size={vocab_size}; one of the train shards "
        "was written with another tokenizer or is corrupt: re-export or re-download them"
    )


class _CheckedTokens:
    """A shard's memmap whose slices are checked against the vocabulary (the replay only)."""

    def __init__(self, path: Path, tokens: np.ndarray, vocab_size: int):
        self.path, self.tokens, self.vocab_size = path, tokens, vocab_size
        self.size = tokens.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> np.ndarray:
        chunk = self.tokens[span]
        bad = np.flatnonzero(chunk >= self.vocab_size)
        if bad.size:
            offset = (span.start or 0) + int(bad[0])
            raise ShardError(
                f"{self.path}: token id {int(chunk[bad[0]])} at token offset {offset:,} (byte "
                f"{HEADER_BYTES + 2 * offset:,}) is >= data.vocab_size={self.vocab_size}; only the first "
                "1M tokens of each train shard are checked before training. The shard was written with "
                "another tokenizer or is corrupt: re-export it (python -m pgolf.data build) or delete it "
                "and download it again, or point data.tokenizer_path/data.vocab_size at its tokenizer"
            )
        return chunk


class _CheckedShards(ShardSet):
    """The same shards, read through `_CheckedTokens`."""

    def __init__(self, inner: ShardSet, vocab_size: int):
        self.__dict__.update(inner.__dict__)
        self.vocab_size = vocab_size

    def tokens(self, i: int) -> np.ndarray:
        return _CheckedTokens(self.files[i], super().tokens(i), self.vocab_size)  # type: ignore[return-value]
