"""`auto` for the eval-only fused kernels (model.fused_mlp_up, fused_qk_rope): on where CUDA and
Triton are, off elsewhere, so CPU runs of the record experiments (which set auto) never refuse."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pgolf.config import from_dict
from pgolf.models import config
from pgolf.models.config import LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.registry import ConfigError

TINY = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
AUTO = dict(fused_mlp_up="auto", fused_qk_rope="auto")


def test_config_takes_auto_and_booleans_only():
    assert from_dict(LayeredGPTConfig, {**TINY, **AUTO}, "model").fused_mlp_up == "auto"
    assert from_dict(LayeredGPTConfig, {**TINY, "fused_qk_rope": True}, "model").fused_qk_rope is True
    with pytest.raises(ConfigError, match="model.fused_mlp_up"):
        from_dict(LayeredGPTConfig, {**TINY, "fused_mlp_up": "maybe"}, "model")


def test_auto_is_off_without_cuda_even_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not turn auto on
    model = GPT(LayeredGPTConfig(**TINY, **AUTO), banked=False)
    assert model.fused_kernels["fused_mlp_up"] is False and model.fused_kernels["fused_qk_rope"] is False
    assert model.blocks[0].mlp.fused_up is None and model.blocks[0].attn.fused_qk is None


def test_auto_is_off_without_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    assert config.switch_on("auto") is False


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_auto_is_on_with_cuda_and_triton(monkeypatch):
    """CUDA is simulated; the interpreter lets `kernels.require` accept the switch on this machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = GPT(LayeredGPTConfig(**TINY, **AUTO), banked=False)
    assert model.fused_kernels == {
        "fused_mlp": False, "fused_ce": False, "fused_mlp_train": False, "fused_mlp_gemm": False, "fused_mlp_up": True, "fused_qk_rope": True
    }  # fmt: skip
    assert model.blocks[0].mlp.fused_up is not None and model.blocks[0].attn.fused_qk is not None


def test_true_and_false_are_unchanged():
    assert config.switch_on(True) is True and config.switch_on(False) is False


def test_plan_counts_the_kernels_a_run_would_import(monkeypatch):
    """pgolf.plan packs pgolf/models/kernels.py exactly when the model would import it."""
    from pgolf.parent.plan import _fused_kernels_on

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _fused_kernels_on(LayeredGPTConfig(**TINY, **AUTO))
    assert _fused_kernels_on(LayeredGPTConfig(**TINY, fused_qk_rope=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _fused_kernels_on(LayeredGPTConfig(**TINY, **AUTO)) == (
        importlib.util.find_spec("triton") is not None
    )


def test_fused_mlp_train_takes_auto_and_is_off_without_cuda(monkeypatch):
    """The record experiments set model.fused_mlp_train=auto: a CPU run trains unfused, not refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = from_dict(LayeredGPTConfig, {**TINY, "fused_mlp_train": "auto"}, "model")
    assert cfg.fused_mlp_train == "auto"
    model = GPT(cfg, banked=False)
    assert model.fused_kernels["fused_mlp_train"] is False and model.blocks[0].mlp.fused_train is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_fused_mlp_train_auto_is_on_with_cuda_and_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = GPT(LayeredGPTConfig(**TINY, fused_mlp_train="auto"), banked=False)
    assert model.fused_kernels["fused_mlp_train"] is True and model.blocks[0].mlp.fused_train is not None


def test_fused_mlp_train_auto_still_refuses_fused_mlp():
    with pytest.raises(ConfigError, match="fused_mlp_train and model.fused_mlp"):
        from_dict(LayeredGPTConfig, {**TINY, "fused_mlp_train": "auto", "fused_mlp": True}, "model")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_plan_counts_the_training_mlp_module_when_the_switch_is_on():
    """pgolf.plan's code bytes grow by pgolf/models/fused_mlp_train.py (and the kernels it builds
    on) when model.fused_mlp_train is on, as a GPU run's packed code does."""
    import re
    import subprocess
    import sys

    def code(value: str) -> int:
        out = subprocess.run(
            [sys.executable, "-m", "pgolf.plan", "experiment=pr1532", f"model.fused_mlp_train={value}"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
        )  # fmt: skip
        found = re.search(
            r"\+ code ([\d,]+)", out.stdout
        )  # exit 1 where the bench-data estimate is over the cap
        assert found, (out.stdout + out.stderr)[-2000:]
        return int(found.group(1).replace(",", ""))

    assert code("true") > code("false") + 3000  # kernels.py and fused_mlp_train.py, compressed
