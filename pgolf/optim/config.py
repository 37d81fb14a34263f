"""Schemas of the `optimizer` group."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.registry import ConfigError, check_range

NS_COEFFS = ("quintic", "polar_express")


@dataclass
class MuonConfig:
    """Muon (Newton-Schulz) for block matrices + AdamW for embeddings and scalars.

    The techniques: docs/techniques.md#optimizer-and-schedule.

    Every variant is a switch; the defaults are the challenge baseline (no weight decay, no
    averaging, no QAT). `conf/optimizer/muon_r0323.yaml` / `muon_r0409.yaml` hold the records.
    """

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
    # Newton-Schulz coefficients: the fixed quintic (3.4445, -4.7750, 2.0315) or the per-iteration
    # Polar Express table (PR #1344; more than 5 steps reuse only the 5 tuples, as the record does).
    ns_coeffs: str = "quintic"
    # How NS rounds b*A + c*A@A in bf16: False computes (c*A) @ A (modded-nanogpt, PR #339), True
    # c * (A @ A) (PRs #399, #726). Same math, different bf16 rounding: about 2% apart per update.
    ns_square_first: bool = False
    # False: NS runs eagerly even when the run compiles (hardware.compile). Compiled, inductor keeps
    # the fused elementwise steps in fp32, so its bf16 result differs from eager NS by about as much
    # as ns_square_first does: PRs #399/#726 run NS eagerly, #339 compiles it. On for speed.
    ns_compile: bool = True
    # False: NS orthogonalizes one matrix at a time, where True stacks same-shape matrices into one
    # batched call. The math is the same, but compiled, the batched form rounds differently from
    # the per-matrix calls of the per-layer record scripts (PR #339); eager NS agrees either way.
    ns_batch: bool = True
    # True: NS is compiled as a bare `@torch.compile` compiles it (automatic dynamic shapes): the
    # first shape gets a static kernel, and a later shape recompiles with its changed dims dynamic.
    # Those kernels round differently from static ones: PR #1775's qo_bank update differs by 2% (CPU)
    # unless pgolf compiles the same kernels in the same order (its banks go largest first, as the
    # script's). False (default): one static compile per shape.
    ns_dynamic: bool = False
    # On a CPU, NS multiplies its bf16 matrices in fp32 and rounds each product to bf16: what a bf16
    # GEMM computes, 20-70x faster on CPUs without bf16 instructions (CI runners, most laptops), but
    # about 1 element in 20,000 rounds the other way. False: ATen's bf16 GEMM, bit for bit as a record
    # script's NS runs on the same CPU (the CPU parity tests). No effect on a GPU.
    ns_cpu_fp32: bool = True
    # Muon's momentum survives the restore after compile priming (everything else is reset): the
    # first real step then starts from the momentum of the priming steps. PR #1775's script does
    # this: its Parallel Muon keeps the momentum in buffers outside the state dict that its warm-up
    # restores. Off, the honest default: training starts from the initial state.
    keep_primed_momentum: bool = False
    # MuonEq-R: unit-L2 rows of the Nesterov update before NS (docs/techniques.md#muoneq-r)
    row_normalize: bool = False
    muon_wd: float = 0.0  # decoupled: p <- p * (1 - lr * wd) before the update
    # WD taper: multiplier 1 until this training fraction, then linear to final_mult at 1
    # (docs/techniques.md#decoupled-weight-decay-and-wd-taper).
    wd_taper_start_frac: float = 1.0
    wd_taper_final_mult: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    embed_wd: float = 0.0  # AdamW decoupled weight decay of the token/bigram/VE tables
    scalar_wd: float = 0.0  # ... of control tensors, gates and small projections
    head_wd: float = 0.0  # ... of an untied lm_head
    grad_clip_norm: float = 0.0
    # Schedule: iteration-count warmdown (baseline; measured in time under a wallclock budget),
    # or, when warmdown_frac > 0, warmdown over the last fraction of the budget with a floor.
    warmdown_iters: int = 1200
    warmdown_frac: float = 0.0
    min_lr: float = 0.0
    # Weight averaging applied to the exported weights, at most one of the two
    # (docs/techniques.md#ema-and-swa).
    ema_decay: float = 0.0  # 0: off; else fp32 shadow, ema <- d*ema + (1-d)*theta after every step
    swa_every: int = 0  # 0: off; else a snapshot every N steps while lr scale < swa_threshold
    swa_threshold: float = 0.2
    # SWA sums: `fp32` (default) or `param`, each parameter's own dtype, so bf16 tables sum and
    # divide in bf16 (PR #339 sums its state dict as stored); SWA is applied only with at least
    # swa_min_snapshots snapshots (PR #339: 2), else the live weights are exported
    swa_accumulate: str = "fp32"
    swa_min_snapshots: int = 1
    # Late QAT (docs/techniques.md#late-qat): STE fake-quant of the block matrices once lr scale < threshold.
    # pgolf.quant.qat owns it: the bits are the quant group's, and it decides the start from this.
    late_qat_threshold: float = 0.0
    # Optimizer timing with CUDA events on this many steps (after 10 settling steps); 0: off, so
    # the step stays free of host syncs. Results land in result.json["optimizer_timing"].
    timing_steps: int = 0

    def validate(self, path: str) -> None:
        for key in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr"):
            check_range(f"{path}.{key}", getattr(self, key), 0, why="a learning rate; 0 freezes the group")
        for key in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"):
            check_range(f"{path}.{key}", getattr(self, key), 0, 1, high_open=True, why="a momentum")
        if not self.adam_eps > 0:
            raise ConfigError(
                f"{path}.adam_eps={self.adam_eps} must be > 0 (it keeps Adam's division finite)"
            )
        check_range(f"{path}.muon_momentum_warmup_steps", self.muon_momentum_warmup_steps, 0)
        check_range(f"{path}.swa_threshold", self.swa_threshold, 0, 1, why="a fraction of the peak lr")
        if self.muon_backend_steps < 1:
            raise ConfigError(f"{path}.muon_backend_steps must be >= 1")
        if self.ns_coeffs not in NS_COEFFS:
            raise ConfigError(f"{path}.ns_coeffs={self.ns_coeffs!r} must be one of {NS_COEFFS}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"{path}.warmdown_frac={self.warmdown_frac} must be in [0, 1]")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ConfigError(f"{path}.min_lr={self.min_lr} must be in [0, 1]")
        if self.warmdown_iters < 0 or self.grad_clip_norm < 0:
            raise ConfigError(f"{path}.warmdown_iters and {path}.grad_clip_norm must be >= 0")
        for key in (
            "muon_wd",
            "embed_wd",
            "scalar_wd",
            "head_wd",
            "late_qat_threshold",
            "wd_taper_final_mult",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{path}.{key}={getattr(self, key)} must be >= 0")
        if not 0.0 <= self.wd_taper_start_frac <= 1.0:
            raise ConfigError(f"{path}.wd_taper_start_frac={self.wd_taper_start_frac} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{path}.ema_decay={self.ema_decay} must be in [0, 1) (0 turns EMA off)")
        if self.swa_accumulate not in ("fp32", "param"):
            raise ConfigError(f"{path}.swa_accumulate={self.swa_accumulate!r} must be fp32 or param")
        if self.swa_min_snapshots < 1:
            raise ConfigError(f"{path}.swa_min_snapshots must be >= 1")
        if self.swa_every < 0 or self.timing_steps < 0:
            raise ConfigError(f"{path}.swa_every and {path}.timing_steps must be >= 0")
        if self.ema_decay > 0 and self.swa_every > 0:
            raise ConfigError(
                f"{path}: ema_decay and swa_every are both on; the exported weights can be one average, "
                "so set one of them to 0 (the 2026-03-23 record exported only the EMA: use ema_decay)"
            )


@dataclass
class ParallelMuonConfig(MuonConfig):
    """Parallel Muon over parameter banks: reduce-scatter -> sharded NS -> all-gather.

    docs/techniques.md#parallel-muon

    The optimizer does all gradient communication itself (no DDP): banks by reduce-scatter,
    replicated parameters by one packed all-reduce of every gradient up to `pack_max_numel`
    elements (larger ones, the token embedding, get their own async all-reduce).
    """

    name: str = "parallel_muon"
    pack_max_numel: int = 32768

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.pack_max_numel < 0:
            raise ConfigError(f"{path}.pack_max_numel must be >= 0")
