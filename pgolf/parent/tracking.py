"""wandb, in the Hydra parent only: one run per job, mirrored from the job's files, and one report
run per sweep.

A job's run follows the worker's `metrics.jsonl` while it trains (live when online) and takes its
summary from `result.json` when the job ends, so the summary's `val_bpb` is the final score. The
worker never imports wandb and this module is never packed (`pgolf.parent.pack.PARENT_PACKAGE`): a packed
`train_gpt.py` runs where wandb is not installed, and `config.json` holds no wandb settings.

Runs of a sweep share one group, `sweep-<sweep folder name>` (the report run's too), and are named
by the values the sweep varies (`seed=42`, `model.num_layers=9 seed=42`); a single run is named
`<label or model-optimizer>-s<seed>`. The run's id and progress are kept in `<job_dir>/wandb.json`,
so `resume=<job_dir>` continues the same run. Offline needs no account; `wandb sync <run folder>`
(or `launch/wandb_sync.sh`) uploads later.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pgolf.config import config_hash, from_dict
from pgolf.history import METRICS_FILE
from pgolf.results import read_json, write_json_atomic

STATE_FILE = "wandb.json"
POLL_SECONDS = 2.0  # how often a job's metrics.jsonl is read while it trains
INSTALL_HINT = 'pip install "wandb>=0.19.10,<0.32"'  # the range pyproject.toml pins and the tests cover


@dataclass
class WandbConfig:
    # auto: offline in a sweep when wandb is installed, else disabled (WANDB_MODE in the
    # environment decides `auto`, and WANDB_MODE=disabled turns every mode off).
    mode: Literal["auto", "disabled", "offline", "online"] = "auto"
    project: str = "pgolf"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


def resolve_mode(mode: str, multirun: bool) -> str:
    """The mode a job runs with: `auto` -> offline in a sweep when wandb is installed, else
    disabled. WANDB_MODE=disabled in the environment (wandb's own off switch) always wins."""
    env = os.environ.get("WANDB_MODE", "")
    if env == "disabled":
        return "disabled"
    if mode != "auto":
        return mode
    if env in ("offline", "online"):
        return env
    return "offline" if multirun and importlib.util.find_spec("wandb") is not None else "disabled"


def wandb_config(node: Any, multirun: bool) -> WandbConfig:
    """The composed `wandb` node (DictConfig or dict), validated (ConfigError names the key), with
    its mode resolved."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    wb = from_dict(WandbConfig, data, "wandb")
    wb.mode = resolve_mode(wb.mode, multirun)
    return wb


def sweep_group(sweep_dir: Path) -> str:
    return f"sweep-{sweep_dir.name}"


def run_name(frozen: dict[str, Any], swept: list[str]) -> str:
    """`swept`: this job's `key=value` for each key the sweep varies (empty outside a sweep)."""
    label = frozen.get("label") or ""
    if swept:
        return " ".join([label, *swept]) if label else " ".join(swept)
    base = label or f"{frozen['model']['name']}-{frozen['optimizer']['name']}"
    return f"{base}-s{frozen['seed']}"


def swept_overrides(sweep_dir: Path, job_overrides: list[str]) -> list[str]:
    """The job's overrides of the keys that the sweep's command line gave several values
    (Hydra's basic sweeper records that command line in `<sweep_dir>/multirun.yaml`). Without that
    file (another sweeper) every override of the job is kept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    mine = parser.parse_overrides(job_overrides)
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return [o.input_line for o in mine if o.input_line]
    task = OmegaConf.load(path).hydra.overrides.task
    keys = {o.key_or_group for o in parser.parse_overrides(list(task)) if o.is_sweep_override()}
    return [o.input_line for o in mine if o.key_or_group in keys and o.input_line]


def _settings() -> Any:
    import wandb

    # silent: none of wandb's banners and hints (pgolf prints one line per run); console off: the
    # parent's stdout is never wrapped (the job's log is train.log); no git, code or system stats:
    # this process is the launcher, not the training process.
    return wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True)


SUMMARY_FROM_RESULT = ("val_bpb", "val_loss", "steps", "ms_per_step", "error")


def _summary_of(result: dict[str, Any]) -> dict[str, Any]:
    """What a run's summary shows: the job's verdict and its final score, as result.json has them."""
    out: dict[str, Any] = {"status": result.get("status", "missing")}
    for key in SUMMARY_FROM_RESULT:
        if key in result:
            out[key] = result[key]
    for key, value in (result.get("bytes") or {}).items():
        out[f"bytes_{key}"] = value
    pre = (result.get("metrics") or {}).get("pre_quant") or {}
    if "val_bpb" in pre:
        out["pre_quant_val_bpb"] = pre["val_bpb"]
    return out


class JobRun:
    """One job's wandb run. A thread copies new lines of the job's metrics.jsonl into it while the
    job trains; `close` copies the rest, writes the summary from result.json and finishes the run.
    A failure in here never fails the job: its files are the record, wandb only mirrors them."""

    def __init__(self, run: Any, job_dir: Path, state: dict[str, Any]):
        self.run, self.job_dir, self.state = run, job_dir, state
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="pgolf-wandb", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._copy_new_rows()

    def _copy_new_rows(self) -> None:
        if self.error is not None:
            return
        try:
            path = self.job_dir / METRICS_FILE
            if not path.is_file():
                return
            with open(path, "rb") as f:
                f.seek(self.state["offset"])
                data = f.read()
            end = data.rfind(b"\n") + 1  # a row still being written is read next time
            for line in data[:end].splitlines():
                try:
                    row = json.loads(line)
                    step = int(row.pop("step"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # the torn last row of a killed worker (pgolf.history ends it)
                # A resumed job retrains from its checkpoint: rows below the logged step are old news.
                if step >= self.state["step"]:
                    self.run.log(row, step=step)
                    self.state["step"] = step
            if end:
                self.state["offset"] += end
                write_json_atomic(self.job_dir / STATE_FILE, self.state)
        except Exception as e:  # noqa: BLE001 - reported once at close; the job goes on
            self.error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._copy_new_rows()
        path = self.job_dir / "result.json"
        try:
            result = read_json(path) if path.is_file() else {}
        except ValueError:
            result = {"status": "unreadable result.json"}
        try:
            self.run.summary.update(_summary_of(result))
            self.run.finish(exit_code=0 if result.get("status") == "ok" else 1)
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"{type(e).__name__}: {e}"
        if self.error:
            print(f"pgolf: the wandb run of {self.job_dir} is incomplete: {self.error}", file=sys.stderr)


def _announce(run: Any, mode: str) -> None:
    """The one line a run prints: where it is, and how to upload it when offline."""
    if mode == "online":
        print(f"pgolf: wandb run {run.name!r}: {run.url}", flush=True)
        return
    run_dir = Path(run.dir).resolve().parent  # <dir>/wandb/offline-run-<time>-<id>
    print(f"pgolf: wandb offline run {run.name!r} in {run_dir}; upload: wandb sync {run_dir}", flush=True)


def start_job_run(
    wb: WandbConfig, job_dir: Path, frozen: dict[str, Any], name: str, group: str | None
) -> JobRun | None:
    """Open the job's run (continuing the one in `<job_dir>/wandb.json` if there is one); None
    when wandb is off or cannot start, which is said in one line and never stops the job."""
    if wb.mode == "disabled":
        return None
    if importlib.util.find_spec("wandb") is None:
        print(f"pgolf: wandb.mode={wb.mode} but wandb is not installed ({INSTALL_HINT}); not logging")
        return None
    import wandb

    state_path = job_dir / STATE_FILE
    old = read_json(state_path) if state_path.is_file() else {}
    try:
        run = wandb.init(
            project=wb.project,
            entity=wb.entity,
            mode=wb.mode,
            dir=str(job_dir),
            id=old.get("id"),
            resume="allow" if old else None,
            group=group,
            name=name,
            job_type="train",
            tags=list(wb.tags),
            config={**frozen, "config_hash": config_hash(frozen)},
            reinit="create_new",  # a sweep opens one run after another in this process
            settings=_settings(),
        )
    except Exception as e:  # noqa: BLE001 - e.g. online without a login
        print(
            f"pgolf: wandb could not start a run for {job_dir} ({type(e).__name__}: {e}); the job "
            "runs without it. Online needs `wandb login` or WANDB_API_KEY; wandb.mode=offline needs neither.",
            file=sys.stderr,
        )
        return None
    state = {
        "id": run.id,
        "mode": wb.mode,
        "project": wb.project,
        "entity": wb.entity,
        "tags": list(wb.tags),
        "group": group,
        "name": name,
        "step": old.get("step", 0),
        "offset": old.get("offset", 0),
    }
    write_json_atomic(state_path, state)
    # The history's val_* are the validations during training (pre-quantization); the summary's are
    # the final score from result.json. Without this, the history's last row, committed at finish,
    # would overwrite the summary with the pre-quant value.
    for key in SUMMARY_FROM_RESULT:
        run.define_metric(key, summary="none")
    _announce(run, wb.mode)
    return JobRun(run, job_dir, state)


def start_hydra_job_run(
    wb: WandbConfig, job_dir: Path, frozen: dict[str, Any], multirun: bool
) -> JobRun | None:
    """`start_job_run` for the Hydra job running now: in a sweep, grouped by the sweep and named by
    what it varies."""
    if wb.mode == "disabled":
        return None
    if not multirun:
        return start_job_run(wb, job_dir, frozen, run_name(frozen, []), None)
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sweep_dir = Path(str(hc.sweep.dir))
    name = run_name(frozen, swept_overrides(sweep_dir, list(hc.overrides.task)))
    return start_job_run(wb, job_dir, frozen, name or f"job{hc.job.num}", sweep_group(sweep_dir))


def resume_job_run(job_dir: Path, frozen: dict[str, Any]) -> JobRun | None:
    """`resume=<job_dir>`: continue the job's run with the settings it started with, if it had one."""
    state_path = job_dir / STATE_FILE
    if not state_path.is_file():
        return None
    old = read_json(state_path)
    wb = WandbConfig(
        mode=resolve_mode(old["mode"], multirun=False),
        project=old["project"],
        entity=old["entity"],
        tags=list(old.get("tags", [])),
    )
    return start_job_run(wb, job_dir, frozen, old["name"], old["group"])


def log_sweep_summary(
    summary: dict[str, Any], sweep_dir: Path, mode: str, project: str, entity: str | None = None
) -> str | None:
    """One `job_type=report` run holding the sweep's table; returns a note when it is skipped."""
    if mode in ("disabled", "auto"):
        return None
    if importlib.util.find_spec("wandb") is None:
        return f"wandb summary run skipped: wandb is not installed ({INSTALL_HINT})"
    import wandb

    from pgolf.parent.report.render import CSV_COLUMNS, csv_row

    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(sweep_dir),
        group=sweep_group(sweep_dir),
        name=f"report-{sweep_dir.name}",
        job_type="report",
        config={k: summary[k] for k in ("sweep_dirs", "alpha", "min_delta_nats", "baseline", "jobs")},
        reinit="create_new",  # never merge into another run of this process (wandb#2877)
        settings=_settings(),
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
    if mode == "online":
        return f"wandb report run: {run.url}"
    run_dir = Path(run.dir).resolve().parent
    return f"wandb offline summary run in {run_dir}; upload: wandb sync {run_dir}"
