"""The record experiments' speed defaults: the eval-only fused kernels on `auto` and cuDNN attention
first in training, composed for the GPU, the challenge's 8 GPUs, auto and the CPU (where they have
no effect); configs that are not records keep every switch off."""

from __future__ import annotations

import pytest
from conftest import worker_job

from pgolf.config import to_dict
from pgolf.hw.config import AutoHardwareConfig, CpuHardwareConfig, CudaHardwareConfig
from pgolf.hw.device import build, resolve_auto

RECORDS = ("r0323", "r0409", "pr339", "pr399", "pr726", "pr1532", "pr1775")


@pytest.mark.parametrize("hardware", ["gpu", "h100x8", "cpu", "auto"])
@pytest.mark.parametrize("name", RECORDS)
def test_records_turn_the_speed_switches_on(compose, name, hardware):
    j = worker_job(compose, f"experiment={name}", f"hardware={hardware}")
    assert j.model.fused_mlp_up == "auto" and j.model.fused_qk_rope == "auto"
    assert j.hardware.train_cudnn_attention is True
    assert not j.model.fused_mlp_gemm  # at most one of the two MLP fusions


@pytest.mark.parametrize(
    "overrides", [("experiment=none", "model=banked", "hardware=gpu"), ("experiment=offline",)]
)
def test_other_configs_keep_them_off(compose, overrides):
    j = to_dict(worker_job(compose, *overrides))
    assert j["model"].get("fused_mlp_up", False) is False and j["model"].get("fused_qk_rope", False) is False
    assert j["hardware"].get("train_cudnn_attention", False) is False


def test_auto_hardware_passes_the_training_kernel_choice_on(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = resolve_auto(AutoHardwareConfig(train_cudnn_attention=True))
    assert isinstance(cpu, CpuHardwareConfig) and cpu.train_cudnn_attention
    assert build(cpu).train_cudnn_attention is False  # no effect on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = resolve_auto(AutoHardwareConfig(train_cudnn_attention=True))
    assert isinstance(gpu, CudaHardwareConfig) and gpu.train_cudnn_attention and gpu.peak_tflops == 989.4
