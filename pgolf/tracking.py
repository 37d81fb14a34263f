"""Optional wandb logging from global rank 0; a no-op unless wandb.mode is offline or online."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgolf.config import JobConfig, config_hash, to_dict


class Tracker:
    def __init__(self, job: JobConfig, job_dir: Path, is_main: bool):
        self.run = None
        if not is_main or job.wandb.mode == "disabled":
            return
        import wandb  # imported only when used: the packed worker and tests never need it

        os.environ.setdefault("WANDB_DIR", str(job_dir))
        id_file = job_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        label = job.label or f"{job.model.name}-{job.optimizer.name}"
        self.run = wandb.init(
            project=job.wandb.project,
            entity=job.wandb.entity,
            mode=job.wandb.mode,
            id=run_id,
            resume="allow",
            group=config_hash(job),
            name=f"{label}-s{job.seed}",
            job_type="train",
            tags=list(job.wandb.tags),
            config=to_dict(job),
            dir=str(job_dir),
        )

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
