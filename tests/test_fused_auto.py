"""`auto` for the eval-only fused kernels (model.fused_mlp_up, fused_qk_rope): on where CUDA and
Triton are, off elsewhere, so CPU runs of the record experiments (which set auto) never refuse."""

from __future__ import annotations

import importlib.util

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
