"""Schemas of the `optimizer` group."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.registry import ConfigError


@dataclass
class MuonConfig:
    """Muon (Newton-Schulz) for block matrices + Adam for embeddings and scalars (TECHNIQUES §2.2-2.5)."""

    name: str = "muon"
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied input embedding only
    head_lr: float = 0.008  # untied lm_head only
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_nesterov: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # Schedule: iteration-count warmdown (baseline; measured in time under a wallclock budget),
    # or, when warmdown_frac > 0, warmdown over the last fraction of the budget with a floor.
    warmdown_iters: int = 1200
    warmdown_frac: float = 0.0
    min_lr: float = 0.0

    def validate(self, path: str) -> None:
        if self.muon_backend_steps < 1:
            raise ConfigError(f"{path}.muon_backend_steps must be >= 1")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"{path}.warmdown_frac={self.warmdown_frac} must be in [0, 1]")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ConfigError(f"{path}.min_lr={self.min_lr} must be in [0, 1]")
        if self.warmdown_iters < 0 or self.grad_clip_norm < 0:
            raise ConfigError(f"{path}.warmdown_iters and {path}.grad_clip_norm must be >= 0")
