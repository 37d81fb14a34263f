"""Per-document LoRA TTT and phased TTT on synthetic document streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval_sliding import scorer, tiny_model
from test_ttt_docs import synthetic
from torch._dynamo.utils import counters

from pgolf.registry import ConfigError
from pgolf.ttt.config import LoRATTTConfig, PhasedTTTConfig
from pgolf.ttt.docs import doc_queue, find_docs, pause_points
from pgolf.ttt.guard import LegalityError, ScoredStream
from pgolf.ttt.lora import LoRATTT, chunk_table, window_buckets

LENGTHS = [30, 12, 45, 7, 22, 38, 16, 9, 27, 33]


def run(toks, cfg, model=None):
    model = model or tiny_model()
    sc = scorer(model, toks, 16, 16, B=2)
    res = LoRATTT(cfg).run(model, sc, model, log=lambda s: None)
    return res, sc, model


def lora_cfg(**kw):
    base = dict(rank=4, chunk_size=5, context=12, batch_docs=3, lr=0.05, targets=["q", "v", "head"])
    return LoRATTTConfig(**{**base, **kw})


def reference_nll(model, toks, chunk, context):
    """Base model, no adapters: each target scored in its chunk's in-document window, one at a time."""
    x_all = torch.from_numpy(toks.astype(np.int64))
    out = torch.full((toks.size - 1,), float("nan"), dtype=torch.float64)
    for d in find_docs(toks, 1):
        pred = d.length - 1
        for ci in range(-(-pred // chunk)):
            end = min((ci + 1) * chunk, pred)
            ws = max(end - context, 0)
            with torch.no_grad():
                nll = model.token_nll(
                    x_all[d.start + ws : d.start + end][None],
                    x_all[d.start + ws + 1 : d.start + end + 1][None],
                )[0]
            out[d.start + ci * chunk : d.start + end] = nll[ci * chunk - ws :].double()
    return out


def test_lora_lr_zero_scores_each_target_once_with_in_document_context():
    toks = synthetic(LENGTHS)
    res, sc, model = run(toks, lora_cfg(lr=0.0))
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    torch.testing.assert_close(sc.nll[:n], reference_nll(tiny_model(), toks, 5, 12), rtol=1e-5, atol=1e-5)


def test_lora_adapts_within_documents_and_leaves_base_weights_alone():
    rng = np.random.default_rng(0)
    rep = rng.integers(2, 48, 6)
    toks = np.concatenate([np.concatenate([[1], np.tile(rep, 12)]) for _ in range(4)]).astype(np.uint16)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res, _, _ = run(toks, lora_cfg(lr=0.05, chunk_size=8, context=32), model=model)
    flat, _, _ = run(toks, lora_cfg(lr=0.0, chunk_size=8, context=32))
    assert res.val_loss < flat.val_loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(b.attn.delta is None for b in model.blocks) and model.head_delta is None
    assert all(p.requires_grad for p in model.parameters())


def test_lora_documents_are_isolated_and_causal():
    toks = synthetic(LENGTHS, seed=2)
    _, sc0, _ = run(toks, lora_cfg())
    docs = find_docs(toks, 1)
    # change the body of document 4: every other document keeps its scores bit for bit
    d = docs[4]
    pert = toks.copy()
    pert[d.start + 1 : d.start + d.length - 1] = (pert[d.start + 1 : d.start + d.length - 1] + 5 - 2) % 46 + 2
    _, sc1, _ = run(pert, lora_cfg())
    lo, hi = d.targets
    n = toks.size - 1
    others = torch.ones(n, dtype=torch.bool)
    others[lo - 1 : hi] = False  # doc 4's targets, and the previous doc's last target (doc 4's BOS) stays
    others[lo - 1] = True
    assert torch.equal(sc1.nll[:n][others], sc0.nll[:n][others])
    # inside the document: targets before the first changed token keep their scores
    p = d.start + 10
    pert2 = toks.copy()
    pert2[p + 1 : d.start + d.length - 1] = (pert2[p + 1 : d.start + d.length - 1] + 3 - 2) % 46 + 2
    _, sc2, _ = run(pert2, lora_cfg())
    assert torch.equal(sc2.nll[:p], sc0.nll[:p])
    assert not torch.equal(sc2.nll[p:hi], sc0.nll[p:hi])


def test_lora_update_only_sees_scored_targets(monkeypatch):
    real = ScoredStream.mark_scored

    def short(self, lo, hi):
        real(self, lo, max(lo, hi - 1))  # the scorer "forgot" each chunk's last target

    monkeypatch.setattr(ScoredStream, "mark_scored", short)
    with pytest.raises(LegalityError, match="has not been scored"):
        run(synthetic(LENGTHS), lora_cfg())


def test_phased_matches_lora_until_the_first_pause_then_adapts_the_base():
    toks = synthetic(LENGTHS * 2, seed=4)
    kw = dict(
        prefix_docs=6,
        num_phases=2,
        global_lr=0.05,
        global_seq_len=8,
        global_batch_seqs=4,
        global_chunk_tokens=64,
    )
    cfg = PhasedTTTConfig(**{**lora_cfg().__dict__, "name": "phased", **kw})
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res, sc, model = run(toks, cfg, model=model)
    _, sc_lora, _ = run(toks, lora_cfg())
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    queue = doc_queue(find_docs(toks, 1), 3)
    first_pause = pause_points(queue, 6, 2)[0]
    assert first_pause == 2  # 20 docs in batches [2, 3, 3, ...]: the 3rd document ends batch 2
    for batch_i, batch in enumerate(queue):
        for d in batch:
            lo, hi = d.targets
            same = torch.equal(sc.nll[lo:hi], sc_lora.nll[lo:hi])
            assert same == (batch_i < first_pause), (batch_i, d)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # global SGD ran


def test_lora_runs_on_the_baseline_model_too():
    from pgolf.models.baseline import BaselineGPT
    from pgolf.models.config import BaselineModelConfig

    torch.manual_seed(0)
    model = BaselineGPT(
        BaselineModelConfig(vocab_size=48, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    )
    toks = synthetic(LENGTHS)
    res, sc, _ = run(toks, lora_cfg(lr=0.05), model=model.eval())
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n and model.head_delta is None


# ------------------------------------------------------------------ fixed shapes and compilation
def test_window_buckets_halve_the_context_down_to_the_chunk_and_stay_few():
    assert window_buckets(48, 2048) == [64, 128, 256, 512, 1024, 2048]
    assert window_buckets(5, 12) == [6, 12]
    assert window_buckets(32, 2000) == [63, 125, 250, 500, 1000, 2000]
    assert len(window_buckets(1, 1 << 20)) == 6  # the smallest bucket takes every shorter window
    assert window_buckets(48, 2048, count=3) == [512, 1024, 2048] and window_buckets(48, 2048, 1) == [2048]
    assert window_buckets(48, 2048, rope_train_seq_len=1536) == [64, 128, 256, 512, 1024, 1536, 2048]
    assert window_buckets(48, 2048, rope_train_seq_len=4096) == window_buckets(48, 2048)
    for bad in (0, 8):
        with pytest.raises(ConfigError, match="window_buckets"):
            lora_cfg(window_buckets=bad).validate("ttt")


def test_chunk_table_pads_rows_and_windows_without_scoring_them():
    docs = find_docs(synthetic([30, 7]), 1)
    tab = chunk_table(docs, 5, 12, 4, [6, 12])
    assert tab.T == [6, 12, 12, 12, 12, 12]  # exact windows 5, 10, 12, ...; one document active after chunk 1
    assert (tab.rows[:, 2:] == 0).all() and not tab.train[:, 2:].any()  # padding rows: nothing scored
    assert not tab.active[2:, 1].any() and (tab.rows[2:, 1] == 0).all()  # doc 1 (6 targets) is done
    exact = chunk_table(docs, 5, 12, 2, None)
    assert exact.T == [5, 10, 12, 12, 12, 12] and (exact.rows == tab.rows[:, :2]).all()
    scored = [(tab.rows[k, j, 2] - tab.rows[k, j, 1]) for k in range(6) for j in range(2)]
    assert sum(scored) == 30 + 6  # every target of both documents (through the next BOS), each once


@pytest.mark.parametrize("phased", [False, True])
def test_padding_to_fixed_shapes_never_changes_a_score(phased):
    """Eager, padded (batch_docs rows, bucketed windows) vs exact shapes: same per-target NLL, so
    padding changed no score and, through the later chunks, no adapter update either."""
    toks = synthetic(LENGTHS, seed=5)  # 10 docs in batches of 3: the last batch has 1 row + 2 padding
    cfg = lora_cfg(lr=0.05)
    if phased:
        kw = dict(prefix_docs=6, num_phases=2, global_lr=0.05, global_seq_len=8, global_batch_seqs=4)
        cfg = PhasedTTTConfig(**{**cfg.__dict__, "name": "phased", **kw, "global_chunk_tokens": 64})
    out = {}
    for pad in (False, True):
        model = tiny_model()
        sc = scorer(model, toks, 16, 16, B=2)
        out[pad] = (LoRATTT(cfg, pad=pad).run(model, sc, model, log=lambda s: None), sc)
    n = toks.size - 1
    (r0, s0), (r1, s1) = out[False], out[True]
    assert torch.equal(s0.count[:n], s1.count[:n]) and (s1.count[:n] == 1).all()
    assert (r0.tokens, r0.bytes) == (r1.tokens, r1.bytes)
    torch.testing.assert_close(s1.nll[:n], s0.nll[:n], rtol=0, atol=1e-5)
    assert r1.val_bpb == pytest.approx(r0.val_bpb, rel=1e-6)


def _compiled_vs_eager(cfg, toks, backend):
    """(eager result, eager scorer, compiled result, compiled scorer, graphs after warm-up, graphs after the run)."""
    torch._dynamo.reset()
    model = tiny_model()
    sc = scorer(model, toks, 16, 16, B=2)
    eager = LoRATTT(cfg).run(model, sc, model, log=lambda s: None)
    model_c = tiny_model()
    sc_c = scorer(model_c, toks, 16, 16, B=2)
    loss_fn = torch.compile(model_c, dynamic=False, fullgraph=True, backend=backend)
    ttt = LoRATTT(cfg, compile=True, backend=backend)
    ttt.warmup(model_c, sc_c, loss_fn, 48, 1)
    warm = counters["stats"]["unique_graphs"]
    res = ttt.run(model_c, sc_c, loss_fn, log=lambda s: None)
    return eager, sc, res, sc_c, warm, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("phased", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_step_traces_whole_and_warmup_makes_every_graph(phased):
    """fullgraph tracing of the adapter hooks (aot_eager: traced and differentiated, not code-generated):
    warm-up makes one graph per window length (and phased's global SGD shapes); the pass makes none."""
    toks = synthetic(LENGTHS, seed=4)
    cfg = lora_cfg(lr=0.05)
    if phased:
        kw = dict(prefix_docs=6, num_phases=2, global_lr=0.05, global_seq_len=8, global_batch_seqs=4)
        cfg = PhasedTTTConfig(**{**cfg.__dict__, "name": "phased", **kw, "global_chunk_tokens": 64})
    counters.clear()
    eager, sc, res, sc_c, warm, after = _compiled_vs_eager(cfg, toks, "aot_eager")
    assert warm >= len(window_buckets(5, 12)) and after == warm
    if not phased:
        assert warm == len(window_buckets(5, 12))
    n = toks.size - 1
    assert (sc_c.count[:n] == 1).all() and res.tokens == eager.tokens
    torch.testing.assert_close(sc_c.nll[:n], sc.nll[:n], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_lora_matches_eager():
    """The real backend: bpb within 1e-5 of the eager pass (fp32; observed ~1e-9), no graph after warm-up."""
    counters.clear()
    eager, sc, res, sc_c, warm, after = _compiled_vs_eager(lora_cfg(lr=0.05), synthetic(LENGTHS), "inductor")
    assert after == warm == 2
    assert res.val_bpb == pytest.approx(eager.val_bpb, abs=1e-5)
    n = synthetic(LENGTHS).size - 1
    torch.testing.assert_close(sc_c.nll[:n], sc.nll[:n], rtol=0, atol=1e-4)
