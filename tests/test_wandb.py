"""wandb as installed, in offline mode: the default sweep logs one run per job from the parent, and
what a sweep job ships (its packed `train_gpt.py`) runs where wandb cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _wandb_records import read_offline_run
from conftest import made_run_once, tiny_cpu_args, wandb_isolation_env

from pgolf.parent.pack import imported_modules, unpack
from pgolf.parent.tracking import resolve_mode, run_name, start_job_run, swept_overrides, wandb_config

pytest.importorskip("wandb")  # a dependency of pgolf (pyproject.toml); the tests meet it as installed


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory, shard_dir, tokenizer_model):
    """The README's seed sweep, two jobs, every wandb setting at its default (mode auto)."""

    def run(root: Path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | wandb_isolation_env(root)
        args = tiny_cpu_args(shard_dir, tokenizer_model, **{"train.val_every": "3"})
        cmd = [
            sys.executable,
            "-m",
            "pgolf.run",
            "-m",
            *args,
            "seed=1337,42",
            f"hydra.sweep.dir={root / 'sweep'}",
        ]
        proc = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    root, proc = made_run_once(tmp_path_factory, "default_sweep", run)
    return root / "sweep", proc


def _offline_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_default_sweep_logs_one_offline_run_per_job_grouped_by_sweep(default_sweep):
    sweep, proc = default_sweep
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"]["ok"] == 2 == summary["jobs"]["total"]
    group = f"sweep-{sweep.name}"
    for num, seed in (("0", 1337), ("1", 42)):
        job = sweep / num
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "ok"
        assert "wandb" not in json.loads((job / "config.json").read_text())  # parent-only, never frozen
        (run_dir,) = _offline_runs(job)
        run = read_offline_run(run_dir)
        assert (run.group, run.name, run.job_type) == (group, f"seed={seed}", "train")
        assert run.config["seed"] == seed and run.config["config_hash"] == result["config_hash"]
        assert run.config["model"]["num_layers"] == 2
        # The summary is the job's final score (post-quantization round trip), not the last
        # pre-quant validation that the history holds.
        assert run.summary["val_bpb"] == result["val_bpb"]
        assert run.summary["pre_quant_val_bpb"] == result["metrics"]["pre_quant"]["val_bpb"]
        assert run.summary["bytes_total"] == result["bytes"]["total"] and run.summary["status"] == "ok"
        assert run.exit_code == 0
        train = [(h["_step"], h["train_loss"]) for h in run.history if "train_loss" in h]
        assert [s for s, _ in train] == list(range(1, 7))  # every log step, in order
        rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
        assert train == [
            (r["step"], r["train_loss"]) for r in rows if "train_loss" in r
        ]  # what the worker wrote
        val = [h for h in run.history if "val_bpb" in h]
        assert [h["_step"] for h in val] == [3, 6]
        assert val[-1]["val_bpb"] == result["metrics"]["pre_quant"]["val_bpb"]
        state = json.loads((job / "wandb.json").read_text())
        assert state["id"] == run.id and state["mode"] == "offline" and state["step"] == 6
    (report_dir,) = _offline_runs(sweep)
    report = read_offline_run(report_dir)
    assert (report.group, report.job_type) == (group, "report")


@pytest.mark.slow
def test_each_job_says_where_its_run_is_in_one_line_and_wandb_stays_quiet(default_sweep):
    sweep, proc = default_sweep
    out = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in out if line.lower().startswith("wandb:")], "wandb chatter on the console"
    notes = [line for line in out if "wandb" in line.lower().replace(str(sweep).lower(), "")]
    for num in ("0", "1"):
        (run_dir,) = _offline_runs(sweep / num)
        assert sum(str(run_dir) in n for n in notes) == 1
        assert (
            f"pgolf: wandb offline run 'seed={('1337', '42')[int(num)]}' in {run_dir}; upload: wandb sync {run_dir}"
            in out
        )
    (report_dir,) = _offline_runs(sweep)
    assert any(f"wandb sync {report_dir}" in n for n in notes)
    assert len(notes) == 3, notes


# A sitecustomize that makes these packages unimportable, as on a grader's machine without them.
BLOCKER = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, _Absent())
"""


def _clean_env(tmp: Path, blocked: tuple[str, ...]) -> dict[str, str]:
    shim = tmp / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=set(blocked))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PGOLF_", "PYTHON"))}
    return env | {"PYTHONPATH": str(shim), "PGOLF_JOB_DIR": str(tmp / "job"), "TMPDIR": str(tmp)}


@pytest.mark.slow
def test_a_sweep_jobs_packed_script_runs_without_wandb(default_sweep, tmp_path):
    from pgolf.parent.submission import pack

    sweep, _ = default_sweep
    job = sweep / "0"
    info = pack(job, tmp_path / "sub")
    script = Path(info["dir"]) / "train_gpt.py"
    files = unpack(script.read_text(encoding="utf-8"))
    assert "pgolf/parent/tracking.py" not in files and "pgolf/history.py" in files
    assert "wandb" not in json.loads(files["config.json"])
    blocked = ("wandb", "hydra", "omegaconf")  # the worker needs none of the parent's libraries
    env = _clean_env(tmp_path, blocked)
    probe = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the blocker works
    work = tmp_path / "empty"
    work.mkdir()
    (work / "train_gpt.py").write_bytes(script.read_bytes())
    proc = subprocess.run(
        [sys.executable, "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "job" / "result.json").read_text())
    want = json.loads((job / "result.json").read_text())
    assert got["status"] == "ok" and abs(got["val_bpb"] - want["val_bpb"]) <= 1e-6
    reqs = (Path(info["dir"]) / "requirements.txt").read_text().splitlines()
    assert not any(line.split("#")[0].strip().startswith("wandb") for line in reqs)


def test_the_packer_never_ships_tracking_even_when_the_parent_imported_it():
    import pgolf.parent.tracking  # noqa: F401 - a single run trains in the parent, which imported it

    assert not any("tracking" in rel for rel in imported_modules())


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto", multirun=True) == "offline"  # sweeps log, offline, by default
    assert resolve_mode("auto", multirun=False) == "disabled"  # single runs don't start wandb
    assert resolve_mode("online", multirun=False) == "online"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("auto", multirun=False) == "online"
    assert resolve_mode("offline", multirun=True) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb's own off switch wins over everything
    assert resolve_mode("online", multirun=True) == "disabled"


def test_a_bad_wandb_setting_names_the_key():
    from pgolf.registry import ConfigError

    with pytest.raises(ConfigError, match="wandb.mode"):
        wandb_config({"mode": "cloud"}, multirun=True)


def test_runs_are_named_by_what_the_sweep_varies(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model.num_layers=9,11\n    - seed=1,2\n    - hardware=cpu\n"
    )
    job = ["model.num_layers=11", "seed=2", "hardware=cpu"]
    assert swept_overrides(tmp_path, job) == ["model.num_layers=11", "seed=2"]
    frozen = {"label": "", "seed": 2, "model": {"name": "gpt"}, "optimizer": {"name": "muon"}}
    assert run_name(frozen, ["seed=2"]) == "seed=2"
    assert run_name({**frozen, "label": "wide"}, ["seed=2"]) == "wide seed=2"
    assert run_name(frozen, []) == "gpt-muon-s2"  # a single run
    assert swept_overrides(tmp_path / "elsewhere", job) == job  # no multirun.yaml: every override


def test_wandb_failing_to_start_never_stops_the_job(tmp_path, monkeypatch, capsys):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    wb = wandb_config({"mode": "online"}, multirun=True)
    frozen = {"seed": 1, "label": "", "model": {"name": "m"}, "optimizer": {"name": "o"}}
    assert start_job_run(wb, tmp_path, frozen, "seed=1", "sweep-x") is None
    err = capsys.readouterr().err
    assert "api_key not configured" in err and "wandb login" in err and "wandb.mode=offline" in err


class _RecordingRun:
    """Stands in for a wandb run in the follower's unit test: records what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.exit_code: int | None = None

    def log(self, row: dict, step: int) -> None:
        self.rows.append((step, row))

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code


def test_the_follower_copies_whole_rows_once_and_a_resumed_job_continues_after_them(tmp_path):
    from pgolf.history import METRICS_FILE, History
    from pgolf.parent.tracking import JobRun

    hist = History(tmp_path, enabled=True)
    for step in (1, 2, 3):
        hist(step, train_loss=5.0 - step)
    hist.close()
    with open(tmp_path / METRICS_FILE, "ab") as f:
        f.write(b'{"step": 4, "train_lo')  # the worker was killed mid-row
    run = _RecordingRun()
    job = JobRun(run, tmp_path, {"id": "abc", "step": 0, "offset": 0})
    job.close()  # no result.json: the job died
    assert [s for s, _ in run.rows] == [1, 2, 3] and run.rows[0][1] == {"train_loss": 4.0}
    assert run.summary["status"] == "missing" and run.exit_code == 1
    state = json.loads((tmp_path / "wandb.json").read_text())
    assert state["step"] == 3 and state["offset"] == len(
        b"".join((tmp_path / METRICS_FILE).read_bytes().splitlines(True)[:3])
    )

    # resume=<job>: the worker retrains from its checkpoint at step 1; rows below step 3 are not new
    hist = History(tmp_path, enabled=True)  # ends the torn row first
    for step in (2, 3, 4, 5):
        hist(step, train_loss=10.0 + step)
    hist(5, val_loss=1.5, val_bpb=2.5)
    hist.close()
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "val_bpb": 1.25, "val_loss": 2.0,
                                                       "metrics": {"pre_quant": {"val_bpb": 1.2}}}))  # fmt: skip
    run = _RecordingRun()
    JobRun(run, tmp_path, state).close()
    assert [s for s, _ in run.rows] == [3, 4, 5, 5]
    assert run.summary == {"status": "ok", "val_bpb": 1.25, "val_loss": 2.0, "pre_quant_val_bpb": 1.2}
    assert run.exit_code == 0


def test_without_wandb_installed_a_sweep_trains_untracked_and_says_how_to_install(
    tmp_path, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert resolve_mode("auto", multirun=True) == "disabled"  # the default needs no wandb
    wb = wandb_config({"mode": "offline"}, multirun=True)  # asked for explicitly: say what is missing
    frozen = {"seed": 1, "label": "", "model": {"name": "m"}, "optimizer": {"name": "o"}}
    assert start_job_run(wb, tmp_path, frozen, "seed=1", None) is None
    assert 'pip install "wandb>=0.19.10,<0.32"' in capsys.readouterr().out


def test_the_installed_wandb_is_in_the_range_pgolf_pins():
    import wandb
    from conftest import REPO
    from packaging.requirements import Requirement

    from pgolf.parent.tracking import INSTALL_HINT

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if d.startswith("wandb")]
    assert wandb.__version__ in pin.specifier, f"wandb {wandb.__version__} is outside the tested range {pin}"
    assert Requirement(INSTALL_HINT.split('"')[1]) == pin  # the hint printed to users names the same range
