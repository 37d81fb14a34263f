"""Host-side batch production: a pool of (pinned) uint16 buffers and an optional producer thread.

The producer runs the sampler ahead of the training loop into a bounded queue, so assembling a
batch (memmap reads, gathers) overlaps the GPU step. Each queued item carries the sampler state
*after* it, which makes the loader's position exact even with batches in flight. Shutdown never
hangs: the thread is a daemon, every blocking call polls a stop event, and a failure travels to
the consumer as a sentinel item that re-raises there. Producers still running when the
interpreter exits are stopped by an atexit hook: a daemon thread frozen inside torch during
finalization would otherwise abort the process ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pgolf.data.sampling import HostSampler, check_batch_vocab

_POLL_S = 0.05


class Stopped(Exception):
    """Raised inside the producer when it is asked to stop while waiting."""


@dataclass
class HostBatch:
    buf: torch.Tensor  # int16 view of the uint16 tokens (torch has no full uint16 support)
    key: tuple[int, int]  # (local_tokens, seq_len)
    state: dict[str, Any]  # sampler state after this batch


@dataclass
class _Failure:
    error: BaseException


def as_uint16(buf: torch.Tensor) -> np.ndarray:
    return buf.numpy().view(np.uint16)


class BufferPool:
    """Recycled host buffers. On CUDA they are pinned, and a buffer is handed out again only after
    the device copy that last read it has finished (its event), so reuse never races the DMA."""

    def __init__(self, pin: bool, capacity: int):
        self.pin, self.capacity = pin, capacity
        self._free: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def _new(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int16, pin_memory=self.pin)

    def acquire(self, shape: tuple[int, ...], stop: threading.Event | None = None) -> torch.Tensor:
        while True:
            try:
                buf, event = self._free.get_nowait()
                break
            except queue.Empty:
                pass
            with self._lock:
                if self._made < self.capacity:
                    self._made += 1
                    return self._new(shape)
            try:
                buf, event = self._free.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise Stopped from None
        if event is not None:
            event.synchronize()
        return buf if tuple(buf.shape) == shape else self._new(shape)

    def release(self, buf: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self._free.put((buf, event))


def produce(
    sampler: HostSampler,
    pool: BufferPool,
    key: tuple[int, int],
    stop: threading.Event | None,
    vocab_size: int | None = None,
    before: dict[str, Any] | None = None,
) -> HostBatch:
    """Assemble one batch: acquire a buffer, let the sampler fill it, snapshot the position. With
    `vocab_size`, ids beyond it are refused by file and offset (`before`: the sampler's state
    before this batch, to replay it)."""
    local_tokens, seq_len = key
    buf = pool.acquire(sampler.shape(local_tokens, seq_len), stop)
    sampler.fill(as_uint16(buf), local_tokens, seq_len)
    if vocab_size is not None:
        try:
            check_batch_vocab(sampler, as_uint16(buf), key, vocab_size, before)
        except BaseException:
            pool.release(buf)
            raise
    return HostBatch(buf, key, sampler.state_dict())


class Producer:
    """A daemon thread running `produce` into a queue of at most `depth` batches."""

    def __init__(
        self,
        sampler: HostSampler,
        pool: BufferPool,
        key: tuple[int, int],
        depth: int,
        device: torch.device | None = None,
        vocab_size: int | None = None,
    ):
        self.sampler, self.pool, self.key, self.device = sampler, pool, key, device
        self.vocab_size = vocab_size
        self.queue: queue.Queue[HostBatch | _Failure] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pgolf-data-producer", daemon=True)
        self.thread.start()
        _LIVE.add(self)

    def _run(self) -> None:
        try:
            if self.device is not None and self.device.type == "cuda" and self.device.index is not None:
                # A new thread starts on GPU 0: without this, every rank's producer would open a
                # context there when it pins memory or waits on a copy event.
                torch.cuda.set_device(self.device)
            before = self.sampler.state_dict()  # each batch's start state, should it need a replay
            while not self.stop.is_set():
                item = produce(self.sampler, self.pool, self.key, self.stop, self.vocab_size, before)
                before = item.state
                self._put(item)
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which raises it in the main thread
            self._put(_Failure(e))

    def _put(self, item: HostBatch | _Failure) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        if isinstance(item, HostBatch):
            self.pool.release(item.buf)

    def get(self, block: bool = True) -> HostBatch | None:
        """The next batch; None if not ready and block=False. Re-raises a producer failure."""
        while True:
            try:
                item = self.queue.get(timeout=_POLL_S) if block else self.queue.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the data producer thread stopped unexpectedly") from None
                continue
            if isinstance(item, _Failure):
                self.close()
                raise RuntimeError(f"data loader producer failed: {item.error}") from item.error
            return item

    def close(self) -> None:
        _LIVE.discard(self)
        self.stop.set()
        self._drain()
        self.thread.join(timeout=10.0)
        self._drain()  # whatever was put between the first drain and the thread's exit

    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, HostBatch):
                self.pool.release(item.buf)


_LIVE: weakref.WeakSet[Producer] = weakref.WeakSet()


@atexit.register
def _stop_live_producers() -> None:
    for producer in list(_LIVE):
        producer.close()
