"""Parallel Muon over parameter banks (docs/techniques.md#parallel-muon), with no DDP.

One optimizer step, after the local backward:
1. every bank's gradient (bf16, padded on the matrix index to a multiple of the world size) goes
   out in an async reduce-scatter (AVG), largest bank first, so rank r receives the averaged
   gradients of its B/world matrices;
2. while those fly, the replicated parameters' gradients are averaged (all gradients up to
   `pack_max_numel` elements packed into one flat buffer per dtype and one all-reduce, larger ones
   each in their own async all-reduce) and AdamW steps them;
3. per bank: wait for its shard, momentum (bf16 shard buffer) + Nesterov (+ MuonEq-R), batched
   Newton-Schulz on the shard, async all-gather of the orthogonalized shard; the previous bank's
   all-gather is waited on only after this bank's NS is queued, so each all-gather overlaps the next
   bank's NS; then decoupled WD and p <- p - lr * sqrt(max(1, rows/cols)) * update.
On one process the same arithmetic runs without the collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.optim.config import ParallelMuonConfig
from pgolf.optim.muon import OptimizerBundle, make_ns, muon_update

if TYPE_CHECKING:
    from pgolf.quant.qat import LateQAT


@dataclass
class _Bank:
    p: nn.Parameter
    B: int  # matrices in the bank
    shard_B: int  # matrices per rank (the bank padded to a multiple of the world size)
    scale: float
    padded_grad: Tensor | None  # (world * shard_B, m, n) bf16, world > 1 only
    shard: Tensor | None  # (shard_B, m, n) bf16: this rank's averaged gradients
    full_update: Tensor | None  # (world * shard_B, m, n) bf16: the gathered updates
    mom: Tensor  # (shard_B, m, n) bf16 momentum of this rank's matrices


class ParallelMuon:
    """Muon over 3-D banks, sharded by matrix index across ranks (see the module docstring)."""

    def __init__(self, banks: list[nn.Parameter], cfg: ParallelMuonConfig, compile_ns: bool, timer=None):
        for p in banks:
            if p.ndim != 3:
                raise ValueError(
                    f"optimizer=parallel_muon shards 3-D parameter banks, got a matrix of shape {tuple(p.shape)}: "
                    "use model=banked (or optimizer=muon for per-layer models)"
                )
        self.cfg, self.params, self.timer = cfg, banks, timer
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # the banked records' order: a tall bank slice is transposed before its norm is taken
        self.ns = make_ns(cfg, compile_ns, transpose_first=True)
        self.banks: list[_Bank] = []
        for p in sorted(banks, key=lambda t: -t.numel()):  # largest reduce-scatter first
            B, (m, n) = p.size(0), p.shape[-2:]
            shard_B = -(-B // self.world)
            bf16 = dict(device=p.device, dtype=torch.bfloat16)
            multi = self.world > 1
            self.banks.append(
                _Bank(
                    p=p,
                    B=B,
                    shard_B=shard_B,
                    scale=max(1.0, m / n) ** 0.5,
                    # zero padding stays zero: only [:B] is ever written, and NS maps 0 to 0
                    padded_grad=torch.zeros(self.world * shard_B, m, n, **bf16) if multi else None,
                    shard=torch.zeros(shard_B, m, n, **bf16) if multi else None,
                    full_update=torch.zeros(self.world * shard_B, m, n, **bf16) if multi else None,
                    mom=torch.zeros(shard_B, m, n, **bf16),
                )
            )
        self._rs: list = []

    def launch_reduce_scatters(self) -> None:
        """Phase 1, right after backward (and clipping)."""
        if self.world == 1:
            return
        self._rs = []
        for b in self.banks:
            b.padded_grad[: b.B].copy_(b.p.grad)
            self._rs.append(
                dist.reduce_scatter_tensor(b.shard, b.padded_grad, op=dist.ReduceOp.AVG, async_op=True)
            )

    def _wait(self, handle) -> None:
        if self.timer is not None:
            self.timer.wait(handle)
        else:
            handle.wait()

    @torch.no_grad()
    def _apply(self, b: _Bank, update: Tensor, lr: float, wd: float) -> None:
        if wd > 0:
            b.p.mul_(1.0 - lr * wd)
        b.p.add_(update.to(b.p.dtype), alpha=-lr * b.scale)

    @torch.no_grad()
    def step(self, lr: float, momentum: float, wd: float = 0.0) -> None:
        """Phase 3, after the replicated parameters stepped."""
        if self.world == 1:
            for b in self.banks:
                g = b.p.grad.bfloat16()
                self._apply(b, muon_update(g, b.mom, momentum, self.cfg, self.ns), lr, wd)
            return
        prev: tuple[_Bank, object] | None = None
        for b, rs in zip(self.banks, self._rs):
            self._wait(rs)
            update = muon_update(b.shard, b.mom, momentum, self.cfg, self.ns)
            ag = dist.all_gather_into_tensor(b.full_update, update.contiguous(), async_op=True)
            if prev is not None:  # queued after this bank's NS: the gather overlapped it
                self._wait(prev[1])
                self._apply(prev[0], prev[0].full_update[: prev[0].B], lr, wd)
            prev = (b, ag)
        self._wait(prev[1])
        self._apply(prev[0], prev[0].full_update[: prev[0].B], lr, wd)
        self._rs = []

    def reset_state(self) -> None:
        for b in self.banks:
            b.mom.zero_()

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's momentum shards, keyed by the bank's position (largest first)."""
        return {str(i): b.mom.clone() for i, b in enumerate(self.banks)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if sorted(state) != sorted(str(i) for i in range(len(self.banks))):
            raise ValueError(
                f"parallel_muon momentum has keys {sorted(state)}, expected {len(self.banks)} banks"
            )
        for i, b in enumerate(self.banks):
            v = state[str(i)]
            if tuple(v.shape) != tuple(b.mom.shape):
                raise ValueError(
                    f"parallel_muon momentum {i} has shape {tuple(v.shape)}, expected {tuple(b.mom.shape)}: "
                    "the checkpoint is from another model or world size"
                )
            b.mom.copy_(v)


class ParallelMuonBundle(OptimizerBundle):
    """OptimizerBundle whose Muon is Parallel Muon and which averages every gradient itself."""

    handles_grad_sync = True

    def __init__(
        self,
        model: nn.Module,
        cfg: ParallelMuonConfig,
        device: torch.device,
        compile_ns: bool,
        late_qat: LateQAT | None = None,
    ):
        super().__init__(model, cfg, device, compile_ns, late_qat)
        self.muon.timer = self.timer  # built after the Muon part; brackets its collective waits
        banks = {id(p) for p in self.muon.params}
        self.replicated = [p for p in self.all_params if id(p) not in banks]

    def _build_muon(self, matrices: list[nn.Parameter], compile_ns: bool) -> ParallelMuon:
        return ParallelMuon(matrices, self.cfg, compile_ns)

    def _all_reduce_replicated(self) -> None:
        """Average the replicated gradients: one packed all-reduce per dtype for the small ones."""
        grads = [p.grad for p in self.replicated if p.grad is not None]
        small: dict[torch.dtype, list[Tensor]] = {}
        handles = []
        for g in grads:
            if g.numel() <= self.cfg.pack_max_numel:
                small.setdefault(g.dtype, []).append(g)
            else:
                handles.append(dist.all_reduce(g, op=dist.ReduceOp.AVG, async_op=True))
        packed = []
        for gs in small.values():
            flat = torch.cat([g.reshape(-1) for g in gs])
            handles.append(dist.all_reduce(flat, op=dist.ReduceOp.AVG, async_op=True))
            packed.append((gs, flat))
        for h in handles:
            self.muon._wait(h)
        for gs, flat in packed:
            torch._foreach_copy_(gs, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in gs]), gs)])

    def _step_all(self, scale: float, lr: float, momentum: float, wd: float) -> None:
        self.muon.launch_reduce_scatters()
        if self.muon.world > 1:
            self._all_reduce_replicated()
        for opt, base in self.base_lrs:
            for g in opt.param_groups:
                g["lr"] = base * scale
            opt.step()
        self.muon.step(lr, momentum, wd)


def build(
    cfg: ParallelMuonConfig,
    model: nn.Module,
    device: torch.device,
    compile_ns: bool = True,
    late_qat: LateQAT | None = None,
) -> ParallelMuonBundle:
    return ParallelMuonBundle(model, cfg, device, compile_ns, late_qat)
