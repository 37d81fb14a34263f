"""Rank-0 text log (train.log) and console progress."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, path: Path | None, enabled: bool, console: bool = True):
        self.enabled = enabled
        self.console = console and enabled
        self.file = open(path, "a", encoding="utf-8") if (enabled and path is not None) else None
        self.t0 = time.time()

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console and self.console:
            print(msg, flush=True)
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()

    def progress(
        self, step: int, total: int, loss: float | None, step_ms: float, eta_s: float | None
    ) -> None:
        """One line per log step; on a terminal, a bar redrawn in place."""
        if not self.console:
            return
        width = 24
        filled = int(width * step / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        loss_s = f" loss {loss:.4f}" if loss is not None else ""
        eta = f" eta {eta_s:5.0f}s" if eta_s is not None else ""
        line = f"train [{bar}] {step}/{total}{loss_s} {step_ms:.1f}ms/step{eta}"
        if sys.stdout.isatty():
            sys.stdout.write("\r" + line + ("\n" if step >= total else ""))
            sys.stdout.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
