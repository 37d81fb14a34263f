"""Non-overlapping validation with exact bpb accounting.

docs/techniques.md#non-overlapping-eval, docs/techniques.md#bits-per-byte


The truncated stream is cut into floor((N-1)/L) sequences of length L, split contiguously over
ranks; NLL and byte sums stay on the device in float64 and are read once at the end. With
`packed`, a batch of sequences is one row (documents continue across the sequences inside it) and
each rank scores only whole batches of its share (eval.nonoverlap_packed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.data.bpb import ByteTables
from pgolf.log import Progress


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int


class ByteLUT:
    """The byte tables on the device, for per-token byte counts inside the eval loop."""

    def __init__(self, tables: ByteTables, device: torch.device):
        self.base = torch.as_tensor(tables.base_bytes.astype(np.int64), device=device)
        self.lead = torch.as_tensor(tables.has_leading_space, device=device)
        self.boundary = torch.as_tensor(tables.is_boundary, device=device)

    def count(self, prev: Tensor, target: Tensor) -> Tensor:
        return self.base[target] + (self.lead[target] & ~self.boundary[prev]).long()


@torch.inference_mode()
def evaluate(
    token_nll: Callable[[Tensor, Tensor], Tensor],
    val_tokens: np.ndarray,
    seq_len: int,
    batch_seqs: int,
    lut: ByteLUT,
    device: torch.device,
    amp_dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] | None = None,
    label: str = "val",
    packed: bool = False,
) -> EvalResult:
    """`log` gets `label` progress lines on long passes (pgolf.log.Progress)."""
    total_seqs = (val_tokens.size - 1) // seq_len
    first, last = total_seqs * rank // world_size, total_seqs * (rank + 1) // world_size
    if packed:  # PR #1775's eval_val: a rank's remainder short of a whole batch is never scored
        last = first + (last - first) // batch_seqs * batch_seqs
    progress = Progress(log, label, last - first, "sequences") if log else None
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # nll, tokens, bytes
    stream = torch.from_numpy(val_tokens.astype(np.int64))
    for s in range(first, last, batch_seqs):
        e = min(s + batch_seqs, last)
        chunk = stream[s * seq_len : e * seq_len + 1].to(device, non_blocking=True)
        row = (e - s) * seq_len if packed else seq_len
        x, y = chunk[:-1].view(-1, row), chunk[1:].view(-1, row)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            nll = token_nll(x, y)
        sums[0] += nll.double().sum()
        sums[1] += y.numel()
        sums[2] += lut.count(x, y).sum().double()
        if progress is not None:
            progress.advance(e - s)
    if world_size > 1:
        dist.all_reduce(sums)
    nll_sum, n_tok, n_bytes = sums.tolist()
    if n_tok == 0:  # packed: no rank's share held one whole batch
        raise ValueError(
            f"nonoverlap eval scored nothing: {total_seqs} sequences of {seq_len} leave no rank a whole "
            f"batch of {batch_seqs}; lower train.val_batch_tokens or turn eval.nonoverlap_packed off"
        )
    val_loss = nll_sum / n_tok
    return EvalResult(val_loss, nll_sum / (math.log(2.0) * n_bytes), int(n_tok), int(n_bytes))
