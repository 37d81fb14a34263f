"""The baseline GPT: size, parameter roles, init, loss consistency, causality, attention backends, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.models import attention
from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BaselineModelConfig
from pgolf.models.layers import CastedLinear, restore_fp32_params

TINY = BaselineModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
CONTROL_SUFFIXES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights")


@pytest.fixture(autouse=True)
def _restore_attention_backend(monkeypatch):
    # select_backend() sets module globals; keep every test independent of the others
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


@pytest.fixture(scope="module")
def baseline() -> BaselineGPT:
    torch.manual_seed(0)
    return BaselineGPT(BaselineModelConfig())


def _tiny(seed: int = 0, perturb: bool = True, cfg: BaselineModelConfig = TINY) -> BaselineGPT:
    torch.manual_seed(seed)
    model = BaselineGPT(cfg)
    if perturb:  # zero-init projections would hide attention entirely
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_baseline_parameter_count(baseline):
    assert sum(p.numel() for p in baseline.parameters()) == 17_059_912
    # the same number from the architecture's shapes
    d, L, V, H, KV = 512, 9, 1024, 8, 4
    kv = d // H * KV
    block = d * d + 2 * d * kv + d * d + 2 * (d * 2 * d) + 2 * d + 2 * d + H
    assert V * d + L * block + (L // 2) * d == 17_059_912


def test_param_groups_cover_every_parameter_once(baseline):
    groups = baseline.param_groups()
    assert set(groups) == {"matrix", "scalar", "embed", "head"}
    listed = [(n, p) for ps in groups.values() for n, p in ps]
    names = [n for n, _ in listed]
    assert len(names) == len(set(names))
    assert len({id(p) for _, p in listed}) == len(listed)
    assert sorted(names) == sorted(n for n, _ in baseline.named_parameters())
    assert all(p is dict(baseline.named_parameters())[n] for n, p in listed)

    matrix = [n for n, _ in groups["matrix"]]
    assert len(matrix) == 54
    kinds = (
        "attn.c_q.weight",
        "attn.c_k.weight",
        "attn.c_v.weight",
        "attn.proj.weight",
        "mlp.fc.weight",
        "mlp.proj.weight",
    )
    assert sorted(matrix) == sorted(f"blocks.{i}.{k}" for i in range(9) for k in kinds)
    assert [n for n, _ in groups["embed"]] == ["tok_emb.weight"]
    assert groups["head"] == []
    scalar = [n for n, _ in groups["scalar"]]
    assert sorted(scalar) == sorted(
        ["skip_weights"]
        + [
            f"blocks.{i}.{k}"
            for i in range(9)
            for k in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")
        ]
    )
    assert all(n.endswith(CONTROL_SUFFIXES) for n in scalar)


def test_untied_head_goes_to_head_group():
    cfg = BaselineModelConfig(
        vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, tie_embeddings=False
    )
    model = BaselineGPT(cfg)
    groups = model.param_groups()
    assert [n for n, _ in groups["head"]] == ["lm_head.weight"]
    assert torch.count_nonzero(model.lm_head.weight) == 0


def test_zero_init_projections(baseline):
    for i, block in enumerate(baseline.blocks):
        assert torch.count_nonzero(block.attn.proj.weight) == 0, i
        assert torch.count_nonzero(block.mlp.proj.weight) == 0, i
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            assert lin.weight.std() > 0.01
    emb = baseline.tok_emb.weight
    assert emb.std().item() == pytest.approx(0.005, rel=0.05)
    assert torch.equal(baseline.blocks[0].attn.q_gain, torch.full((8,), 1.5))
    assert torch.equal(baseline.blocks[0].resid_mix, torch.stack([torch.ones(512), torch.zeros(512)]))


def test_fresh_model_loss_is_near_uniform():
    # zero-init projections + tiny embeddings: the initial prediction is close to uniform
    model = BaselineGPT(
        BaselineModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
    )
    x = torch.randint(0, 64, (2, 16))
    assert model(x, torch.randint(0, 64, (2, 16))).item() == pytest.approx(math.log(64), abs=0.05)


def test_token_nll_mean_equals_forward():
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (3, 24), generator=g), torch.randint(0, 64, (3, 24), generator=g)
    nll = model.token_nll(x, y)
    assert nll.shape == (3, 24) and nll.dtype == torch.float32
    loss = model(x, y)
    torch.testing.assert_close(nll.mean(), loss, rtol=1e-6, atol=1e-6)
    # and each entry is -log softmax(capped logits)[y], computed here from the logits
    logits = model._logits(x).double()
    ref = -torch.log_softmax(logits, dim=-1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= 30.0
    # the sliding scorer's tail path: the last k columns alone, the same numbers
    for k in (1, 7, 24):
        torch.testing.assert_close(model.token_nll(x, y, k), nll[:, -k:], rtol=1e-6, atol=1e-6)


def test_causality():
    model = _tiny(seed=3).eval()
    g = torch.Generator().manual_seed(2)
    T = 32
    x = torch.randint(0, 64, (2, T), generator=g)
    y = torch.randint(0, 64, (2, T), generator=g)
    base = model.token_nll(x, y)
    for t in (0, 5, 17, 30):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(0, 64, (2, T - t - 1), generator=g)
        x2[:, t + 1 :] = torch.where(
            x2[:, t + 1 :] == x[:, t + 1 :], (x[:, t + 1 :] + 1) % 64, x2[:, t + 1 :]
        )
        out = model.token_nll(x2, y)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        # the test is sensitive: positions after t do see the change
        assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4


def _naive_attention(q, k, v):
    """(B, T, H, D) causal GQA attention written out: softmax(q k^T / sqrt(D) + mask) v."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k = k.repeat_interleave(rep, dim=2).double()
    v = v.repeat_interleave(rep, dim=2).double()
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def _qkv(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, KV, D = 2, 16, 4, 2, 8
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, KV, D, generator=g)
    v = torch.randn(B, T, KV, D, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def test_sdpa_backend_matches_reference():
    assert attention.select_backend("sdpa", "cpu") == "sdpa"
    assert attention.select_backend("auto", "cpu") == "sdpa"  # no flash on CPU
    assert attention.backend() == "sdpa"
    q, k, v = _qkv()
    out = attention.causal_attention(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, attention.sdpa_reference(q, k, v), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v), rtol=0, atol=1e-5)


def test_attention_is_causal_and_grouped():
    q, k, v = _qkv(seed=1)
    out = attention.causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 9:] += 1.0
    v2[:, 9:] -= 2.0
    out2 = attention.causal_attention(q, k2, v2)
    torch.testing.assert_close(out2[:, :9], out[:, :9], rtol=0, atol=1e-6)
    assert (out2[:, 9:] - out[:, 9:]).abs().max() > 1e-2
    # query heads 0,1 read KV head 0; heads 2,3 read KV head 1
    v3 = v.clone()
    v3[:, :, 1] += 1.0
    out3 = attention.causal_attention(q, k, v3)
    torch.testing.assert_close(out3[:, :, :2], out[:, :, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out3[:, :, 2:], out[:, :, 2:] + 1.0, rtol=0, atol=1e-5)


def test_restore_fp32_params():
    model = _tiny(perturb=False).bfloat16()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    restore_fp32_params(model)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    linears = [m for m in model.modules() if isinstance(m, CastedLinear)]
    assert len(linears) == 12
    assert all(m.weight.dtype == torch.float32 for m in linears)
    for name, p in model.named_parameters():
        if name.endswith(CONTROL_SUFFIXES):
            assert p.dtype == torch.float32, name
    assert model.skip_weights.dtype == torch.float32 and model.blocks[0].resid_mix.dtype == torch.float32
    # the mixed-precision model still runs (bf16 activations, fp32 weights cast on the fly)
    x = torch.randint(0, 64, (1, 8))
    assert torch.isfinite(model(x, x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backend_parity():
    name = attention.select_backend("auto", "cuda")
    assert name in ("fa3", "fa2", "sdpa")
    for seed in range(3):
        q, k, v = _qkv(torch.bfloat16, "cuda", seed=seed)
        out = attention.causal_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        torch.testing.assert_close(out.float(), attention.sdpa_reference(q, k, v).float(), rtol=0, atol=2e-2)
