"""Optional wandb logging: training runs from global rank 0, and one report run per sweep.

A no-op unless wandb.mode is offline or online (`auto` is resolved by the parent before launch;
an unresolved `auto` means disabled). Runs of one configuration share a group (the seed-free
config hash) and are named `<label>-s<seed>`; the run id is kept in `<job_dir>/wandb_run_id` so
a resumed job continues the same run. No account is needed offline: `launch/wandb_sync.sh`
uploads later.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pgolf.config import JobConfig, config_hash, to_dict


class Tracker:
    def __init__(self, job: JobConfig, job_dir: Path, is_main: bool):
        self.run = None
        if not is_main or job.wandb.mode in ("disabled", "auto"):
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


def log_sweep_summary(
    summary: dict[str, Any], sweep_dir: Path, mode: str, project: str, entity: str | None = None
) -> str | None:
    """One `job_type=report` run holding the sweep's table; returns a note when it is skipped."""
    if mode in ("disabled", "auto"):
        return None
    if importlib.util.find_spec("wandb") is None:
        return "wandb summary run skipped: wandb is not installed"
    import wandb

    from pgolf.report.render import CSV_COLUMNS, csv_row

    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(sweep_dir),
        group=f"sweep-{sweep_dir.name}",
        name=f"report-{sweep_dir.name}",
        job_type="report",
        config={k: summary[k] for k in ("sweep_dirs", "alpha", "min_delta_nats", "baseline", "jobs")},
        reinit="create_new",  # never merge into another run of this process (wandb#2877)
    )
    try:
        table = wandb.Table(columns=CSV_COLUMNS)
        for g in summary["groups"]:
            row = csv_row(g)
            table.add_data(*[row[c] for c in CSV_COLUMNS])
        run.log({"summary": table})
        run.summary.update({"jobs_total": summary["jobs"]["total"], "jobs_ok": summary["jobs"]["ok"]})
    finally:
        run.finish()
    return f"wandb {mode} summary run written under {sweep_dir}/wandb"
