"""Weight averaging applied to the exported weights: EMA or SWA (docs/techniques.md#ema-and-swa).

EMA keeps an fp32 shadow of every parameter, initialized from the weights training starts from
and updated after every optimizer step as ema <- d * ema + (1 - d) * theta (no bias correction).
SWA sums an fp32 snapshot every `swa_every` steps while the lr scale is below `swa_threshold`
(the 2026-03-23 record: every 50 steps under 0.2) and divides by the count at the end (`swa_accumulate=param`
sums in each parameter's dtype instead, and `swa_min_snapshots` is the fewest it applies). Both update with foreach
kernels on the device, so the step stays free of host syncs; `apply()` writes the average into the
model (cast to each parameter's dtype) before the final validation and the artifact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.optim.config import MuonConfig


class WeightAverager:
    def __init__(self, model: nn.Module, cfg: MuonConfig):
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.decay = cfg.ema_decay
        self.every, self.threshold = cfg.swa_every, cfg.swa_threshold
        self.in_param_dtype = cfg.swa_accumulate == "param"
        self.min_snapshots = cfg.swa_min_snapshots
        self.mode = "ema" if cfg.ema_decay > 0 else "swa"
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Restart from the model's current weights (after compile priming restored the init)."""
        self.shadow: list[Tensor] | None = (
            [p.detach().float().clone() for p in self.params] if self.mode == "ema" else None
        )
        self.sum: list[Tensor] | None = None
        self.count = 0
        self.first_step: int | None = None

    def _fp32(self) -> list[Tensor]:
        return [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int, lr_scale: float) -> None:
        """After optimizer step `step` (0-based) with lr multiplier `lr_scale`."""
        if self.mode == "ema":
            torch._foreach_mul_(self.shadow, self.decay)
            torch._foreach_add_(self.shadow, self._fp32(), alpha=1.0 - self.decay)
            return
        if lr_scale < self.threshold and (step + 1) % self.every == 0:
            snap = [p.detach() for p in self.params] if self.in_param_dtype else self._fp32()
            if self.sum is None:
                self.sum = [t.clone() for t in snap]
                self.first_step = step + 1
            else:
                torch._foreach_add_(self.sum, snap)
            self.count += 1

    @torch.no_grad()
    def averaged(self) -> list[Tensor] | None:
        """The average in fp32, one tensor per parameter; None if SWA never took a snapshot."""
        if self.mode == "ema":
            return self.shadow
        if self.count < self.min_snapshots:
            return None
        return [s / self.count for s in self.sum]

    @torch.no_grad()
    def apply(self) -> str:
        avg = self.averaged()
        if avg is None:
            got = (
                f"only {self.count} snapshot(s), fewer than {self.min_snapshots}"
                if self.count
                else "no snapshot"
            )
            return (
                f"swa: {got} (lr scale below {self.threshold} on a multiple of {self.every} steps); "
                "exporting the live weights"
            )
        for p, a in zip(self.params, avg):
            p.copy_(a.to(p.dtype))
        if self.mode == "ema":
            return f"ema: applied decay {self.decay} to {len(self.params)} parameters"
        return f"swa: applied the mean of {self.count} snapshots (from step {self.first_step}, every {self.every})"

    def summary(self) -> dict:
        if self.mode == "ema":
            return {"mode": "ema", "decay": self.decay}
        return {
            "mode": "swa",
            "every": self.every,
            "count": self.count,
            "first_step": self.first_step,
            "applied": self.count >= self.min_snapshots,
        }

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "sum": self.sum, "count": self.count, "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        dev = self.params[0].device

        def move(ts: list[Tensor] | None) -> list[Tensor] | None:
            return None if ts is None else [t.to(dev) for t in ts]

        self.shadow, self.sum = move(state["shadow"]), move(state["sum"])
        self.count, self.first_step = state["count"], state["first_step"]
