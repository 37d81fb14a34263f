"""Resolve the `hardware` config and set up the device, process group and numerics."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgolf.hw.config import AutoHardwareConfig, CpuHardwareConfig, CudaHardwareConfig


def usable_cpus() -> int:
    """The CPUs this process may run on (a taskset, cgroup cpuset or test worker may allow fewer
    than the machine has): more torch threads than that only wait on each other."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def largest_divisor_of_8(n: int) -> int:
    return max(d for d in (1, 2, 4, 8) if d <= max(n, 1))


def resolve_auto(cfg: AutoHardwareConfig) -> CudaHardwareConfig | CpuHardwareConfig:
    """`auto` -> cuda with every visible GPU (largest count dividing 8), else cpu. Done in the parent."""
    if torch.cuda.is_available():
        n = cfg.nproc_per_node or largest_divisor_of_8(torch.cuda.device_count())
        return CudaHardwareConfig(
            nproc_per_node=n,
            compile=cfg.compile,
            train_cudnn_attention=cfg.train_cudnn_attention,
            mix_order_reduction=cfg.mix_order_reduction,
        )
    return CpuHardwareConfig(
        nproc_per_node=cfg.nproc_per_node or 1,
        train_cudnn_attention=cfg.train_cudnn_attention,
        mix_order_reduction=cfg.mix_order_reduction,
    )


def resolve_nproc(cfg: CudaHardwareConfig | CpuHardwareConfig) -> CudaHardwareConfig | CpuHardwareConfig:
    if cfg.nproc_per_node == 0:
        n = largest_divisor_of_8(torch.cuda.device_count()) if isinstance(cfg, CudaHardwareConfig) else 1
        cfg = dataclasses.replace(cfg, nproc_per_node=n)
    if isinstance(cfg, CudaHardwareConfig):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "hardware=cuda (or gpu/h100x8) but no CUDA device is visible; use hardware=cpu or auto"
            )
        if cfg.nproc_per_node > torch.cuda.device_count():
            raise RuntimeError(
                f"hardware.nproc_per_node={cfg.nproc_per_node} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return cfg


def _inductor_triton_config():  # torch._inductor.config.triton (a function: tests stand in for it)
    import torch._inductor.config as inductor

    return inductor.triton


def set_inductor_options(cfg: CudaHardwareConfig) -> None:
    """Set the Inductor options the hardware group names, before anything compiles; "auto" leaves
    Inductor's own value (its default, or the environment variable a bench set)."""
    if cfg.mix_order_reduction == "auto":
        return
    triton_config = _inductor_triton_config()
    if not hasattr(triton_config, "mix_order_reduction"):
        raise RuntimeError(
            f"hardware.mix_order_reduction={cfg.mix_order_reduction} but torch {torch.__version__} has "
            "no Inductor setting triton.mix_order_reduction; use hardware.mix_order_reduction=auto"
        )
    triton_config.mix_order_reduction = cfg.mix_order_reduction


@dataclass
class Runtime:
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    amp_dtype: torch.dtype
    compile: bool
    attention: str  # hardware.attention as configured ("auto" is resolved by models.attention)
    # cuDNN first in the SDPA graphs compiled at eval warm-up (hardware.eval_cudnn_attention; GPU only)
    eval_cudnn_attention: bool = False
    # cuDNN first in the training graphs' SDPA (hardware.train_cudnn_attention; GPU only)
    train_cudnn_attention: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build(cfg: CudaHardwareConfig | CpuHardwareConfig) -> Runtime:
    """Initialize this worker process (called once, under torchrun or in-process)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world:
        raise RuntimeError(f"WORLD_SIZE={world} must divide 8 so grad_accum = 8 // world_size is whole")
    if isinstance(cfg, CudaHardwareConfig):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        # SDPA: prefer the flash kernel (what the reference scripts use); cuDNN attention would be
        # picked first on Hopper otherwise. Efficient/math remain as fallbacks.
        torch.backends.cuda.enable_cudnn_sdp(False)
        set_inductor_options(cfg)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        threads = cfg.threads or max(1, usable_cpus() // max(world, 1))
        torch.set_num_threads(threads)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
    amp = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float32
    cuda = isinstance(cfg, CudaHardwareConfig)
    eval_cudnn, train_cudnn = cuda and cfg.eval_cudnn_attention, cuda and cfg.train_cudnn_attention
    return Runtime(device, rank, local_rank, world, amp, cfg.compile, cfg.attention, eval_cudnn, train_cudnn)
