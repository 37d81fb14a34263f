"""Rank 0's metric history: one JSON object per line in `<job_dir>/metrics.jsonl`.

The worker only writes this file; whoever wants the curves follows it from outside (the Hydra
parent mirrors it into wandb, see `pgolf.tracking`). So the worker, and a packed `train_gpt.py`,
never import a tracking library.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class History:
    def __init__(self, job_dir: Path, enabled: bool):
        # Appended: a resumed job adds to the lines its killed run wrote.
        self.file = open(job_dir / METRICS_FILE, "a", encoding="utf-8") if enabled else None

    def __call__(self, step: int, **values: float) -> None:
        if self.file is not None:  # one whole line per write, flushed: a reader never sees half a row
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
