"""Learning-rate, momentum and WD schedules, shared by the wallclock and steps budget modes.

Every schedule is a function of the step and the training fraction, never of device state, so
the host computes it without a sync.
"""

from __future__ import annotations

from pgolf.optim.config import MuonConfig


def training_frac(step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> float:
    """Fraction of the budget used before step `step`: time over the cap (wallclock) or steps over iterations.

    cap_ms is already net of the quantization reserve (train_seconds - quant_reserve_seconds).
    """
    return elapsed_ms / cap_ms if cap_ms is not None else step / max(iterations, 1)


def lr_scale(cfg: MuonConfig, step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> float:
    """Multiplier on every group's base lr before optimizer step `step` (0-based).

    cap_ms is the training budget in ms (train_seconds - quant_reserve_seconds) in wallclock mode,
    None in steps mode.
    """
    if cfg.warmdown_frac > 0:
        frac = training_frac(step, elapsed_ms, iterations, cap_ms)
        if frac < 1.0 - cfg.warmdown_frac:
            return 1.0
        return max((1.0 - frac) / cfg.warmdown_frac, cfg.min_lr)
    wd = cfg.warmdown_iters
    if wd <= 0:
        return 1.0
    if cap_ms is None:
        # Linear to 0 over the last `wd` steps (the whole run if shorter).
        start = max(iterations - wd, 0)
        return max((iterations - step) / max(wd, 1), 0.0) if start <= step < iterations else 1.0
    # Iterations measured in time: start decaying once the remaining time is below wd steps at the
    # average step time so far, reaching 0 at the cap.
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = wd * step_ms
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(cfg: MuonConfig, step: int) -> float:
    """Linear warmup from muon_momentum_warmup_start to muon_momentum over the warmup steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    f = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1.0 - f) * cfg.muon_momentum_warmup_start + f * cfg.muon_momentum


def wd_mult(cfg: MuonConfig, frac: float) -> float:
    """Muon WD taper: 1 until wd_taper_start_frac, then linear to wd_taper_final_mult at frac 1.

    docs/techniques.md#decoupled-weight-decay-and-wd-taper
    """
    start = cfg.wd_taper_start_frac
    if frac <= start or start >= 1.0:
        return 1.0
    t = min((frac - start) / (1.0 - start), 1.0)
    return 1.0 + t * (cfg.wd_taper_final_mult - 1.0)
