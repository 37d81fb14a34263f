"""The PR #1775 options of ttt=lora / ttt=phased: O and MLP adapters, per-pass adapters on looped
layers, warm-start A, global SGD epochs and document-masked attention, and the eval-clock rule."""

from __future__ import annotations

import pytest
import torch
from test_eval_sliding import V, scorer
from test_ttt_docs import synthetic
from test_ttt_lora import LENGTHS, lora_cfg

from pgolf.models.config import BankedGPTConfig
from pgolf.models.gpt import GPT
from pgolf.registry import ConfigError
from pgolf.ttt import lora as lora_mod
from pgolf.ttt.config import PhasedTTTConfig
from pgolf.ttt.docs import doc_queue, find_docs
from pgolf.ttt.guard import LegalityError, ScoredStream
from pgolf.ttt.lora import LoRATTT


def model_of(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0)
    return GPT(BankedGPTConfig(**{**base, **kw}), banked=True).eval()


# layers 0, 1, 1: layer 1 runs twice; two_lane from layer 1 takes the lane path for the loop
LOOPED = dict(num_loops=1, loop_start=1, loop_end=1, enable_looping_at=0.0)


def phased_cfg(**kw) -> PhasedTTTConfig:
    base = dict(
        prefix_docs=6,
        num_phases=2,
        global_lr=0.05,
        global_seq_len=8,
        global_batch_seqs=4,
        global_chunk_tokens=64,
    )
    return PhasedTTTConfig(**{**lora_cfg().__dict__, "name": "phased", **base, **kw})


def run(toks, cfg, model=None, deadline=None, clock=None, logs=None):
    model = model or model_of()
    sc = scorer(model, toks, 16, 16, B=2)
    ttt = LoRATTT(cfg)
    if clock is not None:
        ttt.clock = clock
    res = ttt.run(
        model, sc, model, log=(logs.append if logs is not None else lambda s: None), deadline=deadline
    )
    return res, sc, model, ttt


def nll(sc, toks):
    return sc.nll[: toks.size - 1]


# ------------------------------------------------------------------------- the options act
@pytest.mark.parametrize("targets", [["o"], ["mlp"], ["q", "k", "v", "o", "mlp", "head"]])
@pytest.mark.parametrize("form", ["none", "gptj", "two_lane"])
def test_o_and_mlp_adapters_change_the_scores(targets, form):
    toks = synthetic(LENGTHS, seed=3)
    arch = dict(parallel_residual=form, parallel_start_layer=1)
    _, ref, _, _ = run(toks, lora_cfg(targets=["q", "k", "v"]), model_of(**arch))
    res, sc, _, _ = run(toks, lora_cfg(targets=targets), model_of(**arch))
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    assert not torch.equal(nll(sc, toks), nll(ref, toks))
    # lr 0: every adapter stays an exact zero (B = 0), so the scores are the base model's
    _, flat, _, _ = run(toks, lora_cfg(targets=targets, lr=0.0), model_of(**arch))
    _, flat_qkv, _, _ = run(toks, lora_cfg(targets=["q", "k", "v"], lr=0.0), model_of(**arch))
    assert torch.equal(nll(flat, toks), nll(flat_qkv, toks))


@pytest.mark.parametrize("form", ["none", "two_lane"])
def test_per_pass_adapters_differ_only_where_a_layer_loops(form):
    toks = synthetic(LENGTHS, seed=5)
    cfg = dict(targets=["q", "v", "o", "mlp", "head"])
    arch = dict(parallel_residual=form, parallel_start_layer=1)
    # no loop: one pass per layer, so per-pass adapters are the per-layer ones, drawn in the same order
    _, shared, _, _ = run(toks, lora_cfg(**cfg), model_of(**arch))
    _, per_pass, m, ttt = run(toks, lora_cfg(per_pass=True, **cfg), model_of(**arch))
    assert torch.equal(nll(per_pass, toks), nll(shared, toks))
    # layer 1 runs twice: its second pass gets adapters of its own
    _, shared, _, _ = run(toks, lora_cfg(**cfg), model_of(**arch, **LOOPED))
    _, per_pass, m, ttt = run(toks, lora_cfg(per_pass=True, **cfg), model_of(**arch, **LOOPED))
    assert m.block_passes() == [0, 1, 1]
    assert len(next(iter(ttt._pool.values())).layers) == 3
    assert not torch.equal(nll(per_pass, toks), nll(shared, toks))
    assert m.pass_deltas is None and m.head_delta is None  # detached after the run


def test_warm_start_a_keeps_a_across_batches_and_zeroes_b():
    toks = synthetic(LENGTHS, seed=6)
    queue = doc_queue(find_docs(toks, 1), 3)
    _, fresh, _, _ = run(toks, lora_cfg())
    res, warm, _, ttt = run(toks, lora_cfg(warm_start_a=True))
    n = toks.size - 1
    assert (warm.count[:n] == 1).all() and res.tokens == n
    assert len(queue[0]) == 1  # the longest document alone: 1 row without warm start, 3 with it
    for k, batch in enumerate(queue):
        for d in batch:
            lo, hi = d.targets
            first = slice(lo, lo + min(5, hi - lo))
            if k == 0:  # A drawn as without warm start (the row count only moves the float rounding)
                torch.testing.assert_close(warm.nll[lo:hi], fresh.nll[lo:hi], rtol=1e-5, atol=1e-5)
                continue
            # later batches start from the A the earlier ones trained ...
            assert (warm.nll[lo:hi] - fresh.nll[lo:hi]).abs().max() > 1e-3, (k, d)
            # ... with B zeroed, so each document's first chunk is still scored by the base model
            assert torch.equal(warm.nll[first], fresh.nll[first])
    adapters = ttt._pool[3]  # one set of batch_docs rows served every batch, the short one too
    assert len(ttt._pool) == 1 and adapters.drawn


# ------------------------------------------------------------------------------- legality
UPDATING = {
    "o_mlp": lora_cfg(targets=["q", "k", "v", "o", "mlp", "head"]),
    "per_pass": lora_cfg(per_pass=True, targets=["q", "o", "mlp"]),
    "warm_start_a": lora_cfg(warm_start_a=True),
    "phased": phased_cfg(targets=["q", "k", "v", "o", "mlp", "head"], per_pass=True, global_doc_mask=True),
}


@pytest.mark.parametrize("name", list(UPDATING))
def test_each_new_path_trains_only_on_scored_targets(name, monkeypatch):
    toks = synthetic(LENGTHS * 2, seed=7)
    run(toks, UPDATING[name], model_of(**LOOPED))  # legal as it is
    real = ScoredStream.mark_scored

    def short(self, lo, hi):
        real(self, lo, max(lo, hi - 1))  # plant: the scorer "forgot" each chunk's last target

    monkeypatch.setattr(ScoredStream, "mark_scored", short)
    with pytest.raises(LegalityError, match="has not been scored"):
        run(toks, UPDATING[name], model_of(**LOOPED))


@pytest.mark.parametrize("doc_mask", [False, True])
def test_global_sgd_refuses_a_document_that_is_not_scored_yet(doc_mask, monkeypatch):
    toks = synthetic(LENGTHS * 2, seed=8)
    real = lora_mod.phase_doc_sets

    def one_too_many(queue, prefix, phases):  # plant: the last document of the queue joins phase 1
        sets = real(queue, prefix, phases)
        return [s + [queue[-1][-1]] for s in sets]

    monkeypatch.setattr(lora_mod, "phase_doc_sets", one_too_many)
    with pytest.raises(LegalityError, match="has not been scored"):
        run(toks, phased_cfg(global_doc_mask=doc_mask, global_epochs=2))


# ---------------------------------------------------------------------- global SGD options
def test_global_sgd_with_the_document_mask_keeps_documents_apart():
    """Global SGD's sequences hold several documents; with ttt.global_doc_mask the gradient of one
    document's loss is the same bit for bit whatever the document before it says."""
    bos, a, b = [1], list(range(2, 12)), list(range(20, 30))
    model = model_of(**LOOPED, parallel_residual="two_lane", parallel_start_layer=1)
    start_b = 1 + len(a)

    def grads(body_a, masked: bool) -> dict[str, torch.Tensor]:
        toks = torch.tensor(bos + body_a + bos + b + [1])
        ttt = LoRATTT(phased_cfg(global_doc_mask=masked))
        model.zero_grad(set_to_none=True)
        model.train()
        with ttt._global_attention(model):
            nll = model.token_nll(toks[None, :-1], toks[None, 1:])
        nll[0, start_b:].sum().backward()  # document b's targets: its BOS onwards predicts its tokens
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    other = [(t * 7 + 3) % 40 + 2 for t in a]
    for masked in (True, False):
        g0, g1 = grads(a, masked), grads(other, masked)
        same = all(torch.equal(g0[k], g1[k]) for k in g0)
        assert same == masked
    assert model._doc_mask is None  # the switch is undone after global SGD


def test_global_sgd_under_the_mask_packs_a_step_as_one_row():
    """With ttt.global_doc_mask a step's sequences are one row, as the records' varlen batch: a
    document crossing a multiple of global_seq_len keeps its context there and is cut only every
    global_seq_len tokens from its BOS, so every token's loss equals that of its piece alone."""
    L = 16
    ttt = LoRATTT(phased_cfg(global_doc_mask=True, global_seq_len=L))
    model = model_of(**LOOPED)
    model.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off the zero-initialized projections, so attention reaches the loss
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    lengths = [5, 37, 12, 6]  # the 37-token document crosses positions 16 and 32 of the stream
    toks = torch.cat(
        [torch.cat((torch.tensor([1]), torch.randint(2, V, (n - 1,), generator=g))) for n in lengths]
    )
    toks = torch.cat((toks, torch.tensor([1])))[: 3 * L + 1]
    x, y = ttt._global_rows(toks[:-1], L), ttt._global_rows(toks[1:], L)
    assert x.shape == (1, 3 * L)
    with torch.no_grad(), ttt._global_attention(model):
        got = model.token_nll(x, y)[0]
        want, start = [], 0
        for n in lengths:  # each document, cut every L tokens from its BOS, each piece alone
            for a in range(start, min(start + n, 3 * L), L):
                b = min(a + L, start + n, 3 * L)
                want.append(model.token_nll(toks[None, a:b], toks[None, a + 1 : b + 1])[0])
            start += n
        torch.testing.assert_close(got, torch.cat(want)[: 3 * L], atol=1e-5, rtol=1e-5)
        rows = model.token_nll(toks[:-1].view(-1, L), toks[1:].view(-1, L)).reshape(-1)
    assert not torch.allclose(rows, got, atol=1e-4)  # rows of L would cut the long document at 16 and 32


def test_global_sgd_epochs_and_doc_mask_change_the_base_update():
    toks = synthetic(LENGTHS * 2, seed=9)
    states = {}
    for key, kw in {
        "plain": {},
        "epochs2": {"global_epochs": 2},
        "doc_mask": {"global_doc_mask": True},
    }.items():
        res, sc, model, _ = run(toks, phased_cfg(**kw))
        assert (sc.count[: toks.size - 1] == 1).all()
        states[key] = model.state_dict()
    for key in ("epochs2", "doc_mask"):
        assert any(not torch.equal(states["plain"][k], v) for k, v in states[key].items()), key


def test_phased_config_checks_the_new_keys():
    with pytest.raises(ConfigError, match="global_epochs"):
        phased_cfg(global_epochs=0).validate("ttt")
    with pytest.raises(ConfigError, match="global_warmup_chunks"):
        phased_cfg(global_warmup_chunks=2).validate("ttt")
    phased_cfg(global_epochs=2, global_doc_mask=True, per_pass=True, warm_start_a=True).validate("ttt")


def test_o_mlp_and_per_pass_need_the_gpt_family():
    from pgolf.models.baseline import BaselineGPT
    from pgolf.models.config import BaselineModelConfig

    model = BaselineGPT(
        BaselineModelConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    )
    for cfg in (lora_cfg(targets=["q", "o"]), lora_cfg(per_pass=True)):
        with pytest.raises(TypeError, match="GPT family"):
            run(synthetic(LENGTHS), cfg, model.eval())


# ------------------------------------------------------------------------------ time rule
class VirtualClock:
    """Each reading advances one second: the rule's arithmetic, independent of the machine."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("phased", [False, True])
def test_updates_stop_in_time_and_every_target_is_still_scored(phased):
    toks = synthetic(LENGTHS * 2, seed=10)
    n = toks.size - 1
    queue = doc_queue(find_docs(toks, 1), 3)
    cfg = phased_cfg() if phased else lora_cfg()
    free, sc_free, m_free, ttt = run(toks, cfg)
    assert ttt.stopped_at is None
    _, sc_base, _, _ = run(toks, lora_cfg(lr=0.0))  # no updates at all: the base model's scores

    # no time left: nothing is updated, everything is scored, and the base weights stay
    model = model_of()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res, sc, model, ttt = run(toks, cfg, model, deadline=-1.0, clock=VirtualClock())
    assert ttt.stopped_at == 0 and (sc.count[:n] == 1).all() and res.tokens == n
    assert torch.equal(nll(sc, toks), nll(sc_base, toks))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # time for a few batches: the same as no deadline before the stop, the base model after it
    logs: list[str] = []
    res, sc, model, ttt = run(toks, cfg, deadline=14.0, clock=VirtualClock(), logs=logs)
    s = ttt.stopped_at
    assert s is not None and 0 < s < len(queue), s
    assert (sc.count[:n] == 1).all() and res.tokens == n
    for k, batch in enumerate(queue):
        for d in batch:
            lo, hi = d.targets
            if k < s:
                assert torch.equal(sc.nll[lo:hi], sc_free.nll[lo:hi]), (k, s)
            elif not phased or s < 2:  # (phased: a phase before the stop may have moved the base)
                assert torch.equal(sc.nll[lo:hi], sc_base.nll[lo:hi]), (k, s)
    assert any("updates stopped before document batch" in line for line in logs)
    if phased:
        assert any("global SGD skipped" in line for line in logs)

    # a deadline that is never near: the same as none
    res, sc, _, ttt = run(toks, cfg, deadline=1e9, clock=VirtualClock())
    assert ttt.stopped_at is None and res.val_loss == free.val_loss


def test_compiled_options_trace_whole_and_warmup_makes_every_graph():
    """O/MLP and per-pass hooks and the document-masked global SGD under fullgraph tracing
    (aot_eager): warm-up makes every graph, including global SGD's masked one; the pass makes none."""
    from test_ttt_lora import _compiled_vs_eager
    from torch._dynamo.utils import counters

    toks = synthetic(LENGTHS, seed=4)
    cfg = phased_cfg(
        targets=["q", "k", "v", "o", "mlp", "head"], per_pass=True, global_doc_mask=True, global_epochs=2
    )
    counters.clear()
    eager, sc, res, sc_c, warm, after = _compiled_vs_eager(cfg, toks, "aot_eager")
    assert after == warm
    n = toks.size - 1
    assert (sc_c.count[:n] == 1).all() and res.tokens == eager.tokens
    torch.testing.assert_close(sc_c.nll[:n], sc.nll[:n], rtol=0, atol=1e-5)


def test_the_batch_about_to_update_is_costed_at_the_slowest_pace():
    """Three one-document batches of 11 targets: the first updated at 1 s/target, the second at
    3 s/target. At the mean pace (2 s/target) the last batch's update would seem to fit 30 s
    (1.25 x 22 s = 27.5 s); at the slowest pace (1.25 x 33 s = 41.25 s) it does not, and an update
    as slow as the last one would indeed end past the deadline."""
    from types import SimpleNamespace

    from pgolf.ttt.docs import Doc
    from pgolf.ttt.lora import UpdateClock

    now = [0.0]
    ttt = SimpleNamespace(deadline=1e9, clock=lambda: now[0])  # the clock times only under a deadline
    queue = [[Doc(index=k, start=12 * k, length=12)] for k in range(3)]
    clock = UpdateClock(ttt, queue, rank=0, world_size=1, device=torch.device("cpu"), sync=lambda: None)
    for k, seconds in enumerate((11.0, 33.0)):
        with clock.batch(k, update=True):
            now[0] += seconds
    ttt.deadline = now[0] + 30.0
    assert not clock.keep_updating(2)
    ttt.deadline = now[0] + 1.25 * 33.0
    assert clock.keep_updating(2)
