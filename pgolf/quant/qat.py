"""Straight-through fake quantization for (late) QAT (docs/techniques.md#late-qat).

The 2026-03-20 to 2026-03-23 records' form, per row r of a matrix (rows = all but the last dim, so a 3-D bank is
quantized matrix by matrix), at int6: s_r = max(max_j |W_rj| / 31, 1/31),
W~ = clamp(round(W / s), -32, 31) * s, the same scale floor as the records' int6 exporter (other
bits: 31 becomes qmax = 2**(bits-1) - 1). The forward uses W + blend * stopgrad(W~ - W):
with a 0-d tensor `blend` the switch is a graph input, so flipping it from 0 to 1 changes what a
`torch.compile(fullgraph=True)` graph computes without a recompile (a Python flag would be
specialized at the first trace and never take effect, as in those records).

Late QAT belongs to this module, whole: the grid (each matrix's bits are the ones the chosen
`quant` exporter gives it, `quant.matrix_bits(name)`), the fake-quant hook the model runs its block
matrices through (installed with the model's `set_weight_hook`, so no model imports this package),
and the start (`LateQAT.update`: the first step whose lr scale is under
`optimizer.late_qat_threshold`). The optimizer only reports its lr scale to it each step and keeps
its start step in its checkpoint state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def fake_quant_rows(w: Tensor, bits: int = 6) -> Tensor:
    """Symmetric per-row fake quantization in fp32 (returns fp32)."""
    qmax = 2 ** (bits - 1) - 1
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1.0 / qmax)
    return torch.clamp(torch.round(w32 / scale), -(qmax + 1), qmax) * scale


def qat_weight(w: Tensor, blend: Tensor, bits: int = 6) -> Tensor:
    """W + blend * stopgrad(fake_quant(W) - W): the weight itself at blend 0, its int-`bits` grid
    at 1, with the identity gradient either way (straight-through estimator)."""
    with torch.no_grad():
        delta = (fake_quant_rows(w, bits) - w.float()) * blend.float()
    return w + delta.to(w.dtype)


class FakeQuant(nn.Module):
    """The weight hook: each of a layer's matrices onto its own bits' grid, scaled by `blend`.

    A module, so the model holds it as a submodule: `blend` (a non-persistent buffer, never in a
    state dict or an export) follows the model's device and is a graph input of the compiled
    forward, so filling it from 0 to 1 takes effect without a recompile."""

    def __init__(self, bits: Sequence[int]):
        super().__init__()
        self.bits = tuple(bits)
        self.register_buffer("blend", torch.zeros(()), persistent=False)

    def forward(self, weights: Sequence[Tensor]) -> list[Tensor]:
        return [qat_weight(w, self.blend, b) for w, b in zip(weights, self.bits)]


class LateQAT:
    """Late QAT of one model: installs the hook (off) and switches it on once, when the lr scale
    first drops under `threshold`; the forward after that step is the first fake-quantized one."""

    def __init__(self, model: nn.Module, quant: Any, threshold: float):
        if not hasattr(model, "set_weight_hook"):
            raise ValueError(
                f"optimizer.late_qat_threshold={threshold} needs a model with late QAT support "
                f"(model=banked, layered, sp8192_recur); {type(model).__name__} has none: set it to 0"
            )
        names = model.weight_hook_names()
        bits = [quant.matrix_bits(n) for n in names]
        if None in bits:
            raise ValueError(
                f"optimizer.late_qat_threshold={threshold} trains towards the export's integer grid, and "
                f"quant={quant.name} stores {names[bits.index(None)]} unquantized: set it to 0"
            )
        self.threshold = threshold
        self.bits = dict(zip(names, bits))
        device = next(model.parameters()).device
        self.hook = FakeQuant(bits).to(device)
        model.set_weight_hook(self.hook)  # before the first trace: the fake-quant path is in the graph
        self.step: int | None = None  # first step whose forward runs with fake-quantized weights

    def update(self, step: int, lr_scale: float) -> None:
        """After optimizer step `step` with this lr scale: on from the next forward, once it is under
        the threshold (a Python flag would be folded in at the first trace and never take effect)."""
        if self.step is None and lr_scale < self.threshold:
            self.hook.blend.fill_(1.0)
            self.step = step + 1

    def restore(self, step: int | None) -> None:
        """Back to a checkpoint's state: on from `step`, or off (None)."""
        self.step = step
        self.hook.blend.fill_(0.0 if step is None else 1.0)

    def reset(self) -> None:
        """Off, as when built (after compile priming)."""
        self.restore(None)
