"""Hydra callbacks (registered under `hydra.callbacks` in conf/config.yaml).

`SweepReport.on_multirun_end` runs on the launching host once every job has returned and writes
summary.{md,csv,json} into the sweep folder. It must never raise: the jobs' results are already on
disk, and `python -m pgolf.report <sweep_dir>` can always redo the aggregation.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            from pgolf.report import write_report
            from pgolf.run import resolve_wandb_mode
            from pgolf.tracking import log_sweep_summary

            rep = config.get("report") or {}
            summary = write_report(
                [sweep_dir],
                baseline=rep.get("baseline"),
                alpha=float(rep.get("alpha", 0.01)),
                min_delta_nats=float(rep.get("min_delta_nats", 0.005)),
            )
            print(summary["markdown"], flush=True)
            print(f"pgolf: sweep summary in {sweep_dir}/summary.md (.csv, .json)", flush=True)
            wb = config.get("wandb") or {}
            note = log_sweep_summary(
                summary,
                sweep_dir,
                mode=resolve_wandb_mode(str(wb.get("mode", "auto")), multirun=True),
                project=str(wb.get("project", "pgolf")),
                entity=wb.get("entity"),
            )
            if note:
                print(f"pgolf: {note}", flush=True)
        except Exception as e:  # the jobs are safe on disk; say how to redo the summary
            traceback.print_exc(file=sys.stderr)
            print(
                f"pgolf: the sweep report failed ({type(e).__name__}: {e}); "
                f"rerun it with: python -m pgolf.report {sweep_dir}",
                file=sys.stderr,
            )
