"""Fused Triton kernels (model.fused_mlp, fused_ce, fused_mlp_gemm) against the eager path.

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
@pytest.mark.parametrize("key", ["fused_mlp", "fused_ce", "fused_mlp_gemm"])
def test_switch_refuses_without_triton_or_cuda(key):
    with pytest.raises(
        RuntimeError, match=rf"model\.{key}=true needs the fused Triton kernels, but .*{key}=false"
    ):
        GPT(LayeredGPTConfig(**TINY, **{key: True}), banked=False)


def test_fused_ce_needs_a_softcap():
    with pytest.raises(ConfigError, match=r"model\.fused_ce fuses the soft-capped loss"):
        LayeredGPTConfig(**{**TINY, "logit_softcap": 0.0}, fused_ce=True).validate("model")


def _act_ref(h, w, slope):
    """The unfused path's numbers: act in fp32 rounded to h's dtype, then the product (in fp32)."""
    a = F.leaky_relu(h.float(), slope).square().to(h.dtype)
    return F.linear(a.float(), w.float())


@needs_kernels
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize(
    "M,K,N",
    [(77, 96, 48), (45, 100, 40), (33, 1536, 512)],  # ragged M/K/N, and the record's K, N
)
def test_act_mm_matches_unfused(M, K, N, slope):
    g = torch.Generator().manual_seed(M)
    h = torch.randn(M, K, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, torch.bfloat16)
    out = kernels.act_mm(h, w, slope)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    # one bf16 rounding of the fp32 sum: within half an ulp (2^-9 relative), plus fp32 order noise
    torch.testing.assert_close(out.float(), _act_ref(h, w, slope), rtol=2**-8, atol=1e-4)
    # the same against the unfused bf16 GEMM itself (cuBLAS on GPU): one extra rounding apart
    unfused = F.linear(F.leaky_relu(h, slope).square(), w)
    torch.testing.assert_close(out, unfused, rtol=2**-7, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("block_k", [16, 32])  # 16: K = 100 has a ragged last K tile
def test_act_mm_kernel_forms(prefetch, block_k):
    """Both ways of feeding h (pipelined through shared memory, or prefetched into registers), run
    directly with explicit tiles, as the GPU autotuner may pick either."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(45, 100, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(40, 100, generator=g) / 10).to(DEVICE, torch.bfloat16)
    out = torch.empty(45, 40, device=DEVICE, dtype=torch.bfloat16)
    meta = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, PREFETCH=prefetch)
    kernels._act_mm_launch(kernels._act_mm_kernel, h, w, out, 0.5, **meta)
    torch.testing.assert_close(out.float(), _act_ref(h, w, 0.5), rtol=2**-8, atol=1e-4)


@needs_kernels
def test_act_mm_fp32_strided_weight_and_batch_dims():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 19, 72, generator=g).to(DEVICE)
    w = torch.randn(72, 40, generator=g).to(DEVICE).t()  # (N, K) view with unit stride along N
    out = kernels.act_mm(h, w, 0.5)
    assert out.shape == (2, 19, 40)
    torch.testing.assert_close(out, F.linear(F.leaky_relu(h, 0.5).square(), w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        kernels.act_mm(h, w.bfloat16(), 0.5)


@needs_kernels
def test_act_mm_traces_without_graph_breaks():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 37, 64, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, 64, generator=g).to(DEVICE, torch.bfloat16)

    def f(h, w):
        return kernels.act_mm(h * 2.0, w, 0.5) + 1.0

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=False)
        # the autotuner may pick another tile for the compiled call: bf16 output rounding apart
        torch.testing.assert_close(compiled(h, w), f(h, w), rtol=2**-7, atol=1e-3)
        explained = torch._dynamo.explain(f)(h, w)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _switch_models(dtype, **extra):
    torch.manual_seed(0)
    cfg = dict(**TINY, activation="leaky_relu2", **extra)
    plain = GPT(LayeredGPTConfig(**cfg), banked=False).to(DEVICE)
    fused = GPT(LayeredGPTConfig(**cfg, fused_mlp_gemm=True), banked=False).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in (*plain.parameters(), *fused.parameters()):
            p.add_(0.01)  # zero-init projections would hide the MLP path
    return plain.to(dtype), fused.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_gemm_switch_matches_eager_in_inference(dtype, monkeypatch):
    plain, fused = _switch_models(dtype)
    calls = []
    real = kernels.act_mm
    for m in fused.modules():
        if getattr(m, "fused_gemm", None) is not None:
            m.fused_gemm = lambda *a: calls.append(1) or real(*a)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    with torch.inference_mode():
        a, b = fused.token_nll(x, y), plain.token_nll(x, y)
    assert len(calls) == 2  # one per layer: the fused GEMM really ran
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@needs_kernels
def test_fused_mlp_gemm_is_never_used_with_grad(monkeypatch):
    plain, fused = _switch_models(torch.float32)

    def boom(*a):
        raise AssertionError("the inference-only fused GEMM ran with grad enabled")

    for m in fused.modules():
        if getattr(m, "fused_gemm", None) is not None:
            m.fused_gemm = boom
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    lf, lp = fused(x, y), plain(x, y)
    lf.backward()
    lp.backward()
    torch.testing.assert_close(lf, lp, rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    with torch.inference_mode(), pytest.raises(AssertionError, match="inference-only"):
        fused.token_nll(x, y)  # the same model does route through it once grad is off


@needs_kernels
def test_fused_mlp_gemm_model_compiles_fullgraph():
    plain, fused = _switch_models(torch.float32)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        torch._dynamo.reset()
        nll = torch.compile(fused.token_nll, backend=backend, fullgraph=True, dynamic=False)(x, y)
        torch.testing.assert_close(nll, plain.token_nll(x, y), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_fused_mlp_gemm_leaves_gptq_hessians_alone():
    from pgolf.quant.hessian import collect_hessians

    plain, fused = _switch_models(torch.float32)
    for m in fused.modules():
        if getattr(m, "fused_gemm", None) is not None:
            m.fused_gemm = lambda *a: pytest.fail("the fused GEMM hid F.linear from the Hessian collector")
    batches = [torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hs = []
    for m in (plain, fused):
        w = {n: t for n, t in m.export_state_dict().items() if t.ndim == 2}
        hs.append(collect_hessians(m, w, [b.to(DEVICE) for b in batches])[0])
    assert "blocks.1.mlp.proj.weight" in hs[1] and set(hs[1]) == set(hs[0])
    for k in hs[0]:
        torch.testing.assert_close(hs[1][k], hs[0][k], rtol=0, atol=0, msg=k)
