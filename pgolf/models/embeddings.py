"""Embedding add-ons of the record stacks: SmearGate v2/v3, BigramHash, value embeddings.

What each does and where it comes from: docs/techniques.md#smeargate, docs/techniques.md#bigramhash,
docs/techniques.md#value-embeddings.

Each is zero-cost to switch off (the module is simply absent) and, where the records' code makes
it so, the identity at initialization: BigramHash and value embeddings start with zero
projections, SmearGate v3 with a zero lambda. SmearGate v2 starts at a 50/50 mix with the previous
token, as in the records.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.models.layers import CastedLinear

# Multipliers of the bigram hash (PR #162, as the records use it from 2026-03-20 on), in int32 arithmetic.
_HASH_CUR, _HASH_PREV = 36313, 27191


def _not_bos(ids: Tensor, bos_id: int, dtype: torch.dtype) -> Tensor:
    """(B, T, 1) mask that is 0 where the current token is BOS: a packed stream's previous token
    then belongs to another document and must not leak into this one (the SmearGate BOS fix)."""
    return (ids != bos_id).to(dtype).unsqueeze(-1)


class SmearGateV2(nn.Module):
    """x_t <- (1 - s) x_t + s x_{t-1} per channel, s = sigmoid(g), g init 0 (SmearGate v2).

    Applied after the embedding RMSNorm. With the BOS fix the previous-token term is zeroed at BOS
    positions, which makes a document start inside a packed sequence look exactly like one at
    position 0 (where x_{-1} = 0).
    """

    def __init__(self, dim: int, bos_fix: bool, bos_id: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))
        self.bos_fix, self.bos_id = bos_fix, bos_id

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        s = torch.sigmoid(self.gate.to(x.dtype))
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        if self.bos_fix:
            prev = prev * _not_bos(ids, self.bos_id, x.dtype)
        return (1 - s) * x + s * prev


class SmearGateV3(nn.Module):
    """x_t <- x_t + lam * sigmoid(w . x_t[:window]) * x_{t-1} for t >= 1 (v3, modded-nanogpt style).

    Applied to the raw embedding, before the RMSNorm. w (window -> 1) and lam start at zero, so the
    gate is the identity at init.
    """

    def __init__(self, window: int, bos_fix: bool, bos_id: int):
        super().__init__()
        self.window = window
        self.proj = CastedLinear(window, 1, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.proj._zero_init = True
        self.lam = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.bos_fix, self.bos_id = bos_fix, bos_id

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        # .contiguous() on the narrow slice keeps the gate matmul a plain GEMM under compile.
        g = self.lam.to(x.dtype) * torch.sigmoid(self.proj(x[:, 1:, : self.window].contiguous()))
        prev = x[:, :-1]
        if self.bos_fix:
            prev = prev * _not_bos(ids[:, 1:], self.bos_id, x.dtype)
        return torch.cat((x[:, :1], x[:, 1:] + g * prev), dim=1)


def bigram_buckets(ids: Tensor, num_buckets: int) -> Tensor:
    """(36313 t_i XOR 27191 t_{i-1}) mod (n - 1) for i >= 1; position 0 gets the reserved bucket n - 1."""
    t = ids.to(torch.int32)
    mod = num_buckets - 1
    rest = torch.bitwise_xor(_HASH_CUR * t[..., 1:], _HASH_PREV * t[..., :-1]) % mod
    first = torch.full_like(t[..., :1], mod)
    return torch.cat((first, rest), dim=-1).long()


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair embedding, added to the token embedding (PR #162).

    Table n x d_b and projection d_b -> d are zero-initialized, times a learned scalar (init 0.05).
    With OrthoInit the projection is re-initialized orthogonally like every other unflagged matrix
    (the 2026-03-23 record's init loop does the same); the zero table still makes the add-on the
    identity at init.
    """

    def __init__(self, num_buckets: int, bigram_dim: int, model_dim: int, scale_init: float = 0.05):
        super().__init__()
        self.num_buckets = num_buckets
        self.embed = nn.Embedding(num_buckets, bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(bigram_dim, model_dim, bias=False) if bigram_dim != model_dim else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(bigram_buckets(ids, self.num_buckets))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class ValueEmbedding(nn.Module):
    """One shared table V x d_ve (N(0, 0.01^2)) projected to the KV width (zero init), times a global
    scalar (init 0.1); GPT multiplies it by a per-layer scalar and adds it to V in the chosen layers.

    The zero projection makes it the identity at init unless OrthoInit re-initializes the projection
    (as the 2026-03-23 record's init loop does; the table is not zero, so VE then contributes from step 0).
    """

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(ve_dim, kv_dim, bias=False) if ve_dim != kv_dim else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.1, dtype=torch.float32))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)
