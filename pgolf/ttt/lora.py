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

Not done here: the records' compiled dynamic-shape forward (this runs eagerly), separate adapters
per pass of looped layers (a looped layer shares one adapter across its passes), O/MLP adapters,
document-respecting attention inside global SGD, and dynamic batch claiming across ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.eval.sliding import ModeResult, WindowScorer, finish
from pgolf.ttt.config import LoRATTTConfig, PhasedTTTConfig
from pgolf.ttt.docs import Doc, doc_queue, find_docs, pause_points, phase_doc_sets
from pgolf.ttt.guard import ScoredStream
from pgolf.ttt.score_first import ceil_div, cosine_lr, sgd_step

LossFn = Callable[[Tensor, Tensor], Tensor]


class BatchedLoRA:
    """One rank-r adapter per batch row: x (B, T, d_in) -> scale * x A^T B^T, A ~ U(+-1/sqrt(d_in)), B = 0."""

    def __init__(
        self,
        n: int,
        d_in: int,
        d_out: int,
        rank: int,
        scale: float,
        device: torch.device,
        gen: torch.Generator,
    ):
        bound = 1.0 / math.sqrt(d_in)
        a = (torch.rand(n, rank, d_in, generator=gen) * 2 - 1).mul_(bound)
        self.a = a.to(device).requires_grad_()
        self.b = torch.zeros(n, d_out, rank, device=device, requires_grad=True)
        self.scale = scale

    def __call__(self, x: Tensor) -> Tensor:
        h = torch.bmm(x, self.a.transpose(1, 2).to(x.dtype))
        return torch.bmm(h, self.b.transpose(1, 2).to(x.dtype)) * self.scale


class Adapters:
    """The adapters of one batch of documents, attached to the model's hook points while alive."""

    def __init__(self, model: nn.Module, n: int, cfg: LoRATTTConfig, device: torch.device, seed: int = 0):
        # Seeded per batch of documents, so scores do not depend on which rank ran the batch.
        gen = torch.Generator().manual_seed(seed)
        mc = model.cfg
        head_dim = mc.model_dim // mc.num_heads
        out = {"q": mc.model_dim, "k": mc.num_kv_heads * head_dim, "v": mc.num_kv_heads * head_dim}
        scale = cfg.alpha / cfg.rank if cfg.alpha > 0 else 1.0
        self.layers = [
            {
                kind: BatchedLoRA(n, mc.model_dim, out[kind], cfg.rank, scale, device, gen)
                for kind in cfg.targets
                if kind != "head"
            }
            for _ in model.blocks
        ]
        self.head = (
            BatchedLoRA(n, mc.model_dim, mc.vocab_size, cfg.rank, scale, device, gen)
            if "head" in cfg.targets
            else None
        )

    def params(self) -> list[Tensor]:
        ps = [t for layer in self.layers for a in layer.values() for t in (a.a, a.b)]
        return ps + ([self.head.a, self.head.b] if self.head is not None else [])

    def attach(self, model: nn.Module) -> None:
        for block, layer in zip(model.blocks, self.layers):
            block.attn.delta = _layer_delta(layer)
        model.head_delta = self.head

    @staticmethod
    def detach(model: nn.Module) -> None:
        for block in model.blocks:
            block.attn.delta = None
        model.head_delta = None


def _layer_delta(layer: dict[str, BatchedLoRA]) -> Callable[[str, Tensor], Tensor | float]:
    def delta(kind: str, x: Tensor) -> Tensor | float:
        a = layer.get(kind)
        return 0.0 if a is None else a(x)

    return delta


def check_model(model: nn.Module) -> None:
    if not (hasattr(model, "head_delta") and all(hasattr(b.attn, "delta") for b in model.blocks)):
        raise TypeError(
            "ttt=lora/phased needs a model with test-time adapter hooks: model=banked or model=layered"
        )


class LoRATTT:
    enabled = True

    def __init__(self, cfg: LoRATTTConfig):
        self.cfg = cfg

    def warmup(
        self, model: nn.Module, scorer: WindowScorer, loss_fn: LossFn, vocab: int, world_size: int
    ) -> None:
        """Nothing to compile: the per-document forward runs eagerly (its shapes vary per chunk)."""
        check_model(model)

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
        pred = np.array([d.length - 1 for d in docs])
        n_chunks = -(-pred // cfg.chunk_size)
        adapters = Adapters(model, n, cfg, dev, seed=batch_index)
        adapters.attach(model)
        opt = torch.optim.AdamW(
            adapters.params(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        try:
            for ci in range(int(n_chunks.max())):
                active = ci < n_chunks
                end = np.minimum((ci + 1) * cfg.chunk_size, pred)
                lo = np.minimum(ci * cfg.chunk_size, end)
                ws = np.maximum(end - cfg.context, 0)
                T = int((end - ws)[active].max())
                starts = np.array([d.start for d in docs]) + np.where(active, ws, 0)
                idx = (
                    torch.from_numpy(starts[:, None] + np.arange(T + 1)[None, :])
                    .to(dev)
                    .clamp_(max=scorer.n_targets)
                )
                tok = scorer.stream[idx]
                x, y = tok[:, :-1], tok[:, 1:]
                col = torch.arange(T, device=dev)[None, :]
                rel_lo = torch.from_numpy(np.where(active, lo - ws, T)).to(dev)[:, None]
                rel_hi = torch.from_numpy(np.where(active, end - ws, 0)).to(dev)[:, None]
                mask = (col >= rel_lo) & (col < rel_hi)
                with torch.autocast(
                    dev.type, dtype=scorer.amp_dtype, enabled=scorer.amp_dtype != torch.float32
                ):
                    nll = model.token_nll(x, y).float()
                # score: the chunk's own targets, under the adapters as they were before this chunk
                with torch.no_grad():
                    m = mask.to(nll.dtype)
                    sums += torch.stack(
                        [
                            (nll.detach() * m).double().sum(),
                            m.double().sum(),
                            (scorer.lut.count(x, y) * mask).sum().double(),
                        ]
                    )
                for j in np.flatnonzero(active):
                    guard.mark_scored(docs[j].start + int(lo[j]), docs[j].start + int(end[j]))
                if scorer.record:  # tests: per-target NLL and counts, in stream coordinates
                    where = torch.where(mask, idx[:, :-1], scorer.n_targets).reshape(-1)
                    scorer.nll.index_put_((where,), nll.detach().reshape(-1).double())
                    scorer.count.index_add_(0, where, torch.ones_like(where))
                # update: documents with a later chunk, on targets the guard confirms were scored
                train = active & (ci + 1 < n_chunks)
                if not train.any():
                    continue
                for j in np.flatnonzero(train):
                    guard.training_tokens(docs[j].start + int(ws[j]), docs[j].start + int(end[j]))
                w = mask & torch.from_numpy(train).to(dev)[:, None]
                per_doc = (nll * w).sum(1) / w.sum(1).clamp(min=1)
                opt.zero_grad(set_to_none=True)
                per_doc.sum().backward()
                opt.step()
        finally:
            Adapters.detach(model)

    # -------------------------------------------------------------------------- global SGD
    def _global_sgd(self, model, docs: list[Doc], scorer, guard, loss_fn, world_size, rank) -> None:
        """Phased TTT's base-model SGD on already-scored documents (§2.13)."""
        cfg: PhasedTTTConfig = self.cfg  # type: ignore[assignment]
        L, C = cfg.global_seq_len, cfg.global_chunk_tokens
        tokens = torch.cat([guard.training_tokens(*d.targets)[:-1] for d in docs])  # each doc from its BOS
        n_chunks = max(-(-(tokens.numel() - 1) // C), 1)
        params = [p for p in model.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
        model.train()
        for c in range(n_chunks if n_chunks == 1 else n_chunks - 1):  # the last chunk would get lr 0
            chunk = tokens[c * C : min((c + 1) * C, tokens.numel() - 1) + 1]
            seqs = (chunk.numel() - 1) // L
            if seqs == 0:
                continue
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.global_lr, c, n_chunks)
            s0, s1 = seqs * rank // world_size, seqs * (rank + 1) // world_size
            steps = ceil_div(ceil_div(seqs, world_size), cfg.global_batch_seqs)
            for b in range(steps):
                a = s0 + b * cfg.global_batch_seqs
                e = min(a + cfg.global_batch_seqs, s1)
                part = chunk[a * L : max(e, a) * L + 1]
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
    ) -> ModeResult:
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
            f"chunk:{cfg.chunk_size} context:{cfg.context}"
            + (f" pauses_after_batches:{pauses}" if phased else "")
        )
        sums = torch.zeros(3, dtype=torch.float64, device=scorer.device)
        requires = {p: p.requires_grad for p in model.parameters()}
        phase, done_upto = 0, 0  # batches [0, done_upto) are marked on this rank
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(False)  # only the adapters learn per document
            for k, batch in enumerate(queue):
                if k % world_size == rank:
                    self._score_batch(model, batch, scorer, guard, sums, batch_index=k)
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


def build(cfg: LoRATTTConfig) -> LoRATTT:
    return LoRATTT(cfg)
