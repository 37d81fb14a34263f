"""Parameter banks <-> canonical per-layer names (docs/techniques.md#parameter-banks).

A banked model stores its 6L block matrices as four 3-D parameters:
  qo_bank (2L, d, d)            [0, L): W_q of layer i, [L, 2L): W_o of layer i
  kv_bank (2L, kv_dim, d)       [0, L): W_k,           [L, 2L): W_v
  mlp_up_bank (L, hidden, d)    W_up of layer i
  mlp_down_bank (L, d, hidden)  W_down of layer i
Quantizers route and scale per row by name, and a 3-D tensor would fall into a per-tensor path,
so exports and checkpoints use the per-layer names `blocks.{i}.attn.c_q.weight`, ... instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")


def bank_slots(num_layers: int) -> dict[str, list[str]]:
    """For each bank, the canonical name of each of its [j] slices, in slice order."""
    layers = range(num_layers)
    return {
        "qo_bank": [f"blocks.{i}.attn.c_q.weight" for i in layers]
        + [f"blocks.{i}.attn.proj.weight" for i in layers],
        "kv_bank": [f"blocks.{i}.attn.c_k.weight" for i in layers]
        + [f"blocks.{i}.attn.c_v.weight" for i in layers],
        "mlp_up_bank": [f"blocks.{i}.mlp.fc.weight" for i in layers],
        "mlp_down_bank": [f"blocks.{i}.mlp.proj.weight" for i in layers],
    }


def unbank(state: dict[str, Tensor], num_layers: int, order: list[str] | None = None) -> dict[str, Tensor]:
    """Split the banks into 2-D per-layer entries (views, no copy); other entries pass through.

    `order` (the per-layer model's key order) makes the result key-for-key identical to the
    per-layer model's state dict, so both layouts serialize to the same bytes.
    """
    out = {k: v for k, v in state.items() if k not in BANKS}
    for bank, names in bank_slots(num_layers).items():
        out.update(zip(names, state[bank].unbind(0)))
    if order is None:
        return out
    if sorted(order) != sorted(out):
        raise KeyError(f"unbank: keys differ from the per-layer order: {sorted(set(order) ^ set(out))[:6]}")
    return {k: out[k] for k in order}


def rebank(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Inverse of `unbank`: stack the per-layer matrices back into the four banks."""
    slots = bank_slots(num_layers)
    sliced = {name for names in slots.values() for name in names}
    missing = sorted(sliced - set(state))
    if missing:
        raise KeyError(f"rebank: missing per-layer matrices, e.g. {missing[:4]}")
    out = {k: v for k, v in state.items() if k not in sliced}
    for bank, names in slots.items():
        out[bank] = torch.stack([state[n] for n in names])
    return out
