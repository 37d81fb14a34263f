"""bench/fp8_gemm.py, the device probe of the FP8 lever: its shapes and its FP8 arithmetic, on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fp8_gemm  # noqa: E402


def test_shapes_are_the_experiments_linear_layers_and_its_head():
    tokens, shapes = fp8_gemm.linear_shapes("pr726")
    assert tokens == 786_432 // 8
    # 11 layers: q and out (512x512), k and v (256x512), MLP 3x up and down, the tied 1024-row head
    assert shapes == {(512, 512): 22, (256, 512): 22, (1536, 512): 11, (512, 1536): 11, (1024, 512): 1}


def test_fp8_step_computes_the_three_gemms_of_a_linear_layer():
    """Forward, input gradient and weight gradient within FP8's rounding of bf16's (a wrong layout
    or a swapped scale is off by far more)."""
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("this torch has no _scaled_mm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16()
    w = (torch.randn(48, 32, generator=g) / 32**0.5).bfloat16()
    dy = (torch.randn(64, 48, generator=g) * 1e-3).bfloat16()
    try:
        got = fp8_gemm.fp8_step(x, w, dy)
    except RuntimeError as e:  # a CPU build without FP8 GEMMs
        pytest.skip(f"_scaled_mm does not run here: {e}")
    for ref, out in zip(fp8_gemm.bf16_step(x, w, dy), got):
        assert out.shape == ref.shape
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 0.1
