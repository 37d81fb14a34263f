"""Hydra multirun end to end (CPU, tiny model): grids, failures, the report callback, launchers."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import CONF, run_cli, tiny_cpu_args

import pgolf.run  # noqa: F401  (registers the ${pgolf_slot_count:} resolver the gpus launcher uses)
from pgolf.run import LAUNCHER_PLUGINS, check_launcher_plugin

LAUNCHERS = sorted(p.stem for p in (CONF / "launcher").glob("*.yaml"))
EXPECTED_TARGET = {
    "local": "BasicLauncher",
    "gpus": "JoblibLauncher",
    "slurm": "SlurmLauncher",
}


def _plugin_missing(option: str) -> str | None:
    plugin = LAUNCHER_PLUGINS.get(option)
    if plugin and importlib.util.find_spec(plugin[0]) is None:
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
    assert cfg.hydra.callbacks.sweep_report._target_ == "pgolf.callbacks.SweepReport"
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
            "report.baseline='model.num_layers=1'",
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
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    from pgolf.tracking import log_sweep_summary

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = {"sweep_dirs": [str(tmp_path)], "alpha": 0.01, "min_delta_nats": 0.005, "baseline": None}
    summary.update(jobs={"total": 0, "ok": 0, "failed": 0}, groups=[])
    assert log_sweep_summary(summary, tmp_path, mode="disabled", project="pgolf") is None
    note = log_sweep_summary(summary, tmp_path, mode="offline", project="pgolf")
    assert "offline summary run" in note
    assert list((tmp_path / "wandb").glob("offline-run-*"))
