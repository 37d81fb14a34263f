"""CPU end-to-end runs through `python -m pgolf.run`: results, bytes, failures, priming, packing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_cpu_args, write_tokens

pytestmark = pytest.mark.slow


def load_result(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "result.json").read_text())


def test_result_json_is_complete(tiny_run):
    tmp, proc = tiny_run
    r = load_result(tmp)
    assert r["status"] == "ok"
    assert r["steps"] == 6 and len(r["train_losses"]) == 6
    assert np.isfinite(r["val_bpb"]) and np.isfinite(r["val_loss"]) and r["val_bpb"] > 0
    assert set(r["timings"]) >= {"build", "prime", "train", "artifact", "eval", "ttt", "total"}
    assert r["limits"]["artifact_bytes"]["held"] is True
    for key in ("config_hash", "config_hash_with_seed", "seed", "ms_per_step", "versions", "world_size"):
        assert key in r
    assert r["versions"]["torch"] and r["world_size"] == 1 and r["grad_accum"] == 8
    assert "val_bpb" in proc.stdout and "artifact" in proc.stdout


def test_artifact_bytes_are_the_files_that_ship(tiny_run):
    tmp, _ = tiny_run
    r = load_result(tmp)
    art = tmp / "run" / "artifact"
    model = (art / "final_model.ptz").stat().st_size
    code = (art / "train_gpt.py").stat().st_size
    assert r["bytes"]["model"] == model
    assert (
        r["bytes"]["code"] == code == len((art / "train_gpt.py").read_text(encoding="utf-8").encode("utf-8"))
    )
    assert r["bytes"]["total"] == model + code
    assert r["bytes"]["cap"] == 16_000_000


def test_roundtrip_eval_scores_the_artifact(tiny_run):
    """Independently dequantize the shipped blob and check the scored loss matches it."""
    import torch

    from pgolf.components import MODELS
    from pgolf.config import job_config_from_dict
    from pgolf.data.source import build_shard_source
    from pgolf.eval.val import ByteLUT, evaluate
    from pgolf.quant.int8 import Int8Zlib

    tmp, _ = tiny_run
    run = tmp / "run"
    job = job_config_from_dict(json.loads((run / "config.json").read_text()))
    state = Int8Zlib(job.quant).load((run / "artifact" / "final_model.ptz").read_bytes())
    model = MODELS.build(job.model)
    model.load_state_dict(state)
    src = build_shard_source(job.data)
    res = evaluate(
        model.token_nll,
        src.val_tokens(job.train.seq_len),
        job.train.seq_len,
        16,
        ByteLUT(src.bytes, torch.device("cpu")),
        torch.device("cpu"),
        torch.float32,
    )
    r = load_result(tmp)
    assert abs(res.val_loss - r["val_loss"]) < 1e-5
    assert abs(res.val_bpb - r["val_bpb"]) < 1e-5


def test_priming_is_undone(tiny_run, tmp_path, shard_dir, tokenizer_model):
    """Prime steps compile and are then erased: losses equal those of a run without priming."""
    primed, _ = tiny_run
    assert "primed 2 steps" in (primed / "run" / "train.log").read_text()  # tiny_cpu_args prime 2 steps
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **{"train.prime_steps": "0"}), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {0: load_result(tmp_path), 2: load_result(primed)}
    assert runs[0]["train_losses"] == runs[2]["train_losses"]
    assert runs[0]["val_loss"] == runs[2]["val_loss"]


def test_keep_primed_momentum_carries_only_muon_momentum_into_training(
    tiny_run, tmp_path, shard_dir, tokenizer_model
):
    """With optimizer.keep_primed_momentum the priming steps' Muon momentum reaches the first real
    update (as PR #1775's warm-up leaves it), while the weights still start from the init."""
    primed, _ = tiny_run
    args = tiny_cpu_args(shard_dir, tokenizer_model, **{"optimizer.keep_primed_momentum": "true"})
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept, reset = load_result(tmp_path)["train_losses"], load_result(primed)["train_losses"]
    assert kept[0] == reset[0]  # the first loss comes before any update: same weights, same batch
    assert kept[1:] != reset[1:]  # the updates differ from the first on


def test_packed_script_reproduces_the_run(tiny_run, tmp_path):
    """The shipped train_gpt.py runs from an empty directory and reaches the same metrics."""
    src, _ = tiny_run
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PGOLF_JOB_DIR"] = str(empty / "job")
    proc = subprocess.run(
        [sys.executable, str(src / "run" / "artifact" / "train_gpt.py")],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    packed = json.loads((empty / "job" / "result.json").read_text())
    orig = load_result(src)
    assert packed["status"] == "ok"
    assert packed["train_losses"] == orig["train_losses"]
    assert packed["val_loss"] == pytest.approx(orig["val_loss"], abs=1e-9)
    # It ships the file it ran from (the packer is not in it), so the code bytes are that file's size.
    script = (src / "run" / "artifact" / "train_gpt.py").read_bytes()
    assert (empty / "job" / "artifact" / "train_gpt.py").read_bytes() == script
    assert packed["bytes"]["code"] == orig["bytes"]["code"] == len(script)


def test_over_cap_artifact_is_refused(tmp_path, shard_dir, tokenizer_model):
    # The cap is checked on the artifact, whatever the training before it: one step, no priming.
    short = {"budget.artifact_bytes": "1000", "train.iterations": "1", "train.prime_steps": "0"}
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **short), tmp_path)
    assert proc.returncode == 1
    r = load_result(tmp_path)
    assert r["status"] == "failed"
    assert "over the budget.artifact_bytes cap of 1,000" in r["error"]
    assert f"{r['bytes']['total']:,}" in r["error"] and r["bytes"]["within_cap"] is False
    assert not (tmp_path / "run" / "artifact" / "final_model.ptz").exists()


def test_nan_loss_stops_with_a_clear_error(tmp_path, shard_dir, tokenizer_model):
    bad = {f"optimizer.{k}": "1e30" for k in ("tied_embed_lr", "matrix_lr", "scalar_lr")}
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **bad), tmp_path)
    assert proc.returncode == 1
    r = load_result(tmp_path)
    assert r["status"] == "failed" and "NaN/inf" in r["error"] and "learning rates" in r["error"]
    assert "NaN/inf" in proc.stderr


def test_malformed_shard_names_the_file(tmp_path, shard_dir, tokenizer_model):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for f in shard_dir.glob("*.bin"):
        (bad_dir / f.name).write_bytes(f.read_bytes())
    victim = sorted(bad_dir.glob("fineweb_train_*.bin"))[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    proc = run_cli(tiny_cpu_args(bad_dir, tokenizer_model), tmp_path)
    assert proc.returncode == 1
    r = load_result(tmp_path)
    assert r["status"] == "failed" and victim.name in r["error"] and "truncated" in r["error"]


def test_token_ids_outside_vocab_are_rejected(tmp_path, tokenizer_model):
    d = tmp_path / "shards"
    d.mkdir()
    write_tokens(d / "fineweb_train_000000.bin", [1, 5, 6, 7] * 500)
    write_tokens(d / "fineweb_val_000000.bin", [1, 5, 999, 7] * 500)
    proc = run_cli(tiny_cpu_args(d, tokenizer_model), tmp_path)
    assert proc.returncode == 1
    r = load_result(tmp_path)
    assert "fineweb_val_000000.bin" in r["error"] and "999" in r["error"]


def test_missing_tokenizer_is_named(tmp_path, shard_dir):
    proc = run_cli(tiny_cpu_args(shard_dir, tmp_path / "nope.model"), tmp_path)
    assert proc.returncode == 1
    assert "nope.model" in load_result(tmp_path)["error"]


def test_empty_glob_is_named(tmp_path, tokenizer_model):
    proc = run_cli(tiny_cpu_args(tmp_path, tokenizer_model), tmp_path)
    assert proc.returncode == 1
    assert "no train shards match" in load_result(tmp_path)["error"]


def test_offline_default_runs_with_no_arguments(tmp_path):
    """The README's main command: the embedded corpus, built and cached on first use."""
    proc = run_cli([], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load_result(tmp_path)
    assert r["status"] == "ok" and r["label"] == "offline" and r["steps"] == 200
    # A trained model beats the uniform distribution (ln 1024 = 6.93 nats) by a wide margin.
    assert r["val_loss"] < 5.0
    assert "val_bpb" in proc.stdout


def test_step_function_has_no_host_syncs():
    """The training step and the optimizer never read device values on the host."""
    import inspect

    from pgolf.optim import muon
    from pgolf.trainer import Trainer

    sources = [
        inspect.getsource(Trainer._train_step),
        inspect.getsource(muon.OptimizerBundle.step),
        inspect.getsource(muon.Muon.step),
    ]
    for src in sources:
        for bad in (".item()", ".cpu()", ".tolist()", ".numpy()", "print("):
            assert bad not in src, f"host sync {bad} in the step"


def test_repo_layout():
    for d in ("conf", "pgolf", "launch", "outputs", "tests"):
        assert (REPO / d).is_dir()


_PLAN_MODULES = """
import json, sys
from pgolf.parent import pack, plan
from pgolf.parent.compose import compose_job
from pgolf.config import to_dict
job = compose_job(sys.argv[1:])
code = plan.code_bytes(job)
print(json.dumps({"modules": sorted(pack.shipped_modules(to_dict(job))), "code_bytes": code}))
"""


def test_plan_counts_the_modules_a_run_ships(tiny_run, shard_dir, tokenizer_model):
    """pgolf.plan's code bytes pack the same modules the worker shipped (it once left out the
    trainer, which the worker imports lazily, and printed ~14 KB too few for r0409)."""
    from pgolf.parent.pack import unpack

    tmp, _ = tiny_run
    shipped = set(unpack((tmp / "run" / "artifact" / "train_gpt.py").read_text(encoding="utf-8"))) - {
        "config.json"
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PLAN_MODULES, *tiny_cpu_args(shard_dir, tokenizer_model)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    planned = set(plan["modules"])
    assert "pgolf/trainer.py" in planned and "pgolf/train.py" in planned
    assert planned == shipped, (sorted(planned - shipped), sorted(shipped - planned))
    # ... and its code bytes are the run's, to the byte (the same packer, the same frozen config)
    assert plan["code_bytes"] == load_result(tmp)["bytes"]["code"]
