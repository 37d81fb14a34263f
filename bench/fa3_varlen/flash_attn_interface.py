"""The seed benchmarks' FlashAttention-3 stand-in: the bench's SDPA shim plus `flash_attn_varlen_func`.

Machines without FA3 run the record scripts through `.bench/fa3_shim/flash_attn_interface.py`
(`flash_attn_func` on SDPA), which has no varlen entry point. The document-packing records
(#1532's successors, #1775) call `flash_attn_varlen_func` over a flattened batch with `cu_seqlens`;
without it #1775 falls back to a Python loop over segments with a host sync per segment. This
module re-exports the shim's `flash_attn_func` and adds a varlen function with FA3's signature:
flex attention under a block mask built on the device from `cu_seqlens` (no host sync, so it
compiles inside the scripts' and pgolf's fullgraph training graphs). bench/seeds.sh puts this
folder on PYTHONPATH, so both sides of a benchmark run the same kernel
(`hardware.doc_attention=auto` picks varlen wherever `flash_attn_interface` has it).
"""

import importlib.util
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from pgolf.models.docmask import doc_block_mask  # the repository root is on the bench's PYTHONPATH

_SHIM = Path(__file__).resolve().parents[2] / ".bench" / "fa3_shim" / "flash_attn_interface.py"
if not _SHIM.is_file():
    raise ImportError(f"{_SHIM} is missing: copy the bench's FA3 shim there (bench/README.md)")
_spec = importlib.util.spec_from_file_location("_pgolf_bench_fa3_shim", _SHIM)
_shim = importlib.util.module_from_spec(_spec)
# Registered under its name: Dynamo imports the module of every function it traces by that name
# (the first GPU run without this failed in compile with "No module named '_pgolf_bench_fa3_shim'").
sys.modules[_spec.name] = _shim
_spec.loader.exec_module(_shim)
flash_attn_func = _shim.flash_attn_func

# Eager flex_attention materializes the whole score matrix; compiled, it is the fused kernel. Inside
# an already compiled graph this is traced through like any other call.
_flex = torch.compile(flex_attention, dynamic=False)


def segment_of(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """The segment index of each of the n flattened tokens (padding entries of cu_seqlens, which
    repeat the total, add only empty segments)."""
    pos = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, pos, right=True)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, softmax_scale=None, **_
):
    """FA3's varlen call on (total, H, D) tensors with one cu_seqlens for queries and keys (the
    records' self-attention): each token attends within its own segment, causally if asked."""
    if cu_seqlens_q is not cu_seqlens_k and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError("this stand-in serves self-attention: cu_seqlens_q must equal cu_seqlens_k")
    n = q.size(0)
    seg = segment_of(cu_seqlens_q, n)

    def same_segment(b, h, qi, ki):
        same = seg[qi] == seg[ki]
        return same & (qi >= ki) if causal else same

    # Causal (the records' only use): the tile-level build pgolf's own flex path uses, the same
    # BlockMask as create_block_mask without evaluating all n^2 pairs (a 9 ms kernel per call on
    # #1775's rows), so this stand-in, like FA3, spends nothing worth timing on its mask.
    if causal:
        mask = doc_block_mask(seg[None], same_segment)
    else:
        mask = create_block_mask(same_segment, None, None, n, n, device=q.device)
    y = _flex(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=mask,
        scale=softmax_scale,
        enable_gqa=k.size(1) != q.size(1),
    )
    return y[0].transpose(0, 1)
