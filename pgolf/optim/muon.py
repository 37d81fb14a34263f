"""Muon for the block matrices (batched Newton-Schulz per shape) + Adam for everything else.

Matrices of one shape are orthogonalized together in one batched, compiled Newton-Schulz call
instead of one call per matrix (54 calls -> 4 for the baseline), which is the same arithmetic
with far fewer kernel launches. Across ranks the work is split as in the baseline: matrix i is
processed by rank i % world_size and one all-reduce shares every update.

A 3-D parameter is a bank of matrices (docs/techniques.md#parameter-banks): each [j] slice is
orthogonalized as its own matrix, exactly as if it were a separate 2-D parameter. When one shape
group is exactly one whole bank (the usual case on one device), its gradient is used as the batch
directly, without stacking slices.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.optim.averaging import WeightAverager
from pgolf.optim.config import MuonConfig
from pgolf.optim.schedules import lr_scale, muon_momentum, training_frac, wd_mult
from pgolf.optim.timing import OptimizerTimer

if TYPE_CHECKING:
    from pgolf.quant.qat import LateQAT

QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express: one (a, b, c) per iteration (docs/techniques.md#polar-express-coefficients).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_schedule(name: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each iteration: `steps` x the quintic, or the Polar Express table sliced
    to `steps` (asking for more than 5 gives 5 iterations, as the record's slicing does)."""
    if name == "quintic":
        return (QUINTIC,) * steps
    if name == "polar_express":
        return POLAR_EXPRESS[:steps]
    raise ValueError(f"unknown optimizer.ns_coeffs {name!r}; use quintic or polar_express")


def newton_schulz(
    G: Tensor,
    steps: int,
    eps: float = 1e-7,
    coeffs: tuple[tuple[float, float, float], ...] | None = None,
    square_first: bool = False,
    transpose_first: bool = False,
    cpu_fp32: bool = True,
) -> Tensor:
    """Orthogonalize a batch of matrices (..., m, n) with the Newton-Schulz iteration, in bf16.

    Each matrix is normalized by its own Frobenius norm; `coeffs` (one (a, b, c) per iteration)
    defaults to `steps` x the fixed quintic. `square_first` rounds c * (A @ A) instead of
    (c * A) @ A, bit for bit as the scripts that parenthesize it (MuonConfig.ns_square_first).
    `transpose_first` takes the norm after a tall matrix is transposed, as the banked records'
    Parallel Muon does (the per-layer records normalize first): the same value, but a compiled
    reduction over the other layout rounds differently, and bf16 Newton-Schulz carries that to
    0.7% of the update of PR #1775's (11, 2048, 512) MLP bank. `cpu_fp32` multiplies on a CPU in
    fp32 and rounds each product to bf16 (`_bf16_matmul_in_fp32`), off: ATen's bf16 GEMM.
    """
    mm = _bf16_matmul_in_fp32 if cpu_fp32 and G.device.type == "cpu" else torch.matmul
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall and transpose_first:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    if tall and not transpose_first:
        X = X.mT
    for a, b, c in coeffs if coeffs is not None else (QUINTIC,) * steps:
        A = mm(X, X.mT)
        B = b * A + (c * mm(A, A) if square_first else mm(c * A, A))
        X = a * X + mm(B, X)
    return X.mT if tall else X


def _bf16_matmul_in_fp32(x: Tensor, y: Tensor) -> Tensor:
    """x @ y for bf16 x and y on a CPU: multiplied in fp32, the product rounded to bf16. A CPU
    without bf16 matrix instructions (AVX2 machines, most CI runners) runs a bf16 GEMM 20-70x slower
    than an fp32 one, which made Newton-Schulz half of a CPU training step. The result is what a
    bf16 GEMM returns: bf16 inputs are exact in fp32, their products too, and the sum is rounded to
    bf16 once; only the order of the fp32 sum can differ from ATen's bf16 kernel (1 bf16 ulp in
    about 5e-5 of the elements, measured on 128x128 and 64x256 batches)."""
    return torch.matmul(x.float(), y.float()).bfloat16()


def make_ns(cfg: MuonConfig, compile_ns: bool, transpose_first: bool = False):
    """The configured Newton-Schulz as a one-argument function (compiled once per shape when the
    run compiles and optimizer.ns_compile is on); `transpose_first` as in `newton_schulz`."""
    compile_ns = compile_ns and cfg.ns_compile
    steps = cfg.muon_backend_steps
    opts = dict(square_first=cfg.ns_square_first, transpose_first=transpose_first, cpu_fp32=cfg.ns_cpu_fp32)
    # dynamic=None is torch.compile's default, automatic dynamic: what optimizer.ns_dynamic asks for
    dynamic = None if cfg.ns_dynamic else False
    fn = torch.compile(newton_schulz, fullgraph=True, dynamic=dynamic) if compile_ns else newton_schulz
    if cfg.ns_coeffs == "quintic":
        one = functools.partial(fn, steps=steps, **opts)
    else:
        coeffs = ns_schedule(cfg.ns_coeffs, steps)
        one = functools.partial(fn, steps=len(coeffs), coeffs=coeffs, **opts)
    if cfg.ns_batch:
        return one
    # One matrix at a time, as the per-layer scripts call their NS: compiled, a batched matmul's
    # fused steps round differently from a single matrix's (2.6% of the update of an (11, 512,
    # 1536) stack on CPU), while eagerly the two agree bit for bit.
    return lambda G: torch.stack([one(g) for g in G.unbind(0)]) if G.ndim == 3 else one(G)


def row_normalize(u: Tensor, eps: float = 1e-7) -> Tensor:
    """MuonEq-R: every row (last dim) of every matrix scaled to unit L2 norm. The norms are taken in
    fp32 and divided in u's dtype, as the records do (`g / norms.to(g.dtype)`): for fp32 updates
    (per-layer Muon) that is plain fp32 division; for the bf16 updates of Parallel Muon's banks
    (PR #1775) each row is divided by its norm rounded to bf16, which the fp32 division this used
    before did not reproduce (a quarter of the elements differ in their last bit)."""
    norms = u.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    return u / norms.to(u.dtype)


def muon_update(grads: Tensor, buf: Tensor, momentum: float, cfg: MuonConfig, ns) -> Tensor:
    """Momentum (in place on buf), Nesterov, optional MuonEq-R, then NS: the orthogonalized update."""
    buf.mul_(momentum).add_(grads)
    update = grads.add(buf, alpha=momentum) if cfg.muon_nesterov else buf
    if cfg.row_normalize:
        update = row_normalize(update)
    return ns(update)


class Muon:
    """Muon over a fixed list of 2-D parameters or 3-D banks; `step(lr, momentum)` applies one update."""

    def __init__(self, params: list[nn.Parameter], cfg: MuonConfig, compile_ns: bool):
        self.cfg = cfg
        self.params = params
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # Matrix i is (parameter, slice index or None): 2-D parameters are one matrix, banks many.
        self.matrices: list[tuple[nn.Parameter, int | None]] = []
        for p in params:
            if p.ndim not in (2, 3):
                raise ValueError(f"Muon takes 2-D matrices or 3-D banks of them, got shape {tuple(p.shape)}")
            self.matrices += [(p, None)] if p.ndim == 2 else [(p, j) for j in range(p.size(0))]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (p, _) in enumerate(self.matrices):
            by_shape[tuple(p.shape[-2:])].append(i)
        # Per shape: the indices of the matrices this rank orthogonalizes (matrix i -> rank i % world).
        self.groups = [[i for i in idx if i % self.world == self.rank] for idx in by_shape.values()]
        # Per group: the bank it covers exactly, in slice order, if any (then no stacking is needed).
        self.whole_bank: list[nn.Parameter | None] = []
        for mine in self.groups:
            p0 = self.matrices[mine[0]][0] if mine else None
            whole = (
                p0 is not None
                and p0.ndim == 3
                and [self.matrices[i] for i in mine] == [(p0, j) for j in range(p0.size(0))]
            )
            self.whole_bank.append(p0 if whole else None)
        self.momentum_buffers: dict[int, Tensor] = {}
        self.ns = make_ns(cfg, compile_ns)
        self._flat: Tensor | None = None

    @torch.no_grad()
    def step(self, lr: float, momentum: float, wd: float = 0.0) -> None:
        world = self.world
        matrices = self.matrices
        if world > 1:
            if self._flat is None:
                total = sum(p.numel() for p in self.params)
                self._flat = torch.empty(total, device=self.params[0].device, dtype=torch.bfloat16)
            self._flat.zero_()
            offsets, off = [], 0
            for p, j in matrices:
                offsets.append(off)
                off += p[0].numel() if j is not None else p.numel()
        for gi, mine in enumerate(self.groups):
            if not mine:
                continue
            bank = self.whole_bank[gi]
            if bank is not None:
                grads = bank.grad
            else:
                grads = torch.stack([self._view(p.grad, j) for p, j in (matrices[i] for i in mine)])
            buf = self.momentum_buffers.get(gi)
            if buf is None:
                buf = self.momentum_buffers[gi] = torch.zeros_like(grads)
            update = muon_update(grads, buf, momentum, self.cfg, self.ns)
            rows, cols = grads.shape[-2:]
            update = update * max(1.0, rows / cols) ** 0.5
            if world == 1 and bank is not None:
                if wd > 0:
                    bank.mul_(1.0 - lr * wd)
                bank.add_(update.to(grads.dtype), alpha=-lr)
            elif world == 1:
                targets = [self._view(p, j) for p, j in (matrices[i] for i in mine)]
                if wd > 0:
                    torch._foreach_mul_(targets, 1.0 - lr * wd)
                torch._foreach_add_(targets, list(update.to(grads.dtype).unbind(0)), alpha=-lr)
            else:
                for k, i in enumerate(mine):
                    n = update[k].numel()
                    self._flat[offsets[i] : offsets[i] + n] = update[k].reshape(-1)
        if world > 1:
            dist.all_reduce(self._flat, op=dist.ReduceOp.SUM)
            if wd > 0:
                for p in self.params:
                    p.mul_(1.0 - lr * wd)
            for (p, j), o in zip(matrices, offsets):
                target = self._view(p, j)
                target.add_(self._flat[o : o + target.numel()].view_as(target).to(p.dtype), alpha=-lr)

    @staticmethod
    def _view(t: Tensor, j: int | None) -> Tensor:
        """Matrix j of a bank (a view, so in-place updates reach the bank), or the 2-D tensor itself."""
        return t if j is None else t[j]

    def reset_state(self) -> None:
        self.momentum_buffers.clear()

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's momentum buffers, keyed by shape group (each rank owns different matrices)."""
        return {str(k): v.clone() for k, v in self.momentum_buffers.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        buffers = {}
        for key, value in state.items():
            gi = int(key)
            mine = self.groups[gi] if gi < len(self.groups) else []
            p = self.matrices[mine[0]][0] if mine else None  # group indices count matrices (bank slices)
            expected = (len(mine), *p.shape[-2:]) if p is not None else None
            if expected != tuple(value.shape):
                raise ValueError(
                    f"Muon momentum for shape group {gi} has shape {tuple(value.shape)}, expected {expected}: "
                    "the checkpoint is from another model or world size"
                )
            buffers[gi] = value.to(p.device).clone()
        self.momentum_buffers = buffers


class OptimizerBundle:
    """All optimizers of a run behind one interface: the trainer calls `step(step, elapsed_ms, ...)`.

    Per step: lr/momentum/WD schedules (host-side), optional global grad-norm clipping, AdamW on
    the embed/head/scalar roles, Muon on the matrices, then the EMA/SWA shadow update, and the lr
    scale goes to late QAT (`late_qat`, pgolf.quant.qat, which decides its start; the bundle keeps
    that start in its state dict). `handles_grad_sync` tells the trainer whether gradients arrive already averaged
    (False: the trainer wraps the model in DDP) or the optimizer communicates them itself.
    """

    handles_grad_sync = False

    def __init__(
        self,
        model: nn.Module,
        cfg: MuonConfig,
        device: torch.device,
        compile_ns: bool,
        late_qat: LateQAT | None = None,
    ):
        self.cfg = cfg
        self.model = model
        groups = model.param_groups()
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **fused)
        tied = not groups["head"]
        self.base_lrs: list[tuple[torch.optim.Optimizer, float]] = []
        self.adams: list[torch.optim.Optimizer] = []
        for role, lr, wd in (
            ("embed", cfg.tied_embed_lr if tied else cfg.embed_lr, cfg.embed_wd),
            ("head", cfg.head_lr, cfg.head_wd),
            ("scalar", cfg.scalar_lr, cfg.scalar_wd),
        ):
            params = [p for _, p in groups[role]]
            if params:
                # AdamW with weight_decay 0 is exactly Adam; WD is decoupled and scales with the lr.
                opt = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": wd}], **adam)
                self.adams.append(opt)
                self.base_lrs.append((opt, lr))
        self.muon = self._build_muon([p for _, p in groups["matrix"]], compile_ns)
        # In the model's own order, not by role: the clip's total norm is a reduction over the
        # per-tensor norms in list order, and the records clip `model.parameters()`, so this order
        # gives their clip coefficient bit for bit (by role, it moved an ulp, and bf16
        # Newton-Schulz carried that to ~1.5% of #726's first bank update).
        grouped = {id(p) for ps in groups.values() for _, p in ps}
        self.all_params = [p for p in model.parameters() if id(p) in grouped]
        self.last_lr_scale = 1.0
        self.averager = WeightAverager(model, cfg) if cfg.ema_decay > 0 or cfg.swa_every > 0 else None
        if cfg.late_qat_threshold > 0 and late_qat is None:
            raise ValueError(
                f"optimizer.late_qat_threshold={cfg.late_qat_threshold} needs late_qat="
                "pgolf.quant.qat.LateQAT(model, quant_cfg, threshold), which the trainer builds"
            )
        self.late_qat = late_qat
        self.timer = (
            OptimizerTimer(cfg.timing_steps) if cfg.timing_steps > 0 and device.type == "cuda" else None
        )

    def _build_muon(self, matrices: list[nn.Parameter], compile_ns: bool):
        return Muon(matrices, self.cfg, compile_ns=compile_ns)

    def step(self, step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> None:
        cfg = self.cfg
        scale = lr_scale(cfg, step, elapsed_ms, iterations, cap_ms)
        frac = training_frac(step, elapsed_ms, iterations, cap_ms)
        self.last_lr_scale = scale
        timing = self.timer is not None and self.timer.begin(step)
        if cfg.grad_clip_norm > 0:
            # Over the local gradients: before any communication when the optimizer does it itself
            # (each rank clips its own, as the 2026-03-23 record does), after DDP's average otherwise.
            torch.nn.utils.clip_grad_norm_(self.all_params, cfg.grad_clip_norm)
        lr = cfg.matrix_lr * scale
        self._step_all(scale, lr, muon_momentum(cfg, step), cfg.muon_wd * wd_mult(cfg, frac))
        if timing:
            self.timer.end()
        if self.averager is not None:
            self.averager.update(step, scale)
        if self.late_qat is not None:
            self.late_qat.update(step, scale)

    def _step_all(self, scale: float, lr: float, momentum: float, wd: float) -> None:
        for opt, base in self.base_lrs:
            for g in opt.param_groups:
                g["lr"] = base * scale
            opt.step()
        self.muon.step(lr, momentum, wd)

    def finish(self) -> str | None:
        """End of training: put the averaged weights (EMA or SWA) into the model; a line for the log."""
        return self.averager.apply() if self.averager is not None else None

    def report(self) -> dict:
        """What result.json records about the optimizer run (timing, QAT start, averaging)."""
        out: dict = {"late_qat_step": self.qat_step}
        if self.averager is not None:
            out["averaging"] = self.averager.summary()
        if self.timer is not None:
            out["timing"] = self.timer.summary()
        return out

    def state_dict(self) -> dict:
        """Adam moments and step counts, this rank's Muon momentum, averages: what a resume needs."""
        return {
            "adam": [opt.state_dict() for opt in self.adams],
            "muon": self.muon.state_dict(),
            "last_lr_scale": self.last_lr_scale,
            "averager": self.averager.state_dict() if self.averager is not None else None,
            "qat_step": self.qat_step,
        }

    @property
    def qat_step(self) -> int | None:
        """The first step whose forward ran with fake-quantized weights (None: not yet, or no QAT)."""
        return self.late_qat.step if self.late_qat is not None else None

    def load_state_dict(self, state: dict) -> None:
        if len(state["adam"]) != len(self.adams):
            raise ValueError(
                f"checkpoint has {len(state['adam'])} Adam optimizers, this model has {len(self.adams)}"
            )
        for opt, s in zip(self.adams, state["adam"]):
            opt.load_state_dict(s)
        self.muon.load_state_dict(state["muon"])
        self.last_lr_scale = state["last_lr_scale"]
        if self.averager is not None and state.get("averager") is not None:
            self.averager.load_state_dict(state["averager"])
        if self.late_qat is not None:
            self.late_qat.restore(state.get("qat_step"))

    def reset_state(self) -> None:
        """Back to the freshly built state (empty moments, QAT off, averages restarted from the
        current weights), as after construction: what the trainer calls after compile priming.
        With optimizer.keep_primed_momentum, Muon's momentum is the one thing kept."""
        for opt in self.adams:
            opt.state.clear()
        if not self.cfg.keep_primed_momentum:
            self.muon.reset_state()
        self.last_lr_scale = 1.0
        if self.averager is not None:
            self.averager.reset()
        if self.late_qat is not None:
            self.late_qat.reset()
        if self.timer is not None:
            self.timer.reset()

    def zero_grad(self) -> None:
        for opt in self.adams:
            opt.zero_grad(set_to_none=True)
        for p in self.muon.params:
            p.grad = None


def build(
    cfg: MuonConfig,
    model: nn.Module,
    device: torch.device,
    compile_ns: bool = True,
    late_qat: LateQAT | None = None,
) -> OptimizerBundle:
    return OptimizerBundle(model, cfg, device, compile_ns, late_qat)
