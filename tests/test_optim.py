"""Newton-Schulz, the lr/momentum schedules, and one Muon+Adam bundle step against a per-parameter reference."""

from __future__ import annotations

import pytest
import torch

from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BaselineModelConfig
from pgolf.optim import muon as muon_module
from pgolf.optim.config import MuonConfig
from pgolf.optim.muon import OptimizerBundle, newton_schulz
from pgolf.optim.schedules import lr_scale, muon_momentum

BASELINE_SHAPES = [(512, 512), (256, 512), (1024, 512), (512, 1024)]


def _ns5_reference(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The challenge's zeropower_via_newtonschulz5 for one 2-D matrix."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


# ---------------------------------------------------------------------------------------------
# Newton-Schulz
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", BASELINE_SHAPES)
def test_newton_schulz_orthogonalizes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(2, *shape, generator=g)
    X = newton_schulz(G, 5)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    # singular values from the short-side Gram matrix (cheaper than an SVD)
    XX = X.double() @ X.double().mT if shape[0] <= shape[1] else X.double().mT @ X.double()
    s = torch.linalg.eigvalsh(XX).clamp_min(0).sqrt()
    assert s.max() <= 1.3
    if shape[0] == shape[1]:
        # a square Gaussian matrix has singular values near 0 that 5 steps cannot lift all the way
        assert (s >= 0.6).float().mean() >= 0.95
    else:
        assert s.min() >= 0.6
    assert 0.85 <= s.mean() <= 1.0
    # X X^T (on the short side) is close to a diagonal matrix with entries near 1.
    diag = torch.diagonal(XX, dim1=-2, dim2=-1)
    assert diag.min() >= 0.6 and diag.max() <= 1.2
    off = XX - torch.diag_embed(diag)
    assert off.abs().max() <= 0.15
    # The input's singular values were far from 1: it really changed the spectrum.
    Gn = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    gram = Gn @ Gn.mT if shape[0] <= shape[1] else Gn.mT @ Gn
    assert torch.linalg.eigvalsh(gram).max().sqrt() < 0.2


# The baseline's aspect ratios at a quarter of the size: eager bf16 matmuls are slow on a CPU, and
# the batched and per-matrix forms agree or not whatever the size.
@pytest.mark.parametrize("shape", [(r // 4, c // 4) for r, c in BASELINE_SHAPES])
def test_newton_schulz_batched_equals_per_matrix(shape):
    g = torch.Generator().manual_seed(1 + sum(shape))
    G = torch.randn(4, *shape, generator=g)
    X = newton_schulz(G, 5)
    for i in range(G.size(0)):
        # Same arithmetic; on some CPUs bf16 bmm and mm round differently, so allow bf16 noise
        # (a wrong transpose/normalization would be off by O(1), not O(1%)).
        for other in (newton_schulz(G[i], 5), _ns5_reference(G[i])):
            diff = X[i].float() - other.float()
            assert diff.norm() <= 0.02 * other.float().norm()
            assert diff.abs().max() <= 2e-2


def test_newton_schulz_is_scale_and_transpose_equivariant():
    g = torch.Generator().manual_seed(9)
    G = torch.randn(2, 64, 96, generator=g)
    X = newton_schulz(G, 5)
    assert torch.equal(newton_schulz(G.mT.contiguous(), 5), X.mT)
    torch.testing.assert_close(newton_schulz(G * 8.0, 5).float(), X.float(), rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def _ref_steps(step: int, iters: int, wd: int) -> float:
    warmdown_start = max(iters - wd, 0)
    if warmdown_start <= step < iters:
        return (iters - step) / wd
    return 1.0


@pytest.mark.parametrize(
    "iters,wd,step,expected",
    [(100, 20, 0, 1.0), (100, 20, 79, 1.0), (100, 20, 80, 1.0), (100, 20, 81, 0.95), (100, 20, 90, 0.5),
     (100, 20, 99, 0.05), (10, 20, 0, 0.5), (10, 20, 5, 0.25), (10, 20, 9, 0.05), (1200, 1200, 600, 0.5)],
)  # fmt: skip
def test_lr_scale_steps(iters, wd, step, expected):
    cfg = MuonConfig(warmdown_iters=wd)
    assert lr_scale(cfg, step, elapsed_ms=123.0, iterations=iters, cap_ms=None) == pytest.approx(
        expected, abs=1e-12
    )
    assert _ref_steps(step, iters, wd) == pytest.approx(expected, abs=1e-12)


def test_lr_scale_steps_sweep_and_disabled():
    cfg = MuonConfig(warmdown_iters=37)
    for step in range(0, 200):
        assert lr_scale(cfg, step, 0.0, 150, None) == pytest.approx(_ref_steps(step, 150, 37), abs=1e-12)
    cfg0 = MuonConfig(warmdown_iters=0)
    assert all(lr_scale(cfg0, s, 1e9, 10, c) == 1.0 for s in range(12) for c in (None, 100.0))


@pytest.mark.parametrize(
    "step,elapsed,expected",
    [
        (50, 500.0, 1.0),  # 10 ms/step -> warmdown 200 ms; 500 ms left
        (80, 800.0, 1.0),  # exactly 200 ms left: 200/200
        (90, 900.0, 0.5),  # 100 ms left of a 200 ms warmdown
        (50, 900.0, 100.0 / 360.0),  # 18 ms/step -> 360 ms warmdown
        (99, 990.0, 0.05),  # 10 ms/step, 10 ms left
        (99, 999.0, 1.0 / (20 * 999.0 / 99)),
        (100, 1200.0, 0.0),  # past the cap
        (0, 950.0, 50.0 / 19000.0),  # step 0: elapsed / max(step, 1)
    ],
)
def test_lr_scale_wallclock(step, elapsed, expected):
    cfg = MuonConfig(warmdown_iters=20)
    cap = 1000.0
    assert lr_scale(cfg, step, elapsed, iterations=10**6, cap_ms=cap) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )
    avg = elapsed / max(step, 1)
    remaining = max(cap - elapsed, 0.0)
    ref = remaining / (20 * avg) if remaining <= 20 * avg else 1.0
    assert ref == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "elapsed,expected",
    [
        (0.0, 1.0),
        (700.0, 1.0),
        (749.0, 1.0),
        (750.0, 1.0),
        (800.0, 0.8),
        (900.0, 0.4),
        (990.0, 0.1),
        (1000.0, 0.1),
        (1100.0, 0.1),
    ],
)
def test_lr_scale_warmdown_frac_wallclock(elapsed, expected):
    cfg = MuonConfig(warmdown_frac=0.25, min_lr=0.1, warmdown_iters=1200)
    assert lr_scale(cfg, 7, elapsed, iterations=10, cap_ms=1000.0) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "step,min_lr,expected",
    [(0, 0.1, 1.0), (74, 0.1, 1.0), (80, 0.1, 0.8), (95, 0.1, 0.2), (99, 0.1, 0.1), (99, 0.0, 0.04)],
)
def test_lr_scale_warmdown_frac_steps(step, min_lr, expected):
    cfg = MuonConfig(warmdown_frac=0.25, min_lr=min_lr)
    assert lr_scale(cfg, step, 1e12, iterations=100, cap_ms=None) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("step,expected", [(0, 0.85), (250, 0.90), (500, 0.95), (1000, 0.95), (100, 0.87)])
def test_muon_momentum_warmup(step, expected):
    cfg = MuonConfig(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert muon_momentum(cfg, step) == pytest.approx(expected, abs=1e-12)
    assert muon_momentum(MuonConfig(muon_momentum_warmup_steps=0), step) == 0.95


# ---------------------------------------------------------------------------------------------
# one OptimizerBundle step vs an independent Muon + torch.optim.Adam
# ---------------------------------------------------------------------------------------------

TINY = BaselineModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
ITERS, WD = 3, 2  # steps mode: lr scale 1.0, 1.0, 0.5


def _tiny_model(seed: int = 0) -> BaselineGPT:
    torch.manual_seed(seed)
    model = BaselineGPT(TINY)
    with torch.no_grad():  # the zero-init projections would make those matrices trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _grads(model: BaselineGPT, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in model.named_parameters()}


class ReferenceOptimizer:
    """Muon for 2-D block matrices (one matrix at a time) and torch.optim.Adam for the rest."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: MuonConfig, ns=_ns5_reference):
        self.cfg = cfg
        self.ns = ns
        self.params = params
        self.matrix = [
            n for n, p in params.items() if n.startswith("blocks.") and p.ndim == 2 and "resid_mix" not in n
        ]
        scalar = [n for n in params if n not in self.matrix and n != "tok_emb.weight"]
        kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, foreach=False)
        self.adams = [
            (torch.optim.Adam([params["tok_emb.weight"]], lr=cfg.tied_embed_lr, **kw), cfg.tied_embed_lr),
            (torch.optim.Adam([params[n] for n in scalar], lr=cfg.scalar_lr, **kw), cfg.scalar_lr),
        ]
        self.bufs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, step: int) -> None:
        scale = _ref_steps(step, ITERS, WD)
        f = min(step / 500, 1.0)
        momentum = (1 - f) * 0.85 + f * 0.95
        if self.cfg.grad_clip_norm > 0:
            # torch's own clipping over all parameters (bf16 Newton-Schulz amplifies the last-ulp
            # differences of any other rounding of the clip coefficient)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip_norm)
        for opt, base in self.adams:
            opt.param_groups[0]["lr"] = base * scale
            opt.step()
        for n in self.matrix:
            p = self.params[n]
            buf = self.bufs.setdefault(n, torch.zeros_like(p))
            buf.mul_(momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=momentum)  # nesterov
            update = self.ns(update, 5)
            update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.sub_(self.cfg.matrix_lr * scale * update.float())


def _fake_ns(
    G: torch.Tensor,
    steps: int,
    square_first: bool = False,
    transpose_first: bool = False,
    cpu_fp32: bool = True,
) -> torch.Tensor:
    """Elementwise stand-in for Newton-Schulz: identical batched or per matrix, bit for bit."""
    assert steps == 5
    return (G * 3.0).bfloat16()


def _run_both(
    cfg: MuonConfig, monkeypatch=None, fake_ns: bool = False
) -> tuple[BaselineGPT, BaselineGPT, dict[str, torch.Tensor], ReferenceOptimizer]:
    if fake_ns:
        monkeypatch.setattr(muon_module, "newton_schulz", _fake_ns)
    model = _tiny_model()
    ref_model = _tiny_model()
    bundle = OptimizerBundle(model, cfg, torch.device("cpu"), compile_ns=False)
    ref = ReferenceOptimizer(
        dict(ref_model.named_parameters()), cfg, ns=_fake_ns if fake_ns else _ns5_reference
    )
    assert len(ref.matrix) == 12 and len(bundle.muon.params) == 12
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        grads = _grads(model, seed=100 + step)
        for m in (model, ref_model):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
        bundle.step(step, elapsed_ms=10.0 * step, iterations=ITERS, cap_ms=None)
        ref.step(step)
    assert bundle.last_lr_scale == 0.5
    return model, ref_model, start, ref


def test_bundle_matches_reference():
    """Real bf16 Newton-Schulz: the bundle orthogonalizes each shape as one batch, the reference one
    matrix at a time; bf16 bmm and mm may round differently on some CPUs, and such ulps grow to ~1% of
    an update, so matrices are compared by their total displacement (nesterov, the sqrt(rows/cols) scale
    or the lr schedule, if wrong, are off by 10-40%). test_bundle_muon_arithmetic_exact checks the rest
    of the arithmetic bit for bit."""
    model, ref_model, start, ref = _run_both(MuonConfig(warmdown_iters=WD))
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(p, start[n]), n
        if n in ref.matrix:
            d, d_ref = p - start[n], ref_params[n] - start[n]
            assert (d - d_ref).norm() <= 0.03 * d_ref.norm(), n
        else:
            torch.testing.assert_close(p, ref_params[n], rtol=1e-6, atol=1e-7, msg=n)


def test_bundle_muon_arithmetic_exact(monkeypatch):
    """With an elementwise stand-in for Newton-Schulz, momentum, nesterov, the shape scale, the lr and
    momentum schedules and the Adam groups agree with the reference to fp32 rounding."""
    model, ref_model, start, ref = _run_both(MuonConfig(warmdown_iters=WD), monkeypatch, fake_ns=True)
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(p, start[n]), n
        torch.testing.assert_close(p, ref_params[n], rtol=1e-6, atol=1e-7, msg=n)


def test_bundle_matches_reference_with_grad_clip():
    """Clipping is over all parameters at once. The clip coefficient's last-ulp rounding depends on the
    summation order, and bf16 Newton-Schulz amplifies such ulps into a few % of a matrix's update,
    so matrices are compared by their total displacement."""
    cfg = MuonConfig(warmdown_iters=WD, grad_clip_norm=0.5)
    model, ref_model, start, ref = _run_both(cfg)
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        if n in ref.matrix:
            d, d_ref = p - start[n], ref_params[n] - start[n]
            assert (d - d_ref).norm() <= 0.03 * d_ref.norm(), n
        else:
            torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-7, msg=n)
    # the clip really bit: the last step's gradients (clipped in place) have total norm 0.5 ...
    clipped = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert float(clipped) == pytest.approx(0.5, rel=1e-5)
    # ... down from the raw gradients' norm
    raw = _grads(model, seed=102)
    assert float(torch.sqrt(sum(g.double().pow(2).sum() for g in raw.values()))) > 1.0


def test_reset_state_equals_fresh_bundle():
    cfg = MuonConfig(warmdown_iters=WD)
    used, fresh = _tiny_model(), _tiny_model(seed=1)
    bundle = OptimizerBundle(used, cfg, torch.device("cpu"), compile_ns=False)
    for step in range(3):
        grads = _grads(used, seed=200 + step)
        for n, p in used.named_parameters():
            p.grad = grads[n]
        bundle.step(step, 0.0, ITERS, None)
    bundle.reset_state()
    assert bundle.last_lr_scale == 1.0
    fresh.load_state_dict(used.state_dict())
    fresh_bundle = OptimizerBundle(fresh, cfg, torch.device("cpu"), compile_ns=False)
    grads = _grads(used, seed=300)
    for m in (used, fresh):
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
    bundle.step(0, 0.0, ITERS, None)
    fresh_bundle.step(0, 0.0, ITERS, None)
    for (n, a), (_, b) in zip(used.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    # and without the reset, the same step would have differed (moments carried over)
    assert bundle.muon.momentum_buffers


def test_reset_state_matters():
    """Sanity check for the test above: carrying state over changes the next step."""
    cfg = MuonConfig(warmdown_iters=WD)
    used, fresh = _tiny_model(), _tiny_model()
    bundle = OptimizerBundle(used, cfg, torch.device("cpu"), compile_ns=False)
    grads = _grads(used, seed=400)
    for n, p in used.named_parameters():
        p.grad = grads[n]
    bundle.step(0, 0.0, ITERS, None)
    fresh.load_state_dict(used.state_dict())
    fresh_bundle = OptimizerBundle(fresh, cfg, torch.device("cpu"), compile_ns=False)
    grads = _grads(used, seed=401)
    for m in (used, fresh):
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
    bundle.step(0, 0.0, ITERS, None)
    fresh_bundle.step(0, 0.0, ITERS, None)
    assert not torch.equal(used.blocks[0].attn.c_q.weight, fresh.blocks[0].attn.c_q.weight)
    assert not torch.equal(used.tok_emb.weight, fresh.tok_emb.weight)


def test_zero_grad_clears_every_grad():
    model = _tiny_model()
    bundle = OptimizerBundle(model, MuonConfig(), torch.device("cpu"), compile_ns=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    bundle.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("extra", [False, True], ids=["bank-alone", "bank-plus-matrix-of-its-shape"])
def test_muon_steps_a_bank_like_its_slices(extra):
    """A 3-D bank is a stack of matrices: Muon moves each slice exactly as it moves the same matrices
    given as separate 2-D parameters (one group per shape either way; with a 2-D parameter of the
    same shape the bank's slices are stacked with it instead of used whole)."""
    g = torch.Generator().manual_seed(0)
    w, other = torch.randn(4, 32, 48, generator=g), torch.randn(32, 48, generator=g)
    bank = torch.nn.Parameter(w.clone())
    slices = [torch.nn.Parameter(m.clone()) for m in w]
    extras = [torch.nn.Parameter(other.clone()) for _ in range(2)] if extra else []
    a = muon_module.Muon([bank, *extras[:1]], MuonConfig(), compile_ns=False)
    b = muon_module.Muon([*slices, *extras[1:]], MuonConfig(), compile_ns=False)
    assert len(a.matrices) == len(b.matrices) == 4 + extra
    assert (a.whole_bank[0] is bank) != extra
    for _ in range(3):
        grads = torch.randn(5, 32, 48, generator=g)
        bank.grad = grads[:4].clone()
        for p, grad in zip(slices, grads):
            p.grad = grad.clone()
        for p in extras:
            p.grad = grads[4].clone()
        a.step(lr=0.02, momentum=0.9)
        b.step(lr=0.02, momentum=0.9)
    for j in range(4):
        assert torch.equal(bank[j], slices[j]) and not torch.equal(bank[j], w[j]), j
    if extra:
        assert torch.equal(extras[0], extras[1])


def _banked_records_ns(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """PR #399 / #726 / #1775's Newton-Schulz, written out: a tall matrix is transposed before
    its norm is taken, and c * (A @ A) is rounded on its own."""
    a, b, c = 3.4445, -4.775, 2.0315
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("shape", [(3, 96, 32), (3, 32, 96), (2, 48, 48)])
def test_transpose_first_is_the_banked_records_newton_schulz(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(G, 5, square_first=True, transpose_first=True)
    assert torch.equal(got, _banked_records_ns(G))


def test_row_normalize_divides_in_the_updates_dtype():
    """MuonEq-R as the records write it: norms in fp32, `g / norms.to(g.dtype)`. For PR #1775's
    bf16 bank updates that divides by the bf16-rounded norm; fp32 updates are plain fp32."""
    u = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1)) * 1e-3
    for t in (u.bfloat16(), u):
        norms = t.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
        assert torch.equal(muon_module.row_normalize(t), t / norms.to(t.dtype))
    b = u.bfloat16()
    fp32_division = (b.float() / b.float().norm(dim=-1, keepdim=True)).to(b.dtype)
    assert not torch.equal(muon_module.row_normalize(b), fp32_division)  # the form used before
