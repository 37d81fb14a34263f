"""Document boundaries of a batch, for varlen attention that never attends across documents.

Follows the document-packing records (docs/techniques.md#document-boundaries): a segment starts
at every BOS and at every row start (rows are separate sequences), segments longer than
`max_doc_len` are cut, and `cu_seqlens` (segment starts + the total length) is padded with the
total length to a multiple of `bucket`. The padding adds zero-length segments, which varlen
kernels skip, and keeps the number of distinct shapes small so `torch.compile` builds only a few
graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DocBoundaries:
    bos_positions: np.ndarray  # int64 flat positions of BOS in the inputs
    cu_seqlens: np.ndarray  # int32, len % bucket == 0: segment starts, then the total repeated
    num_segments: int  # real (non-padding) segments
    max_seqlen: int  # the longest real segment


def padded_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def document_boundaries(x: np.ndarray, bos_id: int, max_doc_len: int = 0, bucket: int = 64) -> DocBoundaries:
    """Boundaries of the inputs `x`, shaped (rows, T) or flat (a flat x counts as one row)."""
    if bucket < 1:
        raise ValueError(f"bucket={bucket} must be >= 1")
    x = np.asarray(x)
    row_len = x.shape[-1] if x.ndim else 1
    flat = x.reshape(-1)
    total = int(flat.size)
    bos = np.flatnonzero(flat == bos_id).astype(np.int64)
    starts = np.union1d(bos, np.arange(0, total, max(row_len, 1), dtype=np.int64))
    if max_doc_len > 0 and starts.size:
        ends = np.append(starts[1:], total)
        long = np.flatnonzero(ends - starts > max_doc_len)
        if long.size:
            cuts = [np.arange(starts[i], ends[i], max_doc_len, dtype=np.int64) for i in long]
            starts = np.union1d(starts, np.concatenate(cuts))
    lengths = np.diff(np.append(starts, total))
    cu = np.full(padded_length(starts.size + 1, bucket), total, dtype=np.int32)
    cu[: starts.size] = starts
    return DocBoundaries(
        bos_positions=bos,
        cu_seqlens=cu,
        num_segments=int(starts.size),
        max_seqlen=int(lengths.max()) if lengths.size else 0,
    )
