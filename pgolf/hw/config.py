"""Schemas of the `hardware` group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.registry import ConfigError

AttentionBackend = Literal["auto", "fa3", "fa2", "sdpa"]
# the kernel of model.doc_mask (pgolf.models.docmask): auto = varlen (FA3) if it imports, else flex
# on CUDA, dense SDPA on CPU
DocAttentionBackend = Literal["auto", "varlen", "flex", "dense"]


def _check_nproc(path: str, nproc: int) -> None:
    if nproc < 0 or (nproc > 0 and 8 % nproc):
        raise ConfigError(
            f"{path}.nproc_per_node={nproc} must divide 8 (1, 2, 4 or 8) so every world size sees the "
            "same global batch; 0 means all visible devices"
        )


@dataclass
class CudaHardwareConfig:
    name: str = "cuda"
    nproc_per_node: int = 1  # 0: every visible GPU (the largest count that divides 8)
    compile: bool = True
    amp_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    attention: AttentionBackend = "auto"
    doc_attention: DocAttentionBackend = "auto"
    allow_tf32: bool = True
    # Training keeps SDPA on the flash kernel (what the reference scripts use). True makes cuDNN
    # SDPA's first choice in the graphs compiled at eval warm-up (nonoverlap, sliding windows, TTT):
    # on an H100 it is the faster kernel for the long eval batches (docs/benchmarks.md §7).
    eval_cudnn_attention: bool = True
    # True: cuDNN SDPA first in the training graphs too (flash when cuDNN cannot take the call), the
    # kernel that bench/optim.sh and seeds.sh timed through the FA3 stand-in. Only where attention
    # runs on SDPA (hardware.attention=sdpa, or auto without FA3/FA2). On in the record experiments.
    train_cudnn_attention: bool = False
    # Dense bf16 TFLOP/s of one device, the denominator of the MFU in the log and result.json
    # (0: no MFU). 989.4: NVIDIA's H100 SXM spec (H200: the same); docs/architecture.md#throughput-and-mfu.
    peak_tflops: float = 989.4
    # Inductor's mix-order reductions (torch._inductor.config.triton.mix_order_reduction): one kernel
    # does a row reduction and a column reduction over the same tensors, e.g. an RMSNorm backward
    # with the per-channel gradient sums of the residual mixes. One such kernel took 5.7% of pr726's
    # training step at about a tenth of HBM bandwidth (docs/benchmarks.md §9e). false: separate
    # kernels; auto: Inductor's own setting (on, or TORCHINDUCTOR_MIX_ORDER_REDUCTION).
    mix_order_reduction: bool | Literal["auto"] = "auto"

    def validate(self, path: str) -> None:
        _check_nproc(path, self.nproc_per_node)
        if self.peak_tflops < 0:
            raise ConfigError(f"{path}.peak_tflops={self.peak_tflops} must be >= 0 (0: no MFU)")


@dataclass
class CpuHardwareConfig:
    name: str = "cpu"
    nproc_per_node: int = 1  # >1 runs gloo processes (used by tests of distribution)
    compile: bool = False  # inductor's C++ compile costs more than it saves on short CPU runs
    amp_dtype: Literal["bfloat16", "float32"] = "float32"
    attention: AttentionBackend = "sdpa"
    # flex runs forward-only on CPU (torch has no CPU backward for it): scoring, not training
    doc_attention: DocAttentionBackend = "auto"
    threads: int = 0  # torch intra-op threads per process; 0 = usable cores / nproc
    peak_tflops: float = 0.0  # a CPU's peak for the MFU (0: no MFU in the log)
    # GPU settings, accepted so that a record experiment (which may set them) also runs on CPU: no effect here
    train_cudnn_attention: bool = False
    mix_order_reduction: bool | Literal["auto"] = "auto"

    def validate(self, path: str) -> None:
        _check_nproc(path, self.nproc_per_node)
        if self.peak_tflops < 0:
            raise ConfigError(f"{path}.peak_tflops={self.peak_tflops} must be >= 0 (0: no MFU)")
        if self.attention in ("fa3", "fa2"):
            raise ConfigError(f"{path}.attention={self.attention!r} needs a GPU; use sdpa or auto on CPU")
        if self.doc_attention == "varlen":
            raise ConfigError(
                f"{path}.doc_attention=varlen needs FlashAttention-3 on a GPU; use dense or auto on CPU"
            )


@dataclass
class AutoHardwareConfig:
    """Resolved in the parent: every visible GPU (as `cuda`) if there is one, else `cpu`."""

    name: str = "auto"
    nproc_per_node: int = 0
    compile: bool = True
    train_cudnn_attention: bool = False  # passed on to `cuda` (see CudaHardwareConfig); no effect on CPU
    mix_order_reduction: bool | Literal["auto"] = "auto"  # the same

    def validate(self, path: str) -> None:
        _check_nproc(path, self.nproc_per_node)
