"""Checkpoint state and kill-and-resume: a resumed job reaches exactly the uninterrupted result."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import made_once, run_cli, tiny_cpu_args

from pgolf.checkpoint import FAULT_ENV, Checkpointer, latest_step, training_parts
from pgolf.config import CheckpointConfig
from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BaselineModelConfig
from pgolf.optim.config import MuonConfig
from pgolf.optim.muon import OptimizerBundle

TINY = BaselineModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


def _steps(model: BaselineGPT, bundle: OptimizerBundle, first: int, n: int) -> None:
    gen = torch.Generator().manual_seed(first)
    for step in range(first, first + n):
        x = torch.randint(0, 64, (2, 16), generator=gen)
        bundle.zero_grad()
        model(x, x.roll(-1, 1)).backward()
        bundle.step(step, 0.0, 10, None)


def test_optimizer_bundle_state_roundtrip_continues_exactly():
    torch.manual_seed(0)
    cfg = MuonConfig()
    model = BaselineGPT(TINY)
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), compile_ns=False)
    _steps(model, bundle, 0, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(bundle.state_dict())
    assert saved_opt["muon"] and all(s["state"] for s in saved_opt["adam"])
    _steps(model, bundle, 3, 2)

    fresh = BaselineGPT(TINY)
    fresh.load_state_dict(saved_model)
    fresh_bundle = OptimizerBundle(fresh, cfg, torch.device("cpu"), compile_ns=False)
    fresh_bundle.load_state_dict(saved_opt)
    _steps(fresh, fresh_bundle, 3, 2)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # Without the optimizer state the continuation differs: the roundtrip above is what matters.
    bare = BaselineGPT(TINY)
    bare.load_state_dict(saved_model)
    _steps(bare, OptimizerBundle(bare, cfg, torch.device("cpu"), compile_ns=False), 3, 2)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bare.state_dict().values()))


def test_muon_state_from_another_model_is_refused():
    cfg = MuonConfig()
    model = BaselineGPT(TINY)
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), compile_ns=False)
    _steps(model, bundle, 0, 1)
    other = BaselineGPT(
        BaselineModelConfig(vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
    )
    other_bundle = OptimizerBundle(other, cfg, torch.device("cpu"), compile_ns=False)
    with pytest.raises(ValueError, match="another model or world size"):
        other_bundle.muon.load_state_dict(bundle.muon.state_dict())
    with pytest.raises(ValueError):  # Adam says so too (its own message)
        other_bundle.load_state_dict(bundle.state_dict())


class _FakeTrainer:
    def __init__(self):
        self.model = BaselineGPT(TINY)
        self.opt = OptimizerBundle(self.model, MuonConfig(), torch.device("cpu"), compile_ns=False)
        self.loader = None

    def checkpointer(
        self, cfg: CheckpointConfig, job_dir: Path, world_size: int = 1, fingerprint: str = "abc"
    ):
        parts = training_parts(self.model, self.opt, self.loader, torch.device("cpu"))
        return Checkpointer(cfg, job_dir, 0, world_size, fingerprint, parts=parts)


class _Loader:
    def __init__(self, pos: int = 0):
        self.pos = pos

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def test_checkpointer_commits_atomically_and_guards_its_job(tmp_path):
    cfg = CheckpointConfig(every_steps=2)
    tr = _FakeTrainer()
    tr.loader = _Loader(123)
    ck = tr.checkpointer(cfg, tmp_path)
    assert ck.enabled and ck.due(4) and not ck.due(3)
    _steps(tr.model, tr.opt, 0, 1)
    for step in (2, 4):
        ck.save(
            {
                "step": step,
                "train_ms": 10.0 * step,
                "stop_after": None,
                "losses": [(1, 5.0)],
                "step_host_ms": [],
            },
        )
    # Only the committed step is kept; nothing half-written is left behind.
    assert latest_step(tmp_path) == 4
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["latest.json", "step_0000004"]
    assert not list((tmp_path / "checkpoint").rglob(".*tmp"))
    # A torn write of a newer step (no commit) is ignored: latest.json still says 4.
    (tmp_path / "checkpoint" / "step_0000006").mkdir()
    (tmp_path / "checkpoint" / "step_0000006" / ".rank0.pt.tmp").write_bytes(b"partial")

    fresh = _FakeTrainer()
    fresh.loader = _Loader()
    state = fresh.checkpointer(cfg, tmp_path).restore()
    assert state["step"] == 4 and state["train_ms"] == 40.0 and fresh.loader.pos == 123
    for a, b in zip(tr.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="another configuration or seed"):
        _FakeTrainer().checkpointer(cfg, tmp_path, fingerprint="other").restore()
    with pytest.raises(RuntimeError, match="processes"):
        _FakeTrainer().checkpointer(cfg, tmp_path, world_size=2).restore()
    ck.discard()
    assert not (tmp_path / "checkpoint").exists()


def test_time_based_checkpoints_vote():
    ck = Checkpointer(CheckpointConfig(every_seconds=2.0), Path("/nonexistent"), 0, 1, "x")
    assert ck.time_due(1999.0) == 0.0 and ck.time_due(2000.0) == 1.0
    assert not ck.due(7)
    ck.vote(True, 7)  # the all-reduced flag, identical on every rank
    assert ck.due(7)
    ck.time_flag, ck.saved_step = False, 8
    ck.vote(True, 8)  # a lagged vote cast before the save at step 8: already covered
    assert not ck.due(9)
    ck.vote(True, 9)
    assert ck.due(9)
    off = Checkpointer(CheckpointConfig(), Path("/nonexistent"), 0, 1, "x")
    assert not off.enabled and off.time_due(1e9) == 0.0


def test_a_run_without_checkpoints_gets_the_null_policy_and_never_imports_the_module(tmp_path, monkeypatch):
    """Checkpoints off, no drill, no checkpoint folder: `NoCheckpoints` answers every call the
    trainer makes as a Checkpointer would there; any of the three brings the real one back."""
    import subprocess
    import sys

    from pgolf.checkpoint_gate import NoCheckpoints, needs_checkpointer

    monkeypatch.delenv(FAULT_ENV, raising=False)
    off, job = CheckpointConfig(), tmp_path / "job"
    job.mkdir()
    assert not needs_checkpointer(off, job)
    null, real = NoCheckpoints(), Checkpointer(off, job, 0, 1, "x")
    assert null.enabled is real.enabled is False
    assert null.time_due(1e9) == real.time_due(1e9) == 0.0
    for ck in (null, real):
        ck.vote(True, 3)
        ck.fault_point(3)
        assert ck.restore() is None
        ck.discard()
    assert needs_checkpointer(CheckpointConfig(every_steps=2), job)
    assert needs_checkpointer(CheckpointConfig(every_seconds=1.0), job)
    (job / "checkpoint").mkdir()
    assert needs_checkpointer(off, job)  # a stale one gets reported
    monkeypatch.setenv(FAULT_ENV, "3")
    assert needs_checkpointer(off, tmp_path)
    probe = "import sys, pgolf.trainer; assert 'pgolf.checkpoint' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- kill and resume


SHORT = {"train.iterations": "8", "train.grad_accum_base": "2"}


def _result(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shard_dir, tokenizer_model) -> dict:
    """The reference: the same job without checkpoints (saving must not change what is computed)."""

    def make(tmp: Path) -> None:
        proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **SHORT), tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return _result(made_once(tmp_path_factory, "uninterrupted", make) / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy,kill_after,resumes_at",
    [
        ({"checkpoint.every_steps": "3"}, 4, 3),  # killed one step after a checkpoint: redo step 4
        ({"checkpoint.every_seconds": "0.000001"}, 5, 5),  # time-based: the all-reduced flag path
    ],
)
def test_kill_and_resume_reaches_the_uninterrupted_result(
    tmp_path, shard_dir, tokenizer_model, uninterrupted, policy, kill_after, resumes_at
):
    args = tiny_cpu_args(shard_dir, tokenizer_model, **SHORT, **policy)
    job = tmp_path / "killed"
    killed = run_cli([*args, f"hydra.run.dir={job}"], tmp_path, env={FAULT_ENV: str(kill_after)})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no chance to write anything
    assert not (job / "result.json").exists()
    assert latest_step(job) == resumes_at

    resumed = run_cli([f"resume={job}", f"hydra.run.dir={tmp_path / 'resume_cmd'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from its checkpoint at step {resumes_at}" in resumed.stdout
    a, b = uninterrupted, _result(job)
    assert b["status"] == "ok" and b["resumed_from_step"] == resumes_at
    assert b["steps"] == a["steps"] == 8
    assert b["train_losses"] == a["train_losses"]  # exact, every step
    assert b["val_loss"] == a["val_loss"] and b["val_bpb"] == a["val_bpb"]
    assert b["metrics"]["pre_quant"] == a["metrics"]["pre_quant"]
    assert b["bytes"]["model"] == a["bytes"]["model"]
    assert not (job / "checkpoint").exists()  # discarded after success (checkpoint.keep=false)
    assert "resumed from the checkpoint" in (job / "train.log").read_text()
    if resumes_at == 3:  # resuming a finished job does nothing (checked once)
        again = run_cli([f"resume={job}", f"hydra.run.dir={tmp_path / 'again'}"], tmp_path)
        assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_resume_refuses_other_overrides_and_unknown_dirs(tmp_path):
    proc = run_cli([f"resume={tmp_path}", "seed=3"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "drop the other overrides" in proc.stderr
    proc = run_cli([f"resume={tmp_path / 'nope'}"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "no config.json" in proc.stderr
    assert os.path.isdir(tmp_path)


def test_banked_checkpoint_holds_canonical_names_and_loads_into_either_layout(tmp_path):
    from pgolf.models.banks import BANKS
    from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
    from pgolf.models.gpt import GPT

    shape = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
    tr = _FakeTrainer()
    torch.manual_seed(0)
    tr.model = GPT(BankedGPTConfig(**shape), banked=True)
    tr.opt = OptimizerBundle(tr.model, MuonConfig(), torch.device("cpu"), compile_ns=False)
    tr.loader = _Loader(7)
    _steps(tr.model, tr.opt, 0, 2)
    ck = tr.checkpointer(CheckpointConfig(every_steps=1), tmp_path)
    ck.save({"step": 2, "train_ms": 1.0, "stop_after": None, "losses": [], "step_host_ms": []})
    saved = torch.load(tmp_path / "checkpoint" / "step_0000002" / "rank0.pt", weights_only=False)["model"]
    layered = GPT(LayeredGPTConfig(**shape), banked=False)
    assert list(saved) == list(layered.state_dict())  # the per-layer model's names, in its order
    assert not set(BANKS) & set(saved) and all(v.ndim <= 2 for v in saved.values())

    # resume into the banked model: exact weights and the same continuation
    fresh = _FakeTrainer()
    torch.manual_seed(1)
    fresh.model = GPT(BankedGPTConfig(**shape), banked=True)
    fresh.opt = OptimizerBundle(fresh.model, MuonConfig(), torch.device("cpu"), compile_ns=False)
    fresh.loader = _Loader()
    fresh.checkpointer(CheckpointConfig(every_steps=1), tmp_path).restore()
    _steps(tr.model, tr.opt, 2, 2)
    _steps(fresh.model, fresh.opt, 2, 2)
    for (name, a), b in zip(tr.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    # and the same weights load into the per-layer layout
    layered.load_state_dict(saved, strict=True)
    for k, v in layered.state_dict().items():
        assert torch.equal(v, saved[k]), k


# --------------------------------------------------------------------------- damaged checkpoints


def _saved(tmp_path: Path) -> Path:
    """A committed checkpoint of step 2 in tmp_path; returns its rank-0 file."""
    tr = _FakeTrainer()
    tr.loader = _Loader(5)
    _steps(tr.model, tr.opt, 0, 1)
    ck = tr.checkpointer(CheckpointConfig(every_steps=2), tmp_path)
    ck.save({"step": 2, "train_ms": 1.0, "stop_after": None, "losses": [], "step_host_ms": []})
    return tmp_path / "checkpoint" / "step_0000002" / "rank0.pt"


def _restore(tmp_path: Path) -> dict:
    fresh = _FakeTrainer()
    fresh.loader = _Loader()
    return fresh.checkpointer(CheckpointConfig(every_steps=2), tmp_path).restore()


def test_latest_json_records_each_files_digest(tmp_path):
    import hashlib

    rank0 = _saved(tmp_path)
    meta = json.loads((tmp_path / "checkpoint" / "latest.json").read_text())
    data = rank0.read_bytes()
    assert meta["files"] == {"rank0.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert _restore(tmp_path)["step"] == 2


@pytest.mark.parametrize("damage", ["bit_flip", "truncated"])
def test_a_damaged_rank_file_is_named_with_the_fix(tmp_path, damage):
    from pgolf.checkpoint import CheckpointError

    rank0 = _saved(tmp_path)
    data = bytearray(rank0.read_bytes())
    if damage == "bit_flip":
        # A byte inside a tensor's storage: torch.load would read it without complaint.
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    rank0.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        _restore(tmp_path)
    msg = str(e.value)
    assert str(rank0) in msg and "damaged" in msg and "bit flip" in msg
    assert f"delete {tmp_path / 'checkpoint'}" in msg


def test_a_bit_flip_loads_silently_without_the_digest(tmp_path):
    """The control for the test above: without the recorded digest the same flip goes unnoticed."""
    rank0 = _saved(tmp_path)
    data = bytearray(rank0.read_bytes())
    data[len(data) // 2] ^= 0x01
    rank0.write_bytes(bytes(data))
    latest_path = tmp_path / "checkpoint" / "latest.json"
    meta = json.loads(latest_path.read_text())
    del meta["files"]  # as a checkpoint written before digests were recorded
    latest_path.write_text(json.dumps(meta))
    assert _restore(tmp_path)["step"] == 2


@pytest.mark.parametrize(
    "latest_text,pattern",
    [
        ('{"step": 2, "dir": "step_00', r"latest\.json: not valid JSON"),
        ("\x00\x00\x00\x00", r"latest\.json: not valid JSON"),
        ('{"step": "two", "dir": "step_0000002", "world_size": 1}', r"latest\.json: expected \{'step': int"),
        ("[1, 2]", r"latest\.json: expected"),
    ],
)
def test_a_damaged_latest_json_is_named_with_the_fix(tmp_path, latest_text, pattern):
    from pgolf.checkpoint import CheckpointError

    _saved(tmp_path)
    (tmp_path / "checkpoint" / "latest.json").write_text(latest_text)
    for call in (lambda: latest_step(tmp_path), lambda: _restore(tmp_path)):
        with pytest.raises(CheckpointError, match=pattern) as e:
            call()
        assert "delete" in str(e.value) and "step 0" in str(e.value)


def test_an_unreadable_or_missing_rank_file_is_named(tmp_path):
    from pgolf.checkpoint import CheckpointError

    rank0 = _saved(tmp_path)
    latest_path = tmp_path / "checkpoint" / "latest.json"
    meta = json.loads(latest_path.read_text())
    del meta["files"]  # no digest: the damage reaches torch.load, whose error is wrapped
    latest_path.write_text(json.dumps(meta))
    rank0.write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(CheckpointError, match=r"rank0\.pt: not a readable checkpoint \(.*delete"):
        _restore(tmp_path)
    rank0.unlink()
    with pytest.raises(CheckpointError, match=r"rank0\.pt: missing, though .*latest\.json points at it"):
        _restore(tmp_path)


def test_a_checkpoint_of_another_model_is_named(tmp_path):
    from pgolf.checkpoint import CheckpointError

    _saved(tmp_path)
    other = _FakeTrainer()
    other.model = BaselineGPT(
        BaselineModelConfig(vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
    )
    other.loader = _Loader()
    with pytest.raises(CheckpointError, match=r"rank0\.pt: does not fit this job's model"):
        other.checkpointer(CheckpointConfig(every_steps=2), tmp_path).restore()
