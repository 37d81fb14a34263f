"""Rank-0 run log: every line into train.log, console lines through `logging`, a terminal progress bar.

Console lines go to the `pgolf.trainer` logger. Under `pgolf.run` Hydra's job logging shows them and
writes them into the job's run.log (`hydra.verbose=pgolf.trainer` adds the debug lines); a worker
process of its own prints them to stdout (`pgolf.parent.console.worker_logging`, or plain lines in a packed
train_gpt.py). train.log stays the complete record: debug lines included, console or not.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger("pgolf.trainer")
# Progress lines of a long loop: at each further tenth of the work, at most every PROGRESS_MIN_S
# seconds, and at least every PROGRESS_MAX_S seconds.
PROGRESS_MIN_S, PROGRESS_MAX_S = 5.0, 60.0


class RunLog:
    def __init__(self, path: Path | None, enabled: bool, console: bool = True, stream=None):
        self.enabled = enabled
        self.console = console and enabled
        self.file = open(path, "a", encoding="utf-8") if (enabled and path is not None) else None
        self.stream = stream or sys.stdout  # where the progress bar is drawn, if it is a terminal
        self.bar = ""  # the bar as drawn now ("" when none is)
        self.lifted = []  # (console handler, its own stream) while the bar is drawn

    def __call__(self, msg: str, console: bool = True, level: int = logging.INFO) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()
        if console and self.console:
            LOG.log(level, msg)

    def debug(self, msg: str) -> None:
        self(msg, level=logging.DEBUG)

    def progress(
        self, step: int, total: int, loss: float | None, step_ms: float, eta_s: float | None
    ) -> None:
        """On a terminal, a bar redrawn in place under the log lines (the step lines are logged apart)."""
        if not self.console or not self.stream.isatty():
            return
        width = 24
        filled = int(width * step / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        loss_s = f" loss {loss:.4f}" if loss is not None else ""
        eta = f" eta {eta_s:5.0f}s" if eta_s is not None else ""
        if not self.bar:
            self._lift()
        self.bar = f"train [{bar}] {step}/{total}{loss_s} {step_ms:.1f}ms/step{eta}"
        self.draw()
        if step >= total:
            self.end_bar()

    def _lift(self) -> None:
        """Route each console handler that writes to a terminal through `_Lifted` while the bar is up."""
        lg = LOG
        while lg:
            for h in lg.handlers:
                s = getattr(h, "stream", None)
                if type(h) is logging.StreamHandler and getattr(s, "isatty", bool)():
                    self.lifted.append((h, s))
                    h.setStream(_Lifted(s, self))
            lg = lg.propagate and lg.parent

    def draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.bar)  # back to column 0, clear the line, draw
        self.stream.flush()

    def end_bar(self) -> None:
        """Leave the bar as it is on its own line and give the console handlers their streams back."""
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()
            self.bar = ""
        for h, s in self.lifted:
            h.setStream(s)
        self.lifted = []

    def close(self) -> None:
        self.end_bar()
        if self.file is not None:
            self.file.close()
            self.file = None


class _Lifted:
    """A console handler's stream while the bar is drawn: a log line (a StreamHandler writes each
    record, newline included, in one call) first takes the bar off its terminal line, and the bar
    is drawn again under it."""

    def __init__(self, stream, log: RunLog):
        self.s, self.log = stream, log

    def write(self, text: str) -> None:
        self.log.stream.write("\r\x1b[K")
        self.log.stream.flush()
        self.s.write(text)
        self.s.flush()
        self.log.draw()

    def flush(self) -> None:
        self.s.flush()


class Progress:
    """Progress lines of a long loop (eval, TTT) from host-side counts: no device sync. On a GPU the
    host runs ahead by the queued work only, so the counts lead the device by a few batches."""

    def __init__(
        self, log: Callable[[str], None], label: str, total: int, unit: str, clock=time.perf_counter
    ):
        self.log, self.label, self.total, self.unit, self.clock = log, label, total, unit, clock
        self.done = 0
        self.t0 = self.last = clock()
        self.next = total / 10

    def advance(self, n: int = 1) -> None:
        self.done += n
        now, done, total = self.clock(), self.done, self.total
        quiet = now - self.last
        if done < total and (done >= self.next and quiet >= PROGRESS_MIN_S or quiet >= PROGRESS_MAX_S):
            self.last, self.next = now, (done * 10 // total + 1) * total / 10
            spent = now - self.t0
            self.log(
                f"{self.label}: {done:,}/{total:,} {self.unit} ({100 * done / total:.0f}%) "
                f"{spent:.0f}s, eta {spent * (total - done) / done:.0f}s"
            )
