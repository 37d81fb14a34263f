"""score_artifact=: an earlier run's artifact scored again under another eval/TTT config, with no
training. The re-score must reproduce the run's own score bit for bit (same weights, same eval), in
the graph variant the model was trained into, and must never pass as a submission."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_RECURRENT, run_cli, tiny_cpu_args

from pgolf.parent.check import check_run
from pgolf.parent.submission import PackError, pack

# A recurrent model whose loop switches on halfway: the trained model is scored with the loop on,
# so a re-score that scored the fresh model's loop-off graph would not reproduce the run's score.
RECURRENT = {**TINY_RECURRENT, "eval.modes": "[nonoverlap]"}


def _result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shard_dir, tokenizer_model) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("trained")
    args = tiny_cpu_args(shard_dir, tokenizer_model, **RECURRENT)
    proc = run_cli([*args, f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "graph_variant:loop_on" in (tmp / "run" / "train.log").read_text()
    return tmp / "run", args


def test_a_rescore_reproduces_the_runs_score_without_training(trained, tmp_path):
    run, args = trained
    proc = run_cli([*args, f"score_artifact={run}", f"hydra.run.dir={tmp_path / 'rescore'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _result(run), _result(tmp_path / "rescore")
    assert b["status"] == "ok" and b["val_bpb"] == a["val_bpb"] and b["val_loss"] == a["val_loss"]
    assert b["metrics"]["nonoverlap"]["tokens"] == a["metrics"]["nonoverlap"]["tokens"]
    # the artifact's bytes as its own run counted them, from the same files
    assert (b["bytes"]["model"], b["bytes"]["code"]) == (a["bytes"]["model"], a["bytes"]["code"])
    assert b["scored_artifact"]["sha256"] == a["files"]["artifact/final_model.ptz"]["sha256"]
    log = (tmp_path / "rescore" / "train.log").read_text()
    assert "score_artifact:" in log and "step:" not in log and "steps" not in b
    # a real score, never a submission: the verdict says why, and pgolf.pack refuses it
    rules = b["rules"]
    assert not rules["pass"] and not rules["checks"]["trained_here"]["held"]
    assert "re-score" in rules["reason"] and "pack the run that trained it" in rules["reason"]
    assert a["rules"]["pass"] and "trained_here" not in a["rules"]["checks"]
    with pytest.raises(PackError, match="not a legal submission: a re-score of"):
        pack(tmp_path / "rescore")
    # pgolf.check re-hashes the scored blob instead of looking for files a re-score never ships
    checked = check_run(tmp_path / "rescore")
    assert checked["checks"]["scored_artifact"]["held"] and not checked["checks"]["trained_here"]["held"]
    assert not checked["pass"] and checked["reason"].startswith("trained_here: a re-score of")


def test_a_missing_artifact_is_named_with_the_fix(trained, tmp_path):
    _, args = trained
    proc = run_cli(
        [*args, f"score_artifact={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path
    )
    assert proc.returncode == 1
    err = _result(tmp_path / "r")["error"]
    assert f"score_artifact={tmp_path / 'nowhere'}: no artifact at" in err
    assert "pass a finished run's job folder or its artifact/final_model.ptz" in err


def test_a_ttt_sweep_on_one_artifact(trained, tmp_path):
    """The README's `-m score_artifact=<run> ttt.lr=...`: another TTT on the same artifact, one job a
    setting, every job scoring the same blob, the sweep summary grouping them by setting."""
    run, args = trained
    sweep = tmp_path / "sweep"
    extra = ["eval.modes=[nonoverlap,sliding]", "ttt=score_first", "ttt.chunk_tokens=2048", "ttt.epochs=1"]
    proc = run_cli(
        ["-m", *args, *extra, f"score_artifact={run}", "ttt.lr=0.001,0.01", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [_result(sweep / n) for n in ("0", "1")]
    assert all(
        r["status"] == "ok"
        and r["scored_artifact"]["path"] == str(run.resolve() / "artifact" / "final_model.ptz")
        for r in jobs
    )
    before = [r["metrics"]["sliding"] for r in jobs]  # the same weights before TTT: the same score
    assert (before[0]["val_bpb"], before[0]["tokens"]) == (before[1]["val_bpb"], before[1]["tokens"])
    assert all(r["final_mode"] == "score_first" and {"eval", "ttt"} <= set(r["timings"]) for r in jobs)
    assert all("train" not in r["timings"] for r in jobs)
    # the unadapted score is the run's own; two learning rates give two adapted scores
    assert before[0]["val_bpb"] != jobs[0]["val_bpb"] != jobs[1]["val_bpb"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs"]["ok"] == 2 and {g["desc"] for g in summary["groups"]} == {
        "ttt.lr=0.001",
        "ttt.lr=0.01",
    }


def test_an_artifact_of_another_model_is_refused_with_the_fix(trained, tmp_path):
    run, args = trained
    other = [a for a in args if not a.startswith("model")] + [
        "model=tiny",
        "model.num_layers=2",
        "model.model_dim=64",
    ]
    proc = run_cli([*other, f"score_artifact={run}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 1
    err = _result(tmp_path / "r")["error"]
    assert f"score_artifact={run}: " in err and "does not load into this config's model=baseline" in err
    assert f"(its config.json: {run / 'config.json'})" in err
