"""Sliding-window scoring on the device, shared by sliding eval and score-first TTT.

docs/techniques.md#sliding-window-eval


Throughput choices (eval time counts against budget.eval_seconds):
- The whole validation stream lives on the device once; a batch of windows is gathered there from
  its start positions (one index op), never assembled window by window on the host.
- Every batch has exactly `batch_seqs` windows: a ragged last batch is padded with copies of its
  last window, masked out, so one compiled graph (fixed shapes) serves the whole pass.
- The per-batch work (gather, forward, fp32 NLL, masks, byte counts, float64 sums) is one function,
  compiled whole when compile is on; sums stay on the device and are read once at the end.
- Only the scored tail is computed past the point where it can be: every window but the first
  scores its last `stride` targets, so those windows run the final block's queries, attention
  output and MLP, the final norm, the head and the NLL for the last `stride` rows only (keys and
  values still span the window, so the scores are the full forward's). The first window (start 0)
  scores all of its targets and has its own one-window graph.
- No reuse across windows: a target's hidden state depends on where its window starts (attention
  sees a different context), so sharing activations between overlapping windows would not be exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.eval.val import ByteLUT, EvalResult
from pgolf.eval.windows import check_rule, check_window, scored_ranges, window_starts
from pgolf.log import Progress

# nll_fn(x, y, last): per-target NLL of windows x -> y, (B, T); with last > 0 only the last `last`
# columns, (B, last). The models' `token_nll` has this signature.
NllFn = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class ModeResult:
    """One eval mode's score and cost, as written to result.json under metrics.<mode>."""

    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float
    tokens_per_s: float


def finish(sums: Tensor, seconds: float, world_size: int) -> ModeResult:
    """All-reduce the device sums (nll, tokens, bytes) and turn them into a result: one host read."""
    if world_size > 1:
        dist.all_reduce(sums)
    nll, n_tok, n_bytes = sums.tolist()
    loss = nll / n_tok
    return ModeResult(
        loss, nll / (math.log(2.0) * n_bytes), int(n_tok), int(n_bytes), seconds, n_tok / max(seconds, 1e-9)
    )


def from_eval_result(res: EvalResult, seconds: float) -> ModeResult:
    return ModeResult(
        res.val_loss, res.val_bpb, res.tokens, res.bytes, seconds, res.tokens / max(seconds, 1e-9)
    )


class WindowScorer:
    """Scores sets of windows of one stream into device sums; optionally records per-target NLL.

    `record=True` (tests) also keeps each target's NLL and how many times it was scored, so the
    exactly-once rule is checked on what the scorer really did, not only on the range arithmetic.
    """

    def __init__(
        self,
        nll_fn: NllFn,
        stream: np.ndarray,
        seq_len: int,
        stride: int,
        batch_seqs: int,
        lut: ByteLUT,
        device: torch.device,
        amp_dtype: torch.dtype,
        compile: bool = False,
        record: bool = False,
        tail_only: bool = True,
        rule: str = "exact",
    ):
        check_window(seq_len, stride)
        check_rule(rule)
        self.rule = rule  # eval.window_rule: exact, or the pre-fix records' legacy (windows.py)
        self.nll_fn, self.seq_len, self.stride, self.batch_seqs = nll_fn, seq_len, stride, batch_seqs
        self.lut, self.device, self.amp_dtype = lut, device, amp_dtype
        self.n_targets = int(stream.size) - 1
        self.stream = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.offsets = torch.arange(seq_len + 1, device=device)
        self.record = record
        self._warm = False  # warm-up done: score_first's warm-up and the trainer's both ask for it
        self.tail_only = tail_only  # False: every column of every window (benchmarks compare both)
        if record:
            self.nll = torch.full((self.n_targets + 1,), float("nan"), dtype=torch.float64, device=device)
            self.count = torch.zeros(self.n_targets + 1, dtype=torch.int64, device=device)
        self._batch = (
            torch.compile(self._batch_sums, dynamic=False, fullgraph=True) if compile else self._batch_sums
        )

    def starts(self, ttt: bool = False) -> np.ndarray:
        """The kept windows; `ttt` applies score-first TTT's own filter under the legacy rule."""
        return window_starts(self.n_targets, self.seq_len, self.stride, self.rule, ttt)

    def ranges(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scored_ranges(starts, self.n_targets, self.seq_len, self.stride, self.rule)

    @property
    def tail(self) -> int:
        """Columns a window other than the first needs scores for (0: all, when stride = seq_len)."""
        return self.stride if self.tail_only and self.stride < self.seq_len else 0

    def _batch_sums(self, starts: Tensor, valid: Tensor, last: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sums for a batch of windows; `last` > 0 computes scores for the last `last` columns only
        (valid for every window except the one at start 0, whose scored range begins at column 0)."""
        L, n = self.seq_len, self.n_targets
        idx = (starts[:, None] + self.offsets[None, :]).clamp_(
            max=n
        )  # a short tail window repeats its last token
        tok = self.stream[idx]
        x, y = tok[:, :-1], tok[:, 1:]
        first_col = L - last if last else 0
        pos = starts[:, None] + self.offsets[None, first_col:L]  # the target index of each column
        if self.rule == "legacy":  # the last min(stride, wlen) targets, short tail windows too
            lo = torch.maximum((starts + L).clamp(max=n) - self.stride, starts)
            lo = torch.where(starts == 0, starts, lo)
        else:
            lo = torch.where(starts == 0, starts, starts + (L - self.stride))
        mask = (pos >= lo[:, None]) & (pos < n) & valid[:, None]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            nll = self.nll_fn(x, y, last).float()
        nll = torch.where(mask, nll, 0.0)
        bytes_ = self.lut.count(x[:, first_col:], y[:, first_col:])
        sums = torch.stack(
            [
                nll.double().sum(),
                mask.sum().double(),
                torch.where(mask, bytes_, 0).sum().double(),
            ]
        )
        return sums, nll, torch.where(mask, pos, n)

    @torch.inference_mode()
    def score(self, starts: np.ndarray, sums: Tensor, progress: Progress | None = None) -> None:
        """Add the NLL/token/byte sums of `starts` (any subset of the kept windows) to `sums`."""
        first = starts == 0
        if self.tail and first.any():  # the window at 0 scores every column: the one-window graph
            self._run(starts[first], 1, 0, sums, progress)
            starts = starts[~first]
        if self.tail and self.rule == "legacy":
            # a legacy short window (past n - L) scores columns before its last `stride`: full graph
            short = starts + self.seq_len > self.n_targets
            self._run(starts[short], self.batch_seqs, 0, sums, progress)
            starts = starts[~short]
        self._run(starts, self.batch_seqs, self.tail, sums, progress)

    def _run(self, starts: np.ndarray, B: int, last: int, sums: Tensor, progress: Progress | None) -> None:
        if starts.size == 0:
            return
        n_batches = -(-starts.size // B)
        pad = n_batches * B - starts.size
        # One upload per call (a pageable copy per batch would stall the host on the GPU each time).
        padded = np.concatenate([starts, np.full(pad, starts[-1], dtype=np.int64)]).reshape(n_batches, B)
        valid = (np.arange(n_batches * B) < starts.size).reshape(n_batches, B)
        padded_d = torch.from_numpy(padded).to(self.device)
        valid_d = torch.from_numpy(valid).to(self.device)
        for b in range(n_batches):
            # clones: fresh offset-0 inputs, so the compiled graph never specializes on a view offset
            s, nll, where = self._batch(padded_d[b].clone(), valid_d[b].clone(), last)
            sums += s
            if self.record:  # unscored columns land in the spare slot n_targets
                flat = where.reshape(-1)
                self.nll.index_put_((flat,), nll.reshape(-1).double())
                self.count.index_add_(0, flat, torch.ones_like(flat))
            if progress is not None:
                progress.advance(min(B, starts.size - b * B))

    @torch.inference_mode()
    def warmup(self, seed: int = 0) -> None:
        """Compile the batch graphs on random tokens (once): the validation stream is never read here."""
        if self._warm:
            return
        real = self.stream
        g = torch.Generator(device="cpu").manual_seed(seed)
        vocab = int(self.lut.base.numel())
        # Made outside inference mode, like the real stream: an inference tensor carries other
        # dispatch keys, which would fail the graph's guards and recompile on the eval clock.
        with torch.inference_mode(False):
            self.stream = torch.randint(0, vocab, real.shape, generator=g).to(self.device)
        try:  # both graphs: the batch of tails and the one-window graph for the window at 0
            shapes = [(self.batch_seqs, self.tail), (1, 0)] if self.tail else [(self.batch_seqs, 0)]
            if self.tail and self.rule == "legacy":
                shapes.append((self.batch_seqs, 0))  # the legacy short windows' full-column graph
            for B, last in shapes:
                starts = torch.full((B,), self.stride, dtype=torch.int64, device=self.device)
                self._batch(starts, torch.ones(B, dtype=torch.bool, device=self.device), last)
            self._warm = True
        finally:
            self.stream = real


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Contiguous split of n items over ranks (sizes differ by at most one)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def evaluate_sliding(
    scorer: WindowScorer,
    rank: int = 0,
    world_size: int = 1,
    sync: Callable[[], None] = lambda: None,
    log: Callable[[str], None] | None = None,
) -> ModeResult:
    """Every kept window once, split contiguously over ranks; `log` gets progress lines (pgolf.log.Progress)."""
    sync()
    t0 = time.perf_counter()
    starts = scorer.starts()
    sums = torch.zeros(3, dtype=torch.float64, device=scorer.device)
    mine = starts[rank_slice(starts.size, rank, world_size)]
    scorer.score(mine, sums, Progress(log, "eval:sliding", mine.size, "windows") if log else None)
    res = finish(sums, 0.0, world_size)  # the all-reduce + read is the sync point
    seconds = time.perf_counter() - t0
    return ModeResult(
        res.val_loss, res.val_bpb, res.tokens, res.bytes, seconds, res.tokens / max(seconds, 1e-9)
    )
