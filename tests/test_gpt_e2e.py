"""`python -m pgolf.run model=banked` end to end on CPU: the record preset, shrunk, with depth
recurrence switching on mid-run; the artifact holds per-layer 2-D matrices and scores as trained."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import made_once, run_cli, tiny_cpu_args

from pgolf.checkpoint import FAULT_ENV
from pgolf.parent.pack import unpack

pytestmark = pytest.mark.slow

SHRINK = {
    "model": "banked",
    "model.num_layers": "3",
    "model.model_dim": "64",
    "model.num_heads": "2",
    "model.num_kv_heads": "1",
    "model.ve_layers": "[2]",
    "model.bigram_vocab_size": "64",
    "model.num_loops": "1",
    "model.loop_start": "1",
    "model.loop_end": "1",
    "model.enable_looping_at": "0.5",
    "optimizer.grad_clip_norm": "0.3",
}


def _banked(tmp: Path, shard_dir: Path, tokenizer_model: Path, nproc: str) -> Path:
    """The shrunk preset on `nproc` gloo processes (one thread each, so two ranks share 2 cores)."""
    args = tiny_cpu_args(shard_dir, tokenizer_model, **SHRINK, **{"hardware.nproc_per_node": nproc})
    proc = run_cli(args, tmp, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def banked_one(tmp_path_factory, shard_dir, tokenizer_model) -> Path:
    """One process: the end-to-end checks below and the reference of the two-rank run read it."""
    made = made_once(
        tmp_path_factory, "banked_one", lambda tmp: _banked(tmp, shard_dir, tokenizer_model, "1")
    )
    return made / "run"


def test_banked_preset_runs_end_to_end(banked_one):
    run = banked_one
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 6
    assert np.isfinite(result["val_bpb"]) and result["val_bpb"] > 0
    # the roundtrip scores the same weights as the pre-quant eval, up to int8 error
    assert abs(result["val_bpb"] - result["metrics"]["pre_quant"]["val_bpb"]) < 0.05
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "banked" and config["model"]["smear_gate"] == "v2"
    log = (run / "train.log").read_text()
    assert "model:banked" in log and "graph variants ['loop_off', 'loop_on']" in log
    assert "step:3 graph_variant:loop_on frac:0.500 layers:[0, 1, 1, 2]" in log  # 3 of 6 steps

    # The artifact holds the canonical per-layer matrices, never a 3-D bank.
    obj = torch.load(io.BytesIO(zlib.decompress((run / "artifact" / "final_model.ptz").read_bytes())))
    names = set(obj["quantized"]) | set(obj["passthrough"])
    for i in range(3):
        for kind in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            assert f"blocks.{i}.{kind}.weight" in names
    assert not any("bank" in n for n in names)
    assert all(t.ndim <= 2 for t in obj["quantized"].values())

    # and the shipped code carries the model family
    wrapper = (run / "artifact" / "train_gpt.py").read_text()
    shipped = set(unpack(wrapper))
    assert {"pgolf/models/gpt.py", "pgolf/models/banks.py", "pgolf/models/blocks.py"} <= shipped


def test_banked_two_gloo_processes_match_one(banked_one, tmp_path, shard_dir, tokenizer_model):
    """Muon splits bank slices across ranks (slice j -> rank j % world) and shares the updates; with
    DDP averaging the bank gradients, 2 ranks train like 1 (the tolerance of test_dist.py)."""
    one = json.loads((banked_one / "result.json").read_text())
    two = json.loads((_banked(tmp_path, shard_dir, tokenizer_model, "2") / "result.json").read_text())
    assert (one["world_size"], one["grad_accum"]) == (1, 8)
    assert (two["world_size"], two["grad_accum"]) == (2, 4)
    for (s1, a), (s2, b) in zip(one["train_losses"], two["train_losses"]):
        assert s1 == s2 and b == pytest.approx(a, rel=5e-4)
    assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=5e-4)


def test_banked_kill_and_resume_across_the_loop_switch(tmp_path, shard_dir, tokenizer_model):
    """Killed after the step-3 checkpoint, resumed: the loops still switch on at step 4 (half of 8
    steps) and the run ends exactly where the uninterrupted one does (banks, Muon momentum per
    bank-slice group, and the host-side loop flag all restored or recomputed)."""
    short = {**SHRINK, "train.iterations": "8", "train.grad_accum_base": "2", "checkpoint.every_steps": "3"}
    args = tiny_cpu_args(shard_dir, tokenizer_model, **short)
    straight = run_cli(args, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    job = tmp_path / "killed"
    killed = run_cli([*args, f"hydra.run.dir={job}"], tmp_path, env={FAULT_ENV: "4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli([f"resume={job}", f"hydra.run.dir={tmp_path / 'resume_cmd'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "run" / "result.json").read_text())
    b = json.loads((job / "result.json").read_text())
    assert b["resumed_from_step"] == 3 and b["train_losses"] == a["train_losses"]
    assert b["val_bpb"] == a["val_bpb"]
    assert "step:4 graph_variant:loop_on" in (job / "train.log").read_text()
