"""ttt=score_first: legal score-first chunked TTT (docs/techniques.md#score-first-chunked-ttt).

The stream's targets are cut into chunks of `chunk_tokens`. Each sliding window belongs to the chunk
holding its first scored target. For chunk c: (1) score its windows under inference mode with the
current weights; (2) unless c is the last chunk, train on the chunk's targets (cut into sequences
of eval.seq_len, split over ranks) for `epochs` epochs of SGD with momentum, gradients averaged
over ranks and clipped, lr = lr * cos-schedule(c). Training tokens come only from the legality
guard, which refuses anything not yet scored.

With a `deadline` (passed by the trainer under budget.mode=wallclock: the end of budget.eval_seconds),
a chunk is trained on only if that training plus scoring every chunk after it still fits, going by
the measured seconds per chunk (training costed at the slowest chunk trained so far); after that the remaining chunks are scored with the weights as
they are. Every target is scored either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.eval.sliding import ModeResult, WindowScorer, finish, rank_slice
from pgolf.eval.windows import assign_chunks
from pgolf.models.banks import BANKS, bank_slots
from pgolf.ttt.config import ScoreFirstTTTConfig
from pgolf.ttt.guard import ScoredStream

LossFn = Callable[[Tensor, Tensor], Tensor]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cosine_lr(lr: float, chunk: int, n_chunks: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def trainable(
    model: nn.Module, freeze_blocks: int, bank_slices: bool = True
) -> tuple[list[nn.Parameter], dict[nn.Parameter, Tensor]]:
    """Parameters TTT updates, and gradient masks for banks whose leading slices belong to frozen blocks.

    `bank_slices=False` freezes only the parameters named `blocks.{i}.` (the frozen layers' matrices
    inside the banks keep training), which is what PR #726's banked script does.
    """
    frozen = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    params, masks = [], {}
    with_slots = freeze_blocks and bank_slices and hasattr(model, "num_layers")
    slots = bank_slots(model.num_layers) if with_slots else {}
    for name, p in model.named_parameters():
        if frozen and name.startswith(frozen):
            continue
        params.append(p)
        if name in BANKS and name in slots:
            keep = torch.tensor(
                [not s.startswith(frozen) for s in slots[name]], dtype=p.dtype, device=p.device
            )
            masks[p] = keep.view(-1, *([1] * (p.dim() - 1)))
    return params, masks


def sgd_step(
    loss_fn: LossFn,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    masks: dict[nn.Parameter, Tensor],
    x: Tensor,
    y: Tensor,
    device: torch.device,
    amp_dtype: torch.dtype,
    world_size: int,
    clip: float,
) -> None:
    """One step: mean loss, backward, frozen slices masked, gradients averaged over ranks, clip, step.
    A rank with no sequence (x of size 0) still joins the average with zero gradients."""
    opt.zero_grad(set_to_none=False)
    if x.size(0):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = loss_fn(x, y)
        loss.backward()
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p in masks:
            p.grad.mul_(masks[p])
        grads.append(p.grad)
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


class ScoreFirstTTT:
    enabled = True

    def __init__(self, cfg: ScoreFirstTTTConfig):
        self.cfg = cfg
        self.stopped_at: int | None = None  # the chunk whose update the deadline skipped, if any

    def _keep_updating(
        self,
        c: int,
        n_chunks: int,
        score_s: float,
        train_s: float,
        world_size: int,
        device: torch.device,
        deadline: float,
    ) -> bool:
        """Whether training on chunk c still leaves time to score the chunks after it (with 25%
        headroom); decided on every rank together, since the updates all-reduce gradients."""
        late = time.perf_counter() + 1.25 * (train_s + (n_chunks - c - 1) * score_s) > deadline
        if world_size > 1:
            flag = torch.tensor([float(late)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return not late

    # -------------------------------------------------------------------------------- plan
    def plan(self, n_targets: int, seq_len: int, world_size: int) -> tuple[int, list[int]]:
        """(number of chunks, the per-rank training batch sizes that will occur), from lengths only."""
        C, B = self.cfg.chunk_tokens, self.cfg.batch_seqs
        n_chunks = -(-n_targets // C)
        sizes: set[int] = set()
        for c in range(n_chunks - 1):
            seqs = (min((c + 1) * C, n_targets) - c * C) // seq_len
            for r in range(world_size):
                mine = rank_slice(seqs, r, world_size)
                n = mine.stop - mine.start
                sizes.update({min(B, n), n % B} - {0})
        return n_chunks, sorted(sizes)

    # ------------------------------------------------------------------------------ warmup
    def warmup(
        self, model: nn.Module, scorer: WindowScorer, loss_fn: LossFn, vocab: int, world_size: int
    ) -> None:
        """Compile the scoring and training graphs on random tokens, then restore the weights."""
        scorer.warmup()
        _, sizes = self.plan(scorer.n_targets, scorer.seq_len, world_size)
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params, _ = trainable(model, self.cfg.freeze_blocks, self.cfg.freeze_bank_slices)
        opt = torch.optim.SGD(params, lr=0.0, momentum=self.cfg.momentum)
        model.train()
        L = scorer.seq_len
        for bs in sizes:
            # Shaped exactly like run()'s batches (views of one flat token run, row stride L): a
            # (bs, L + 1) tensor sliced per row would have row stride L + 1, fail the compiled
            # step's stride guards and recompile it on the eval clock.
            tok = torch.randint(0, vocab, (bs * L + 1,), device=scorer.device)
            sgd_step(
                loss_fn,
                opt,
                params,
                {},
                tok[:-1].view(-1, L),
                tok[1:].view(-1, L),
                scorer.device,
                scorer.amp_dtype,
                world_size,
                self.cfg.grad_clip,
            )
        with torch.no_grad():
            model.load_state_dict(snapshot, strict=True)
        model.eval()

    # --------------------------------------------------------------------------------- run
    def run(
        self,
        model: nn.Module,
        scorer: WindowScorer,
        loss_fn: LossFn,
        rank: int = 0,
        world_size: int = 1,
        log: Callable[[str], None] = print,
        sync: Callable[[], None] = lambda: None,
        deadline: float | None = None,
    ) -> ModeResult:
        """Score every chunk, then train on it. `deadline` (time.perf_counter()): when scoring must
        be done; updates stop early (`stopped_at`) when training a chunk would make it late."""
        cfg, L = self.cfg, scorer.seq_len
        sync()
        t0 = time.perf_counter()
        guard = ScoredStream(scorer.stream)
        starts = scorer.starts(ttt=True)
        lo, hi = scorer.ranges(starts)
        n_chunks = -(-scorer.n_targets // cfg.chunk_tokens)
        chunk_of = assign_chunks(starts, scorer.n_targets, L, scorer.stride, cfg.chunk_tokens, scorer.rule)
        bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1))  # windows are in chunk order
        params, masks = trainable(model, cfg.freeze_blocks, cfg.freeze_bank_slices)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        sums = torch.zeros(3, dtype=torch.float64, device=scorer.device)
        log(
            f"ttt:score_first chunks:{n_chunks} chunk_tokens:{cfg.chunk_tokens} windows:{starts.size} "
            f"window_rule:{scorer.rule} "
            f"seq_len:{L} stride:{scorer.stride} lr:{cfg.lr} epochs:{cfg.epochs} freeze_blocks:{cfg.freeze_blocks} "
            f"trainable_params:{sum(p.numel() for p in params):,}"
        )
        every = max(n_chunks // 10, 1)
        marked = 0  # targets [0, marked) are marked scored in the guard
        self.stopped_at = None
        score_s, scored, train_s = (
            0.0,
            0,
            0.0,
        )  # seconds scoring so far, chunks scored, slowest update's seconds
        for c in range(n_chunks):
            w0, w1 = int(bounds[c]), int(bounds[c + 1])
            if w0 == w1:
                continue  # no window starts scoring here (chunk shorter than the stride): nothing to do
            # 1. score, weights fixed (inference mode inside the scorer)
            model.eval()
            mine = starts[w0:w1][rank_slice(w1 - w0, rank, world_size)]
            t_score = time.perf_counter()
            scorer.score(mine, sums)
            # the chunk's windows, scored by all ranks; the legacy rule re-scores targets an earlier
            # chunk already marked (its short tail windows), which only the exact rule forbids
            a, b = int(lo[w0]), int(hi[w1 - 1])
            if scorer.rule == "legacy":
                a = min(max(a, marked), b)
            guard.mark_scored(a, b)
            marked = max(marked, b)
            if deadline is not None:
                sync()
                score_s, scored = score_s + time.perf_counter() - t_score, scored + 1
            # 2. train on the chunk, unless it is the last one
            if c == n_chunks - 1 or cfg.epochs == 0 or self.stopped_at is not None:
                continue
            if deadline is not None and not self._keep_updating(
                c, n_chunks, score_s / scored, train_s, world_size, scorer.device, deadline
            ):
                self.stopped_at = c
                log(
                    f"ttt:updates stopped before chunk {c + 1}/{n_chunks}: training it and scoring the rest would "
                    "pass budget.eval_seconds; the remaining chunks are scored with the current weights"
                )
                continue
            t_train = time.perf_counter()
            c0, c1 = c * cfg.chunk_tokens, min((c + 1) * cfg.chunk_tokens, scorer.n_targets)
            seqs = (c1 - c0) // L
            if seqs == 0:
                continue
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, c, n_chunks)
            mine_seqs = rank_slice(seqs, rank, world_size)
            # every rank runs as many steps as the busiest one, so the gradient all-reduces pair up
            n_batches = ceil_div(ceil_div(seqs, world_size), cfg.batch_seqs)
            model.train()
            for _ in range(cfg.epochs):
                for b in range(n_batches):
                    s0 = mine_seqs.start + b * cfg.batch_seqs
                    s1 = min(s0 + cfg.batch_seqs, mine_seqs.stop)
                    if s1 > s0:
                        tok = guard.training_tokens(c0 + s0 * L, c0 + s1 * L)
                        x, y = tok[:-1].view(-1, L), tok[1:].view(-1, L)
                    else:  # this rank has no sequence left: it still joins the gradient average
                        x = y = scorer.stream.new_zeros(0, L)
                    sgd_step(
                        loss_fn,
                        opt,
                        params,
                        masks,
                        x,
                        y,
                        scorer.device,
                        scorer.amp_dtype,
                        world_size,
                        cfg.grad_clip,
                    )
            if deadline is not None:
                sync()
                train_s = max(train_s, time.perf_counter() - t_train)  # the next one may be as slow
            if rank == 0 and (c % every == 0):
                nll, ntok, nbytes = sums.tolist()
                log(
                    f"ttt:chunk {c + 1}/{n_chunks} running_bpb(rank0):{nll / math.log(2) / max(nbytes, 1):.6f} "
                    f"time:{time.perf_counter() - t0:.1f}s"
                )
        model.eval()
        guard.assert_complete()  # every target scored, with or without updates before it
        res = finish(sums, 0.0, world_size)
        seconds = time.perf_counter() - t0
        return ModeResult(
            res.val_loss, res.val_bpb, res.tokens, res.bytes, seconds, res.tokens / max(seconds, 1e-9)
        )


def build(cfg: ScoreFirstTTTConfig, compile: bool = False) -> ScoreFirstTTT:
    # `compile` is the trainer's: its training step is the compiled model the trainer passes to run()
    return ScoreFirstTTT(cfg)
