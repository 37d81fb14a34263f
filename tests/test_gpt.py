"""The record GPT family's features: each one as the spec describes it, identities at init, and
every switch composing with the others (forward + backward, both layouts)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.models import attention
from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BankedGPTConfig, BaselineModelConfig, GPTModelConfig, LayeredGPTConfig
from pgolf.models.embeddings import SmearGateV2, SmearGateV3, bigram_buckets
from pgolf.models.gpt import GPT
from pgolf.models.layers import apply_partial_rotary, apply_rotary, ntk_rope_base, rms_norm, rotary_tables
from pgolf.models.recurrence import layer_plan, virtual_layers
from pgolf.registry import ConfigError

V = 64
TINY = dict(vocab_size=V, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2)

# One entry per switch, with the settings the records use it with (tiny shapes).
FEATURES: dict[str, dict] = {
    "leaky": dict(activation="leaky_relu2", negative_slope=0.5),
    "mlp3": dict(mlp_mult=3.0),
    "xsa": dict(xsa_last_n=2),
    "rope": dict(rope_dims=8, rope_train_seq_len=8),
    "ln_scale": dict(ln_scale=True),
    "resid_mix": dict(resid_mix=True),
    "unet": dict(unet_skips=True),
    "skip_gates": dict(unet_skips=True, skip_gates_enabled=True),
    "smear_v2": dict(smear_gate="v2", smear_bos_fix=True),
    "smear_v3": dict(smear_gate="v3", smear_bos_fix=True, gate_window=12),
    "bigram": dict(bigram_vocab_size=48, bigram_dim=16),
    "ve": dict(ve_enabled=True, ve_dim=16, ve_layers=[1, 3]),
    "ortho": dict(ortho_init=True),
    "qk": dict(qk_gain_init=5.25),
    "softcap": dict(logit_softcap=30.0),
    "untied": dict(tie_embeddings=False),
    "backout": dict(backout=True),
    "loops": dict(num_loops=2, loop_start=1, loop_end=2, enable_looping_at=0.0),
    "gptj": dict(parallel_residual="gptj", parallel_start_layer=2),
    "two_lane": dict(parallel_residual="two_lane", parallel_start_layer=2),
    "out_gate": dict(attn_out_gate=True),
    "out_gate_q": dict(attn_out_gate=True, attn_out_gate_src="q"),
    "dense_gate": dict(gated_attn=True, gated_attn_init_std=0.005),
    "sparse_gate": dict(sparse_attn_gate=True, sparse_attn_gate_scale=0.5),
}
EXCLUSIVE = [
    {"smear_v2", "smear_v3"},
    {"gptj", "two_lane"},
    {"out_gate", "out_gate_q", "dense_gate", "sparse_gate"},
]
# The records' stacks on tiny shapes.
STACKS = {
    "r0323": ["leaky", "mlp3", "xsa", "rope", "ln_scale", "resid_mix", "unet", "smear_v2", "bigram", "ve", "ortho"],
    "r0409": ["leaky", "xsa", "rope", "ln_scale", "resid_mix", "skip_gates", "gptj", "loops", "qk", "ortho"],
    "r0416": ["leaky", "xsa", "rope", "ln_scale", "resid_mix", "skip_gates", "two_lane", "loops", "smear_v3", "out_gate"],
    "r0419": ["leaky", "xsa", "rope", "ln_scale", "resid_mix", "skip_gates", "two_lane", "loops", "dense_gate"],
    "r0427a": ["leaky", "xsa", "rope", "ln_scale", "resid_mix", "skip_gates", "two_lane", "loops", "smear_v3", "sparse_gate"],
    "pr339": ["mlp3", "xsa", "resid_mix", "unet", "smear_v2", "bigram", "ortho", "backout", "softcap"],
}  # fmt: skip


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def cfg_of(banked: bool = False, **kw) -> GPTModelConfig:
    cls = BankedGPTConfig if banked else LayeredGPTConfig
    cfg = cls(**{**TINY, **kw})
    cfg.validate("model")
    return cfg


def features(*names: str) -> dict:
    out: dict = {}
    for n in names:
        out.update(FEATURES[n])
    return out


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Zero-initialized projections and gates would hide whole paths; nudge every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def batch(seed: int = 0, B: int = 2, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, V, (B, T + 1), generator=g)
    x[0, 0] = x[1, 5] = x[1, 11] = 1  # BOS at a sequence start and inside a packed sequence
    return x[:, :-1], x[:, 1:]


def forward_backward(model: GPT) -> float:
    x, y = batch()
    loss = model(x, y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return loss.item()


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------


def _compatible(a: str, b: str) -> bool:
    return not any({a, b} <= group for group in EXCLUSIVE)


PAIRS = [(a, b) for a, b in itertools.combinations(FEATURES, 2) if _compatible(a, b)]


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_of_switches_composes(a, b):
    torch.manual_seed(0)
    model = perturb(GPT(cfg_of(banked=len(a) % 2 == 0, **features(a, b)), banked=len(a) % 2 == 0))
    assert math.isfinite(forward_backward(model))


@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("banked", [False, True], ids=["layered", "banked"])
def test_record_stacks_forward_backward(stack, banked):
    cfg = cfg_of(banked, **features(*STACKS[stack]))
    torch.manual_seed(0)
    model = perturb(GPT(cfg, banked))
    for variant in model.graph_variants():
        model.set_graph_variant(variant)
        model.zero_grad()
        assert math.isfinite(forward_backward(model))


def test_gates_are_mutually_exclusive():
    for a, b in itertools.combinations(("attn_out_gate", "gated_attn", "sparse_attn_gate"), 2):
        with pytest.raises(ConfigError, match=rf"model\.{a} and model\.{b} are mutually exclusive"):
            cfg_of(**{a: True, b: True})


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(skip_gates_enabled=True), r"skip_gates_enabled gates the U-Net skips"),
        (dict(num_loops=1, loop_start=3, loop_end=2), r"loop_start <= loop_end"),
        (dict(num_loops=1, loop_start=0, loop_end=4), r"loop_end < num_layers=4"),
        (dict(xsa_last_n=2, xsa_layers=[0]), r"either model\.xsa_last_n or model\.xsa_layers"),
        (dict(ve_enabled=True, ve_layers=[4]), r"ve_layers=\[4\]"),
        (dict(rope_dims=7), r"rope_dims=7 must be even and <= head_dim=16"),
        (dict(rope_dims=24), r"rope_dims=24"),
        (dict(parallel_residual="gptj", parallel_start_layer=4), r"parallel_start_layer=4"),
        (dict(smear_bos_fix=True), r"smear_bos_fix applies to the SmearGate"),
        (dict(backout=True, backout_layer=4), r"backout_layer=4"),
        (dict(enable_looping_at=1.5), r"enable_looping_at=1\.5"),
    ],
)
def test_invalid_combinations_are_named(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg_of(**kw)


# ---------------------------------------------------------------------------------------------
# the naive baseline is a special case
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("banked", [False, True], ids=["layered", "banked"])
def test_baseline_settings_reproduce_baseline_gpt(banked):
    base_cfg = BaselineModelConfig(vocab_size=V, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    baseline = perturb(BaselineGPT(base_cfg))
    cfg = cfg_of(banked, num_layers=5, resid_mix=True, unet_skips=True, logit_softcap=30.0)
    model = GPT(cfg, banked)
    model.load_export_state_dict(baseline.state_dict())  # same names: strict load
    x, _ = batch()
    torch.testing.assert_close(model._logits(x), baseline._logits(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# identities at init
# ---------------------------------------------------------------------------------------------


def _with_and_without(on: dict, off: dict | None = None, seed: int = 3) -> tuple[GPT, GPT, list[str]]:
    """(model without the feature, perturbed; same model with it, freshly initialized feature params)."""
    torch.manual_seed(seed)
    plain = perturb(GPT(cfg_of(**(off or {})), banked=False))
    torch.manual_seed(seed)
    model = GPT(cfg_of(**{**(off or {}), **on}), banked=False)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    return plain, model, result.missing_keys


@pytest.mark.parametrize(
    "name,on,new_params",
    [
        ("smear_v3", dict(smear_gate="v3"), {"smear.proj.weight", "smear.lam"}),
        ("smear_v3_bos", dict(smear_gate="v3", smear_bos_fix=True), {"smear.proj.weight", "smear.lam"}),
        ("bigram", dict(bigram_vocab_size=48, bigram_dim=16), {"bigram.embed.weight", "bigram.proj.weight", "bigram.scale"}),
        ("bigram_ortho", dict(bigram_vocab_size=48, bigram_dim=96, ortho_init=True), None),
        ("ve", dict(ve_enabled=True, ve_dim=16, ve_layers=[0, 2]), None),
        ("attn_out_gate", dict(attn_out_gate=True), None),
        ("attn_out_gate_q", dict(attn_out_gate=True, attn_out_gate_src="q"), None),
        ("backout_zero", dict(backout=True, backout_lambda_init=0.0), {"backout_lambda"}),
    ],
)  # fmt: skip
def test_identity_at_init(name, on, new_params):
    off = {"resid_mix": True, "unet_skips": True}
    plain, model, missing = _with_and_without(on, off)
    if new_params is not None:
        assert set(missing) == new_params
    if name == "bigram_ortho":  # OrthoInit reaches the projection, the zero table still adds nothing
        assert torch.count_nonzero(model.bigram.proj.weight) > 0
        assert torch.count_nonzero(model.bigram.embed.weight) == 0
    x, _ = batch()
    torch.testing.assert_close(model._logits(x), plain._logits(x), rtol=0, atol=0)
    # the feature is live: once its parameters move, the output changes
    perturb(model, seed=9)
    assert not torch.allclose(model._logits(x), plain._logits(x))


SIGMOID_GATES = [dict(sparse_attn_gate=True), dict(gated_attn=True, gated_attn_init_std=0.0)]


@pytest.mark.parametrize("gate", SIGMOID_GATES)
def test_sigmoid_gates_halve_attention_at_zero_weights(gate):
    """sigmoid(0) = 0.5 per head before W_o: the same as halving attn_scale."""
    plain, model, _ = _with_and_without(gate)
    with torch.no_grad():
        for b in plain.blocks:
            b.attn_scale.mul_(0.5)
    x, _ = batch()
    torch.testing.assert_close(model._logits(x), plain._logits(x), rtol=1e-5, atol=1e-5)


def test_recurrence_off_is_the_plain_stack():
    """Loops not yet enabled: the plain 0..L-1 stack, using the first of the (more) skip weights."""
    loops = dict(num_loops=2, loop_start=1, loop_end=2, enable_looping_at=0.5)
    torch.manual_seed(0)
    looped = perturb(GPT(cfg_of(unet_skips=True, **loops), banked=False))
    plain = GPT(cfg_of(unet_skips=True), banked=False)
    state = looped.state_dict()
    state["skip_weights"] = state["skip_weights"][: plain.num_skips]
    plain.load_state_dict(state, strict=True)
    x, _ = batch()
    assert not looped.looping
    torch.testing.assert_close(looped._logits(x), plain._logits(x), rtol=0, atol=0)
    looped.on_progress(0.5)
    assert looped.looping and not torch.allclose(looped._logits(x), plain._logits(x))


# ---------------------------------------------------------------------------------------------
# each feature as specified
# ---------------------------------------------------------------------------------------------


def test_virtual_layers_of_the_records():
    r0409 = [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert virtual_layers(11, num_loops=2, loop_start=3, loop_end=5) == r0409
    plan = layer_plan(11, 2, 3, 5, looping=True)
    assert plan.encoder == (0, 1, 2, 3, 4, 5, 3, 4)
    assert plan.decoder == (5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert plan.num_skips == 8 and list(plan.layers) == r0409
    off = layer_plan(11, 2, 3, 5, looping=False)
    assert (off.encoder, off.decoder) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10))
    r0405 = layer_plan(11, 2, 4, 5, looping=True)  # NUM_LOOPS=2, LOOP_START=4, LOOP_END=5
    assert r0405.encoder == (0, 1, 2, 3, 4, 5, 4) and r0405.decoder == (5, 4, 5, 6, 7, 8, 9, 10)
    assert virtual_layers(11, 1, 4, 5) == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]  # R0331's 13 passes


@pytest.mark.parametrize("two_lane", [False, True])
def test_model_runs_the_plan_it_is_in(two_lane):
    extra = dict(parallel_residual="two_lane", parallel_start_layer=3) if two_lane else {}
    loops = dict(num_loops=2, loop_start=2, loop_end=3, enable_looping_at=0.4)
    cfg = cfg_of(num_layers=6, unet_skips=True, **loops, **extra)
    model = GPT(cfg, banked=True)
    order: list[int] = []
    for i, b in enumerate(model.blocks):
        b.attn.register_forward_pre_hook(lambda *_, i=i: order.append(i))
    x, _ = batch()
    for frac, looping in ((0.0, False), (0.39, False), (0.4, True), (1.0, True)):
        order.clear()
        model.on_progress(frac)
        model._logits(x)
        assert order == virtual_layers(6, 2 if looping else 0, 2, 3)
    assert model.skip_weights.shape == (5, 64)  # min(5, 5) of the 10-layer looped plan
    assert model.graph_variants() == ["loop_off", "loop_on"]


def test_xsa_removes_the_own_value_component():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 8, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    out = attention.exclusive_self_attention(y, v)
    v_rep = F.normalize(v, dim=-1).repeat_interleave(4, dim=2)  # query head h reads KV head h // 4
    torch.testing.assert_close((out * v_rep).sum(-1), torch.zeros(2, 5, 8), rtol=0, atol=1e-5)
    ref = y - (y * v_rep).sum(-1, keepdim=True) * v_rep
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_xsa_layer_selection():
    def xsa(**kw) -> list[bool]:
        return [b.attn.use_xsa for b in GPT(cfg_of(**kw), banked=False).blocks]

    assert xsa(xsa_last_n=2) == [False, False, True, True]
    assert xsa(xsa_layers=[0, 2]) == [True, False, True, False]
    assert xsa(xsa_last_n=11) == [True] * 4 and xsa() == [False] * 4


def test_bigram_hash_buckets():
    ids = torch.tensor([[5, 7, 1000, 3]])
    n = 1536
    expected = [n - 1] + [((36313 * c) ^ (27191 * p)) % (n - 1) for p, c in [(5, 7), (7, 1000), (1000, 3)]]
    assert bigram_buckets(ids, n).tolist() == [expected]


def test_smear_gates_and_bos_fix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 16, generator=g)
    ids = torch.tensor([[1, 9, 9, 1, 9, 9]])  # a second document starts at position 3
    v2 = SmearGateV2(16, bos_fix=True, bos_id=1)
    with torch.no_grad():
        v2.gate.copy_(torch.randn(16, generator=g))
    s = torch.sigmoid(v2.gate)
    out = v2(x, ids)
    for t in range(6):
        prev = x[0, t - 1] if t > 0 and ids[0, t] != 1 else torch.zeros(16)
        torch.testing.assert_close(out[0, t], (1 - s) * x[0, t] + s * prev)
    v3 = SmearGateV3(4, bos_fix=True, bos_id=1)
    with torch.no_grad():
        v3.proj.weight.copy_(torch.randn(1, 4, generator=g))
        v3.lam.fill_(0.7)
    out = v3(x, ids)
    for t in range(6):
        gate = 0.7 * torch.sigmoid(v3.proj.weight[0] @ x[0, t, :4])
        prev = x[0, t - 1] if t > 0 and ids[0, t] != 1 else torch.zeros(16)
        torch.testing.assert_close(out[0, t], x[0, t] + gate * prev)
    no_fix = SmearGateV3(4, bos_fix=False, bos_id=1)
    no_fix.load_state_dict(v3.state_dict())
    assert not torch.allclose(no_fix(x, ids)[0, 3], out[0, 3])  # the leak the fix removes


def test_partial_rope_and_ntk_base():
    assert ntk_rope_base(1e4, 16, 2048, 1024) == pytest.approx(1e4 * 2 ** (16 / 14))
    assert ntk_rope_base(1e4, 16, 2048, 2048) == 1e4 and ntk_rope_base(1e4, 16, 4096, 0) == 1e4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 64, generator=g)
    cos, sin = rotary_tables(8, 16, 1e4, x.device, x.dtype)
    out = apply_partial_rotary(x, cos, sin, 16)
    assert torch.equal(out[..., 16:], x[..., 16:])  # dims 16..63 carry no position
    torch.testing.assert_close(out[..., :16], apply_rotary(x[..., :16], cos, sin))
    # inverse frequencies over the 16 rotated dims: base^(-2j/16), pairing j with j + 8
    t, j = 5, 3
    theta = t * 1e4 ** (-2 * j / 16)
    a, b = x[0, t, 0, j], x[0, t, 0, j + 8]
    torch.testing.assert_close(out[0, t, 0, j], a * math.cos(theta) + b * math.sin(theta))


def test_bf16_inv_freq_tables_are_pr1775s():
    """PR #1775's Rotary: model.bfloat16() rounds the inv_freq buffer, then each forward takes
    `inv_freq.float()` against an fp32 arange, so positions stay exact (unlike `bfloat16` tables,
    whose bf16 arange rounds position 1027 to 1024)."""
    T, rd, base = 2048, 16, 1e4
    inv = (1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)).bfloat16().float()
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = rotary_tables(T, rd, base, torch.device("cpu"), torch.float32, inv_freq_dtype=torch.bfloat16)
    assert torch.equal(cos[0, :, 0], freqs.cos()) and torch.equal(sin[0, :, 0], freqs.sin())
    exact, _ = rotary_tables(T, rd, base, torch.device("cpu"), torch.float32)
    rounded, _ = rotary_tables(T, rd, base, torch.device("cpu"), torch.float32, torch.bfloat16)
    assert not torch.equal(cos, exact)  # the rounded frequencies
    assert not torch.equal(cos[0, 1027], rounded[0, 1027])  # exact positions, unlike bfloat16


def test_block_forms_and_scales():
    gptj = dict(parallel_residual="gptj", parallel_start_layer=2)
    cfg = cfg_of(ln_scale=True, resid_mix=True, activation="leaky_relu2", **gptj)
    torch.manual_seed(0)
    model = perturb(GPT(cfg, banked=False))
    assert [b.ln_factor for b in model.blocks] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5]
    assert [b.gptj for b in model.blocks] == [False, False, True, True]
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 64, generator=g)
    cos, sin = rotary_tables(8, 16, 1e4, x.device, x.dtype)
    for i in (1, 3):
        b, w = model.blocks[i], model.layer_weights(i)
        h = b.resid_mix[0] * x + b.resid_mix[1] * x0
        n = rms_norm(h) * b.ln_factor
        a = b.attn_scale * b.attn(n, w, cos, sin)
        if b.gptj:  # both branches read the same input
            expected = h + a + b.mlp_scale * (F.leaky_relu(n @ w.up.T, 0.5).square() @ w.down.T)
        else:
            h2 = h + a
            n2 = rms_norm(h2) * b.ln_factor
            expected = h2 + b.mlp_scale * (F.leaky_relu(n2 @ w.up.T, 0.5).square() @ w.down.T)
        torch.testing.assert_close(b(x, x0, w, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_two_lane_block_formula():
    cfg = cfg_of(resid_mix=True, parallel_residual="two_lane", parallel_start_layer=2)
    torch.manual_seed(0)
    model = perturb(GPT(cfg, banked=True), scale=0.3)
    assert torch.equal(GPT(cfg, banked=True).parallel_resid_lambdas, torch.full((4, 2), 1.1))
    g = torch.Generator().manual_seed(1)
    l0, l1, x0 = (torch.randn(2, 8, 64, generator=g) for _ in range(3))
    cos, sin = rotary_tables(8, 16, 1e4, l0.device, l0.dtype)
    b, w = model.blocks[2], model.layer_weights(2)
    a = b.attn_branch(b.mix(l0, x0), w, cos, sin, None)  # attention reads lane0 (mixed with x0)
    m = b.mlp_branch(l1, w)  # the MLP reads lane1, both from the pre-update lanes
    r, p = model.parallel_resid_lambdas[2], model.parallel_post_lambdas[2]
    new0, new1 = model._two_lane(2, (l0, l1), x0, cos, sin, None)
    torch.testing.assert_close(new0, r[0] * l0 + p[0, 0] * a + p[1, 0] * m)
    torch.testing.assert_close(new1, r[1] * l1 + p[0, 1] * a + p[1, 1] * m)


def test_init_policies():
    cfg = cfg_of(ortho_init=True, qk_gain_init=5.25, num_layers=2)
    model = GPT(cfg, banked=True)
    eye = torch.eye(32)
    for i in range(2):
        w = model.layer_weights(i)
        torch.testing.assert_close(w.q @ w.q.T, torch.eye(64), rtol=0, atol=1e-5)
        torch.testing.assert_close(w.k @ w.k.T, eye, rtol=0, atol=1e-5)  # wide: orthonormal rows
        assert torch.count_nonzero(w.o) == 0 and torch.count_nonzero(w.down) == 0
    assert torch.equal(model.blocks[0].attn.q_gain, torch.full((4,), 5.25))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)
    # without zero-init, output projections are orthogonal times 1/sqrt(2L)
    scaled = GPT(cfg_of(ortho_init=True, zero_init_proj=False, num_layers=2), banked=False)
    o = scaled.layer_weights(1).o
    torch.testing.assert_close(o @ o.T, torch.eye(64) / 4, rtol=0, atol=1e-5)


def test_softcap_and_head():
    torch.manual_seed(0)
    capped = perturb(GPT(cfg_of(logit_softcap=2.0), banked=False), scale=1.0)
    x, _ = batch()
    assert capped._logits(x).abs().max() <= 2.0
    raw = GPT(cfg_of(), banked=False)
    raw.load_state_dict(capped.state_dict())
    assert raw._logits(x).abs().max() > 2.0
    untied = GPT(cfg_of(tie_embeddings=False), banked=True)
    assert torch.count_nonzero(untied.lm_head.weight) == 0
    assert [n for n, _ in untied.param_groups()["head"]] == ["lm_head.weight"]


def test_backout_subtracts_mid_stream_before_the_final_norm():
    cfg = cfg_of(backout=True, unet_skips=True)
    torch.manual_seed(0)
    model = perturb(GPT(cfg, banked=False))
    mids: list[torch.Tensor] = []
    model.blocks[1].register_forward_hook(lambda m, i, out: mids.append(out))  # encoder = layers 0, 1
    finals: list[torch.Tensor] = []
    model.blocks[3].register_forward_hook(lambda m, i, out: finals.append(out))
    x, _ = batch()
    hidden = model._hidden(x)
    lam = model.backout_lambda.detach()
    assert float(lam) == pytest.approx(0.2, abs=0.2)
    torch.testing.assert_close(hidden, rms_norm(finals[0] - lam * mids[0]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# scoring only the last rows (sliding eval's tail path)
# ---------------------------------------------------------------------------------------------

LAST_ROWS_CASES = {
    **{name: features(name) for name in FEATURES},
    **{f"stack_{name}": features(*names) for name, names in STACKS.items()},
    "two_lane_seq": dict(parallel_residual="two_lane_seq", parallel_start_layer=2),
    "split_lane": dict(parallel_residual="split_lane", parallel_start_layer=2),
    "all_parallel": dict(parallel_residual="gptj", parallel_start_layer=0),
}


@pytest.mark.parametrize("name", sorted(LAST_ROWS_CASES))
@pytest.mark.parametrize("last", [1, 5, 16])
def test_token_nll_of_the_last_rows_equals_the_full_forwards(name, last):
    """`token_nll(x, y, last)` skips the final block's other rows; the scores must not move."""
    kw = LAST_ROWS_CASES[name]
    torch.manual_seed(0)
    banked = len(name) % 2 == 0
    model = perturb(GPT(cfg_of(banked=banked, **kw), banked=banked)).eval()
    if model.cfg.num_loops:
        model.on_progress(1.0)  # recurrence on: the looped plan's last layer is pruned
    x, y = batch(T=16)
    with torch.no_grad():
        full = model.token_nll(x, y)
        tail = model.token_nll(x, y, last)
    assert tail.shape == (x.size(0), last)
    torch.testing.assert_close(tail, full[:, -last:], rtol=1e-5, atol=1e-5)


def test_last_rows_pruning_reaches_the_final_block(monkeypatch):
    """The saving is real: the final block's MLP sees `last` rows, the others every row."""
    model = perturb(GPT(cfg_of(**features("xsa", "unet")), banked=False)).eval()
    seen: list[int] = []
    for block in model.blocks:
        orig = block.mlp.forward
        monkeypatch.setattr(
            block.mlp,
            "forward",
            lambda h, up, down, orig=orig: (seen.append(h.size(1)), orig(h, up, down))[1],
        )
    x, y = batch(T=16)
    with torch.no_grad():
        model.token_nll(x, y, 3)
    assert seen == [16] * (len(model.blocks) - 1) + [3]


# PR #1775's GPT.__init__ registers its own parameters in this order (.refs/pr1775/train_gpt.py):
# the four banks, skip_weights, skip_gates, then the post lambdas before the resid lambdas.
PR1775_OWN_ORDER = [
    "qo_bank",
    "kv_bank",
    "mlp_up_bank",
    "mlp_down_bank",
    "skip_weights",
    "skip_gates",
    "parallel_post_lambdas",
    "parallel_resid_lambdas",
]


def test_param_order_sets_the_clip_order_and_nothing_else(compose):
    """model.param_order reorders parameters(), which is the grad clip's reduction order
    (OptimizerBundle.all_params: one ulp of the total norm, through bf16 Newton-Schulz, was 0.5% of
    a bank's update in bench/seed_parity_cpu.py pr1775 --prime-steps); the init draws, the state
    and the export keys stay as they were. experiment=pr1775 sets its script's order."""
    from pgolf.optim.config import ParallelMuonConfig
    from pgolf.optim.parallel_muon import ParallelMuonBundle

    assert compose(["experiment=pr1775"])["model"]["param_order"] == PR1775_OWN_ORDER
    kw = dict(unet_skips=True, skip_gates_enabled=True, parallel_residual="two_lane", parallel_start_layer=2)
    torch.manual_seed(0)
    plain = GPT(cfg_of(banked=True, **kw), banked=True)
    torch.manual_seed(0)
    ordered = GPT(cfg_of(banked=True, param_order=PR1775_OWN_ORDER, **kw), banked=True)
    names = [n for n, _ in ordered.named_parameters()]
    assert names[: len(PR1775_OWN_ORDER) + 1] == [*PR1775_OWN_ORDER, "tok_emb.weight"]
    assert [n for n, _ in plain.named_parameters()][:2] == ["skip_weights", "skip_gates"]
    a, b = plain.state_dict(), ordered.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list(plain.export_state_dict()) == list(ordered.export_state_dict())
    bundle = ParallelMuonBundle(ordered, ParallelMuonConfig(), torch.device("cpu"), compile_ns=False)
    assert [id(p) for p in bundle.all_params] == [id(p) for p in ordered.parameters()]
    with pytest.raises(ConfigError, match="param_order"):
        cfg_of(banked=True, param_order=["qo_bank", "nope"])
