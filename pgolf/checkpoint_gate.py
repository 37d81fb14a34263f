"""Whether a run touches checkpoints at all, decided without importing `pgolf.checkpoint`.

A run with checkpointing off (the default, and every record's config) never saves, and has nothing
to resume unless its job folder already holds a checkpoint folder. Such a run gets `NoCheckpoints`,
which does exactly what a `Checkpointer` does in that case (nothing), so the checkpoint module
(torch.save/load plumbing, digests, resume checks: ~2.3 KB of a packed train_gpt.py) is neither
imported by the worker nor shipped (`pgolf.parent.pack.shipped_modules` leaves it out whenever the
config turns checkpoints off, so an in-process run and a worker ship the same files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CKPT_DIR = "checkpoint"
# Fault injection for tests and drills: the worker SIGKILLs itself right after this step (after the
# step's checkpoint, if one is due), as an OOM killer or a lost node would.
FAULT_ENV = "PGOLF_FAULT_KILL_AFTER_STEP"


def checkpoints_on(cfg: Any) -> bool:
    """The config asks for checkpoints (`checkpoint.every_steps` or `every_seconds` above 0)."""
    return cfg.every_steps > 0 or cfg.every_seconds > 0


def needs_checkpointer(cfg: Any, job_dir: Path) -> bool:
    """A real `Checkpointer` is needed: checkpoints are on, a fault drill is armed, or the job folder
    holds a checkpoint folder (resume, or a stale one whose mismatch must be reported)."""
    return (
        checkpoints_on(cfg)
        or bool(os.environ.get(FAULT_ENV, "").strip())
        or (Path(job_dir) / CKPT_DIR).exists()
    )


class NoCheckpoints:
    """The `Checkpointer` of a run with checkpoints off, no drill and no checkpoint folder: it never
    saves (`enabled` is False), has nothing to restore or discard, and never kills."""

    enabled = False

    def time_due(self, train_ms: float) -> float:
        return 0.0

    def vote(self, due: bool, step: int) -> None:
        pass

    def fault_point(self, step: int) -> None:
        pass

    def restore(self) -> None:
        return None

    def discard(self) -> None:
        pass
