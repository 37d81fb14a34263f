"""Layer-input Hessians H = sum_x x x^T for GPTQ, collected without touching the model code.

pgolf's models apply their matrices functionally (`F.linear(x, w.to(x.dtype))`), banked models
through slices of 3-D banks, so module hooks cannot see them. Instead a TorchFunctionMode watches
every `F.linear` call and recognises its weight by storage address: a per-layer parameter, or a
bank slice (a view whose address is the exported per-layer tensor's), or a `.to(dtype)` copy of
either (tracked as it is made). Looped layers are called several times per forward, and each call
adds to the same H, so Hessians are summed over passes. A tied embedding's H comes from the head's
`F.linear(final_norm(x), tok_emb.weight)`, i.e. through the final norm, for free.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _key(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class HessianCollector(TorchFunctionMode):
    def __init__(self, weights: dict[str, Tensor]):
        super().__init__()
        self.names = {_key(t): n for n, t in weights.items()}
        self.copies: dict[int, tuple[Tensor, str]] = {}  # id -> (copy kept alive, name)
        self.H: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}

    def _name(self, t: Tensor) -> str | None:
        hit = self.copies.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        return self.names.get(_key(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            name = self._name(w)
            if name is not None:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                with torch.autocast(x.device.type, enabled=False):  # accumulate in fp32
                    h = self.H.get(name)
                    if h is None:
                        self.H[name] = x2.T @ x2
                    else:
                        h.addmm_(x2.T, x2)
                self.calls[name] = self.calls.get(name, 0) + 1
        out = func(*args, **kwargs)
        if func is Tensor.to and isinstance(out, Tensor):
            name = self._name(args[0])
            if name is not None and out is not args[0]:
                self.copies[id(out)] = (out, name)
        return out


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module,
    weights: dict[str, Tensor],
    batches: Iterable[Tensor],
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Run `model` over `batches` (token ids (B, T+1) or (x, y) pairs) and return ({name: H}, batches).

    `weights` are the tensors to watch, as the model holds them (the exported per-layer state dict
    of the live model: for banked models its entries are views into the banks).
    """
    was_training = model.training
    model.eval()
    col = HessianCollector(weights)
    n = 0
    try:
        for batch in batches:
            x, y = batch if isinstance(batch, tuple) else (batch[:, :-1], batch[:, 1:])
            device_type = x.device.type
            with (
                col,
                torch.autocast(
                    device_type,
                    dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype not in (None, torch.float32),
                ),
            ):
                model(x, y)
            col.copies.clear()
            n += 1
    finally:
        model.train(was_training)
    return col.H, n
