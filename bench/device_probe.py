"""What the kernel-level device probes share (bench/ns_forms.py, bench/fp8_gemm.py): an
experiment's Muon matrix shapes, and a CUDA-event timer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch


def muon_matrix_shapes(job) -> Counter:
    """{(rows, cols): how many matrices} of the experiment's Muon parameters, a bank counting once
    per layer slice (the model is built on the meta device: shapes only)."""
    from pgolf.components import MODELS

    with torch.device("meta"):
        model = MODELS.build(job.model)
    shapes: Counter = Counter()
    for _, p in model.param_groups()["matrix"]:
        shapes[tuple(p.shape[-2:])] += p.size(0) if p.ndim == 3 else 1
    return shapes


def cuda_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Mean milliseconds of `fn()` on the current CUDA stream, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
