"""`data.prefetch_threads > 1`: one thread plans every batch in order, several threads gather them.

Only the plan touches the sampler's RNG and cursors, so planning stays on one thread and the
batches are exactly those of the single producer (`pgolf.data.prefetch.Producer`) and of no
prefetch at all. The planner takes a buffer from the pool, plans the batch, snapshots the sampler
state after it and puts a slot into the bounded queue in plan order; a gather worker then copies
the slot's tokens into its buffer. The consumer takes slots in queue order and waits for each one's
gather, so batches reach it in plan order however the workers interleave. Each slot carries the
sampler state after it, which keeps the loader's position exact with batches in flight.

Shutdown and errors follow the single producer: daemon threads, every blocking call polls a stop
event, and a failure in the planner or in a gather reaches the consumer, which re-raises it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from pgolf.data.prefetch import _LIVE, _POLL_S, BufferPool, HostBatch, Stopped, as_uint16
from pgolf.data.sampling import PlannedSampler, check_planned_vocab


class _Slot:
    """One planned batch: its buffer, plan and sampler state; `done` is set once it is gathered."""

    def __init__(self, buf: torch.Tensor, key: tuple[int, int], plan: Any, state: dict[str, Any]):
        self.buf, self.key, self.plan, self.state = buf, key, plan, state
        self.error: BaseException | None = None
        self.done = threading.Event()


class _PlanFailure:
    def __init__(self, error: BaseException):
        self.error = error


class ParallelProducer:
    """The `Producer` interface (`get`, `close`) over a planner thread and `threads` gather threads."""

    def __init__(
        self,
        sampler: PlannedSampler,
        pool: BufferPool,
        key: tuple[int, int],
        depth: int,
        threads: int,
        device: torch.device | None = None,
        vocab_size: int | None = None,
    ):
        self.sampler, self.pool, self.key, self.device = sampler, pool, key, device
        self.vocab_size = vocab_size
        self.queue: queue.Queue[_Slot | _PlanFailure] = queue.Queue(maxsize=depth)
        self.jobs: queue.Queue[_Slot] = queue.Queue()  # bounded by the queue: a slot enters it first
        self.stop = threading.Event()
        self._head: _Slot | None = None  # taken from the queue, its gather not yet finished
        self.planner = threading.Thread(target=self._plan_loop, name="pgolf-data-producer", daemon=True)
        self.workers = [
            threading.Thread(target=self._gather_loop, name=f"pgolf-data-gather-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in (self.planner, *self.workers):
            thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------------------ threads
    def _plan_loop(self) -> None:
        try:
            if self.device is not None and self.device.type == "cuda" and self.device.index is not None:
                # Pinned allocations and copy-event waits happen here: keep them off GPU 0.
                torch.cuda.set_device(self.device)
            while not self.stop.is_set():
                buf = self.pool.acquire(self.sampler.shape(*self.key), self.stop)
                try:
                    plan = self.sampler.plan(*self.key)
                except BaseException:
                    self.pool.release(buf)
                    raise
                slot = _Slot(buf, self.key, plan, self.sampler.state_dict())
                if not self._put(slot):
                    self.pool.release(buf)
                    return
                self.jobs.put(slot)
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which raises it in the main thread
            self._put(_PlanFailure(e))

    def _put(self, item: _Slot | _PlanFailure) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _gather_loop(self) -> None:
        while not self.stop.is_set():
            try:
                slot = self.jobs.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            try:
                out = as_uint16(slot.buf)
                self.sampler.gather(slot.plan, out)
                if self.vocab_size is not None:
                    check_planned_vocab(self.sampler, slot.plan, out, self.vocab_size)
            except BaseException as e:  # the consumer raises it when this slot's turn comes
                slot.error = e
            finally:
                slot.done.set()

    # ------------------------------------------------------------------------------ consumer
    def get(self, block: bool = True) -> HostBatch | None:
        """The next batch in plan order; None if not ready and block=False. Re-raises a failure."""
        while True:
            if self._head is None:
                try:
                    item = self.queue.get(timeout=_POLL_S) if block else self.queue.get_nowait()
                except queue.Empty:
                    if not block:
                        return None
                    if not self.planner.is_alive() and self.queue.empty():
                        raise RuntimeError("the data planner thread stopped unexpectedly") from None
                    continue
                if isinstance(item, _PlanFailure):
                    self.close()
                    raise RuntimeError(f"data loader producer failed: {item.error}") from item.error
                self._head = item
            slot = self._head
            if slot.done.wait(timeout=_POLL_S if block else 0):
                self._head = None
                if slot.error is not None:
                    self.pool.release(slot.buf)
                    self.close()
                    raise RuntimeError(f"data loader producer failed: {slot.error}") from slot.error
                return HostBatch(slot.buf, slot.key, slot.state)
            if not block:
                return None
            if not any(w.is_alive() for w in self.workers):
                raise RuntimeError("the data gather threads stopped unexpectedly")

    def close(self) -> None:
        _LIVE.discard(self)
        self.stop.set()
        for thread in (self.planner, *self.workers):
            thread.join(timeout=10.0)
        # With every thread gone, the buffers of batches not handed out go back to the pool.
        if self._head is not None:
            self.pool.release(self._head.buf)
            self._head = None
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Slot):
                self.pool.release(item.buf)
