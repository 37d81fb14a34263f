"""Straight-through fake quantization for (late) QAT (docs/techniques.md#late-qat).

The 2026-03-20 to 2026-03-23 records' form, per row r of a matrix (rows = all but the last dim,
so a 3-D bank is quantized matrix by matrix):
    s_r = max(max_j |W_rj| / 31, 1/31), W~ = clamp(round(W / s), -32, 31) * s,
the same scale floor as the records' int6 exporter. The forward uses W + blend * stopgrad(W~ - W):
with a 0-d tensor `blend` the switch is a graph input, so flipping it from 0 to 1 changes what a
`torch.compile(fullgraph=True)` graph computes without a recompile (a Python flag would be
specialized at the first trace and never take effect, as in those records).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fake_quant_rows(w: Tensor, bits: int = 6) -> Tensor:
    """Symmetric per-row fake quantization in fp32 (returns fp32)."""
    qmax = 2 ** (bits - 1) - 1
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1.0 / qmax)
    return torch.clamp(torch.round(w32 / scale), -(qmax + 1), qmax) * scale


def qat_weight(w: Tensor, blend: Tensor, bits: int = 6) -> Tensor:
    """W + blend * stopgrad(fake_quant(W) - W): the weight itself at blend 0, its int6 grid at 1,
    with the identity gradient either way (straight-through estimator)."""
    with torch.no_grad():
        delta = (fake_quant_rows(w, bits) - w.float()) * blend.float()
    return w + delta.to(w.dtype)
