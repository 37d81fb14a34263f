"""ttt=lora and ttt=phased: per-document LoRA TTT (TECHNIQUES §2.12), optionally with phased global
SGD of the base model on already-scored documents (§2.13).

Per batch of documents (the length-sorted queue of pgolf.ttt.docs), every document gets its own
rank-r adapters (q/k/v projections of every layer, and the logits), so no information flows
between documents. Each document is processed in chunks of `chunk_size` targets: the chunk's
window is up to `context` tokens of the same document ending at the chunk's end; one forward
(base + adapters) scores the chunk's own targets, then, for documents that still have a later
chunk, one AdamW step on the mean loss over the chunk. The update sees only scored targets: the
guard hands out nothing else. Adapters and optimizer state reset per batch.

Phased: after the queue has scored prefix_docs*(p+1)//num_phases documents, global SGD (fresh
momentum) trains the base weights on exactly those documents, then the queue continues.
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

Not done here: separate adapters per pass of looped layers (a looped layer shares one adapter
across its passes), O/MLP adapters, document-respecting attention inside global SGD, and dynamic
batch claiming across ranks.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
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
    """One layer's `Attention.delta`: the q/k/v adapter output for `kind`, 0 for a kind without one.
    Built once per Adapters, so every batch attaches the same object (a compiled graph guards on it)."""

    def __init__(self, layer: dict[str, BatchedLoRA]):
        self.layer = layer

    def __call__(self, kind: str, x: Tensor) -> Tensor | float:
        a = self.layer.get(kind)
        return 0.0 if a is None else a(x)


class Adapters:
    """The adapters of `n` batch rows and the AdamW that trains them, reset in place per batch."""

    def __init__(self, model: nn.Module, n: int, cfg: LoRATTTConfig, device: torch.device):
        mc = model.cfg
        head_dim = mc.model_dim // mc.num_heads
        out = {"q": mc.model_dim, "k": mc.num_kv_heads * head_dim, "v": mc.num_kv_heads * head_dim}
        scale = cfg.alpha / cfg.rank if cfg.alpha > 0 else 1.0
        self.n, self.device = n, device
        self.layers = [
            {
                kind: BatchedLoRA(n, mc.model_dim, out[kind], cfg.rank, scale, device)
                for kind in cfg.targets
                if kind != "head"
            }
            for _ in model.blocks
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
        Seeded per batch of documents, so scores do not depend on which rank ran the batch."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for a in self.loras():
            a.reset(rows, gen)
        for state in self.opt.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    v.zero_()

    def attach(self, model: nn.Module) -> None:
        for block, delta in zip(model.blocks, self.deltas):
            block.attn.delta = delta
        model.head_delta = self.head

    @staticmethod
    def detach(model: nn.Module) -> None:
        for block in model.blocks:
            block.attn.delta = None
        model.head_delta = None


def check_model(model: nn.Module) -> None:
    if not (hasattr(model, "head_delta") and all(hasattr(b.attn, "delta") for b in model.blocks)):
        raise TypeError(
            "ttt=lora/phased needs a model with test-time adapter hooks: model=banked or model=layered"
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
        check_model(model)
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
        for bs in sizes:
            # laid out as _global_sgd's sequences are (views of one run of tokens: stride L), since
            # the compiled model guards on strides
            tok = torch.randint(0, vocab, (bs * L + 1,), generator=g).to(scorer.device)
            sgd_step(
                loss_fn,
                opt,
                params,
                {},
                tok[:-1].view(bs, L),
                tok[1:].view(bs, L),
                scorer.device,
                scorer.amp_dtype,
                world_size,
                cfg.global_grad_clip,
            )
        with torch.no_grad():
            model.load_state_dict(snapshot, strict=True)
        model.eval()

    # ------------------------------------------------------------------------------ one batch
    def _score_batch(
        self,
        model: nn.Module,
        docs: list[Doc],
        scorer: WindowScorer,
        guard: ScoredStream,
        sums: Tensor,
        batch_index: int = 0,
    ) -> None:
        cfg, dev = self.cfg, scorer.device
        n = len(docs)
        rows = cfg.batch_docs if self.padded else n
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
                if not train.any():
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
        """Phased TTT's base-model SGD on already-scored documents (§2.13)."""
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        L = cfg.global_seq_len
        tokens = torch.cat([guard.training_tokens(*d.targets)[:-1] for d in docs])  # each doc from its BOS
        params = [p for p in model.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
        model.train()
        for c, n_chunks, t0, spans in global_steps(tokens.numel(), cfg, world_size, rank):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.global_lr, c, n_chunks)
            for a, e in spans:
                part = tokens[t0 + a * L : t0 + e * L + 1]
                x = part[:-1].view(-1, L) if e > a else part.new_zeros(0, L)
                y = part[1:].view(-1, L) if e > a else part.new_zeros(0, L)
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
        # `deadline` is not read: every document's adapters train to the end, as in the records.
        cfg = self.cfg
        check_model(model)
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
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(False)  # only the adapters learn per document
            progress = Progress(log, f"ttt:{cfg.name}", len(queue), "doc batches")
            for k, batch in enumerate(queue):
                if k % world_size == rank:
                    self._score_batch(model, batch, scorer, guard, sums, batch_index=k)
                progress.advance()
                while phase < len(pauses) and pauses[phase] == k + 1:
                    for other in range(done_upto, k + 1):  # scored by another rank before this collective
                        if other % world_size != rank:
                            for d in queue[other]:
                                guard.mark_scored(*d.targets)
                    done_upto = k + 1
                    for p, flag in requires.items():
                        p.requires_grad_(flag)
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


def build(cfg: LoRATTTConfig, compile: bool = False) -> LoRATTT:
    return LoRATTT(cfg, compile=compile)
