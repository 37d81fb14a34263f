"""hardware.mix_order_reduction: the hardware group's switch of an Inductor setting (a speed lever,
docs/benchmarks.md §9e). It reaches torch._inductor.config before anything compiles, `auto` leaves
Inductor's own value (and so an environment variable a bench sets), and a torch without the
setting is told by name."""

from __future__ import annotations

import pytest
import torch._inductor.config as inductor
from conftest import worker_job

from pgolf.hw import device
from pgolf.hw.config import AutoHardwareConfig, CpuHardwareConfig, CudaHardwareConfig
from pgolf.hw.device import resolve_auto, set_inductor_options
from pgolf.registry import ConfigError


@pytest.fixture
def mix_order():
    """Inductor's value before the test, restored after it."""
    before = inductor.triton.mix_order_reduction
    yield before
    inductor.triton.mix_order_reduction = before


@pytest.mark.parametrize("hardware", ["gpu", "h100x8", "cpu", "auto"])
def test_every_hardware_preset_composes_the_switch(compose, hardware):
    assert worker_job(compose, f"hardware={hardware}").hardware.mix_order_reduction == "auto"
    off = worker_job(compose, f"hardware={hardware}", "hardware.mix_order_reduction=false")
    assert off.hardware.mix_order_reduction is False


def test_a_bad_value_names_the_key(compose):
    with pytest.raises(ConfigError, match="hardware.mix_order_reduction"):
        worker_job(compose, "hardware=gpu", "hardware.mix_order_reduction=sometimes")


@pytest.mark.parametrize("value", [False, True])
def test_a_value_sets_inductor_and_auto_leaves_it(mix_order, value):
    set_inductor_options(CudaHardwareConfig(mix_order_reduction=value))
    assert inductor.triton.mix_order_reduction is value
    inductor.triton.mix_order_reduction = not value  # as TORCHINDUCTOR_MIX_ORDER_REDUCTION would
    set_inductor_options(CudaHardwareConfig(mix_order_reduction="auto"))
    assert inductor.triton.mix_order_reduction is (not value)


def test_a_torch_without_the_setting_is_told_by_name(monkeypatch, mix_order):
    import types

    monkeypatch.setattr(device, "_inductor_triton_config", lambda: types.SimpleNamespace())
    with pytest.raises(
        RuntimeError, match=r"hardware.mix_order_reduction=False .*triton.mix_order_reduction"
    ):
        set_inductor_options(CudaHardwareConfig(mix_order_reduction=False))
    set_inductor_options(CudaHardwareConfig())  # auto asks nothing of this torch


def test_auto_hands_the_switch_on(monkeypatch):
    assert resolve_auto(AutoHardwareConfig(mix_order_reduction=False)) == CpuHardwareConfig(
        mix_order_reduction=False
    )
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 1)
    gpu = resolve_auto(AutoHardwareConfig(mix_order_reduction=False))
    assert isinstance(gpu, CudaHardwareConfig) and gpu.mix_order_reduction is False


def test_a_cuda_worker_sets_it_when_it_builds_its_runtime(monkeypatch, mix_order):
    """`pgolf.hw.device.build` (the worker's first step, before any compile) applies the switch; the
    CUDA calls it makes are stood in for, and the global switches it flips are put back."""
    import torch

    monkeypatch.setattr(device.torch.cuda, "set_device", lambda d: None)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        device.build(CudaHardwareConfig(mix_order_reduction=False))
        assert inductor.triton.mix_order_reduction is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
