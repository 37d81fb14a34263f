"""One causal-attention entry point: FA3 -> FA2 -> PyTorch SDPA.

Inputs are (B, T, H, D) like flash-attn; K/V may have fewer heads (GQA) and are never repeated in
memory: FA2/FA3 take GQA natively and SDPA gets `enable_gqa=True`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKEND: str | None = None
_FN: Callable[..., Tensor] | None = None
# SDPA kernels allowed, in priority order, for graphs traced from now on (None: the global
# torch.backends.cuda flags). Applied as an `sdpa_kernel` context around each SDPA call, which
# Dynamo records in the graph: the choice is then part of the compiled graph and of its cache key.
# (The global flags are read at trace time but are not in Inductor's/AOTAutograd's cache keys, so a
# graph cached under one setting would be reused under another.)
_SDPA_BACKENDS: list[SDPBackend] | None = None
SDPA_BACKEND_NAMES = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _try_flash(module: str) -> Callable[..., Tensor] | None:
    try:
        return importlib.import_module(module).flash_attn_func
    except Exception:  # missing package, or a build that does not match this GPU/torch
        return None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal SDPA over (B, T, H, D) tensors; `mask` (True = attend) replaces the causal rule."""
    # SDPA wants (B, H, T, D); transposes are views that inductor folds into the kernel's strides.
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kw = {"attn_mask": mask, "is_causal": mask is None, "enable_gqa": q.size(2) != k.size(2)}
    if _SDPA_BACKENDS is None:
        y = F.scaled_dot_product_attention(*args, **kw)
    else:
        with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
            y = F.scaled_dot_product_attention(*args, **kw)
    return y.transpose(1, 2)


def set_sdpa_backends(names: list[str] | None) -> None:
    """Restrict SDPA to these kernels, first choice first ("cudnn", "flash", "efficient", "math"),
    in every graph traced from now on; None goes back to the global torch.backends.cuda flags."""
    global _SDPA_BACKENDS
    if names is None:
        _SDPA_BACKENDS = None
        return
    unknown = [n for n in names if n not in SDPA_BACKEND_NAMES]
    if unknown or not names:
        raise ValueError(f"SDPA backends {names!r}: choose from {sorted(SDPA_BACKEND_NAMES)}")
    _SDPA_BACKENDS = [SDPA_BACKEND_NAMES[n] for n in names]


def sdpa_backends() -> list[str] | None:
    if _SDPA_BACKENDS is None:
        return None
    name_of = {b: n for n, b in SDPA_BACKEND_NAMES.items()}
    return [name_of[b] for b in _SDPA_BACKENDS]


def select_backend(requested: str = "auto", device_type: str = "cuda") -> str:
    """Pick and remember the backend; `auto` prefers FA3, then FA2, then SDPA. Returns its name."""
    global _BACKEND, _FN
    candidates = {"auto": ["fa3", "fa2", "sdpa"], "fa3": ["fa3"], "fa2": ["fa2"], "sdpa": ["sdpa"]}[requested]
    if device_type != "cuda":
        candidates = ["sdpa"]
    for name in candidates:
        if name == "sdpa":
            _BACKEND, _FN = "sdpa", None
            return _BACKEND
        fn = _try_flash("flash_attn_interface" if name == "fa3" else "flash_attn")
        if fn is not None:
            _BACKEND, _FN = name, fn
            return name
    raise RuntimeError(
        f"hardware.attention={requested!r}: the flash-attn package for it is not importable; install it "
        "(pip install 'pgolf[flash]') or use hardware.attention=auto/sdpa"
    )


def backend() -> str:
    return _BACKEND or "sdpa"


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention over (B, T, H, D) tensors with default softmax scale 1/sqrt(D)."""
    if _FN is None:
        return _sdpa(q, k, v)
    out = _FN(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE


def last_rows_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention for only the last Tq query rows of a Tk-token sequence, (B, T, H, D) tensors.

    Query row i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i (bottom-right
    alignment). Scoring needs the final layer only at the positions that are scored, so the
    sliding scorer runs that layer's queries for the last `stride` rows alone. Always SDPA with an
    explicit mask: the alignment then never depends on which flash build is installed, and with so
    few query rows the kernel choice costs nothing.
    """
    Tq, Tk = q.size(1), k.size(1)
    row_pos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    return _sdpa(q, k, v, torch.arange(Tk, device=q.device)[None, :] <= row_pos)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention (docs/techniques.md#exclusive-self-attention-xsa): remove from each
    head's output its component along the token's own value.

    y: (B, T, H, D) attention output, v: (B, T, H_kv, D) values. GQA-efficient: y is viewed as
    (B, T, H_kv, H/H_kv, D) and the unit value broadcast over each group, so V is never repeated.
    Applied outside the kernel, so it works with every backend.
    """
    B, T, H, D = y.shape
    groups = v.size(2)
    yg = y.reshape(B, T, groups, H // groups, D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, H, D)


def sdpa_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain SDPA with repeated KV in fp32, for parity tests."""
    rep = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    y = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), is_causal=True
    )
    return y.transpose(1, 2).to(q.dtype)


__all__ = [
    "backend",
    "causal_attention",
    "exclusive_self_attention",
    "last_rows_causal_attention",
    "sdpa_backends",
    "sdpa_reference",
    "select_backend",
    "set_sdpa_backends",
]
