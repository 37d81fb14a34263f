"""Document-masked causal attention (`model.doc_mask`): no token attends across a BOS boundary.

Rows are packed from the token stream as they come: a row may start in the middle of a document
and hold several documents, each beginning with BOS. With the mask on, a query sees a key only
when the key is not later and both lie in the same *segment* of the row. A segment starts at
every BOS, at the row start (the partial document a row starts in is its own segment) and, with
`model.doc_max_len = L > 0`, every L tokens from its own start (the records cap a document's
context at the train length this way when a micro-batch is one long row).

The segment ids are computed on the device from the input ids of each forward, with no host
synchronisation, so the model needs nothing beyond `input_ids` and every caller (training, the
nonoverlap and sliding scorers, TTT) gets the same mask. Three kernels apply it, chosen once per
process by `select_doc_backend` and logged by the trainer:

- `varlen`: FlashAttention-3's `flash_attn_varlen_func` over the flattened batch with
  `cu_seqlens` (only where `flash_attn_interface` imports, i.e. on a Hopper GPU);
- `flex`: `torch.nn.attention.flex_attention` with a block mask built from the segment ids
  (CUDA; on CPU torch runs it forward-only, so it serves inference there);
- `dense`: SDPA with an explicit (B, 1, Tq, Tk) boolean mask. Exact on every device, the CPU
  default; O(T^2) memory, so meant for CPU and tests.

All three give the same function; tests compare each with a per-token reference mask.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

# the exact path: SDPA over (B, T, H, D) with an explicit mask (GQA without repeating K/V)
from pgolf.models.attention import _sdpa as masked_attention

if TYPE_CHECKING:  # imported where used: torch < 2.5 has no flex attention
    from torch.nn.attention.flex_attention import BlockMask

DOC_BACKENDS = ("auto", "varlen", "flex", "dense")
_DOC_BACKEND: str | None = None  # set by select_doc_backend; None: flex on CUDA, dense elsewhere
_VARLEN_FN: Callable[..., Tensor] | None = None


def _try_varlen() -> Callable[..., Tensor] | None:
    try:
        return importlib.import_module("flash_attn_interface").flash_attn_varlen_func
    except Exception:  # not installed, or a build that does not match this GPU/torch
        return None


def _flex_available() -> bool:
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except Exception:  # torch < 2.5
        return False
    return True


def select_doc_backend(requested: str = "auto", device_type: str = "cuda") -> str:
    """Pick and remember the document-mask kernel; `auto`: varlen (FA3) if it imports on CUDA, else
    flex on CUDA, else dense. A named backend that cannot run here raises. Returns its name."""
    global _DOC_BACKEND, _VARLEN_FN
    if requested not in DOC_BACKENDS:
        raise ValueError(f"doc-mask attention backend {requested!r}: choose from {DOC_BACKENDS}")
    cuda = device_type == "cuda"
    if requested in ("auto", "varlen") and cuda:
        fn = _try_varlen()
        if fn is not None:
            _DOC_BACKEND, _VARLEN_FN = "varlen", fn
            return _DOC_BACKEND
    if requested == "varlen":
        raise RuntimeError(
            "hardware.doc_attention=varlen needs FlashAttention-3 (`flash_attn_interface`) on a CUDA GPU; "
            "use hardware.doc_attention=auto, flex or dense"
        )
    if requested == "flex" or (requested == "auto" and cuda):
        if not _flex_available():
            raise RuntimeError("flex_attention needs torch >= 2.5; use hardware.doc_attention=dense")
        _DOC_BACKEND = "flex"
        return _DOC_BACKEND
    _DOC_BACKEND = "dense"
    return _DOC_BACKEND


def doc_backend(device_type: str = "cuda") -> str:
    if _DOC_BACKEND is not None:
        return _DOC_BACKEND
    return "flex" if device_type == "cuda" else "dense"


@torch.library.custom_op("pgolf::materialized", mutates_args=())
def materialized(x: Tensor) -> Tensor:
    """A copy of x that Inductor must allocate with a fixed layout (an opaque op's output).

    The flex kernel's mask function reads the segment ids as a captured buffer. Built inside the
    compiled graph, that buffer is an intermediate whose layout Inductor may still change; a
    training graph fixes it (backward keeps it), but the scoring graph, compiled under inference
    mode, failed on an H100 with torch 2.11 in the flex lowering ("convert FlexibleLayout to
    FixedLayout first"). An opaque op's output always has a fixed layout. Costs one copy of the
    (B, T) int32 ids per forward.
    """
    return x.clone()


@materialized.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def segment_ids(ids: Tensor, bos_id: int, max_len: int = 0) -> Tensor:
    """(B, T) int32 segment index of every token, counted from 0 along each row (see the module doc).

    Element-wise ops and scans only (no nonzero, no .item()), so it traces into one graph.
    """
    pos = torch.arange(ids.size(1), device=ids.device)
    start = (ids == bos_id) | (pos == 0)
    if max_len > 0:
        # where each token's BOS-or-row segment began, then a cut every max_len tokens from there
        began = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=-1).values
        start = start | ((pos - began) % max_len == 0)
    return torch.cumsum(start.to(torch.int32), dim=-1, dtype=torch.int32) - 1


def dense_doc_mask(seg: Tensor, q_len: int) -> Tensor:
    """(B, 1, q_len, T) bool, True = attend: causal and same segment, for the last q_len queries."""
    T = seg.size(1)
    q_pos = torch.arange(T - q_len, T, device=seg.device)
    causal = q_pos[:, None] >= torch.arange(T, device=seg.device)[None, :]
    same = seg[:, T - q_len :, None] == seg[:, None, :]
    return (causal[None] & same)[:, None]


def varlen_cu_seqlens(seg: Tensor) -> Tensor:
    """int32 cu_seqlens of the flattened (B*T) batch, with a fixed length B*T + 1.

    The real segment starts come first, in order; the rest is padded with B*T (zero-length
    segments, which varlen kernels skip). The fixed length keeps the shape static under compile
    at the price of empty entries; a host-built, bucketed cu_seqlens
    (pgolf.data.boundaries.document_boundaries) would be shorter.
    """
    B, T = seg.shape
    n = B * T
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]  # every row start is a segment start
    flat = torch.arange(n, device=seg.device, dtype=torch.int32)
    starts = torch.where(start.reshape(-1), flat, torch.full_like(flat, n)).sort().values
    return torch.cat((starts, starts.new_full((1,), n)))


def same_doc_causal(seg: Tensor) -> Callable[..., Tensor]:
    """flex's mask_mod of document-causal attention over (B, T) segment ids: a query sees a key
    when the key is not later and in the same segment."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (q >= k) & (seg[b, q] == seg[b, k])

    return mask_mod


FLEX_BLOCK = 128  # flex_attention's default sparse block (queries and keys)


def block_kinds(seg: Tensor, block: int = FLEX_BLOCK) -> tuple[Tensor, Tensor]:
    """(partial, full) int8 (B, 1, nb, nb) maps of the document-causal mask over block x block tiles
    (query tile i, key tile j; nb = ceil(T / block)): a tile is full when every query in it may see
    every key, partial when some may, and neither when none may.

    `create_block_mask` finds these by evaluating the mask at all T^2 token pairs and summing each
    tile: on #1775's packed 98,304-token rows that is 9.7e9 evaluations, a 9.2 ms kernel per forward
    on an H100 (measured in the bench's FA3 stand-in, which built its mask that way). Segment ids
    never decrease along a row, so a tile's answer follows from the first and last id of its two
    blocks: for j < i every key precedes every query, so seg[key] <= seg[query],
    and a pair can match only where the key block's last id equals the query block's first id
    (partial) and every pair matches when the key block's first id equals the query block's last
    (full). A diagonal tile is always partial (causal); tiles above it are empty. Positions past T
    (a ragged last block) never attend, so a ragged block is never full, as create_block_mask pads.
    """
    T = seg.size(1)
    nb = -(-T // block)
    idx = torch.arange(nb, device=seg.device)
    first = seg[:, idx * block]
    last = seg[:, (idx * block + block - 1).clamp(max=T - 1)]
    below = idx[None, :] < idx[:, None]  # (i, j): key tile j strictly before query tile i
    whole = idx * block + block <= T
    full = below & (first[:, None, :] == last[:, :, None]) & whole[None, :] & whole[:, None]
    some = (idx[None, :] == idx[:, None]) | (below & (last[:, None, :] == first[:, :, None]))
    return (some & ~full).to(torch.int8)[:, None], full.to(torch.int8)[:, None]


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """A (B, H, rows, cols) 0/1 tile map as flex's (count per row, column indices), the listed
    columns first in increasing order: the same stable sort create_block_mask uses, so the kernel
    visits the same tiles in the same order."""
    dense = dense.to(torch.int32)
    count = dense.sum(dim=-1).to(torch.int32)
    cols = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count, cols


def doc_block_mask(seg: Tensor, mask_mod: Callable[..., Tensor], block: int = FLEX_BLOCK) -> BlockMask:
    """The flex BlockMask of the document-causal mask over (B, T) segment ids, from `block_kinds`
    (O((T / block)^2) work) instead of `create_block_mask` (O(T^2)). Equal to
    create_block_mask(mask_mod, B, None, T, T) tensor for tensor (tests/test_docmask.py)."""
    from torch.nn.attention.flex_attention import BlockMask

    T = seg.size(1)
    partial, full = block_kinds(seg, block)
    kv_count, kv_cols = _ordered(partial)
    full_count, full_cols = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_count,
        kv_cols,
        full_kv_num_blocks=full_count,
        full_kv_indices=full_cols,
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod,
        seq_lengths=(T, T),
    )


class DocMask:
    """The document mask of one forward: segment ids plus what the chosen kernel needs, built once
    and shared by every layer."""

    def __init__(self, ids: Tensor, bos_id: int, max_len: int = 0, backend: str | None = None):
        self.seg = segment_ids(ids, bos_id, max_len)
        self.backend = backend or doc_backend(ids.device.type)
        T = ids.size(1)
        self.max_seqlen = min(T, max_len) if max_len > 0 else T
        self.cu_seqlens: Tensor | None = None
        self.block_mask = None
        self.dense: Tensor | None = None
        if self.backend == "varlen":
            self.cu_seqlens = varlen_cu_seqlens(self.seg)
        elif self.backend == "flex":
            self.block_mask = doc_block_mask(self.seg, same_doc_causal(materialized(self.seg)))
        else:
            self.dense = dense_doc_mask(self.seg, T)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Document-masked causal attention over (B, T, H, D) tensors (GQA: fewer K/V heads)."""
        if self.backend == "varlen":
            B, T, H, D = q.shape
            out = _VARLEN_FN(
                q.reshape(B * T, H, D),
                k.reshape(B * T, k.size(2), D),
                v.reshape(B * T, v.size(2), D),
                cu_seqlens_q=self.cu_seqlens,
                cu_seqlens_k=self.cu_seqlens,
                max_seqlen_q=self.max_seqlen,
                max_seqlen_k=self.max_seqlen,
                causal=True,
            )
            out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
            return out.reshape(B, T, H, D)
        if self.backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            y = flex_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                block_mask=self.block_mask,
                enable_gqa=q.size(2) != k.size(2),
            )
            return y.transpose(1, 2)
        return masked_attention(q, k, v, self.dense)

    def attend_last_rows(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The last Tq query rows only (sliding scoring): always SDPA with an explicit mask, as the
        unmasked last-rows path does; few query rows make the kernel choice immaterial."""
        return masked_attention(q, k, v, dense_doc_mask(self.seg, q.size(1)))


__all__ = [
    "DOC_BACKENDS",
    "DocMask",
    "block_kinds",
    "dense_doc_mask",
    "doc_block_mask",
    "doc_backend",
    "same_doc_causal",
    "segment_ids",
    "select_doc_backend",
    "varlen_cu_seqlens",
]
