"""Parallel residuals: the two-stream forms against eager re-implementations of
the records' forward passes, written here from the records' code (R0331 two-lane sequential,
R0404/R0408 split lanes with a learned merge, R0410 two-lane concurrent), plus structure checks."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.models import attention
from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import is_control, ntk_rope_base, rms_norm, rotary_tables
from pgolf.registry import ConfigError

V, L = 64, 5
BASE = dict(
    vocab_size=V, num_layers=L, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
    activation="leaky_relu2", ln_scale=True, resid_mix=True, unet_skips=True, logit_softcap=30.0,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def build(banked: bool = False, seed: int = 0, perturb: bool = True, **kw) -> GPT:
    cfg = (BankedGPTConfig if banked else LayeredGPTConfig)(**{**BASE, **kw})
    cfg.validate("model")
    torch.manual_seed(seed)
    m = GPT(cfg, banked=banked)
    if perturb:  # lambdas, gates, merges and zero-init projections all away from their init
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))


class Ref:
    """The records' sub-block arithmetic on a pgolf model's weights (attention and MLP modules are
    reused: they are checked elsewhere; what is re-implemented is how the streams are wired)."""

    def __init__(self, m: GPT, tokens: torch.Tensor):
        self.m = m
        self.x = m._embed(tokens)
        self.x0 = self.x
        T = tokens.size(1)
        base = ntk_rope_base(m.cfg.rope_base, m.rope_dims, T, m.cfg.rope_train_seq_len)
        self.cos, self.sin = rotary_tables(T, m.rope_dims, base, self.x.device, self.x.dtype)

    def ln(self, i: int) -> float:
        return 1.0 / math.sqrt(i + 1) if self.m.cfg.ln_scale else 1.0

    def mix(self, i: int, h):
        rm = self.m.blocks[i].resid_mix
        return rm[0] * h + rm[1] * self.x0

    def attn(self, i: int, h):
        b = self.m.blocks[i]
        return b.attn_scale * b.attn(
            rms_norm(h) * self.ln(i), self.m.layer_weights(i), self.cos, self.sin, None
        )

    def mlp(self, i: int, h):
        b, w = self.m.blocks[i], self.m.layer_weights(i)
        return b.mlp_scale * b.mlp(rms_norm(h) * self.ln(i), w.up, w.down)

    def block(self, i: int, h):  # the sequential block of every record
        h = self.mix(i, h)
        h = h + self.attn(i, h)
        return h + self.mlp(i, h)

    def skip(self, k: int, h, s):
        w = self.m.skip_weights[k]
        if self.m.skip_gates is None:
            return h + w * s
        return torch.lerp(w * s, h, torch.sigmoid(self.m.skip_gates[k]))

    def plan(self):
        m = self.m
        return (m.enc_loop, m.dec_loop) if m.looping else (m.enc_plain, m.dec_plain)


def ref_r0331(m: GPT, tokens) -> torch.Tensor:
    """R0331 `_backbone`/`_parallel_block`: lanes from the first layer (encoder or decoder) whose
    physical index is >= the start; skips into both lanes; final (lane0 + lane1) / 2."""
    r = Ref(m, tokens)
    start, x = m.cfg.parallel_start_layer, r.x
    R, P = m.parallel_resid_lambdas, m.parallel_post_lambdas

    def par(i, lane0, lane1):
        a = r.attn(i, r.mix(i, lane0))
        lane0, lane1 = R[i, 0] * lane0 + P[i, 0, 0] * a, R[i, 0] * lane1 + P[i, 0, 1] * a
        o = r.mlp(i, r.mix(i, lane1))
        return R[i, 1] * lane0 + P[i, 1, 0] * o, R[i, 1] * lane1 + P[i, 1, 1] * o

    enc, dec = r.plan()
    lane0 = lane1 = None
    skips = []
    for i in enc:
        if i >= start:
            if lane0 is None:
                lane0 = lane1 = x
            lane0, lane1 = par(i, lane0, lane1)
            skips.append((lane0, lane1))
        else:
            x = r.block(i, x)
            skips.append(x)
    for k, i in enumerate(dec):
        if i >= start:
            if lane0 is None:
                lane0 = lane1 = x
            if skips:
                s = skips.pop()
                s0, s1 = s if isinstance(s, tuple) else (s, s)
                lane0, lane1 = r.skip(k, lane0, s0), r.skip(k, lane1, s1)
            lane0, lane1 = par(i, lane0, lane1)
        else:
            if skips:
                x = r.skip(k, x, skips.pop())
            x = r.block(i, x)
    return rms_norm(x if lane0 is None else (lane0 + lane1) * 0.5)


def ref_r0408(m: GPT, tokens) -> torch.Tensor:
    """R0408 `forward_logits`: the skip joins the stream, then the stream splits at the first decoder
    layer >= start; attention alone on lane0 (forward_attn), MLP alone on lane1 (forward_mlp); later
    skips into lane0; final lane_merge * lane0 + (1 - lane_merge) * lane1."""
    r = Ref(m, tokens)
    start, x = m.cfg.parallel_start_layer, r.x
    enc, dec = r.plan()
    skips = []
    for i in enc:
        x = r.block(i, x)
        skips.append(x)
    lane0 = lane1 = None
    for k, i in enumerate(dec):
        if lane0 is None:
            if skips:
                x = r.skip(k, x, skips.pop())
            if i >= start:
                h = r.mix(i, x)
                lane0, lane1 = h + r.attn(i, h), x + r.mlp(i, x)
            else:
                x = r.block(i, x)
        else:
            if skips:
                lane0 = r.skip(k, lane0, skips.pop())
            h = r.mix(i, lane0)
            lane0, lane1 = h + r.attn(i, h), lane1 + r.mlp(i, lane1)
    if lane0 is not None:
        x = m.lane_merge * lane0 + (1 - m.lane_merge) * lane1
    return rms_norm(x)


def ref_r0410(m: GPT, tokens) -> torch.Tensor:
    """R0410 `forward_logits`/`_parallel_block`: both sub-blocks read the pre-update lanes (attention
    resid-mixed lane0, MLP plain lane1); skips into lane0 after the split; final lane per setting."""
    r = Ref(m, tokens)
    start, x = m.cfg.parallel_start_layer, r.x
    R, P = m.parallel_resid_lambdas, m.parallel_post_lambdas
    enc, dec = r.plan()
    skips = []
    for i in enc:
        x = r.block(i, x)
        skips.append(x)
    lane0 = lane1 = None
    for k, i in enumerate(dec):
        if i >= start:
            if lane0 is None:
                lane0 = lane1 = x
            if skips:
                lane0 = r.skip(k, lane0, skips.pop())
            a, o = r.attn(i, r.mix(i, lane0)), r.mlp(i, lane1)
            lane0, lane1 = (
                R[i, 0] * lane0 + P[i, 0, 0] * a + P[i, 1, 0] * o,
                R[i, 1] * lane1 + P[i, 0, 1] * a + P[i, 1, 1] * o,
            )
        else:
            if skips:
                x = r.skip(k, x, skips.pop())
            x = r.block(i, x)
    final = m.cfg.parallel_final_lane
    if lane0 is not None:
        x = lane0 if final == "attn" else lane1 if final == "mlp" else 0.5 * (lane0 + lane1)
    return rms_norm(x)


CASES = [
    # (form, reference, extra settings); start 1 puts R0331's lanes into the encoder (L=5: enc [0, 1])
    ("two_lane_seq", ref_r0331, dict(parallel_start_layer=3, skip_gates_enabled=True)),
    ("two_lane_seq", ref_r0331, dict(parallel_start_layer=1)),
    ("two_lane_seq", ref_r0331, dict(parallel_start_layer=3, num_loops=1, loop_start=1, loop_end=2)),
    (
        "split_lane",
        ref_r0408,
        dict(parallel_start_layer=3, parallel_final_lane="learned", skip_gates_enabled=True),
    ),
    ("split_lane", ref_r0408, dict(parallel_start_layer=2, parallel_final_lane="learned")),
    ("two_lane", ref_r0410, dict(parallel_start_layer=3, skip_gates_enabled=True)),
    ("two_lane", ref_r0410, dict(parallel_start_layer=2, parallel_final_lane="mlp")),
    ("two_lane", ref_r0410, dict(parallel_start_layer=3, num_loops=1, loop_start=1, loop_end=2)),
]


@pytest.mark.parametrize("banked", [False, True])
@pytest.mark.parametrize("form,ref,extra", CASES)
def test_lane_forms_match_the_records(form, ref, extra, banked):
    m = build(banked=banked, parallel_residual=form, **extra)
    tokens = ids()
    with torch.no_grad():
        got, want = m._hidden(tokens), ref(m, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the check can fail: the sequential model (no lanes) gives another hidden state
    seq = build(banked=banked, **{k: v for k, v in extra.items() if k != "parallel_final_lane"})
    with torch.no_grad():
        assert not torch.allclose(seq._hidden(tokens), want, atol=1e-3)


def test_lane_parameters_and_their_inits():
    seq = build(parallel_residual="two_lane_seq", parallel_start_layer=2, perturb=False)
    assert seq.parallel_resid_lambdas.shape == (L, 2) and seq.parallel_post_lambdas.shape == (L, 2, 2)
    assert torch.allclose(seq.parallel_resid_lambdas, torch.full((L, 2), math.sqrt(1.1)))
    conc = build(parallel_residual="two_lane", parallel_start_layer=2, perturb=False)
    assert torch.equal(conc.parallel_resid_lambdas, torch.full((L, 2), 1.1))
    assert torch.equal(conc.parallel_post_lambdas, torch.ones(L, 2, 2)) and conc.lane_merge is None
    split = build(
        parallel_residual="split_lane", parallel_final_lane="learned", parallel_start_layer=2, perturb=False
    )
    assert not hasattr(split, "parallel_resid_lambdas")
    assert split.lane_merge.shape == () and split.lane_merge.item() == 0.5
    assert split.lane_merge.dtype == torch.float32 and is_control("lane_merge")
    assert ("lane_merge", split.lane_merge) in split.param_groups()["scalar"]
    with pytest.raises(ConfigError, match=r"parallel_final_lane=learned merges two lanes"):
        LayeredGPTConfig(
            **BASE, parallel_residual="gptj", parallel_start_layer=2, parallel_final_lane="learned"
        ).validate("model")


def test_two_lane_seq_at_init_is_the_sequential_block():
    """resid lambdas 1 and every post lambda 1 keep the lanes equal, and with resid-mix at its init
    (1, 0) the MLP then reads exactly what a sequential block's MLP reads."""
    m = build(parallel_residual="two_lane_seq", parallel_start_layer=1, perturb=False)
    plain = build(perturb=False)
    with torch.no_grad():
        for p in (*m.parameters(), *plain.parameters()):  # zero-init projections would hide paths
            if p.ndim == 2 and p.abs().sum() == 0:
                p.add_(0.05)
        m.parallel_resid_lambdas.fill_(1.0)
        got, want = m._hidden(ids()), plain._hidden(ids())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge,dead", [(0.0, "attn"), (1.0, "mlp")])
def test_split_lanes_never_exchange(merge, dead):
    """With lane_merge 0 only lane1 leaves, and it never sees the attention of the split layers;
    with 1 only lane0 leaves, which never sees their MLPs."""
    start = 2
    m = build(parallel_residual="split_lane", parallel_final_lane="learned", parallel_start_layer=start)
    with torch.no_grad():
        m.lane_merge.fill_(merge)
    m._hidden(ids()).square().sum().backward()
    split_layers = [i for i in m.dec_plain if i >= start]
    for i in split_layers:
        a, f = m.blocks[i].attn, m.blocks[i].mlp
        dead_w = (a.c_q.weight, a.proj.weight) if dead == "attn" else (f.fc.weight, f.proj.weight)
        live_w = (f.fc.weight,) if dead == "attn" else (a.c_q.weight,)
        assert all(w.grad is None or w.grad.abs().max() == 0 for w in dead_w), i
        assert all(w.grad is not None and w.grad.abs().max() > 0 for w in live_w), i
