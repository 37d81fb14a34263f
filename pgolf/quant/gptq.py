"""Per-row scales and the two ways to pick integer codes: round to nearest, or GPTQ.

docs/techniques.md#full-hessian-gptq, docs/techniques.md#sdclip, docs/techniques.md#gptq-lite-clip-search


GPTQ quantizes a weight W (out, in) one input column at a time and pushes each column's rounding
error onto the columns not yet quantized, weighted by the inverse of the layer-input Hessian
H = sum x x^T, so the layer's *output* error is minimised instead of the weight error. Columns go
in blocks (lazy batch updates); act-order handles the columns with the largest diag(H) first.
"""

from __future__ import annotations

import torch
from torch import Tensor

PERCENTILE_SEARCH = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite candidate clips (2026-03-22/23 records)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def round_codes(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    m = qmax(bits)
    return torch.clamp(torch.round(w / scale[:, None]), -m, m).to(torch.int8)


def _fp16(s: Tensor) -> Tensor:
    # Scales ship as fp16; every candidate is judged with the value that will be stored.
    return s.clamp(6e-8, 65000.0).to(torch.float16).float()


def row_scales(
    w: Tensor,
    bits: int,
    clip: str,
    sigmas: float,
    percentile: float,
    floor: bool = False,
    per_row: bool = True,
) -> Tensor:
    """Per-row step sizes (fp32 holding fp16-representable values) for a 2-D float tensor.

    `floor` applies the pre-SDClip records' minimum step 1/qmax to the percentile and search clips;
    `per_row=False` makes the search pick one candidate for the whole matrix, as the 2026-03-23
    record's code does.
    """
    w = w.float()
    m = qmax(bits)
    lo = 1.0 / m if floor else 0.0

    def step(c: Tensor) -> Tensor:
        return _fp16((c / m).clamp_min(lo))

    if clip == "sdclip":  # SDClip: the step is a fixed number of row standard deviations
        return _fp16(sigmas * w.std(dim=1, unbiased=True).nan_to_num(0.0) / m)
    if clip == "percentile":
        return step(_row_quantile(w.abs(), percentile / 100.0))
    if clip == "rowmax":  # the row's largest magnitude (PR #339 / #399's int6 export)
        return step(w.abs().amax(dim=1))
    if clip == "search":  # GPTQ-lite: the candidate clip with the least squared error
        best_s = best_err = None
        for p in PERCENTILE_SEARCH:
            s = step(_row_quantile(w.abs(), p))
            err = (w - round_codes(w, s, bits).float() * s[:, None]).pow(2).sum(dim=1)
            if not per_row:
                err = err.sum().expand_as(err)
            if best_s is None:
                best_s, best_err = s, err
            else:
                better = err < best_err
                best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
        return best_s
    raise ValueError(f"unknown clip method {clip!r}; choose sdclip, percentile, rowmax or search")


def clip_then_round(w: Tensor, bits: int, percentile: float, floor: bool) -> tuple[Tensor, Tensor]:
    """(codes, fp16 step) the way the 2026-03 records' int8 export rounds (their per-row
    `quantize_float_tensor`): every value is first clamped to the row's percentile clip, the codes
    come from the exact fp32 step, and only the stored step is rounded to fp16. With the 1/qmax
    floor the clamp matters: a row whose clip is below 1 keeps its outliers at the clip instead of
    letting them round past it. `row_scales` + `round_codes` instead use the stored fp16 step and
    clamp only the codes."""
    w = w.float()
    m = qmax(bits)
    clip = _row_quantile(w.abs(), percentile / 100.0)
    step = (clip / m).clamp_min(1.0 / m if floor else 0.0)
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    codes = torch.clamp(torch.round(clipped / step[:, None]), -m, m).to(torch.int8)
    return codes, step.to(torch.float16).float()


def _row_quantile(a: Tensor, q: float) -> Tensor:
    if q >= 1.0:
        return a.amax(dim=1)
    if a.numel() <= 2**24:
        return torch.quantile(a, q, dim=1)
    return torch.stack([torch.quantile(r, q) for r in a])  # torch.quantile's size limit


def gptq_codes(
    w: Tensor,
    H: Tensor,
    scale: Tensor,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> Tensor:
    """int8 codes of W (out, in) under fixed per-row `scale`, chosen by GPTQ with Hessian H (in, in)."""
    W = w.float().clone()
    H = H.float().clone().to(W.device)
    s = scale.float().to(W.device)
    cols = W.shape[1]
    m = qmax(bits)
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)  # upper factor of H^-1
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wb = W[:, i1:i2].clone()
        Ub = U[i1:i2, i1:i2]
        err = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            col = Wb[:, j]
            q = torch.clamp(torch.round(col / s), -m, m)
            Q[:, i1 + j] = q.to(torch.int8)
            e = (col - q * s) / Ub[j, j]
            Wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            err[:, j] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q[:, inv].contiguous()


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):  # a near-singular H gets more damping rather than a crash
        Hd = H.clone()
        Hd.diagonal().add_(damp * (10**attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 1e5x damping")
