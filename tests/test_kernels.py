"""Fused Triton kernels (model.fused_mlp, fused_ce, fused_mlp_gemm/_up, fused_qk_rope) against the eager path.

On a machine without CUDA the kernels run in Triton's CPU interpreter: tests/conftest.py sets
`TRITON_INTERPRET=1` before any kernel is decorated, so a plain `python -m pytest` runs them
(Triton comes with the `dev` extra). Without Triton the parity tests skip with that reason. Either
way, the switches must refuse to turn on, with a clear error, where the kernels cannot run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.models import attention, kernels
from pgolf.models.blocks import Attention
from pgolf.models.config import LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import apply_partial_rotary, rms_norm, rotary_tables
from pgolf.registry import ConfigError

REASON = kernels.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"fused kernels unavailable: {REASON}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The record's GEMM shapes take ~4 s a case in the interpreter; the ragged small shapes cover the
# same tile logic there (masks, ragged K tiles), so the record's shapes run on CUDA only.
record_shape = pytest.mark.skipif(
    DEVICE == "cpu", reason="record-sized GEMM: ~4 s a case in Triton's CPU interpreter; runs on CUDA"
)
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


@needs_kernels
@pytest.mark.skipif(
    DEVICE != "cuda", reason="Dynamo cannot trace a kernel launch of Triton's CPU interpreter"
)
@pytest.mark.parametrize("mlp_switch", ["fused_mlp", "fused_mlp_train"])
def test_training_switches_compile_fullgraph_forward_and_backward(mlp_switch):
    # The training graph as priming compiles it. Under Inductor a kernel's float argument (the
    # softcap, the slope) arrives as fp64; the fused CE's loop-carried max then changed type and
    # Triton refused to compile (found on an H100), so the kernels cast their scalars to fp32 first.
    _assert_compiled_matches_eager(dict(fused_ce=True, **{mlp_switch: True}), "inductor", perturb=True)


def _assert_compiled_matches_eager(switches: dict, backend: str, perturb: bool) -> None:
    """A tiny model with `switches` on, compiled fullgraph with `backend`, against the eager model
    without them: the loss and every gradient after one forward and backward."""
    torch.manual_seed(0)
    cfg = dict(**TINY, activation="leaky_relu2")
    eager = GPT(LayeredGPTConfig(**cfg), banked=False).to(DEVICE)
    fused = GPT(LayeredGPTConfig(**cfg, **switches), banked=False).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    if perturb:
        with torch.no_grad():
            for p in (*eager.parameters(), *fused.parameters()):
                p.add_(0.01)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    torch._dynamo.reset()
    loss = torch.compile(fused, fullgraph=True, dynamic=False, backend=backend)(x, y)
    loss.backward()
    ref = eager(x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_kernels
def test_fused_mlp_train_ops_compile_fullgraph_as_opaque_ops():
    # Runs on CPU too: the ops are opaque custom ops (the compiler sees only their fakes), so Dynamo
    # never traces the interpreter's launch. Checks their fakes and autograd under a fullgraph
    # compile of forward and backward. The H100 failure this form fixes (as triton_ops, Inductor's
    # mutation analysis took the backward kernel as writing W_down, a leaf requiring grad) only
    # shows with CUDA kernels: the GPU test above.
    # aot_eager: AOTAutograd's joint graph (where the mutation check failed) without Inductor's
    # minute of C++ compilation on CPU; the GPU test above covers Inductor.
    _assert_compiled_matches_eager(dict(fused_mlp_train=True), "aot_eager", perturb=False)


@pytest.mark.parametrize("missing", ["triton", "cuda"])
@pytest.mark.parametrize("key", ["fused_mlp", "fused_ce", "fused_mlp_gemm", "fused_mlp_up", "fused_qk_rope"])
def test_switch_refuses_without_triton_or_cuda(key, missing, monkeypatch):
    """Runs everywhere: the missing piece is simulated (Triton not importable, or no CUDA device
    and no interpreter)."""
    if missing == "triton":
        monkeypatch.setattr(kernels, "triton", None)
        why = "Triton is not installed"
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        why = r"no CUDA device \(set TRITON_INTERPRET=1"
    with pytest.raises(
        RuntimeError, match=rf"model\.{key}=true needs the fused Triton kernels, but {why}.*{key}=false"
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
    # ragged M/K/N, and the record's K, N
    [(77, 96, 48), (45, 100, 40), pytest.param(33, 1536, 512, marks=record_shape)],
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
    kernels._gemm_launch(kernels._act_mm_kernel, h, w, out, 0.5, **meta)
    torch.testing.assert_close(out.float(), _act_ref(h, w, 0.5), rtol=2**-8, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize(
    "kernel,eager",
    [
        ("act_mm", lambda h, w: F.linear(F.leaky_relu(h, 0.5).square(), w)),
        ("mm_act", lambda x, w: F.leaky_relu(F.linear(x, w), 0.5).square()),
    ],
)
def test_gemm_ops_fp32_strided_weight_and_batch_dims(kernel, eager):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 19, 72, generator=g).to(DEVICE)
    w = torch.randn(72, 40, generator=g).to(DEVICE).t()  # (N, K) view with unit stride along N
    op = getattr(kernels, kernel)
    out = op(h, w, 0.5)
    assert out.shape == (2, 19, 40)
    torch.testing.assert_close(out, eager(h, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        op(h, w.bfloat16(), 0.5)


@needs_kernels
@pytest.mark.parametrize("kernel", ["act_mm", "mm_act"])
def test_gemm_ops_trace_without_graph_breaks(kernel):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 37, 64, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, 64, generator=g).to(DEVICE, torch.bfloat16)
    op = getattr(kernels, kernel)

    def f(h, w):
        return op(h * 2.0, w, 0.5) + 1.0

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=False)
        # the autotuner may pick another tile for the compiled call: a rounding step apart
        torch.testing.assert_close(compiled(h, w), f(h, w), rtol=2**-6, atol=1e-3)
        explained = torch._dynamo.explain(f)(h, w)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _mm_act_ref(x, w, slope):
    """The unfused path's numbers: the product in fp32 rounded to x's dtype (the stored h), then the
    activation in fp32 rounded to x's dtype again."""
    h = F.linear(x.float(), w.float()).to(x.dtype)
    return F.leaky_relu(h.float(), slope).square().to(x.dtype)


@needs_kernels
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize(
    "M,K,N",
    # ragged M/K/N, and the record's up projection
    [(77, 96, 48), (45, 100, 40), pytest.param(33, 512, 1536, marks=record_shape)],
)
def test_mm_act_matches_unfused(M, K, N, slope):
    g = torch.Generator().manual_seed(M + N)
    x = torch.randn(M, K, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, torch.bfloat16)
    out = kernels.mm_act(x, w, slope)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    ref = _mm_act_ref(x, w, slope)
    # the fp32 sums may round to a neighbouring bf16 h in a few elements (another summation order):
    # one ulp of h is two of h^2, so 2^-6 relative; everything else is the same rounding
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=1e-4)
    assert (out != ref).float().mean() < 0.02
    unfused = F.leaky_relu(F.linear(x, w), slope).square()  # the eager bf16 path itself
    torch.testing.assert_close(out, unfused, rtol=2**-6, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("block_k", [16, 32])  # 16: K = 100 has a ragged last K tile
def test_mm_act_kernel_tiles(block_k):
    """Explicit tiles, smaller than the autotuner's, with ragged M, N and K edges."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(45, 100, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(40, 100, generator=g) / 10).to(DEVICE, torch.bfloat16)
    out = torch.empty(45, 40, device=DEVICE, dtype=torch.bfloat16)
    kernels._gemm_launch(kernels._mm_act_kernel, x, w, out, 0.5, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k)
    torch.testing.assert_close(out.float(), _mm_act_ref(x, w, 0.5).float(), rtol=2**-6, atol=1e-4)


def test_the_two_mlp_gemm_fusions_are_exclusive():
    cfg = LayeredGPTConfig(**TINY, fused_mlp_gemm=True, fused_mlp_up=True)
    with pytest.raises(ConfigError, match=r"model\.fused_mlp_gemm and model\.fused_mlp_up .*set one of them"):
        cfg.validate("model")


def _plain_and_switched(switch: str, **cfg):
    """Two equal small models (every weight nudged off zero, so no path is trivially skipped), the
    second with `switch` on."""
    torch.manual_seed(0)
    plain = GPT(LayeredGPTConfig(**TINY, **cfg), banked=False).to(DEVICE)
    fused = GPT(LayeredGPTConfig(**TINY, **cfg, **{switch: True}), banked=False).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in (*plain.parameters(), *fused.parameters()):
            p.add_(0.01)  # zero-init projections would hide the MLP and attention paths
    return plain, fused


# The MLP's two GEMM fusions: (config switch, the MLP attribute holding the kernel, the kernel)
MLP_GEMM_SWITCHES = [("fused_mlp_gemm", "fused_gemm", "act_mm"), ("fused_mlp_up", "fused_up", "mm_act")]
mlp_gemm_switches = pytest.mark.parametrize("switch,attr,kernel", MLP_GEMM_SWITCHES)


def _switch_models(dtype, switch="fused_mlp_gemm", **extra):
    plain, fused = _plain_and_switched(switch, activation="leaky_relu2", **extra)
    return plain.to(dtype), fused.to(dtype)


@needs_kernels
@mlp_gemm_switches
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_gemm_switch_matches_eager_in_inference(dtype, switch, attr, kernel):
    plain, fused = _switch_models(dtype, switch)
    calls = []
    real = getattr(kernels, kernel)
    for m in fused.modules():
        if getattr(m, attr, None) is not None:
            setattr(m, attr, lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    with torch.inference_mode():
        a, b = fused.token_nll(x, y), plain.token_nll(x, y)
    assert len(calls) == 2  # one per layer: the fused GEMM really ran
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@needs_kernels
def test_fused_mlp_up_runs_on_the_autocast_dtype():
    """fp32 weights and activations under bf16 autocast, as in the scorer: the op gets bf16 operands,
    as F.linear's autocast would give them, and returns the eager path's numbers."""
    plain, fused = _switch_models(torch.float32, "fused_mlp_up")
    seen = []
    for m in fused.modules():
        if getattr(m, "fused_up", None) is not None:
            m.fused_up = lambda x, w, s: seen.append((x.dtype, w.dtype)) or kernels.mm_act(x, w, s)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        a, b = fused.token_nll(x, y), plain.token_nll(x, y)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _assert_unused_with_grad(plain, fused, attr: str, what: str) -> None:
    """Training forward/backward of `fused` never calls its inference-only kernel (set on every
    module that has `attr`) and equals `plain` bit for bit; with grad off it does call it."""

    def boom(*a):
        raise AssertionError(f"the inference-only {what} ran with grad enabled")

    for m in fused.modules():
        if getattr(m, attr, None) is not None:
            setattr(m, attr, boom)
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
@mlp_gemm_switches
def test_fused_mlp_gemm_is_never_used_with_grad(switch, attr, kernel):
    _assert_unused_with_grad(*_switch_models(torch.float32, switch), attr, "fused GEMM")


@needs_kernels
@mlp_gemm_switches
def test_fused_mlp_gemm_model_compiles_fullgraph(switch, attr, kernel):
    plain, fused = _switch_models(torch.float32, switch)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        torch._dynamo.reset()
        nll = torch.compile(fused.token_nll, backend=backend, fullgraph=True, dynamic=False)(x, y)
        torch.testing.assert_close(nll, plain.token_nll(x, y), rtol=1e-5, atol=1e-5)


def _assert_hessians_unchanged(plain, fused, attr: str) -> None:
    """GPTQ's Hessian collector (a TorchFunctionMode, run without grad) sees the plain path's calls:
    the shared rule keeps the inference-only kernel in `attr` out of its eager forwards."""
    from pgolf.quant.hessian import collect_hessians

    for m in fused.modules():
        if getattr(m, attr, None) is not None:
            setattr(m, attr, lambda *a: pytest.fail(f"{attr} ran under the Hessian collector"))
    batches = [torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hs = []
    for m in (plain, fused):
        w = {n: t for n, t in m.export_state_dict().items() if t.ndim == 2}
        hs.append(collect_hessians(m, w, [b.to(DEVICE) for b in batches])[0])
    assert "blocks.1.mlp.proj.weight" in hs[1] and set(hs[1]) == set(hs[0])
    for k in hs[0]:
        torch.testing.assert_close(hs[1][k], hs[0][k], rtol=0, atol=0, msg=k)


@needs_kernels
@mlp_gemm_switches
def test_fused_mlp_gemm_leaves_gptq_hessians_alone(switch, attr, kernel):
    _assert_hessians_unchanged(*_switch_models(torch.float32, switch), attr)


# ---- model.fused_qk_rope: kernels.qk_prologue ----


def _qk_eager(x, cos, sin, rope_dims, gain, dtype):
    """Attention's unfused prologue in `dtype`: rms_norm, RoPE with the tables' last T rows, gain."""
    T = x.size(1)
    c, s = cos[:, cos.size(1) - T :].to(dtype), sin[:, sin.size(1) - T :].to(dtype)
    y = apply_partial_rotary(rms_norm(x.to(dtype)), c, s, rope_dims)
    return y if gain is None else y * gain.to(dtype)[None, None, :, None]


@needs_kernels
@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize("with_gain", [True, False])
@pytest.mark.parametrize(
    "B,T,H,D,rope_dims,table_len",
    [
        (2, 37, 4, 64, 16, 37),  # the record's partial RoPE, odd T
        (2, 37, 4, 64, 64, 37),  # full RoPE
        (2, 37, 2, 64, 16, 37),  # GQA k: fewer heads
        (2, 5, 4, 64, 16, 37),  # the tail-only final block's q: the tables' last 5 rows
        (1, 7, 3, 24, 8, 9),  # a head dim that is not a power of two
    ],
)
def test_qk_prologue_matches_eager(B, T, H, D, rope_dims, table_len, with_gain, heads_major):
    g = torch.Generator().manual_seed(T * H + D)
    x = (3.0 * torch.randn(B, T, H, D, generator=g)).to(DEVICE, torch.bfloat16)
    cos, sin = rotary_tables(table_len, rope_dims, 10_000.0, torch.device(DEVICE), torch.bfloat16)
    gain = (0.5 + 3.0 * torch.rand(H, generator=g)).to(DEVICE) if with_gain else None  # fp32, as q_gain
    y = kernels.qk_prologue(x, cos, sin, rope_dims, gain, heads_major=heads_major)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    if heads_major:  # a (B, H, T, D) buffer: SDPA's transpose(1, 2) of it is contiguous
        assert y.transpose(1, 2).is_contiguous()
    else:
        assert y.is_contiguous()
    ref = _qk_eager(x, cos, sin, rope_dims, gain, torch.float32)
    # fp32 math, one rounding at the store: within one bf16 ulp of the fp32 result (2^-8 relative)
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5)
    # the eager bf16 path rounds after every op: a few ulps away, and never closer to fp32
    eager = _qk_eager(x, cos, sin, rope_dims, None if gain is None else gain.bfloat16(), torch.bfloat16)
    torch.testing.assert_close(y, eager, rtol=2e-2, atol=2e-2)
    assert (y.float() - ref).abs().max() <= (eager.float() - ref).abs().max()


@needs_kernels
def test_qk_prologue_fp32_strided_input_and_errors():
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(2, 11, 4, 96, generator=g).to(DEVICE)
    x = wide[..., 16:80]  # (B, T, H, 64) view with a head stride of 96: copied first
    cos, sin = rotary_tables(11, 16, 10_000.0, torch.device(DEVICE), torch.float32)
    gain = torch.rand(4, generator=g).to(DEVICE)
    y = kernels.qk_prologue(x, cos, sin, 16, gain)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _qk_eager(x, cos, sin, 16, gain, torch.float32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must both be"):
        kernels.qk_prologue(x, cos, sin, 32, gain)  # tables for 16 rotated dims
    with pytest.raises(ValueError, match="one entry per head"):
        kernels.qk_prologue(x, cos, sin, 16, gain[:2])
    with pytest.raises(ValueError, match="rope_dims"):
        kernels.qk_prologue(x, cos[:, :5], sin[:, :5], 16)  # fewer table rows than x has


@needs_kernels
def test_qk_prologue_traces_without_graph_breaks():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 9, 4, 32, generator=g).to(DEVICE, torch.bfloat16)
    cos, sin = rotary_tables(9, 16, 10_000.0, torch.device(DEVICE), torch.bfloat16)
    gain = torch.rand(4, generator=g).to(DEVICE)

    def f(x, cos, sin, gain):
        q = kernels.qk_prologue(x * 2.0, cos, sin, 16, gain)
        k = kernels.qk_prologue(x[:, 4:], cos, sin, 16, heads_major=True)  # a row offset into the tables
        return q[:, 4:] + k

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x, cos, sin, gain), f(x, cos, sin, gain), rtol=0, atol=0)
        explained = torch._dynamo.explain(f)(x, cos, sin, gain)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _qk_models(dtype, **extra):
    plain, fused = _plain_and_switched("fused_qk_rope", **extra)  # head_dim 16, 2 query heads, 1 KV head
    with torch.no_grad():
        for m in (plain, fused):
            for i, blk in enumerate(m.blocks):  # distinct per-head gains: a head mix-up would show
                blk.attn.q_gain.copy_(torch.tensor([1.0, 2.5]) + i)
    return plain.to(dtype), fused.to(dtype)


def _count_qk_calls(model, calls, **kw):
    real = kernels.qk_prologue
    for m in model.modules():
        if isinstance(m, Attention) and m.fused_qk is not None:
            m.fused_qk = lambda *a: calls.append(1) or real(*a, **kw)


@needs_kernels
@pytest.mark.parametrize(
    "extra,heads_major",
    [
        (dict(rope_dims=8), False),  # partial RoPE
        (dict(rope_dims=8), True),  # the (B, H, T, D) output layout
        (dict(xsa_last_n=2, attn_out_gate=True, attn_out_gate_src="q"), False),  # full RoPE, XSA, q gate
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qk_rope_switch_matches_eager_in_inference(dtype, extra, heads_major):
    plain, fused = _qk_models(dtype, **extra)
    calls = []
    _count_qk_calls(fused, calls, heads_major=heads_major)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        torch.testing.assert_close(fused.token_nll(x, y), plain.token_nll(x, y), **tol)
        assert len(calls) == 4  # q and k in each of the 2 layers: the kernel really ran
        # the tail path: the final block's queries are the last 5 rows (a table row offset)
        tail = fused.token_nll(x, y, 5)
        assert tail.shape == (2, 5) and len(calls) == 8
        torch.testing.assert_close(tail, plain.token_nll(x, y, 5), **tol)
        torch.testing.assert_close(tail, plain.token_nll(x, y)[:, -5:], **tol)


@needs_kernels
def test_fused_qk_rope_is_never_used_with_grad():
    _assert_unused_with_grad(*_qk_models(torch.float32, rope_dims=8), "fused_qk", "q/k prologue")


@needs_kernels
def test_fused_qk_rope_model_compiles_fullgraph():
    plain, fused = _qk_models(torch.float32, rope_dims=8)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.inference_mode():
        for last in (0, 5):
            torch._dynamo.reset()
            nll = torch.compile(fused.token_nll, backend=backend, fullgraph=True, dynamic=False)(x, y, last)
            torch.testing.assert_close(nll, plain.token_nll(x, y, last), rtol=1e-5, atol=1e-5)
        explained = torch._dynamo.explain(fused.token_nll)(x, y, 5)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@needs_kernels
def test_fused_qk_rope_stays_off_under_the_gptq_hessian_collector():
    _assert_hessians_unchanged(*_qk_models(torch.float32, rope_dims=8), "fused_qk")


# ---------------------------------------------------------------------------------------------
# model.fused_mlp_train: the training MLP with the activation (and its derivative) in GEMM epilogues
# ---------------------------------------------------------------------------------------------


def _mlp_train():
    """The fused training MLP (its module imports Triton's helpers, so only where the kernels run)."""
    from pgolf.models.fused_mlp_train import mlp_train

    return mlp_train


@pytest.fixture(params=["pointer", "tma"])
def mlp_form(request, monkeypatch):
    """Each training-MLP test runs both kernel forms: the pointer form and the persistent TMA form
    (Hopper's; in Triton's interpreter on CPU). Yields a counter of the TMA form's launches."""
    if REASON is not None:
        pytest.skip(f"fused kernels unavailable: {REASON}")
    from pgolf.models import fused_mlp_train

    if request.param == "tma":
        if fused_mlp_train.TensorDescriptor is None:
            pytest.skip("this Triton has no host-side TMA descriptors")
        if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the TMA form is Hopper's (sm_90)")
    monkeypatch.setattr(fused_mlp_train, "TMA_FORM", "on" if request.param == "tma" else "off")
    launches = []
    real = fused_mlp_train._mlp_train_tma_launch
    monkeypatch.setattr(
        fused_mlp_train, "_mlp_train_tma_launch", lambda *a, **k: launches.append(1) or real(*a, **k)
    )
    yield request.param, launches
    if request.param == "tma":
        assert launches, "the TMA form never ran"
    else:
        assert not launches


def _mlp_unfused(x, w_up, w_down, slope):
    """What the unfused path computes, rounding where it stores: h, act(h), and the output."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), slope).square(), w_down)


@needs_kernels
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize(
    "M,D,H",
    # ragged rows, model dim and hidden width (each a part tile, rows 16-byte aligned as TMA needs);
    # then the record's MLP (d 512, hidden 2048)
    [(77, 48, 96), (45, 40, 104), pytest.param(64, 512, 2048, marks=record_shape)],
)
def test_mlp_train_ops_match_the_unfused_steps(M, D, H, slope, mlp_form):
    _mlp_train()  # registers torch.ops.pgolf.mlp_up_act / mlp_dact
    g = torch.Generator().manual_seed(M + H)
    x = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16)
    w_up = (torch.randn(H, D, generator=g) / D**0.5).to(DEVICE, torch.bfloat16)
    w_down = (torch.randn(D, H, generator=g) / H**0.5).to(DEVICE, torch.bfloat16)
    dout = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16)
    pre, post = torch.ops.pgolf.mlp_up_act(x, w_up, slope)
    h = F.linear(x.float(), w_up.float()).to(torch.bfloat16)  # the stored GEMM output
    # one bf16 ulp apart where the fp32 sums round the other way (another summation order)
    torch.testing.assert_close(pre, h, rtol=2**-7, atol=1e-4)
    torch.testing.assert_close(
        post, F.leaky_relu(pre.float(), slope).square().to(torch.bfloat16), rtol=0, atol=0
    )
    dpre = torch.ops.pgolf.mlp_dact(dout, w_down, pre, slope)
    dpost = F.linear(dout.float(), w_down.float().t()).to(torch.bfloat16)  # dOut @ W_down
    act_grad = torch.where(pre.float() > 0, 2 * pre.float(), 2 * slope * slope * pre.float())
    ref = (dpost.float() * act_grad).to(torch.bfloat16)
    torch.testing.assert_close(dpre.float(), ref.float(), rtol=2**-6, atol=1e-4)
    assert (dpre != ref).float().mean() < 0.02


@needs_kernels
def test_mlp_train_rows_tma_cannot_address_take_the_pointer_form(monkeypatch):
    """A hidden width of 100 bf16 (200-byte rows) is no TMA row stride: with the TMA form on, those
    launches take the pointer form, with the same results."""
    from pgolf.models import fused_mlp_train

    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 40, generator=g).to(DEVICE, torch.bfloat16)
    w_up = (torch.randn(100, 40, generator=g) / 40**0.5).to(DEVICE, torch.bfloat16)
    assert not fused_mlp_train._tma_form(x, w_up, fused_mlp_train._gemm_out(x, w_up))
    x_ok = torch.randn(45, 40, generator=g).to(DEVICE, torch.bfloat16)
    w_ok = (torch.randn(104, 40, generator=g) / 40**0.5).to(DEVICE, torch.bfloat16)
    out_ok = fused_mlp_train._gemm_out(x_ok, w_ok)
    monkeypatch.setattr(fused_mlp_train, "TMA_FORM", "on")
    assert fused_mlp_train._tma_form(x_ok, w_ok, out_ok) == (fused_mlp_train.TensorDescriptor is not None)
    assert not fused_mlp_train._tma_form(x, w_up, fused_mlp_train._gemm_out(x, w_up))
    assert not fused_mlp_train._tma_form(x_ok[:, 1:], w_ok[:, 1:], out_ok)  # misaligned starts
    assert not fused_mlp_train._tma_form(x_ok.float(), w_ok.float(), out_ok.float())
    _mlp_train()
    pre, post = torch.ops.pgolf.mlp_up_act(x, w_up, 0.5)
    torch.testing.assert_close(
        pre, F.linear(x.float(), w_up.float()).to(torch.bfloat16), rtol=2**-7, atol=1e-4
    )
    torch.testing.assert_close(
        post, F.leaky_relu(pre.float(), 0.5).square().to(torch.bfloat16), rtol=0, atol=0
    )


@needs_kernels
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_mlp_train_forward_and_backward_match_the_unfused_mlp(slope, mlp_form):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 37, 48, generator=g).to(DEVICE, torch.bfloat16)
    w_up = (torch.randn(96, 48, generator=g) / 48**0.5).to(DEVICE, torch.bfloat16)
    w_down = (torch.randn(48, 96, generator=g) / 96**0.5).to(DEVICE, torch.bfloat16)
    dout = torch.randn(2, 37, 48, generator=g).to(DEVICE, torch.bfloat16)
    grads = []
    for fn in (_mlp_train(), _mlp_unfused):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
        out = fn(*leaves, slope)
        out.backward(dout)
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), grads[0], grads[1]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # bf16 GEMMs on both sides, summed in another order: a few bf16 ulps of the largest values
        torch.testing.assert_close(
            a.float(), b.float(), rtol=2**-5, atol=2e-2 * b.float().abs().max().item(), msg=name
        )


@needs_kernels
def test_mlp_train_computes_only_the_gradients_asked_for(monkeypatch):
    """Frozen weights (LoRA TTT): no weight gradients, and dx as with trainable weights; frozen x
    and W_up (only W_down trains): the activation-gradient kernel is not run at all."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=g).to(DEVICE, torch.bfloat16)
    w_up = (torch.randn(96, 48, generator=g) / 48**0.5).to(DEVICE, torch.bfloat16)
    w_down = (torch.randn(48, 96, generator=g) / 96**0.5).to(DEVICE, torch.bfloat16)
    dout = torch.randn(37, 48, generator=g).to(DEVICE, torch.bfloat16)
    fn = _mlp_train()
    full = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    fn(*full, 0.5).backward(dout)
    xs = x.detach().clone().requires_grad_()
    up, down = w_up.detach().clone().requires_grad_(False), w_down.detach().clone().requires_grad_(False)
    fn(xs, up, down, 0.5).backward(dout)
    assert up.grad is None and down.grad is None
    torch.testing.assert_close(xs.grad, full[0].grad, rtol=0, atol=0)
    calls = []
    real = torch.ops.pgolf.mlp_dact
    monkeypatch.setattr(torch.ops.pgolf, "mlp_dact", lambda *a: calls.append(1) or real(*a))
    down = w_down.detach().clone().requires_grad_()
    fn(x, w_up, down, 0.5).backward(dout)
    assert not calls and down.grad is not None
    torch.testing.assert_close(down.grad, full[2].grad, rtol=0, atol=0)


@needs_kernels
def test_model_with_fused_mlp_train_matches_eager_and_scores_unfused():
    torch.manual_seed(0)
    cfg = dict(**TINY, activation="leaky_relu2")
    eager = GPT(LayeredGPTConfig(**cfg), banked=False).to(DEVICE)
    fused = GPT(LayeredGPTConfig(**cfg, fused_mlp_train=True), banked=False).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for p in (*eager.parameters(), *fused.parameters()):
            p.add_(0.01)
    x = torch.randint(0, 96, (2, 16), device=DEVICE)
    y = x.roll(-1, 1)
    calls = []
    real = _mlp_train()

    def counting(*a):
        calls.append(1)
        return real(*a)

    for block in fused.blocks:
        block.mlp.fused_train = counting
    le, lf = eager(x, y), fused(x, y)  # fp32 weights and activations here: the kernels' fp32 path
    assert len(calls) == len(fused.blocks)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
    le.backward()
    lf.backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():  # scoring (and GPTQ's F.linear hooks) keep the unfused path
        torch.testing.assert_close(fused.token_nll(x, y), eager.token_nll(x, y), rtol=1e-5, atol=1e-5)
    assert calls == []


def test_fused_mlp_train_and_fused_mlp_are_exclusive():
    with pytest.raises(ConfigError, match="fused_mlp_train and model.fused_mlp"):
        LayeredGPTConfig(**TINY, fused_mlp=True, fused_mlp_train=True).validate("model")
