"""Training batches on the device: `build_loader(cfg, files, ...)` -> `next_batch(...) -> (x, y)`.

A host sampler (sequential / coprime / shuffled, pure numpy) picks the tokens; this module moves
them to the device. Tokens travel as uint16 (half the bytes of int32) and become int64 on the
device. With `data.prefetch = N > 0`, a producer thread keeps up to N batches ready in pinned
memory, the copy of the *next* batch is issued on a side CUDA stream as soon as the current one is
handed out, and the compute stream only waits on that copy's event, so the step never waits for
the host. With `data.prefetch_threads = M > 1`, one thread plans the batches in order and M threads
gather their tokens (`pgolf.data.parallel_prefetch`). Prefetch changes timing only: batches are
identical with it on or off and with any number of threads.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pgolf.components import LOADERS
from pgolf.data.prefetch import BufferPool, HostBatch, Producer, produce


def to_xy(buf: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int16-viewed tokens -> int64 (x, y) of shape (rows, seq_len). A 1-D span of rows*T+1 tokens
    gives two shifted views of one tensor; (rows, T+1) windows give each row's first and last T."""
    tokens = buf.to(torch.int64).bitwise_and_(0xFFFF)  # undo the int16 view: ids up to 65535
    if tokens.dim() == 1:
        return tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@dataclass
class _Staged:
    x: torch.Tensor
    y: torch.Tensor
    event: torch.cuda.Event | None
    key: tuple[int, int]
    state: dict[str, Any]


class Loader:
    def __init__(
        self,
        name: str,
        sampler: Any,
        rank: int,
        world_size: int,
        device: torch.device,
        prefetch: int = 0,
        vocab_size: int | None = None,
        prefetch_threads: int = 1,
        pin_memory: bool = True,
    ):
        self.name, self.sampler = name, sampler
        self.vocab_size = vocab_size  # every batch's ids are checked against it on the host
        self.rank, self.world_size, self.device = rank, world_size, device
        self.prefetch = prefetch
        self.prefetch_threads = prefetch_threads  # > 1: one planner thread and this many gatherers
        self.cuda = device.type == "cuda"
        # Sync mode needs two buffers (one being copied, one being filled); prefetch needs room for
        # the queue, the one being filled and the one whose copy is in flight.
        self.pool = BufferPool(pin=self.cuda and pin_memory, capacity=prefetch + 3 if prefetch else 2)
        self.stream = torch.cuda.Stream(device) if (self.cuda and prefetch) else None
        self._state = sampler.state_dict()  # position after the last batch handed out
        self._producer: Producer | None = None
        self._staged: _Staged | None = None
        self._key: tuple[int, int] | None = None
        self._closed = False

    @classmethod
    def for_config(cls, cfg: Any, sampler: Any, rank: int, world_size: int, device: torch.device) -> Loader:
        """The device side of data loader `cfg.loader` around its host sampler, as `cfg` sets it."""
        return cls(
            cfg.loader,
            sampler,
            rank,
            world_size,
            device,
            prefetch=cfg.prefetch,
            vocab_size=cfg.vocab_size,
            # schemas carry both (LoaderFields); a bare namespace gets the one-thread, pinned default
            prefetch_threads=getattr(cfg, "prefetch_threads", 1),
            pin_memory=getattr(cfg, "pin_memory", True),
        )

    # ------------------------------------------------------------------------------ batches
    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise RuntimeError("next_batch on a closed loader")
        local = global_tokens // (self.world_size * grad_accum)
        if local < seq_len or local % seq_len:
            raise ValueError(
                f"each rank's micro-batch is {local} tokens, not a positive multiple of seq_len={seq_len}; "
                "check train.batch_tokens, train.grad_accum_base and the world size"
            )
        key = (local, seq_len)
        if not self.prefetch:
            batch = self._copy(
                produce(self.sampler, self.pool, key, None, self.vocab_size, self._state), stream=None
            )
        else:
            if key != self._key:
                self._restart(key)
            batch = (
                self._staged if self._staged is not None else self._copy(self._producer.get(), self.stream)
            )
            # Issue the next copy now, so it overlaps this step; never block on the producer here.
            ready = self._producer.get(block=False)
            self._staged = self._copy(ready, self.stream) if ready is not None else None
        self._state = batch.state
        if batch.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.event)
            # x and y were allocated on the side stream: tell the allocator the compute stream uses them.
            batch.x.record_stream(current)
            batch.y.record_stream(current)
        return batch.x, batch.y

    def _copy(self, item: HostBatch, stream: torch.cuda.Stream | None) -> _Staged:
        """Host buffer -> device (x, y); the buffer goes back to the pool tagged with the copy's event."""
        event = None
        if self.cuda:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                x, y = to_xy(item.buf.to(self.device, non_blocking=True), item.key[1])
                event = torch.cuda.Event()
                event.record()
            self.pool.release(item.buf, event)
            if stream is None:
                event = None  # same stream as the step: ordering is implicit
        else:
            x, y = to_xy(item.buf, item.key[1])  # a fresh tensor: the buffer can be refilled at once
            self.pool.release(item.buf)
        return _Staged(x, y, event, item.key, item.state)

    def _restart(self, key: tuple[int, int]) -> None:
        """(Re)start the producer for a batch shape, from the position of the last batch handed out."""
        self._stop_producer()
        self.sampler.load_state_dict(self._state)
        if self.prefetch_threads > 1:
            from pgolf.data.parallel_prefetch import ParallelProducer  # only runs that use it pack it

            self._producer = ParallelProducer(
                self.sampler,
                self.pool,
                key,
                self.prefetch,
                self.prefetch_threads,
                self.device,
                self.vocab_size,
            )
        else:
            self._producer = Producer(
                self.sampler, self.pool, key, self.prefetch, self.device, self.vocab_size
            )
        self._key = key

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._staged = None
        self._key = None

    # ------------------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: loading this into a fresh loader of the same data, seed, rank and
        world size makes it hand out exactly the batches this one would hand out next."""
        return {"loader": self.name, "rank": self.rank, "world_size": self.world_size, "sampler": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.name, self.rank, self.world_size)
        theirs = (state.get("loader"), state.get("rank"), state.get("world_size"))
        if mine != theirs:
            raise ValueError(
                f"loader state of (loader, rank, world_size)={theirs} cannot be loaded into {mine}; "
                "resume with the same data.loader and number of processes"
            )
        self._stop_producer()
        self.sampler.load_state_dict(state["sampler"])
        self._state = state["sampler"]

    def close(self) -> None:
        """Stop the producer thread (idempotent). The trainer calls it; daemon threads cover crashes."""
        self._stop_producer()
        self._closed = True

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loader(cfg: Any, files: list[Path], *, seed: int, rank: int, world_size: int, device: torch.device):
    """The loader `cfg.loader` names (registered in pgolf.components.LOADERS), for this rank."""
    return LOADERS.build(cfg, files=files, seed=seed, rank=rank, world_size=world_size, device=device)
