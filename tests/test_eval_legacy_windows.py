"""eval.window_rule=legacy: the pre-fix records' sliding windows, checked against a plain re-statement
of what their eval loops did (every window start < n, each window scoring its last `stride`
targets; score-first TTT keeping only windows of at least `stride` tokens), computed window by
window with Python loops: the sums, the token and byte counts, and how often each target counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval_sliding import CPU, scorer, stream, tables, tiny_model

from pgolf.eval.sliding import WindowScorer, evaluate_sliding
from pgolf.eval.val import ByteLUT
from pgolf.eval.windows import scored_ranges, window_starts


def legacy_reference(model, toks: np.ndarray, L: int, stride: int, ttt: bool):
    """(nll sum, token count, byte count, per-target count) the old loops would report."""
    n = toks.size - 1
    x_all = torch.from_numpy(toks.astype(np.int64))
    lut = tables()
    nll_sum, tokens, nbytes = 0.0, 0, 0
    counts = np.zeros(n, dtype=np.int64)
    for ws in range(0, n, stride):
        wlen = min(ws + L, n) - ws
        if ttt and not (wlen >= stride or ws == 0):
            continue
        x = torch.zeros(1, L, dtype=torch.int64)  # zero-padded past wlen, as the scripts did
        y = torch.zeros(1, L, dtype=torch.int64)
        x[0, :wlen] = x_all[ws : ws + wlen]
        y[0, :wlen] = x_all[ws + 1 : ws + wlen + 1]
        with torch.no_grad():
            nll = model.token_nll(x, y)[0].double()
        s = 0 if ws == 0 else max(wlen - stride, 0)
        nll_sum += float(nll[s:wlen].sum())
        tokens += wlen - s
        tgt, prev = y[0, s:wlen].numpy(), x[0, s:wlen].numpy()
        nbytes += int(lut.token_bytes(prev, tgt).sum())
        counts[ws + s : ws + wlen] += 1
    return nll_sum, tokens, nbytes, counts


@pytest.mark.parametrize(
    "n_tokens,L,stride", [(100, 16, 5), (65, 16, 4), (64, 16, 16), (40, 8, 3), (9, 16, 5)]
)
@pytest.mark.parametrize("ttt", [False, True])
def test_legacy_scorer_matches_the_old_loops(n_tokens, L, stride, ttt):
    model, toks = tiny_model(), stream(n_tokens)
    ref_sum, ref_tokens, ref_bytes, ref_counts = legacy_reference(model, toks, L, stride, ttt)
    sc = WindowScorer(
        model.token_nll,
        toks,
        L,
        stride,
        3,
        ByteLUT(tables(), CPU),
        CPU,
        torch.float32,
        record=True,
        rule="legacy",
    )
    sums = torch.zeros(3, dtype=torch.float64)
    sc.score(sc.starts(ttt=ttt), sums)
    n = n_tokens - 1
    assert sc.count[:n].tolist() == ref_counts.tolist()
    assert sums[1].item() == ref_tokens
    assert sums[2].item() == ref_bytes
    assert sums[0].item() == pytest.approx(ref_sum, rel=1e-6)


def test_legacy_counts_the_tail_several_times_and_exact_does_not():
    n, L, stride = 1000, 64, 16
    for ttt, extra_windows in ((False, 3), (True, 2)):  # starts 944..992 vs ..944; TTT stops at 976
        starts = window_starts(n, L, stride, "legacy", ttt)
        lo, hi = scored_ranges(starts, n, L, stride, "legacy")
        counts = np.zeros(n, dtype=int)
        for a, b in zip(lo, hi):
            counts[a:b] += 1
        exact = window_starts(n, L, stride)
        assert starts.size == exact.size + extra_windows
        assert (counts[: n - stride] == 1).all()
        assert counts[n - stride :].max() > 1  # the duplicate-scoring of the tail
        assert (lo[1:] >= lo[:-1]).all()  # chunk order for TTT stays ascending


def test_legacy_equals_exact_when_no_window_is_short():
    # n - 1 = k * stride + (L - stride): the last full window ends exactly at n, no short windows
    model, L, stride = tiny_model(), 16, 4
    toks = stream(L + 5 * stride + 1)
    exact = evaluate_sliding(scorer(model, toks, L, stride, B=3, record=False))
    legacy_sc = WindowScorer(
        model.token_nll, toks, L, stride, 3, ByteLUT(tables(), CPU), CPU, torch.float32, rule="legacy"
    )
    n = toks.size - 1
    # legacy still keeps windows past n - L (they score [n - stride, n) again) unless none start there
    starts = legacy_sc.starts()
    if (starts + L > n).any():
        assert evaluate_sliding(legacy_sc).tokens > exact.tokens
    else:
        assert evaluate_sliding(legacy_sc).val_loss == pytest.approx(exact.val_loss, rel=1e-9)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="window_rule"):
        window_starts(10, 4, 2, "sloppy")


def test_legacy_window_count_on_the_sp1024_val_stream_matches_pr726s_log():
    """PR #726's log: `ttt_sliding:start chunks=1893 ... total_windows=969088 stride=64` on the
    62,021,632 targets of the sp1024 validation split (seq 2048)."""
    n = 62_021_632
    assert window_starts(n, 2048, 64, "legacy", ttt=True).size == 969_088
    assert window_starts(n, 2048, 64, "legacy").size == 969_088
    assert window_starts(n, 2048, 64).size == 969_057
