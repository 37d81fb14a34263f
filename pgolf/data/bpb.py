"""Exact byte accounting for val_bpb (docs/techniques.md#bits-per-byte).

bytes(y | p) = base_bytes[y] + [has_leading_space[y] and not is_boundary[p]]: the space that a
piece's leading "▁" stands for is charged only when the previous token is not a boundary (BOS...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACE_MARK = "\u2581"  # SentencePiece's meta-space "▁"


@dataclass
class ByteTables:
    base_bytes: np.ndarray  # int16 [table]
    has_leading_space: np.ndarray  # bool [table]
    is_boundary: np.ndarray  # bool [table]

    def token_bytes(self, prev: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Bytes of each target token given its previous token (numpy reference implementation)."""
        lead = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target].astype(np.int64) + lead.astype(np.int64)


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    """Tables over max(tokenizer vocab, model vocab) ids; ids beyond the tokenizer are 0-byte boundaries."""
    n_sp = int(sp.vocab_size())
    size = max(n_sp, vocab_size)
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, lead, boundary)
