"""Hydra callbacks (registered under `hydra.callbacks` in conf/config.yaml).

`OutputGuard` owns the output folder before Hydra writes anything into it: it locks the run or
sweep folder (pgolf/parent/outdir.py), refuses a folder that already holds another run unless
`overwrite=true`, and recognises a rerun of the same sweep, whose finished jobs are then kept.

`SweepReport.on_multirun_end` runs on the launching host once every job has returned and writes
summary.{md,csv,json} into the sweep folder. It must never raise: the jobs' results are already on
disk, and `python -m pgolf.report <sweep_dir>` can always redo the aggregation. `pgolf.parent.run.main`
calls `write_sweep_summary` itself when Ctrl-C ends a sweep early, and reads `SWEEP` to turn
failed jobs into a non-zero exit.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pgolf.parent.outdir import FolderInUse, earlier_run, lock_folder, set_aside

# The sweep this process launched: its folder and config (set when it starts) and, once the
# summary is written, the job counts. `pgolf.parent.run.main` reads it for Ctrl-C and the exit code.
SWEEP: dict[str, Any] = {}

# Overrides that do not change which jobs a sweep runs, so a rerun may differ in them and still
# resume the same sweep (e.g. another launcher, a report baseline, wandb switched off).
_NOT_JOB_DEFINING = ("hydra", "launcher", "launch", "report", "wandb", "overwrite", "resume")


def _refuse(message: str) -> None:
    print(f"pgolf: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)  # SystemExit passes Hydra's callback wrapper, which only catches Exception


def _take(folder: Path) -> None:
    try:
        lock = lock_folder(folder)
    except FolderInUse as e:
        _refuse(str(e))
        return
    if lock.reclaimed:
        print(f"pgolf: {lock.reclaimed}", flush=True)


def job_defining(overrides: list[str]) -> list[str]:
    """The overrides that decide a sweep's jobs (and their numbering: order is kept)."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0].split("/", 1)[0] not in _NOT_JOB_DEFINING:
            keep.append(o)
    return keep


def _earlier_sweep_overrides(sweep_dir: Path) -> list[str] | None:
    """The task overrides of the sweep that last ran in `sweep_dir` (from Hydra's multirun.yaml)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        task = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task")
    except Exception:  # an unreadable multirun.yaml tells nothing about what ran here
        return None
    return None if task is None else [str(o) for o in task]


def _job_folders(sweep_dir: Path) -> list[Path]:
    return [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()] if sweep_dir.is_dir() else []


class OutputGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).resolve()
        _take(folder)
        if config.get("resume"):  # this folder only gets Hydra's log; the job's own folder is locked later
            return
        held = earlier_run(folder)
        if held is None:
            return
        if config.get("overwrite"):
            moved = set_aside(folder)
            print(f"pgolf: overwrite=true: moved the earlier run out of the way, to {moved}", flush=True)
            return
        _refuse(
            f"{folder} already holds {held.text}. Run into a new folder (leave out hydra.run.dir= for a "
            "fresh timestamped one), "
            + ("" if held.finished else f"continue the run with resume={folder}, ")
            + f"or pass overwrite=true to move the earlier files to {folder}/.replaced/ and run there."
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        _take(sweep_dir)
        SWEEP.clear()
        SWEEP.update(dir=sweep_dir, config=config)
        jobs = _job_folders(sweep_dir)
        single = earlier_run(sweep_dir)
        earlier = _earlier_sweep_overrides(sweep_dir)
        if not jobs and single is None and earlier is None:
            return  # a new (or empty) sweep folder
        if config.get("overwrite"):
            moved = set_aside(sweep_dir)
            print(f"pgolf: overwrite=true: moved the earlier sweep out of the way, to {moved}", flush=True)
            return
        now = job_defining([str(o) for o in config.hydra.overrides.task])
        fix = (
            "Run into another folder (leave out hydra.sweep.dir= for a fresh timestamped one), or pass "
            f"overwrite=true to move the earlier files to {sweep_dir}/.replaced/ and start afresh."
        )
        if single is not None:
            _refuse(f"{sweep_dir} holds {single.text}, not a sweep. {fix}")
        if earlier is None:
            _refuse(f"{sweep_dir} holds job folders ({len(jobs)}) of a sweep with no multirun.yaml. {fix}")
        if job_defining(earlier) != now:
            _refuse(
                f"{sweep_dir} holds a sweep of other overrides (earlier: {' '.join(job_defining(earlier))}; "
                f"now: {' '.join(now)}). Rerun it with the earlier overrides to resume it. {fix}"
            )
        print(
            f"pgolf: resuming the sweep in {sweep_dir}: jobs whose result.json is ok are kept, "
            "failed, killed and missing ones run again",
            flush=True,
        )

    # The locks are released at process exit (pgolf/parent/outdir.py), after the summary is written.


def write_sweep_summary(config: DictConfig, sweep_dir: Path, log_to_wandb: bool = True) -> dict | None:
    """Write the sweep's summary files; return the summary, or None (with a message) on failure."""
    try:
        from pgolf.parent.report import write_report

        rep = config.get("report") or {}
        baseline = rep.get("baseline")
        summary = write_report(
            [sweep_dir],
            baseline=None if baseline is None else str(baseline),
            alpha=float(rep.get("alpha", 0.01)),
            min_delta_nats=float(rep.get("min_delta_nats", 0.005)),
        )
        SWEEP["jobs"] = summary["jobs"]
        print(summary["markdown"], flush=True)
        print(f"pgolf: sweep summary in {sweep_dir}/summary.md (.csv, .json)", flush=True)
        if log_to_wandb:
            from pgolf.parent.tracking import log_sweep_summary, resolve_mode

            wb = config.get("wandb") or {}
            note = log_sweep_summary(
                summary,
                sweep_dir,
                mode=resolve_mode(str(wb.get("mode", "auto")), multirun=True),
                project=str(wb.get("project", "pgolf")),
                entity=wb.get("entity"),
            )
            if note:
                print(f"pgolf: {note}", flush=True)
        return summary
    except Exception as e:  # the jobs are safe on disk; say how to redo the summary
        traceback.print_exc(file=sys.stderr)
        print(
            f"pgolf: the sweep report failed ({type(e).__name__}: {e}); "
            f"rerun it with: python -m pgolf.report {sweep_dir}",
            file=sys.stderr,
        )
        return None


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(config, Path(str(config.hydra.sweep.dir)).resolve())


__all__ = ["SWEEP", "OutputGuard", "SweepReport", "write_sweep_summary"]
