"""Hydra multirun end to end (CPU, tiny model): grids, failures, the report callback, launchers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, REPO, default_sigint, run_cli, tiny_cpu_args

import pgolf.parent.run  # noqa: F401  (registers the ${pgolf_slot_count:} resolver the gpus launcher uses)
from pgolf.parent.run import LAUNCHER_PLUGINS, check_launcher_plugin, plugin_installed, quote_free_text

LAUNCHERS = sorted(p.stem for p in (CONF / "launcher").glob("*.yaml"))
EXPECTED_TARGET = {
    "local": "BasicLauncher",
    "gpus": "JoblibLauncher",
    "slurm": "SlurmLauncher",
}


def _plugin_missing(option: str) -> str | None:
    plugin = LAUNCHER_PLUGINS.get(option)
    if plugin and not plugin_installed(plugin[0]):
        return f"launcher={option} needs {plugin[0]} (pip install -e '.[{plugin[1]}]'); not installed here"
    return None


@pytest.mark.parametrize("option", LAUNCHERS)
def test_every_launcher_composes(option):
    from hydra import compose, initialize_config_dir

    missing = _plugin_missing(option)
    if missing:
        pytest.skip(missing)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"launcher={option}"], return_hydra_config=True)
    assert EXPECTED_TARGET[option] in cfg.hydra.launcher._target_
    assert cfg.hydra.callbacks.sweep_report._target_ == "pgolf.parent.callbacks.SweepReport"
    if option == "gpus":
        assert cfg.launch.gpu_slots is True and cfg.hydra.launcher.n_jobs >= 1
    if option == "slurm":  # one task per node, which runs torchrun itself
        assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.gpus_per_node == 8


def test_default_launcher_is_local_and_needs_no_plugin(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert not cfg.launch.gpu_slots and cfg.resume is None
    # The parent-only keys never reach a job's config.
    from pgolf.config import job_config_from_dict, to_dict

    frozen = to_dict(job_config_from_dict(compose()))
    assert not {"resume", "launch", "report"} & set(frozen)


def test_missing_launcher_plugin_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match=r"pip install -e \"\.\[parallel\]\""):
        check_launcher_plugin(["-m", "launcher=gpus", "seed=1,2"])
    check_launcher_plugin(["launcher=local"])  # the basic launcher ships with Hydra


def test_no_plugin_at_all_says_how_to_install_too(monkeypatch):
    """With no Hydra plugin installed the `hydra_plugins` namespace is missing, and find_spec of a
    module under it raises instead of returning None: the user still gets the install command."""

    def find_spec(name, *a):
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit, match=r"pip install -e \"\.\[slurm\]\""):
        check_launcher_plugin(["-m", "launcher=slurm"])


def test_slurm_launcher_off_a_cluster_says_so(monkeypatch):
    """With the plugin installed but no `srun`, submitit would fail inside Hydra with a traceback."""
    import shutil

    monkeypatch.setattr("pgolf.parent.run.plugin_installed", lambda module: True)
    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    with pytest.raises(SystemExit, match=r"launcher=slurm .* `srun` is not on PATH.*launcher=local"):
        check_launcher_plugin(["-m", "launcher=slurm", "seed=1,2"])
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    check_launcher_plugin(["-m", "launcher=slurm", "seed=1,2"])  # on a cluster: goes on


# ------------------------------------------------------------------------------ end to end


# Sweep jobs only need to finish: few, single-micro-batch steps and no priming keep each one short.
FAST = {"train.iterations": "3", "train.prime_steps": "0", "train.grad_accum_base": "1"}


def _jobs(sweep: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "result.json").read_text()) for p in sweep.iterdir() if p.name.isdigit()}


@pytest.mark.slow
def test_grid_sweep_writes_jobs_and_summary(tmp_path, shard_dir, tokenizer_model):
    sweep = tmp_path / "sweep"
    args = tiny_cpu_args(shard_dir, tokenizer_model, **FAST)
    proc = run_cli(
        [
            "-m",
            *args,
            "model.num_layers=1,2",
            "seed=1,2",
            *shell_words("report.baseline='model.num_layers=1'"),  # as bash passes it: no quotes left
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(jobs) == ["0", "1", "2", "3"]
    for num, r in jobs.items():
        assert r["status"] == "ok", r
        assert (sweep / num / "config.json").is_file() and (sweep / num / "train.log").is_file()
    # Two configurations, two seeds each: the seed-free hash groups them.
    hashes = {r["config_hash"] for r in jobs.values()}
    assert len(hashes) == 2 and len({r["config_hash_with_seed"] for r in jobs.values()}) == 4
    summary = json.loads((sweep / "summary.json").read_text())
    assert [g["n"] for g in summary["groups"]] == [2, 2] and summary["jobs"]["ok"] == 4
    descs = {g["desc"] for g in summary["groups"]}
    assert descs == {"model.num_layers=1", "model.num_layers=2"}
    two = next(g for g in summary["groups"] if g["desc"] == "model.num_layers=2")
    expected = sorted(r["val_bpb"] for r in jobs.values() if r["config_hash"] == two["config_hash"])
    assert sorted(two["val_bpb"]["values"]) == expected
    assert "welch" in two["comparison"] and "rule" in two["comparison"]  # report.baseline was used
    md = (sweep / "summary.md").read_text()
    assert "| model.num_layers=1 |" in md and "Against the baseline: model.num_layers=1" in md
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 2
    assert "Sweep summary" in proc.stdout  # the callback printed it at the end of the multirun


@pytest.mark.slow
def test_a_failing_job_never_takes_the_sweep_down(tmp_path, shard_dir, tokenizer_model):
    sweep = tmp_path / "sweep"
    args = tiny_cpu_args(shard_dir, tokenizer_model, **FAST)
    # Job 0 diverges in its worker (NaN with an embedding learning rate of 1e30); job 1 is fine.
    proc = run_cli(
        ["-m", *args, "optimizer.tied_embed_lr=1e30,0.05", "seed=3", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    # Every job ran and the summary was written, and then the sweep says (by its exit code) that a job failed.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 jobs failed" in proc.stderr and f"{sweep}/summary.md" in proc.stderr
    jobs = _jobs(sweep)
    assert jobs["0"]["status"] == "failed" and "nan" in jobs["0"]["error"].lower()
    assert jobs["1"]["status"] == "ok"
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"] == {"total": 2, "ok": 1, "failed": 1}
    assert [f["job"] for f in summary["failed"]] == ["0"]
    md = (sweep / "summary.md").read_text()
    assert "## Failed jobs" in md and "optimizer.tied_embed_lr=1e+30" in md


@pytest.mark.slow
@pytest.mark.skipif(_plugin_missing("gpus") is not None, reason=str(_plugin_missing("gpus")))
def test_gpus_launcher_runs_jobs_in_parallel_on_distinct_slots(tmp_path, shard_dir, tokenizer_model):
    """Three jobs, two fake GPUs, two at a time: each job holds one GPU and no GPU is held twice."""
    sweep = tmp_path / "sweep"
    args = tiny_cpu_args(shard_dir, tokenizer_model, **FAST, **{"hardware.threads": "1"})
    proc = run_cli(
        ["-m", *args, "launcher=gpus", "launch.devices=[0,1]", "seed=1,2,3", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(jobs) == ["0", "1", "2"] and all(r["status"] == "ok" for r in jobs.values())
    leases = [r["gpu_lease"] for r in jobs.values()]
    assert all(len(lease["devices"]) == 1 for lease in leases)
    for i, a in enumerate(leases):
        for b in leases[i + 1 :]:
            if a["devices"] == b["devices"]:  # the same GPU: one job released it before the other took it
                assert a["released"] <= b["acquired"] or b["released"] <= a["acquired"]
    assert json.loads((sweep / "summary.json").read_text())["groups"][0]["n"] == 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_sweep_summary_run_logs_offline_without_an_account(tmp_path, monkeypatch):
    from pgolf.parent.tracking import log_sweep_summary

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = {"sweep_dirs": [str(tmp_path)], "alpha": 0.01, "min_delta_nats": 0.005, "baseline": None}
    summary.update(jobs={"total": 0, "ok": 0, "failed": 0}, groups=[])
    assert log_sweep_summary(summary, tmp_path, mode="disabled", project="pgolf") is None
    note = log_sweep_summary(summary, tmp_path, mode="offline", project="pgolf")
    assert "offline summary run" in note
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------ commands as a shell passes them


def shell_words(text: str) -> list[str]:
    """The argv bash makes of `text` (quotes removed, comments dropped), from bash itself."""
    out = subprocess.run(["bash", "-c", f'printf "%s\\0" {text}'], capture_output=True, check=True)
    return [w.decode() for w in out.stdout.split(b"\0")[:-1]]


def test_free_text_overrides_are_quoted_for_hydra():
    assert quote_free_text(["report.baseline=model.num_layers=9", "seed=1,2"]) == [
        "report.baseline='model.num_layers=9'",
        "seed=1,2",
    ]
    # Commas stay inside the value instead of making a sweep; a quote inside is escaped.
    assert quote_free_text(["+report.baseline=a=1,b=2"]) == ["+report.baseline='a=1,b=2'"]
    assert quote_free_text(["report.baseline=it's"]) == ["report.baseline='it\\'s'"]
    for unchanged in ("report.baseline='x=1'", 'report.baseline="x=1"', "report.baseline=null", "seed=1"):
        assert quote_free_text([unchanged]) == [unchanged]


def test_a_resumed_sweep_may_differ_only_in_overrides_that_do_not_change_its_jobs():
    from pgolf.parent.callbacks import job_defining

    earlier = ["model.num_layers=1,2", "seed=1,2", "report.baseline='x=1'", "wandb.mode=offline"]
    now = ["model.num_layers=1,2", "seed=1,2", "launcher=gpus", "launch.devices=[0,1]", "hydra.verbose=true"]
    assert job_defining(earlier) == job_defining(now) == ["model.num_layers=1,2", "seed=1,2"]
    assert job_defining(["seed=1,2", "overwrite=true", "+report.alpha=0.05"]) == ["seed=1,2"]
    # Order decides the job numbers, so a reordered grid is another sweep.
    assert job_defining(["seed=1,2", "model.num_layers=1,2"]) != job_defining(earlier)
    assert job_defining(["seed=1,2,3"]) != job_defining(["seed=1,2"])


def test_readme_sweep_commands_parse_as_typed_in_bash():
    """Every `pgolf.run -m` line of the README, through bash and then Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    lines = [
        line.strip()
        for line in (REPO / "README.md").read_text().splitlines()
        if line.strip().startswith("python3 -m pgolf.run -m ")
    ]
    assert len(lines) >= 4 and all("<" not in line for line in lines)
    parser = OverridesParser.create()
    baselines = []
    for line in lines:
        argv = shell_words(line)
        assert argv[:4] == ["python3", "-m", "pgolf.run", "-m"], line
        for o in parser.parse_overrides(quote_free_text(argv[4:])):  # raises on anything Hydra rejects
            if o.key_or_group == "report.baseline":
                assert not o.is_sweep_override()
                baselines.append(o.value())
            if o.key_or_group == "seed":
                assert o.is_sweep_override(), line
        if "report.baseline=" in line:  # the control: what Hydra got before pgolf quoted it
            with pytest.raises(OverrideParseException):
                parser.parse_overrides(argv[4:])
    assert baselines == ["model.num_layers=9"]


# ------------------------------------------------------------------- kills, Ctrl-C, resumed sweeps


def _start(args: list[str], **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pgolf.run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        **popen,
    )


def _wait_for(what: str, check, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_pid(job_dir: Path) -> int | None:
    """The pid of the `python -m pgolf.train <job_dir>` worker, if it is running."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pgolf.train" in cmd and str(job_dir).encode() in cmd:
            return int(proc.name)
    return None


def _ok_result(job_dir: Path) -> bool:
    try:
        return json.loads((job_dir / "result.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_a_killed_job_is_recorded_and_a_rerun_keeps_finished_jobs(tmp_path, shard_dir, tokenizer_model):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *tiny_cpu_args(shard_dir, tokenizer_model, **FAST),
        "seed=1,2,3",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _start(args)
    victim = _wait_for("job 1's worker", lambda: _worker_pid(sweep / "1"))
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    # The killed job is recorded as failed; the next job and the summary still ran; the exit says so.
    assert proc.returncode == 1, err[-3000:]
    jobs = _jobs(sweep)
    assert jobs["0"]["status"] == "ok" and jobs["2"]["status"] == "ok"
    assert jobs["1"]["status"] == "failed" and "code -9" in jobs["1"]["error"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"] == {"total": 3, "ok": 2, "failed": 1}
    assert [f["job"] for f in summary["failed"]] == ["1"] and "code -9" in summary["failed"][0]["error"]
    assert "1 of 3 jobs failed" in err
    finished = {n: (sweep / n / "result.json").read_bytes() for n in ("0", "2")}
    logs = {n: (sweep / n / "train.log").read_text() for n in ("0", "2")}

    # The same command again resumes the sweep: finished jobs are kept as they are, the killed one reruns.
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the sweep" in again.stdout
    for n in ("0", "2"):
        assert f"job {n} kept" in again.stdout
        assert (sweep / n / "result.json").read_bytes() == finished[n]
        assert (sweep / n / "train.log").read_text() == logs[n]  # no second training
    assert "job 1: running it again (the earlier attempt ended with status failed" in again.stdout
    assert _jobs(sweep)["1"]["status"] == "ok"
    (earlier,) = (sweep / "1" / ".replaced").glob("*/result.json")
    assert "code -9" in json.loads(earlier.read_text())["error"]  # the failed attempt is kept aside
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"] == {"total": 3, "ok": 3, "failed": 0} and summary["groups"][0]["n"] == 3

    # Another grid into the same folder is refused before any job runs...
    other = ["-m", *tiny_cpu_args(shard_dir, tokenizer_model, **FAST), "seed=4", f"hydra.sweep.dir={sweep}"]
    refused = run_cli(other, tmp_path)
    assert refused.returncode == 2
    assert (
        f"{sweep} holds a sweep of other overrides" in refused.stderr and "overwrite=true" in refused.stderr
    )
    assert (sweep / "0" / "result.json").read_bytes() == finished["0"]
    # ... unless the user says so: the earlier sweep is moved aside, not deleted.
    replaced = run_cli([*other, "overwrite=true"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert _jobs(sweep)["0"]["seed"] == 4 and not (sweep / "1").exists()
    (moved,) = (sweep / ".replaced").iterdir()
    assert (moved / "0" / "result.json").read_bytes() == finished["0"] and (moved / "summary.md").is_file()
    assert json.loads((sweep / "summary.json").read_text())["jobs"]["total"] == 1


@pytest.mark.slow
def test_ctrl_c_writes_the_summary_of_what_finished(tmp_path, shard_dir, tokenizer_model):
    sweep = tmp_path / "sweep"
    # Job 1 would train for hours: it is always the one running when Ctrl-C comes.
    grid = tiny_cpu_args(shard_dir, tokenizer_model, **{**FAST, "train.iterations": "3,100000,3"})
    args = ["-m", *grid, f"hydra.sweep.dir={sweep}"]
    proc = _start(args, start_new_session=True)  # its own process group, like a terminal's foreground job
    _wait_for("job 1's worker", lambda: _worker_pid(sweep / "1"))
    assert _ok_result(sweep / "0")
    # While it runs, a second sweep into the same folder is refused and touches nothing.
    second = run_cli(args, tmp_path)
    assert second.returncode == 2
    assert f"{sweep} is in use by pid {proc.pid}" in second.stderr and ".pgolf.lock" in second.stderr
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the parent and the worker
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (Ctrl-C): writing the summary" in err
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"] == {"total": 2, "ok": 1, "failed": 1}
    assert summary["failed"][0]["job"] == "1" and "interrupted (Ctrl-C)" in summary["failed"][0]["error"]
    assert not (sweep / "2").exists()  # the sweep stopped: job 2 never started
    assert re.search(r"\| 1 \| .* \| failed \| interrupted \(Ctrl-C\)", (sweep / "summary.md").read_text())
    assert not (sweep / ".pgolf.lock").exists()  # released on the way out
