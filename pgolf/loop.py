"""The training loop's bookkeeping, one concern per object, so `Trainer.train` reads as a loop.

- `TrainClock`: training time, paused while validating and checkpointing.
- `StopRule`: when the run ends (the step count, or the last step that surely fits the wallclock
  cap, going by the slowest recent step).
- `StepFlags`: a step's stop vote, non-finite-loss flag and checkpoint vote on their way to the
  host, without making the step wait for the device.
- `StepTimes`: per-step times for the median ms/step.
- `LossLog`: which steps read their loss back (the only host read of it) and what they read.

None of them synchronizes with the device except where its docstring says so.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


class TrainClock:
    """Milliseconds of training. `now` is the clock in seconds (time.perf_counter); `sync` waits
    for the device, so that a pause starts and ends with the device idle."""

    def __init__(self, sync: Callable[[], None], now: Callable[[], float]):
        self.sync, self.now = sync, now
        self.train_ms = 0.0  # time banked before the current stretch
        self.t0 = 0.0  # when the current stretch started

    def start(self) -> None:
        self.sync()
        self.t0 = self.now()

    def elapsed_ms(self) -> float:
        return self.train_ms + 1000.0 * (self.now() - self.t0)

    @contextmanager
    def paused(self) -> Iterator[float]:
        """Stop the clock (syncs), yield the moment it stopped, then start it again (syncs)."""
        self.sync()
        stopped = self.now()
        self.train_ms += 1000.0 * (stopped - self.t0)
        yield stopped
        self.start()


# The stop rule's estimate of one step: the slowest of the last STEP_WINDOW step times, times
# STEP_MARGIN, so a step somewhat slower than any recent one (a loader stall, a late graph switch)
# still ends inside the cap. Costs about (lookahead + 1) * (STEP_MARGIN - 1) steps at the end.
STEP_WINDOW = 50
STEP_MARGIN = 1.25


class StopRule:
    """After `iterations` steps, or under a wallclock cap on the last step that surely fits it.

    A stop vote ends the run after the steps still in flight plus `lookahead` more: the next step
    (on CUDA, the one queued before the vote is read), plus one when the vote travels through a
    lagged all-reduce. Every rank acts on the same all-reduced vote, so all stop together.

    A step is costed at `STEP_MARGIN` x the slowest of the recent steps (the mean of all steps until
    two votes give a step time), never at the mean: a mean lets one slow step, or steps that slow
    down late in the run, carry training past the cap. The step times are the gaps between votes,
    read off the host clock the loop already reads, so the rule adds no device sync.
    """

    def __init__(self, iterations: int, cap_ms: float | None, in_flight: int, lookahead: int):
        self.iterations, self.cap_ms = iterations, cap_ms
        self.in_flight = in_flight  # steps queued but not known finished when the host times one
        self.lookahead = lookahead
        self.stop_after: int | None = None  # the step count the run ends at, once voted
        self.recent_ms: deque[float] = deque(maxlen=STEP_WINDOW)  # the last steps' times
        self.last_vote_ms: float | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_after is not None

    def is_last(self, step: int) -> bool:
        return step == self.iterations or (self.stop_after is not None and step >= self.stop_after)

    def progress(self, step: int, elapsed_ms: float) -> float:
        """The fraction of training done: of the clock's cap, or of the steps."""
        return elapsed_ms / self.cap_ms if self.cap_ms is not None else step / max(self.iterations, 1)

    def step_estimate_ms(self, completed: int, done_ms: float) -> float:
        """What the next step may take: the margin over the slowest recent step."""
        slowest = max(self.recent_ms) if self.recent_ms else done_ms / completed
        return STEP_MARGIN * slowest

    def vote(self, step: int, done_ms: float) -> float:
        """This rank's stop vote (0/1) with `step` steps started and `done_ms` of training done.
        The next vote would end the run one step later: vote now when that later end could pass
        the cap, so the run ends on the last step that surely fits (not the first one past it)."""
        if self.last_vote_ms is not None:
            self.recent_ms.append(done_ms - self.last_vote_ms)
        self.last_vote_ms = done_ms
        completed = step - self.in_flight  # steps known finished at done_ms
        if self.cap_ms is None or completed <= 0:
            return 0.0
        left = (step - completed) + self.lookahead
        return float(done_ms + (left + 1) * self.step_estimate_ms(completed, done_ms) >= self.cap_ms)

    def agree(self, stop: bool, step: int) -> None:
        """The all-reduced vote of `step`: the first one to stop fixes the end."""
        if stop and self.stop_after is None:
            self.stop_after = step + 1

    def stopped_by(self, steps: int) -> str:
        return "wallclock" if self.stop_after is not None and steps < self.iterations else "iterations"


class StepFlags:
    """[stop vote, non-finite loss, checkpoint vote] of a step, MAX-reduced over ranks, to the host.

    On CUDA they travel through a pinned buffer and are read while the next step runs (`previous`
    waits for the step before, never the current one); elsewhere `send` returns them at once.
    """

    def __init__(self, device: torch.device, distributed: bool):
        self.cuda = device.type == "cuda"
        self.distributed = distributed
        self.host = torch.zeros(3, dtype=torch.float32, pin_memory=self.cuda)
        self.device = torch.zeros(3, dtype=torch.float32, device=device)
        self.pending: torch.cuda.Event | None = None

    def send(self, stop: float, loss: torch.Tensor, checkpoint: float) -> list[float] | None:
        # fill_/copy_ are kernel launches; torch.tensor(x, device=cuda) would block on a pageable copy.
        self.device[0].fill_(stop)
        self.device[1].copy_(~torch.isfinite(loss))
        self.device[2].fill_(checkpoint)
        if self.distributed:
            dist.all_reduce(self.device, op=dist.ReduceOp.MAX)
        if self.cuda:
            self.host.copy_(self.device, non_blocking=True)
            self.pending = torch.cuda.Event()
            self.pending.record()
            return None
        self.host.copy_(self.device)
        return self.host.tolist()

    def previous(self) -> list[float] | None:
        """The flags sent after the previous step (CUDA only; waits for that step to finish)."""
        if self.pending is None:
            return None
        self.pending.synchronize()
        return self.host.tolist()


class StepTimes:
    """Per-step times: CUDA events bracket each step on the device; host times on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.host_ms: list[float] = []  # training ms when each step's host work was done
        self.events: list[torch.cuda.Event] = []

    def _record(self) -> None:
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()

    def start(self) -> None:
        self._record()

    def mark(self, done_ms: float) -> None:
        self.host_ms.append(done_ms)
        self._record()

    def median_ms(self) -> float:
        """The median step after the first 20 (or the first half) settle in. Syncs on CUDA."""
        if self.cuda:
            step_ms = [a.elapsed_time(b) for a, b in zip(self.events[:-1], self.events[1:])]
        else:
            step_ms = [b - a for a, b in zip([0.0] + self.host_ms[:-1], self.host_ms)]
        settled = step_ms[min(20, len(step_ms) // 2) :] or step_ms
        return statistics.median(settled) if settled else 0.0


class LossLog:
    """The train losses read back on log steps: the first five, every `log_every`-th and the last."""

    def __init__(self, log_every: int, iterations: int):
        self.log_every, self.iterations = log_every, iterations
        self.values: list[tuple[int, float]] = []

    def due(self, step: int) -> bool:
        return self.log_every > 0 and (step % self.log_every == 0 or step == self.iterations or step <= 5)

    def read(self, step: int, loss: torch.Tensor, world_size: int) -> float:
        """The global-batch mean loss of `step` (identical for every world size); syncs."""
        if world_size > 1:
            loss = loss.detach().clone()
            if loss.device.type == "cpu":  # gloo has no AVG
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)
                loss = loss / world_size
            else:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        value = loss.item()
        self.values.append((step, value))
        return value
