"""ttt=lora and ttt=phased: per-document LoRA TTT, optionally with phased global SGD of the base
model on already-scored documents (docs/techniques.md#per-document-lora-ttt, docs/techniques.md#phased-ttt).

Per batch of documents (the length-sorted queue of pgolf.ttt.docs), every document gets its own
rank-r adapters (`ttt.targets`: q/k/v projections, attention output `o` and MLP output `mlp` of
every block, and the logits), so no information flows between documents. The o and mlp adapters
read the normalized input of their sub-block and add to its output before the branch scale. With
`per_pass` every executed pass of a looped layer has its own adapters (GPT.pass_deltas); without,
a looped layer shares one set. Each document is processed in chunks of `chunk_size` targets: the
chunk's window is up to `context` tokens of the same document ending at the chunk's end; one
forward (base + adapters) scores the chunk's own targets, then, for documents that still have a
later chunk, one AdamW step on the mean loss over the chunk. The update sees only scored targets:
the guard hands out nothing else. AdamW state resets per batch; so do the adapters (B zero, A
drawn afresh), or, with `warm_start_a`, B alone (A keeps what the previous batches trained).

Phased: after the queue has scored prefix_docs*(p+1)//num_phases documents, global SGD (fresh
momentum, `global_epochs` passes per chunk) trains the base weights on exactly those documents,
concatenated; with `global_doc_mask` no token attends across a BOS there (GPT.doc_masked). Then the
queue continues.
Batches go round-robin to ranks; at a pause every rank marks the other ranks' documents scored
(the collective in the SGD step orders it after their scoring).

Compiled (hardware compile on, or `pad=True`): shapes are fixed, so a few graphs serve the pass.
Every batch has `batch_docs` rows (a short batch gets empty rows: nothing scored, nothing trained,
zero adapters) and every chunk's window is right-padded to the smallest of `window_buckets` (the
context, halved while >= chunk_size, at most cfg.window_buckets lengths). Padding only appends positions after a row's window, which
causal attention hides from the scored ones, and masked positions add exact zeros to the sums and
the gradients, so scores do not change. One function per window length (gather, forward, fp32
NLL, masks, byte counts, sums, training loss) is compiled whole; its backward is AOTAutograd's
compiled backward; fused AdamW steps the adapters. Adapters and AdamW state live across batches and
are reset in place, so the graphs' inputs stay the same objects (no re-trace). The chunk table is
uploaded once per batch; nothing in the chunk loop reads the device. `warmup` compiles every graph
on random tokens before the eval clock.

Time rule (`deadline`, set under budget.mode=wallclock): see UpdateClock. Once updating would not
leave time to score the rest, the remaining batches are scored without adapter steps and the
remaining phases skip global SGD; every target is still scored, and `stopped_at` records the first
batch without updates.

Not done here: dynamic batch claiming across ranks (batches go round-robin), more than one
adapter step per chunk (TTT_GRAD_STEPS > 1), and global SGD's lr warm-up.
"""

from __future__ import annotations

import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.contracts import NeverStopsEarly
from pgolf.eval.sliding import ModeResult, WindowScorer, finish
from pgolf.log import Progress
from pgolf.ttt.config import LoRATTTConfig, PhasedTTTConfig
from pgolf.ttt.docs import Doc, doc_queue, find_docs, pause_points, phase_doc_sets
from pgolf.ttt.guard import ScoredStream
from pgolf.ttt.score_first import ceil_div, cosine_lr, sgd_step

LossFn = Callable[[Tensor, Tensor], Tensor]


class BatchedLoRA:
    """One rank-r adapter per batch row: x (B, T, d_in) -> scale * x A^T B^T, A ~ U(+-1/sqrt(d_in)), B = 0."""

    def __init__(self, n: int, d_in: int, d_out: int, rank: int, scale: float, device: torch.device):
        self.bound = 1.0 / math.sqrt(d_in)
        self.a = torch.zeros(n, rank, d_in, device=device, requires_grad=True)
        self.b = torch.zeros(n, d_out, rank, device=device, requires_grad=True)
        self.scale = scale

    @torch.no_grad()
    def reset(self, rows: int, gen: torch.Generator) -> None:
        """Fresh adapters for the first `rows` rows; the rest (padding) are zero and stay zero."""
        self.a[:rows].uniform_(-self.bound, self.bound, generator=gen)
        self.a[rows:].zero_()
        self.b.zero_()

    def __call__(self, x: Tensor) -> Tensor:
        h = torch.bmm(x, self.a.transpose(1, 2).to(x.dtype))
        return torch.bmm(h, self.b.transpose(1, 2).to(x.dtype)) * self.scale


class LayerDelta:
    """One block pass's test-time adapters (`Attention.delta`, or an entry of `GPT.pass_deltas`): the
    adapter output for `kind` (q, k, v, o, mlp), 0 for a q/k/v kind without one; the model adds an
    o/mlp output only where `has` says so. Built once per Adapters, so every batch attaches the same
    object (a compiled graph guards on it)."""

    def __init__(self, layer: dict[str, BatchedLoRA]):
        self.layer = layer

    def has(self, kind: str) -> bool:
        return kind in self.layer

    def __call__(self, kind: str, x: Tensor) -> Tensor | float:
        a = self.layer.get(kind)
        return 0.0 if a is None else a(x)


class Adapters:
    """The adapters of `n` batch rows and the AdamW that trains them, reset in place per batch.

    One set per block (`per_pass` off: a looped layer shares it across its passes) or one per
    executed block pass (`per_pass` on, attached through `GPT.pass_deltas`)."""

    def __init__(self, model: nn.Module, n: int, cfg: LoRATTTConfig, device: torch.device):
        mc = model.cfg
        d = mc.model_dim
        head_dim = d // mc.num_heads
        kv = mc.num_kv_heads * head_dim
        out = {"q": d, "k": kv, "v": kv, "o": d, "mlp": d}  # o and mlp read the normalized input (d)
        scale = cfg.alpha / cfg.rank if cfg.alpha > 0 else 1.0
        self.n, self.device = n, device
        self.per_pass = cfg.per_pass
        self.warm_start_a = cfg.warm_start_a
        self.drawn = False  # A drawn once (warm start keeps it from then on)
        slots = model.block_passes() if cfg.per_pass else list(range(len(model.blocks)))
        self.layers = [
            {
                kind: BatchedLoRA(n, d, out[kind], cfg.rank, scale, device)
                for kind in cfg.targets
                if kind != "head"
            }
            for _ in slots
        ]
        self.deltas = [LayerDelta(layer) for layer in self.layers]
        self.head = (
            BatchedLoRA(n, mc.model_dim, mc.vocab_size, cfg.rank, scale, device)
            if "head" in cfg.targets
            else None
        )
        # fused: one kernel for all adapters, step counts on the device (no host sync per step)
        self.opt = torch.optim.AdamW(
            self.params(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=device.type in ("cuda", "cpu"),
        )

    def loras(self) -> list[BatchedLoRA]:
        return [a for layer in self.layers for a in layer.values()] + (
            [self.head] if self.head is not None else []
        )

    def params(self) -> list[Tensor]:
        return [t for a in self.loras() for t in (a.a, a.b)]

    def reset(self, rows: int, seed: int) -> None:
        """New adapters for `rows` documents and fresh AdamW state (zeroed in place: step 0 again).
        Seeded per batch of documents, so scores do not depend on which rank ran the batch. With
        warm_start_a, A is drawn at the first reset only and then kept as training left it (B is
        zeroed, so a fresh batch still starts from the base model's outputs); the scores then depend
        on which batches this rank ran before."""
        if self.warm_start_a and self.drawn:
            with torch.no_grad():
                for a in self.loras():
                    a.b.zero_()
        else:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            for a in self.loras():
                a.reset(rows, gen)
            self.drawn = True
        for state in self.opt.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    v.zero_()

    def attach(self, model: nn.Module) -> None:
        if self.per_pass:
            model.pass_deltas = self.deltas
        else:
            for block, delta in zip(model.blocks, self.deltas):
                block.attn.delta = delta
        model.head_delta = self.head

    @staticmethod
    def detach(model: nn.Module) -> None:
        for block in model.blocks:
            block.attn.delta = None
        if hasattr(model, "pass_deltas"):
            model.pass_deltas = None
        model.head_delta = None


def check_model(model: nn.Module, cfg: LoRATTTConfig | None = None) -> None:
    if not (hasattr(model, "head_delta") and all(hasattr(b.attn, "delta") for b in model.blocks)):
        raise TypeError(
            "ttt=lora/phased needs a model with test-time adapter hooks: model=banked or model=layered"
        )
    if cfg is None or hasattr(model, "block_passes"):
        return
    extra = [t for t in cfg.targets if t in ("o", "mlp")]
    if extra or cfg.per_pass or getattr(cfg, "global_doc_mask", False):
        raise TypeError(
            f"ttt targets {extra}, ttt.per_pass and ttt.global_doc_mask need the GPT family "
            "(model=banked, layered, sp8192_recur or a PR preset)"
        )


def window_buckets(chunk_size: int, context: int, count: int = 6, rope_train_seq_len: int = 0) -> list[int]:
    """Padded window lengths, ascending: context, ceil(context/2), ... while >= chunk_size (at most
    `count`; the smallest takes every shorter window). An NTK RoPE length inside the range is a
    boundary too: above it the rotary base depends on the window length, so no window may be padded
    across it."""
    out = {context}
    k = 1
    while len(out) < count and ceil_div(context, 2**k) >= chunk_size:
        out.add(ceil_div(context, 2**k))
        k += 1
    if 0 < rope_train_seq_len < context:
        out.add(rope_train_seq_len)
    return sorted(out)


@dataclass
class ChunkTable:
    """One batch's chunks, from document lengths only (host arrays; K chunks, n documents, B rows)."""

    T: list[int]  # window columns per chunk (a bucket length when padded)
    rows: np.ndarray  # (K, B, 3) int64: window's first stream position, scored columns [lo, hi)
    train: np.ndarray  # (K, B) bool: rows that take an AdamW step after chunk k
    active: np.ndarray  # (K, n) bool: documents with a chunk k
    lo: np.ndarray  # (K, n) document-relative targets: chunk [lo, end), window [ws, end)
    end: np.ndarray
    ws: np.ndarray


def chunk_table(
    docs: list[Doc], chunk: int, context: int, rows: int, buckets: list[int] | None
) -> ChunkTable:
    n = len(docs)
    pred = np.array([d.length - 1 for d in docs])
    n_chunks = -(-pred // chunk)
    ci = np.arange(int(n_chunks.max()))[:, None]
    active = ci < n_chunks
    end = np.minimum((ci + 1) * chunk, pred)
    lo = np.minimum(ci * chunk, end)
    ws = np.maximum(end - context, 0)
    T = np.where(active, end - ws, 0).max(1).tolist()
    if buckets is not None:  # every window fits the largest bucket (context)
        T = [buckets[bisect_left(buckets, t)] for t in T]
    table = np.zeros((ci.shape[0], rows, 3), dtype=np.int64)  # inactive and padding rows: [0, 0) scored
    table[:, :n, 0] = np.where(active, np.array([d.start for d in docs]) + ws, 0)
    table[:, :n, 1] = np.where(active, lo - ws, 0)
    table[:, :n, 2] = np.where(active, end - ws, 0)
    train = np.zeros((ci.shape[0], rows), dtype=bool)
    train[:, :n] = active & (ci + 1 < n_chunks)
    return ChunkTable(T, table, train, active, lo, end, ws)


class ChunkStep:
    """One chunk of a batch: gather the windows, base + adapters forward, fp32 NLL, the chunk's masked
    sums (nll, tokens, bytes) and the training loss (over rows, each row's mean NLL on its training
    targets). Its shapes depend only on the row count and T, so compiled it is one graph per T."""

    def __init__(
        self,
        model: nn.Module,
        scorer: WindowScorer,
        compile: bool,
        backend: str = "inductor",
    ):
        self.model, self.scorer = model, scorer
        self.lut, self.device, self.amp_dtype = scorer.lut, scorer.device, scorer.amp_dtype
        self.fn = (
            torch.compile(self._run, dynamic=False, fullgraph=True, backend=backend) if compile else self._run
        )

    def _run(
        self, stream: Tensor, table: Tensor, train: Tensor, T: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = stream.numel() - 1
        cols = torch.arange(T + 1, device=stream.device)
        idx = (table[:, :1] + cols[None, :]).clamp(max=n)  # columns past the stream repeat its last token
        tok = stream[idx]
        x, y = tok[:, :-1], tok[:, 1:]
        c = cols[None, :T]
        mask = (c >= table[:, 1:2]) & (c < table[:, 2:3])
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            nll = self.model.token_nll(x, y).float()
        # score: the chunk's own targets, under the adapters as they were before this chunk
        scored = torch.where(mask, nll.detach(), 0.0)
        sums = torch.stack(
            [
                scored.double().sum(),
                mask.sum().double(),
                torch.where(mask, self.lut.count(x, y), 0).sum().double(),
            ]
        )
        # update: rows with a later chunk, on the chunk's (scored) targets; where, not a product, so a
        # masked position contributes an exact zero gradient whatever its value
        w = mask & train[:, None]
        loss = (torch.where(w, nll, 0.0).sum(1) / w.sum(1).clamp(min=1)).sum()
        return sums, scored, torch.where(mask, idx[:, :-1], n), loss


def _upload(a: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(a)
    if device.type == "cuda":  # pinned + async: the host does not wait for the device queue
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def global_steps(
    n_tokens: int, cfg: PhasedTTTConfig, world_size: int, rank: int
) -> Iterator[tuple[int, int, int, list[tuple[int, int]]]]:
    """Phased global SGD's schedule over `n_tokens` concatenated document tokens: per chunk (index,
    number of chunks, its first token, and per step this rank's sequences [a, e) of the chunk, e == a
    when it has none left). Every rank gets the same number of steps, so the all-reduces pair up."""
    L, C = cfg.global_seq_len, cfg.global_chunk_tokens
    n_chunks = max(ceil_div(n_tokens - 1, C), 1)
    for c in range(n_chunks if n_chunks == 1 else n_chunks - 1):  # the last chunk would get lr 0
        t0 = c * C
        seqs = (min((c + 1) * C, n_tokens - 1) - t0) // L
        if seqs <= 0:
            continue
        s0, s1 = seqs * rank // world_size, seqs * (rank + 1) // world_size
        steps = ceil_div(ceil_div(seqs, world_size), cfg.global_batch_seqs)
        spans = []
        for b in range(steps):
            a = s0 + b * cfg.global_batch_seqs
            spans.append((a, max(min(a + cfg.global_batch_seqs, s1), a)))
        yield c, n_chunks, t0, spans


class LoRATTT(NeverStopsEarly):
    enabled = True

    def __init__(
        self, cfg: LoRATTTConfig, compile: bool = False, pad: bool | None = None, backend: str = "inductor"
    ):
        self.cfg = cfg
        self.compile = compile  # hardware.compile: the per-chunk step compiles with the model
        self.pad = pad  # fixed shapes (batch_docs rows, bucketed windows); None: when compiling
        self.backend = backend
        self._step: ChunkStep | None = None
        self._pool: dict[int, Adapters] = {}
        # time rule (as ttt=score_first): `run(deadline=)`, the clock() by which scoring must be done
        # under budget.mode=wallclock (None: every update runs); `clock` is replaceable for tests
        self.deadline: float | None = None
        self.clock: Callable[[], float] = time.perf_counter
        self.stopped_at: int | None = None  # the first document batch scored without updates, if any

    @property
    def padded(self) -> bool:
        return self.compile if self.pad is None else self.pad

    def buckets(self, model: nn.Module) -> list[int]:
        cfg = self.cfg
        rope = getattr(model.cfg, "rope_train_seq_len", 0)
        return window_buckets(cfg.chunk_size, cfg.context, cfg.window_buckets, rope)

    def _tools(self, model: nn.Module, scorer: WindowScorer, rows: int) -> tuple[ChunkStep, Adapters]:
        """The chunk step and the adapters for `rows` rows, built once per (model, scorer)."""
        if self._step is None or self._step.model is not model or self._step.scorer is not scorer:
            self._step = ChunkStep(model, scorer, self.compile, self.backend)
            self._pool = {}
        if rows not in self._pool:
            self._pool[rows] = Adapters(model, rows, self.cfg, scorer.device)
        return self._step, self._pool[rows]

    # ------------------------------------------------------------------------------ warmup
    def warmup(
        self, model: nn.Module, scorer: WindowScorer, loss_fn: LossFn, vocab: int, world_size: int
    ) -> None:
        """Compile the chunk graph of every window length (forward and backward) and the fused AdamW
        step on random tokens, and phased TTT's global SGD shapes; the validation tokens are never
        read (the global SGD shapes follow from the documents' lengths). Nothing to do eagerly."""
        check_model(model, self.cfg)
        if not self.compile:
            return
        B, dev = self.cfg.batch_docs, scorer.device
        g = torch.Generator().manual_seed(0)
        stream = torch.randint(0, vocab, tuple(scorer.stream.shape), generator=g).to(dev)
        step, adapters = self._tools(model, scorer, B)
        requires = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        adapters.reset(B, seed=0)
        adapters.attach(model)
        try:
            for p in model.parameters():
                p.requires_grad_(False)  # as in run: a graph guards on it
            for T in self.buckets(model):
                table = torch.zeros(B, 3, dtype=torch.int64, device=dev)
                table[:, 2] = T  # every column scored and trained on
                train = torch.ones(B, dtype=torch.bool, device=dev)
                _, _, _, loss = step.fn(stream, table, train, T)
                adapters.opt.zero_grad(set_to_none=True)
                loss.backward()
                adapters.opt.step()
        finally:
            Adapters.detach(model)
            for p, flag in requires.items():
                p.requires_grad_(flag)
        if isinstance(self.cfg, PhasedTTTConfig):
            self._warm_global_sgd(model, scorer, loss_fn, vocab, world_size)

    def _warm_global_sgd(self, model, scorer, loss_fn, vocab, world_size) -> None:
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        docs = find_docs(scorer.stream.cpu().numpy(), cfg.bos_id)
        sets = phase_doc_sets(doc_queue(docs, cfg.batch_docs), cfg.prefix_docs, cfg.num_phases)
        sizes = sorted(
            {
                e - a
                for ds in sets
                for r in range(world_size)
                for *_, spans in global_steps(sum(d.length - 1 for d in ds), cfg, world_size, r)
                for a, e in spans
                if e > a
            }
        )
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.0, momentum=cfg.global_momentum)
        model.train()
        g, L = torch.Generator().manual_seed(1), cfg.global_seq_len
        with self._global_attention(model):
            self._warm_sizes(sizes, g, L, vocab, scorer, loss_fn, opt, params, world_size)
        with torch.no_grad():
            model.load_state_dict(snapshot, strict=True)
        model.eval()

    def _warm_sizes(self, sizes, g, L, vocab, scorer, loss_fn, opt, params, world_size) -> None:
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        for bs in sizes:
            # laid out as _global_sgd's sequences are (views of one run of tokens: stride L), since
            # the compiled model guards on strides
            tok = torch.randint(0, vocab, (bs * L + 1,), generator=g).to(scorer.device)
            sgd_step(
                loss_fn,
                opt,
                params,
                {},
                self._global_rows(tok[:-1], L),
                self._global_rows(tok[1:], L),
                scorer.device,
                scorer.amp_dtype,
                world_size,
                cfg.global_grad_clip,
            )

    def _global_attention(self, model: nn.Module):
        """Document-masked attention for global SGD under ttt.global_doc_mask (a document cut every
        global_seq_len tokens from its BOS, as the records' cu_seqlens cap it), else unchanged."""
        if getattr(self.cfg, "global_doc_mask", False):
            return model.doc_masked(max_len=self.cfg.global_seq_len)
        return contextlib.nullcontext()

    def _global_rows(self, tokens: Tensor, L: int) -> Tensor:
        """One global SGD step's tokens as model rows: rows of L, or under ttt.global_doc_mask one row,
        as the records pack the step into one varlen batch, so a document that crosses a multiple
        of L keeps its context (rows of L would start a new segment there)."""
        return tokens.view(1, -1) if getattr(self.cfg, "global_doc_mask", False) else tokens.view(-1, L)

    # ------------------------------------------------------------------------------ one batch
    def _score_batch(
        self,
        model: nn.Module,
        docs: list[Doc],
        scorer: WindowScorer,
        guard: ScoredStream,
        sums: Tensor,
        batch_index: int = 0,
        update: bool = True,
    ) -> None:
        """Score one batch chunk by chunk; with `update`, an AdamW step on the adapters after each
        chunk that has a later one (without: every chunk under the fresh adapters, i.e. the base model)."""
        cfg, dev = self.cfg, scorer.device
        n = len(docs)
        # warm_start_a: one set of batch_docs rows for every batch (a short batch too), so A carries on
        rows = cfg.batch_docs if self.padded or cfg.warm_start_a else n
        step, adapters = self._tools(model, scorer, rows)
        adapters.reset(n, seed=batch_index)
        tab = chunk_table(
            docs, cfg.chunk_size, cfg.context, rows, self.buckets(model) if self.padded else None
        )
        table_d, train_d = _upload(tab.rows, dev), _upload(tab.train, dev)
        starts = np.array([d.start for d in docs])
        adapters.attach(model)
        try:
            for ci, T in enumerate(tab.T):
                # clones: fresh offset-0 inputs, so a compiled graph never specializes on a view offset
                s, nll, where, loss = step.fn(scorer.stream, table_d[ci].clone(), train_d[ci].clone(), T)
                sums += s
                for j in np.flatnonzero(tab.active[ci]):
                    guard.mark_scored(int(starts[j] + tab.lo[ci, j]), int(starts[j] + tab.end[ci, j]))
                if scorer.record:  # tests: per-target NLL and counts, in stream coordinates
                    flat = where.reshape(-1)
                    scorer.nll.index_put_((flat,), nll.reshape(-1).double())
                    scorer.count.index_add_(0, flat, torch.ones_like(flat))
                # update: documents with a later chunk, on targets the guard confirms were scored
                train = tab.train[ci, :n]
                if not update or not train.any():
                    continue
                for j in np.flatnonzero(train):
                    guard.training_tokens(int(starts[j] + tab.ws[ci, j]), int(starts[j] + tab.end[ci, j]))
                adapters.opt.zero_grad(set_to_none=True)
                loss.backward()
                adapters.opt.step()
        finally:
            Adapters.detach(model)

    # -------------------------------------------------------------------------- global SGD
    def _global_sgd(self, model, docs: list[Doc], scorer, guard, loss_fn, world_size, rank) -> None:
        """Phased TTT's base-model SGD on already-scored documents."""
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        tokens = torch.cat([guard.training_tokens(*d.targets)[:-1] for d in docs])  # each doc from its BOS
        params = [p for p in model.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
        model.train()
        with self._global_attention(model):
            self._global_chunks(model, tokens, opt, params, scorer, loss_fn, world_size, rank)
        model.eval()

    def _global_chunks(self, model, tokens, opt, params, scorer, loss_fn, world_size, rank) -> None:
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        L = cfg.global_seq_len
        for c, n_chunks, t0, spans in global_steps(tokens.numel(), cfg, world_size, rank):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.global_lr, c, n_chunks)
            for a, e in [span for _ in range(cfg.global_epochs) for span in spans]:
                part = tokens[t0 + a * L : t0 + e * L + 1]
                x = self._global_rows(part[:-1], L) if e > a else part.new_zeros(0, L)
                y = self._global_rows(part[1:], L) if e > a else part.new_zeros(0, L)
                sgd_step(
                    loss_fn,
                    opt,
                    params,
                    {},
                    x,
                    y,
                    scorer.device,
                    scorer.amp_dtype,
                    world_size,
                    cfg.global_grad_clip,
                )

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
        # under a deadline, UpdateClock stops updating once a batch's update would make scoring late
        self.deadline = deadline
        cfg = self.cfg
        check_model(model, cfg)
        sync()
        t0 = time.perf_counter()
        guard = ScoredStream(scorer.stream)
        docs = find_docs(scorer.stream.cpu().numpy(), cfg.bos_id)
        queue = doc_queue(docs, cfg.batch_docs)
        phased = isinstance(cfg, PhasedTTTConfig)
        pauses = pause_points(queue, cfg.prefix_docs, cfg.num_phases) if phased else []
        sets = phase_doc_sets(queue, cfg.prefix_docs, cfg.num_phases) if phased else []
        log(
            f"ttt:{cfg.name} docs:{len(docs)} batches:{len(queue)} rank:{cfg.rank} targets:{cfg.targets} "
            f"chunk:{cfg.chunk_size} context:{cfg.context} compile:{self.compile}"
            + (f" padded_windows:{self.buckets(model)} rows:{cfg.batch_docs}" if self.padded else "")
            + (f" pauses_after_batches:{pauses}" if phased else "")
        )
        sums = torch.zeros(3, dtype=torch.float64, device=scorer.device)
        requires = {p: p.requires_grad for p in model.parameters()}
        phase, done_upto = 0, 0  # batches [0, done_upto) are marked on this rank
        clock = UpdateClock(self, queue, rank, world_size, scorer.device, sync)
        self.stopped_at = None
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(False)  # only the adapters learn per document
            progress = Progress(log, f"ttt:{cfg.name}", len(queue), "doc batches")
            for k, batch in enumerate(queue):
                if k % world_size == rank:
                    update = self.stopped_at is None and clock.keep_updating(k)
                    if not update and self.stopped_at is None:
                        self._stop(k, log)
                    with clock.batch(k, update):
                        self._score_batch(model, batch, scorer, guard, sums, batch_index=k, update=update)
                progress.advance()
                while phase < len(pauses) and pauses[phase] == k + 1:
                    for other in range(done_upto, k + 1):  # scored by another rank before this collective
                        if other % world_size != rank:
                            for d in queue[other]:
                                guard.mark_scored(*d.targets)
                    done_upto = k + 1
                    n_tok = sum(d.length - 1 for d in sets[phase])
                    if not clock.keep_global_sgd(k, n_tok, self.stopped_at is not None):
                        if self.stopped_at is None:
                            self._stop(k + 1, log)
                        log(
                            f"ttt:{cfg.name} phase {phase + 1}/{len(pauses)}: global SGD skipped (eval clock)"
                        )
                        phase += 1
                        continue
                    for p, flag in requires.items():
                        p.requires_grad_(flag)
                    with clock.global_sgd(n_tok):
                        self._global_sgd(model, sets[phase], scorer, guard, loss_fn, world_size, rank)
                    for p in model.parameters():
                        p.requires_grad_(False)
                    log(
                        f"ttt:{cfg.name} phase {phase + 1}/{len(pauses)}: global SGD on {len(sets[phase])} scored docs "
                        f"after batch {k + 1}, time:{time.perf_counter() - t0:.1f}s"
                    )
                    phase += 1
        finally:
            for p, flag in requires.items():
                p.requires_grad_(flag)
        if world_size == 1:
            guard.assert_complete()
        res = finish(sums, 0.0, world_size)
        seconds = time.perf_counter() - t0
        return ModeResult(
            res.val_loss, res.val_bpb, res.tokens, res.bytes, seconds, res.tokens / max(seconds, 1e-9)
        )

    def _stop(self, k: int, log: Callable[[str], None]) -> None:
        self.stopped_at = k
        log(
            f"ttt:updates stopped before document batch {k}: updating it and scoring the rest would pass "
            "budget.eval_seconds; the remaining batches are scored without updates"
        )


class UpdateClock:
    """ttt=lora/phased's time rule, like ttt=score_first's: an update (a batch's adapter steps, a
    phase's global SGD) runs only if, at the measured pace, it and the scoring of every batch this
    rank still has fit before the deadline with 25% headroom. Scoring without updates is costed at
    the pace with updates (an upper bound: the measured seconds per target of updated batches), so
    the rule is conservative; the batch about to be updated is costed at the slowest pace measured
    so far, so one slow batch (longer documents cost more per target) cannot carry it past. Batch decisions are per rank (they involve no collective); a phase
    is skipped on every rank when any rank is late, since global SGD all-reduces. No deadline: always."""

    def __init__(self, ttt: LoRATTT, queue: list[list[Doc]], rank: int, world_size: int, device, sync):
        self.ttt, self.rank, self.world_size, self.device, self.sync = ttt, rank, world_size, device, sync
        targets = [sum(d.length - 1 for d in b) for b in queue]
        self.targets = targets
        mine = [t if k % world_size == rank else 0 for k, t in enumerate(targets)]
        self.after = np.cumsum(mine[::-1])[::-1].tolist() + [0]  # this rank's targets in batches >= k
        self.upd_s, self.upd_targets = 0.0, 0  # seconds and targets of updated batches so far
        self.slowest_rate = 0.0  # the most seconds per target of one updated batch
        self.sgd_s, self.sgd_tokens = 0.0, 0

    @property
    def on(self) -> bool:
        return self.ttt.deadline is not None

    def _target_rate(self) -> float:
        return self.upd_s / self.upd_targets if self.upd_targets else 0.0

    def keep_updating(self, k: int) -> bool:
        if not self.on:
            return True
        rate = self._target_rate()
        need = (self.after[k] - self.targets[k]) * rate + self.targets[k] * max(rate, self.slowest_rate)
        return self.ttt.clock() + 1.25 * need <= self.ttt.deadline

    def keep_global_sgd(self, k: int, tokens: int, stopped: bool) -> bool:
        if not self.on:
            return True
        rate = self.sgd_s / self.sgd_tokens if self.sgd_tokens else 0.0
        need = tokens * rate + self.after[k + 1] * self._target_rate()
        late = stopped or self.ttt.clock() + 1.25 * need > self.ttt.deadline
        if self.world_size > 1:
            flag = torch.tensor([float(late)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return not late

    @contextlib.contextmanager
    def batch(self, k: int, update: bool) -> Iterator[None]:
        if not (self.on and update):
            yield
            return
        t = self.ttt.clock()
        yield
        self.sync()
        seconds = self.ttt.clock() - t
        self.upd_s += seconds
        self.upd_targets += self.targets[k]
        self.slowest_rate = max(self.slowest_rate, seconds / max(self.targets[k], 1))

    @contextlib.contextmanager
    def global_sgd(self, tokens: int) -> Iterator[None]:
        if not self.on:
            yield
            return
        t = self.ttt.clock()
        yield
        self.sync()
        self.sgd_s += self.ttt.clock() - t
        self.sgd_tokens += tokens


def build(cfg: LoRATTTConfig, compile: bool = False) -> LoRATTT:
    return LoRATTT(cfg, compile=compile)
