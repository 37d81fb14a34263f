"""The sliding-window rule: which windows exist and which targets each scores.

docs/techniques.md#sliding-window-eval


Targets are indexed by stream position t = 0 .. n-1 (target t is token t+1, predicted from tokens
0..t). A window starting at `ws` reads inputs [ws, ws+L) and scores targets [lo, hi):
    lo = ws               for ws = 0 (the first window scores everything it sees)
    lo = ws + L - stride  otherwise (every scored target sees >= L - stride tokens of context)
    hi = min(ws + L, n)
A window is kept only when it scores something (lo < hi). Consecutive kept windows then tile
[0, n) exactly: window k (k >= 1) starts scoring where window k-1 stopped, so no target is scored
twice. The records from 2026-03-19 to 2026-03-31 instead kept every short tail window and let each
score its last `stride` targets, which counted ~2k tail targets several times (fixed by the
2026-04-01 record); here the ranges are derived, never stored, so that cannot happen.

`rule="legacy"` reproduces that older rule, for comparing with numbers published under it
(`eval.window_rule=legacy`). A window's length is wlen = min(ws + L, n) - ws, and it scores
[ws, ws + wlen) if ws = 0, else its last min(stride, wlen) targets:
    sliding eval: every ws = 0, stride, 2*stride, ... < n is kept;
    score-first TTT: only ws = 0 and windows with wlen >= stride are kept (its own filter).
Each short window at the tail (ws + L > n) then scores targets the previous windows already
scored, so the last `stride` targets count up to L / stride times.
"""

from __future__ import annotations

import numpy as np


def check_window(seq_len: int, stride: int) -> None:
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(
            f"sliding windows need seq_len >= 1 and 1 <= stride <= seq_len (got {seq_len}, {stride})"
        )


WINDOW_RULES = ("exact", "legacy")


def check_rule(rule: str) -> None:
    if rule not in WINDOW_RULES:
        raise ValueError(f"eval.window_rule={rule!r} must be one of {', '.join(WINDOW_RULES)}")


def window_starts(
    n_targets: int, seq_len: int, stride: int, rule: str = "exact", ttt: bool = False
) -> np.ndarray:
    """Start positions of the kept windows, ascending; `ttt` picks score-first TTT's legacy filter."""
    check_window(seq_len, stride)
    check_rule(rule)
    if n_targets <= 0:
        return np.zeros(0, dtype=np.int64)
    if rule == "legacy":
        starts = np.arange(0, n_targets, stride, dtype=np.int64)
        return starts[(starts == 0) | (n_targets - starts >= stride)] if ttt else starts
    # ws = 0 always; ws = k*stride (k >= 1) while ws + L - stride < n.
    last = (n_targets - 1 - (seq_len - stride)) // stride  # largest k with k*stride + L - stride < n
    return np.arange(0, max(last, 0) + 1, dtype=np.int64) * stride


def scored_ranges(
    starts: np.ndarray, n_targets: int, seq_len: int, stride: int, rule: str = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of the targets each window scores, in stream coordinates."""
    check_rule(rule)
    hi = np.minimum(starts + seq_len, n_targets)
    if rule == "legacy":  # the last min(stride, wlen) targets of a window, whether full or short
        return np.where(starts == 0, 0, np.maximum(hi - stride, starts)), hi
    lo = np.where(starts == 0, 0, starts + seq_len - stride)
    return lo, hi


def assign_chunks(
    starts: np.ndarray, n_targets: int, seq_len: int, stride: int, chunk_tokens: int, rule: str = "exact"
) -> np.ndarray:
    """The chunk of each window (score-first TTT): the one holding its first scored target.

    A window's scored range can straddle a chunk boundary (when stride does not divide the chunk);
    the whole window is then scored with its first target's chunk, before that chunk is trained on,
    so every target is still scored by a model that never saw it.
    """
    n_chunks = -(-n_targets // chunk_tokens)
    lo, _ = scored_ranges(starts, n_targets, seq_len, stride, rule)
    return np.minimum(lo // chunk_tokens, n_chunks - 1)
