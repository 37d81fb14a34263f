"""Rank 0's metric history: one JSON object per line in `<job_dir>/metrics.jsonl`.

The worker only writes this file; whoever wants the curves follows it from outside (the Hydra
parent mirrors it into wandb, see `pgolf.parent.tracking`). So the worker, and a packed `train_gpt.py`,
never import a tracking library.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class History:
    def __init__(self, job_dir: Path, enabled: bool):
        self.file = open(job_dir / METRICS_FILE, "ab+") if enabled else None
        # Appended: a resumed job adds to the rows its killed run wrote, after ending a torn last row.
        if self.file is not None and self.file.tell():
            self.file.seek(-1, 2)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")

    def __call__(self, step: int, **values: float) -> None:
        if self.file is not None:  # one whole row per write, flushed
            self.file.write(json.dumps({"step": step, **values}).encode() + b"\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
