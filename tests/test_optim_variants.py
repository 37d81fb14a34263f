"""Muon variants, AdamW weight decay, schedules, EMA/SWA and late QAT."""

from __future__ import annotations

import pytest
import torch

from pgolf.models import attention
from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.optim.config import MuonConfig, ParallelMuonConfig
from pgolf.optim.muon import OptimizerBundle, make_ns, newton_schulz, ns_schedule, row_normalize
from pgolf.optim.parallel_muon import ParallelMuonBundle
from pgolf.optim.schedules import lr_scale, muon_momentum, training_frac, wd_mult
from pgolf.quant.config import GroupQuant, Int8ZlibConfig, LosslessConfig, MixedQuantConfig
from pgolf.quant.qat import LateQAT, fake_quant_rows, qat_weight
from pgolf.registry import ConfigError

V = 64
TINY = dict(vocab_size=V, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
# R0323's bank shapes (L=11, d=512, kv 256, MLP 1536): qo, kv, up, down
BANK_SHAPES = [(4, 512, 512), (4, 256, 512), (3, 1536, 512), (3, 512, 1536)]


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def tiny_gpt(banked: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = (BankedGPTConfig if banked else LayeredGPTConfig)(**TINY)
    cfg.validate("model")
    model = GPT(cfg, banked=banked)
    with torch.no_grad():  # zero-initialized projections would make whole matrices trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def set_grads(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


def singular_values(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    gram = X @ X.mT if X.size(-2) <= X.size(-1) else X.mT @ X
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


# ---------------------------------------------------------------------------------------------
# Newton-Schulz variants and MuonEq-R
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coeffs", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", BANK_SHAPES)
def test_ns_variants_orthogonalize_bank_shapes(coeffs, shape):
    """Measured on these shapes: quintic puts singular values in [0.68, 1.15] (mean ~0.94), Polar
    Express in [0.85, 1.15] (mean ~1.01), except the near-zero tail of square Gaussian matrices."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    s = singular_values(newton_schulz(G, 5, coeffs=ns_schedule(coeffs, 5)))
    lo = 0.6 if coeffs == "quintic" else 0.8
    assert s.max() <= 1.25
    assert (s >= lo).float().mean() >= (0.95 if shape[-1] == shape[-2] else 1.0)
    assert (0.88 <= s.mean() <= 1.0) if coeffs == "quintic" else (0.97 <= s.mean() <= 1.05)
    assert singular_values(G / G.norm(dim=(-2, -1), keepdim=True)).max() < 0.2  # input was far from it


def test_polar_express_beats_quintic_and_slices():
    G = torch.randn(3, 256, 512, generator=torch.Generator().manual_seed(0))
    err = {c: (singular_values(newton_schulz(G, 5, coeffs=ns_schedule(c, 5))) - 1).abs().mean() for c in
           ("quintic", "polar_express")}  # fmt: skip
    assert err["polar_express"] < 0.7 * err["quintic"]  # measured 0.081 vs 0.148
    assert len(ns_schedule("polar_express", 7)) == 5 and len(ns_schedule("polar_express", 3)) == 3
    assert ns_schedule("quintic", 4) == ((3.4445, -4.7750, 2.0315),) * 4
    with pytest.raises(ValueError, match="ns_coeffs"):
        ns_schedule("cubic", 5)


def test_make_ns_honours_the_config():
    G = torch.randn(2, 64, 32)
    assert torch.equal(make_ns(MuonConfig(), False)(G), newton_schulz(G, 5))
    pe = make_ns(MuonConfig(ns_coeffs="polar_express"), False)(G)
    assert torch.equal(pe, newton_schulz(G, 5, coeffs=ns_schedule("polar_express", 5)))
    assert not torch.equal(pe, newton_schulz(G, 5))


@pytest.mark.parametrize("ns_batch", [True, False])
def test_ns_batch_off_orthogonalizes_one_matrix_at_a_time(ns_batch, monkeypatch):
    from pgolf.optim import muon as muon_module

    shapes = []
    real = muon_module.newton_schulz

    def spy(G, *a, **k):
        shapes.append(tuple(G.shape))
        return real(G, *a, **k)

    monkeypatch.setattr(muon_module, "newton_schulz", spy)
    G = torch.randn(3, 64, 32)
    out = make_ns(MuonConfig(ns_batch=ns_batch), False)(G)
    assert shapes == ([(3, 64, 32)] if ns_batch else [(64, 32)] * 3)
    # eagerly the two forms agree bit for bit (compiled, a batch rounds differently)
    assert torch.equal(out, real(G, 5))
    shapes.clear()
    assert torch.equal(make_ns(MuonConfig(ns_batch=ns_batch), False)(G[0]), real(G[0], 5))
    assert shapes == [(64, 32)]


def test_row_normalize_gives_unit_rows_per_matrix():
    u = torch.randn(3, 16, 8) * torch.arange(1, 17).view(1, 16, 1)
    r = row_normalize(u)
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(3, 16))
    torch.testing.assert_close(r * u.norm(dim=-1, keepdim=True), u)  # only the row scale changed


def test_muoneq_r_changes_the_muon_update():
    a, b = tiny_gpt(), tiny_gpt()
    for m in (a, b):
        set_grads(m, 1)
        m.qo_bank.grad[:, :4] *= 50.0  # rows of very different norms: row normalization matters
    OptimizerBundle(a, MuonConfig(warmdown_iters=0), torch.device("cpu"), False).step(0, 0.0, 10, None)
    OptimizerBundle(b, MuonConfig(warmdown_iters=0, row_normalize=True), torch.device("cpu"), False).step(
        0, 0.0, 10, None
    )
    assert not torch.allclose(a.qo_bank, b.qo_bank)
    torch.testing.assert_close(a.tok_emb.weight, b.tok_emb.weight)  # Adam groups untouched


# ---------------------------------------------------------------------------------------------
# weight decay
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle_cls", [OptimizerBundle, ParallelMuonBundle])
def test_decoupled_weight_decay_is_exact(bundle_cls):
    """Zero gradients give zero Muon/Adam updates, so one step is pure decay p * (1 - lr * wd)."""
    model = tiny_gpt()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = ParallelMuonConfig if bundle_cls is ParallelMuonBundle else MuonConfig
    cfg = cls(warmdown_iters=0, muon_wd=0.5, embed_wd=0.25, scalar_wd=0.125, matrix_lr=0.1, scalar_lr=0.2,
              tied_embed_lr=0.4)  # fmt: skip
    bundle = bundle_cls(model, cfg, torch.device("cpu"), False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bundle.step(0, 0.0, 10, None)
    groups = model.param_groups()
    expect = {"matrix": 1 - 0.1 * 0.5, "embed": 1 - 0.4 * 0.25, "scalar": 1 - 0.2 * 0.125}
    for role, factor in expect.items():
        for n, p in groups[role]:
            torch.testing.assert_close(p, start[n] * factor, rtol=1e-6, atol=0, msg=n)


@pytest.mark.parametrize("bundle_cls", [OptimizerBundle, ParallelMuonBundle])
@pytest.mark.parametrize("keep", [False, True])
def test_keep_primed_momentum_keeps_muon_momentum_and_nothing_else(bundle_cls, keep):
    """After priming's reset, the next step equals a fresh bundle's on the same weights, whose Muon
    momentum is the primed one (keep) or zero (the default); Adam's moments are fresh either way."""
    cls = ParallelMuonConfig if bundle_cls is ParallelMuonBundle else MuonConfig
    cfg = cls(warmdown_iters=0, keep_primed_momentum=keep)
    used, fresh = tiny_gpt(), tiny_gpt(seed=1)
    bundle = bundle_cls(used, cfg, torch.device("cpu"), False)
    for step in range(3):  # "priming"
        set_grads(used, seed=10 + step)
        bundle.step(step, 0.0, 10, None)
    primed = bundle.muon.state_dict()
    bundle.reset_state()
    fresh.load_state_dict(used.state_dict())
    fresh_bundle = bundle_cls(fresh, cfg, torch.device("cpu"), False)
    if keep:
        fresh_bundle.muon.load_state_dict(primed)
    for m, b in ((used, bundle), (fresh, fresh_bundle)):
        set_grads(m, seed=99)
        b.step(0, 0.0, 10, None)
    for (n, a), (_, b) in zip(used.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    kept = bundle.muon.state_dict()
    moved = any(not torch.equal(kept[k], v) for k, v in primed.items()) if primed else False
    assert primed and moved  # the momentum was real and the step used it


def test_wd_taper_scales_the_muon_decay():
    model = tiny_gpt()
    q0 = model.qo_bank.detach().clone()
    cfg = MuonConfig(
        warmdown_iters=0, muon_wd=0.5, matrix_lr=0.1, wd_taper_start_frac=0.5, wd_taper_final_mult=0.5
    )
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bundle.step(75, 0.0, 100, None)  # frac 0.75: halfway down the taper, mult 0.75
    torch.testing.assert_close(model.qo_bank, q0 * (1 - 0.1 * 0.5 * 0.75), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# schedules at documented fractions
# ---------------------------------------------------------------------------------------------


def test_r0409_fraction_warmdown_with_reserve():
    """WARMDOWN_FRAC 0.72 of the 588 s left after a 12 s GPTQ reserve (the 2026-04-09 record)."""
    cfg = MuonConfig(warmdown_frac=0.72, min_lr=0.0)
    cap = 1000.0 * (600 - 12)
    for frac, expected in [(0.0, 1.0), (0.279, 1.0), (0.28, 1.0), (0.64, 0.5), (0.82, 0.25), (1.0, 0.0)]:
        assert lr_scale(cfg, 1, frac * cap, 0, cap) == pytest.approx(expected), frac
    assert training_frac(0, 294_000.0, 0, cap) == pytest.approx(0.5)
    floor = MuonConfig(warmdown_frac=0.72, min_lr=0.1)  # R0423's MIN_LR floor
    assert lr_scale(floor, 1, 0.99 * cap, 0, cap) == pytest.approx(0.1)
    assert lr_scale(floor, 1, 0.5 * cap, 0, cap) == pytest.approx(0.5 / 0.72)
    # steps mode: the same function of step / iterations
    assert lr_scale(cfg, 640, 0.0, 1000, None) == pytest.approx(0.5)


def test_r0323_time_based_warmdown():
    """WARMDOWN_ITERS 3500 at 83.3 ms/step: decay starts when 291.55 s remain, linear to 0 at 600 s."""
    cfg = MuonConfig(warmdown_iters=3500)
    cap, step_ms = 600_000.0, 83.3
    start_ms = cap - 3500 * step_ms
    for elapsed, expected in [
        (start_ms - 1000, 1.0),
        (start_ms, 1.0),
        (cap - 1750 * step_ms, 0.5),
        (cap, 0.0),
    ]:
        step = round(elapsed / step_ms)
        got = lr_scale(cfg, step, step * step_ms, 9000, cap)
        assert got == pytest.approx(expected, abs=2e-3), elapsed


def test_record_momentum_and_taper_values():
    cfg = MuonConfig(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)
    assert [muon_momentum(cfg, s) for s in (0, 750, 1500, 5000)] == pytest.approx([0.92, 0.955, 0.99, 0.99])
    taper = MuonConfig(wd_taper_start_frac=0.70, wd_taper_final_mult=0.50)  # R0418
    assert [wd_mult(taper, f) for f in (0.0, 0.7, 0.85, 1.0)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert wd_mult(MuonConfig(), 0.99) == 1.0


# ---------------------------------------------------------------------------------------------
# EMA / SWA
# ---------------------------------------------------------------------------------------------


def _train(cfg: MuonConfig, steps: int, iterations: int) -> tuple[GPT, OptimizerBundle, list[dict]]:
    """`steps` bundle steps on fixed random grads; returns the live weights after every step."""
    model = tiny_gpt()
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), False)
    history = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for step in range(steps):
        set_grads(model, 10 + step)
        bundle.step(step, 0.0, iterations, None)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, bundle, history


def test_ema_is_applied_exactly_as_specified():
    d = 0.9
    model, bundle, hist = _train(MuonConfig(ema_decay=d, warmdown_iters=0), 4, 10)
    expected = {n: t.float().clone() for n, t in hist[0].items()}  # initialized from the start weights
    for h in hist[1:]:
        for n in expected:
            expected[n] = expected[n] * d + h[n].float() * (1 - d)
    assert "ema" in bundle.finish()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, expected[n].to(p.dtype), rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.equal(p, hist[-1][n]), n  # the live weights were replaced


def test_swa_is_applied_exactly_as_specified():
    """Steps mode, warmdown over all 6 steps: lr scale before step s is (6 - s) / 6, so with
    threshold 0.6 and every 2 the snapshots are the weights after steps 4 and 6 (1-based)."""
    model, bundle, hist = _train(MuonConfig(swa_every=2, swa_threshold=0.6, warmdown_iters=6), 6, 6)
    assert bundle.averager.count == 2 and bundle.averager.first_step == 4
    assert "swa" in bundle.finish()
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p, ((hist[4][n] + hist[6][n]) / 2).to(p.dtype), rtol=1e-6, atol=1e-7, msg=n
        )


def test_swa_without_snapshots_keeps_live_weights():
    model, bundle, hist = _train(MuonConfig(swa_every=2, swa_threshold=0.01, warmdown_iters=0), 4, 10)
    assert "no snapshot" in bundle.finish()
    for n, p in model.named_parameters():
        assert torch.equal(p, hist[-1][n])


def test_averaging_restarts_on_reset_and_round_trips():
    model, bundle, _ = _train(MuonConfig(ema_decay=0.5, warmdown_iters=0), 2, 10)
    state = bundle.state_dict()
    bundle.reset_state()  # what priming does after restoring the initial weights
    for s, p in zip(bundle.averager.shadow, model.parameters()):
        assert torch.equal(s, p.float())
    bundle.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(bundle.averager.shadow, state["averager"]["shadow"]))


def test_ema_and_swa_together_are_refused():
    with pytest.raises(ConfigError, match="ema_decay and swa_every"):
        MuonConfig(ema_decay=0.997, swa_every=50).validate("optimizer")


# ---------------------------------------------------------------------------------------------
# late QAT
# ---------------------------------------------------------------------------------------------


def test_fake_quant_is_the_record_int6_grid():
    w = torch.tensor([[0.0, 0.5, -1.0, 2.0], [0.01, -0.02, 0.005, 0.0]])
    q = fake_quant_rows(w)
    # row 0: scale 2/31, values snap to k * 2/31; row 1: amax/31 < 1/31, so the 1/31 floor applies
    torch.testing.assert_close(q[0], torch.round(w[0] / (2 / 31)) * (2 / 31))
    torch.testing.assert_close(q[1], torch.tensor([0.0, -1 / 31, 0.0, 0.0]))
    w.requires_grad_(True)
    out = qat_weight(w, torch.tensor(1.0))
    out.sum().backward()
    torch.testing.assert_close(out.detach(), q)
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    assert torch.equal(qat_weight(w, torch.tensor(0.0)), w)


# attention at int6 (the records' grid), MLP at int4: each matrix gets its own group's bits
QAT_QUANT = MixedQuantConfig(attn=GroupQuant(bits=6), mlp=GroupQuant(bits=4))
QAT_BITS = {"c_q": 6, "c_k": 6, "c_v": 6, "attn.proj": 6, "mlp.fc": 4, "mlp.proj": 4}
BANK_BITS = {"qo_bank": 6, "kv_bank": 6, "mlp_up_bank": 4, "mlp_down_bank": 4}


@pytest.mark.parametrize("banked", [True, False])
def test_late_qat_switch_takes_effect_under_compile(banked):
    """The flag flips after the graph is compiled (fullgraph) and the compiled forward follows it:
    quantized weights at blend 1, exact weights at 0, with no recompile either way."""
    torch._dynamo.reset()
    model = tiny_gpt(banked)
    blend = LateQAT(model, QAT_QUANT, 0.5).hook.blend
    x = torch.randint(2, V, (2, 17), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    off = compiled(x[:, :-1], x[:, 1:])
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    blend.fill_(1.0)
    on = compiled(x[:, :-1], x[:, 1:])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # same graph, new behaviour
    # eager reference: a plain model holding the fake-quantized block matrices, at their group's bits
    ref = tiny_gpt(banked)
    with torch.no_grad():
        for name, t in ref.named_parameters():
            bits = BANK_BITS.get(name) or next(
                (b for k, b in QAT_BITS.items() if f".{k}.weight" in name), None
            )
            if bits is not None and name.startswith(("blocks.", *BANK_BITS)):
                t.copy_(fake_quant_rows(t, bits))
    torch.testing.assert_close(on, ref(x[:, :-1], x[:, 1:]), rtol=1e-5, atol=1e-5)
    assert abs(on.item() - off.item()) > 1e-4
    torch.testing.assert_close(off, tiny_gpt(banked)(x[:, :-1], x[:, 1:]), rtol=1e-6, atol=1e-6)
    blend.fill_(0.0)
    torch.testing.assert_close(compiled(x[:, :-1], x[:, 1:]), off, rtol=0, atol=0)
    model.eval()  # eval forwards never fake-quantize
    blend.fill_(1.0)
    torch.testing.assert_close(model(x[:, :-1], x[:, 1:]), off, rtol=1e-6, atol=1e-6)


def test_late_qat_bits_are_the_exporters():
    """Each hooked matrix trains towards the grid its quant group exports it on."""
    names = tiny_gpt(banked=False).weight_hook_names()
    assert LateQAT(tiny_gpt(), QAT_QUANT, 0.5).bits == dict(zip(names, [6, 6, 6, 6, 4, 4]))
    assert set(LateQAT(tiny_gpt(), Int8ZlibConfig(), 0.5).bits.values()) == {8}
    with pytest.raises(ValueError, match="unquantized"):
        LateQAT(tiny_gpt(), LosslessConfig(), 0.5)


def test_weight_hook_names_are_the_hooked_matrices_in_order():
    model = tiny_gpt(banked=False)
    params = dict(model.named_parameters())
    assert [params[n] for n in model.weight_hook_names()] == list(model._layer_weights(0))


def test_bundle_turns_late_qat_on_and_priming_reset_turns_it_off():
    model = tiny_gpt()
    cfg = MuonConfig(late_qat_threshold=0.5, warmdown_iters=4)
    qat = LateQAT(model, QAT_QUANT, cfg.late_qat_threshold)
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), False, qat)
    assert model.weight_hook is qat.hook and qat.hook.blend.item() == 0.0
    scales = []
    for step in range(4):  # lr scale before step s: 1, 0.75, 0.5, 0.25 -> below 0.5 first at s=3
        set_grads(model, step)
        bundle.step(step, 0.0, 4, None)
        scales.append((bundle.last_lr_scale, qat.hook.blend.item()))
    assert scales == [(1.0, 0.0), (0.75, 0.0), (0.5, 0.0), (0.25, 1.0)]
    assert bundle.report()["late_qat_step"] == 4
    state = bundle.state_dict()
    bundle.reset_state()
    assert qat.hook.blend.item() == 0.0 and bundle.qat_step is None
    bundle.load_state_dict(state)  # a resume after the start: on again, from the same step
    assert qat.hook.blend.item() == 1.0 and bundle.qat_step == 4
    assert not any("blend" in k for k in [*model.state_dict(), *model.export_state_dict()])


def test_late_qat_on_a_model_without_support_is_refused():
    from pgolf.models.baseline import BaselineGPT
    from pgolf.models.config import BaselineModelConfig

    model = BaselineGPT(
        BaselineModelConfig(vocab_size=V, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
    )
    with pytest.raises(ValueError, match="late_qat_threshold"):
        LateQAT(model, QAT_QUANT, 0.15)
    # a threshold with nothing to drive it is refused too, never silently ignored
    with pytest.raises(ValueError, match="late_qat_threshold"):
        OptimizerBundle(tiny_gpt(), MuonConfig(late_qat_threshold=0.15), torch.device("cpu"), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="optimizer timing uses CUDA events")
def test_optimizer_timing_on_cuda():
    model = tiny_gpt().cuda()
    bundle = ParallelMuonBundle(model, ParallelMuonConfig(timing_steps=3), torch.device("cuda"), False)
    for step in range(15):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.1
        bundle.step(step, 0.0, 100, None)
    t = bundle.report()["timing"]
    assert t["steps"] == 3 and t["optimizer_ms_median"] > 0 and t["exposed_comm_ms_median"] == 0.0
    bundle.reset_state()
    assert bundle.report()["timing"] == {"steps": 0}


def _scripts_ns(G: torch.Tensor, square_first: bool) -> torch.Tensor:
    """The NS5 of the seed scripts, transcribed: PR #399's and #726's `zeropower_via_newtonschulz5`
    (transpose, then normalize, B = b * A + c * (A @ A)); with square_first=False, #339's line
    B = b * A + c * A @ A."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * (A @ A) if square_first else b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


@pytest.mark.parametrize("shape", [(3, 64, 192), (4, 64, 64), (3, 192, 64)])
def test_ns_square_first_is_bit_exact_with_the_seed_scripts(shape):
    """Both bf16 roundings of b*A + c*A@A, bit for bit; they are ~2% apart (rel. Frobenius on
    (11, 512, 1536) bf16 Gaussians), which is why experiment=pr399/pr726 set ns_square_first."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    for square_first in (False, True):  # on this CPU the scripts' NS runs ATen's bf16 GEMM
        cfg = MuonConfig(ns_square_first=square_first, ns_cpu_fp32=False)
        assert torch.equal(make_ns(cfg, False)(G), _scripts_ns(G, square_first))
    assert torch.equal(newton_schulz(G, 5, cpu_fp32=False), _scripts_ns(G, False))  # default form
    assert not torch.equal(_scripts_ns(G, True), _scripts_ns(G, False))


def test_bf16_matmul_in_fp32_is_a_bf16_gemm_up_to_the_sum_order():
    """The CPU's Newton-Schulz GEMM (optimizer.ns_cpu_fp32): bf16 operands multiplied in fp32, the
    product rounded to bf16 once. Against ATen's bf16 GEMM, at most a 1-ulp rounding difference, in
    a small share of the elements; exact where the fp32 sums are (small integers)."""
    from pgolf.optim.muon import _bf16_matmul_in_fp32

    g = torch.Generator().manual_seed(4)
    ints = torch.randint(-8, 9, (3, 32, 48), generator=g).bfloat16()
    assert torch.equal(_bf16_matmul_in_fp32(ints, ints.mT), ints @ ints.mT)
    X = torch.randn(4, 128, 128, generator=g).bfloat16()
    ours, aten = _bf16_matmul_in_fp32(X, X.mT), X @ X.mT
    assert ours.dtype == torch.bfloat16
    differ = ours != aten
    assert differ.float().mean() < 1e-3
    ulp = torch.finfo(torch.bfloat16).eps * aten[differ].float().abs()
    assert ((ours[differ].float() - aten[differ].float()).abs() <= ulp).all()


@pytest.mark.parametrize("shape", [(2, 128, 256), (2, 256, 128)])
def test_cpu_fp32_newton_schulz_orthogonalizes_like_the_bf16_gemm(shape, monkeypatch):
    """optimizer.ns_cpu_fp32 (the CPU default) changes only the GEMM's rounding: the update is
    within bf16 noise of ATen's bf16 NS, and the switch reaches make_ns. Which GEMM ran is told by
    counting calls, not by the results: on a CPU with bf16 dot-product instructions (avx512_bf16)
    ATen's bf16 GEMM also sums in fp32 and often returns the very same bits."""
    import pgolf.optim.muon as muon

    calls = []
    fp32_gemm = muon._bf16_matmul_in_fp32
    monkeypatch.setattr(muon, "_bf16_matmul_in_fp32", lambda x, y: calls.append(1) or fp32_gemm(x, y))
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fast = newton_schulz(G, 5)
    assert len(calls) == 5 * 3  # three GEMMs in each of the five iterations
    aten = newton_schulz(G, 5, cpu_fp32=False)
    assert len(calls) == 15
    assert ((fast.float() - aten.float()).norm() / aten.float().norm()) < 0.02
    assert torch.equal(make_ns(MuonConfig(), False)(G), fast) and len(calls) == 30
    assert torch.equal(make_ns(MuonConfig(ns_cpu_fp32=False), False)(G), aten) and len(calls) == 30


def test_ns_compile_off_runs_newton_schulz_eagerly(monkeypatch):
    """optimizer.ns_compile=false keeps NS out of torch.compile even in a compiled run (the
    #399/#726 scripts run it eagerly; compiled bf16 NS rounds differently)."""
    import pgolf.optim.muon as muon

    compiled = []
    monkeypatch.setattr(muon.torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    G = torch.randn(2, 32, 16)
    eager = make_ns(MuonConfig(ns_compile=False), True)
    assert compiled == [] and torch.equal(eager(G), newton_schulz(G, 5))
    make_ns(MuonConfig(), True)
    assert compiled == [newton_schulz]  # the default still compiles


@pytest.mark.parametrize("ns_dynamic", [False, True])
def test_ns_dynamic_compiles_as_a_bare_torch_compile(ns_dynamic, monkeypatch):
    """optimizer.ns_dynamic: NS compiled with torch.compile's default automatic dynamic shapes
    (dynamic=None), as PR #1775's bare @torch.compile, instead of one static compile per shape.
    bench/seed_parity_cpu.py pr1775 shows the effect: qo_bank's update 2% apart without it, every
    bank bit for bit with it."""
    from pgolf.optim import muon as muon_module

    calls = []

    def spy_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(muon_module.torch, "compile", spy_compile)
    G = torch.randn(2, 64, 32)
    out = make_ns(MuonConfig(ns_dynamic=ns_dynamic), True)(G)
    assert calls == [{"fullgraph": True, "dynamic": None if ns_dynamic else False}]
    assert torch.equal(out, newton_schulz(G, 5))
    calls.clear()
    make_ns(MuonConfig(ns_dynamic=ns_dynamic, ns_compile=False), True)
    assert calls == []  # ns_compile=false: eager, whatever ns_dynamic says
