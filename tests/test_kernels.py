"""Fused Triton kernels (model.fused_mlp, model.fused_ce) against the eager path.

On CPU the kernels run in Triton's interpreter when `TRITON_INTERPRET=1` is set before Triton is
imported (run `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`); without Triton, or
without CUDA and the interpreter, the parity tests skip with the reason, and the switches must refuse
to turn on with a clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.models import attention, kernels
from pgolf.models.config import LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.registry import ConfigError

REASON = kernels.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"fused kernels unavailable: {REASON}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(vocab_size=96, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, logit_softcap=30.0)


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


@needs_kernels
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_leaky_relu2_matches_eager(slope, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 333, generator=g).to(DEVICE, dtype)  # not a multiple of the block
    up = torch.randn_like(h)
    a = h.clone().requires_grad_(True)
    b = h.clone().requires_grad_(True)
    (kernels.leaky_relu2(a, slope) * up).sum().backward()
    (F.leaky_relu(b, slope).square() * up).sum().backward()
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kernels.leaky_relu2(h, slope), F.leaky_relu(h, slope).square(), **tol)
    torch.testing.assert_close(
        a.grad, b.grad, **(tol if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6))
    )


@needs_kernels
@pytest.mark.parametrize("V", [96, 2500])  # one block, and several with a ragged tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_softcap_ce_matches_eager(V, dtype):
    g = torch.Generator().manual_seed(1)
    raw = (40.0 * torch.randn(5, 9, V, generator=g)).to(DEVICE, dtype)  # well into the cap
    t = torch.randint(0, V, (5, 9), generator=g).to(DEVICE)
    w = torch.rand(5, 9, generator=g).to(DEVICE)  # a non-uniform upstream gradient
    a = raw.clone().requires_grad_(True)
    b = raw.clone().requires_grad_(True)
    la = kernels.softcap_cross_entropy(a, t, 30.0)
    zb = 30.0 * torch.tanh(b.float() / 30.0)
    lb = F.cross_entropy(zb.flatten(0, 1), t.flatten(), reduction="none").view_as(t)
    assert la.dtype == torch.float32 and la.shape == t.shape
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-4)
    (la * w).sum().backward()
    (lb * w).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(a.grad, b.grad, **tol)


@needs_kernels
def test_model_with_both_switches_matches_eager():
    torch.manual_seed(0)
    eager = GPT(LayeredGPTConfig(**TINY, activation="leaky_relu2"), banked=False).to(DEVICE)
    fused = GPT(
        LayeredGPTConfig(**TINY, activation="leaky_relu2", fused_mlp=True, fused_ce=True), banked=False
    )
    fused = fused.to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for p in (*eager.parameters(), *fused.parameters()):
            p.add_(0.01)  # zero-init projections would hide the MLP path
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    le, lf = eager(x, y), fused(x, y)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.token_nll(x, y), eager.token_nll(x, y), rtol=1e-5, atol=1e-5)
    le.backward()
    lf.backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(REASON is None, reason="the kernels can run here")
@pytest.mark.parametrize("key", ["fused_mlp", "fused_ce"])
def test_switch_refuses_without_triton_or_cuda(key):
    with pytest.raises(
        RuntimeError, match=rf"model\.{key}=true needs the fused Triton kernels, but .*{key}=false"
    ):
        GPT(LayeredGPTConfig(**TINY, **{key: True}), banked=False)


def test_fused_ce_needs_a_softcap():
    with pytest.raises(ConfigError, match=r"model\.fused_ce fuses the soft-capped loss"):
        LayeredGPTConfig(**{**TINY, "logit_softcap": 0.0}, fused_ce=True).validate("model")
