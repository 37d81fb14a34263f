"""Score-first TTT and the legality guard shared by TTT modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval_sliding import scorer, stream, tiny_model

from pgolf.eval.sliding import evaluate_sliding
from pgolf.ttt.config import ScoreFirstTTTConfig
from pgolf.ttt.guard import LegalityError, ScoredStream
from pgolf.ttt.score_first import ScoreFirstTTT, cosine_lr

L, STRIDE, CHUNK = 16, 4, 40


def run_ttt(toks, lr=0.05, epochs=2, freeze=0, model=None, **kw):
    model = model or tiny_model()
    sc = scorer(model, toks, L, STRIDE, B=3)
    cfg = ScoreFirstTTTConfig(
        lr=lr, epochs=epochs, chunk_tokens=CHUNK, batch_seqs=2, freeze_blocks=freeze, **kw
    )
    res = ScoreFirstTTT(cfg).run(model, sc, model, log=lambda s: None)
    return res, sc, model


def test_lr_zero_equals_sliding_eval_exactly():
    toks = stream(300)
    res, sc, _ = run_ttt(toks, lr=0.0)
    ref_sc = scorer(tiny_model(), toks, L, STRIDE, B=3)
    ref = evaluate_sliding(ref_sc)
    n = toks.size - 1
    assert torch.equal(sc.nll[:n], ref_sc.nll[:n])  # token for token, bit for bit
    assert (sc.count[:n] == 1).all()
    assert (res.tokens, res.bytes) == (ref.tokens, ref.bytes)
    assert res.val_loss == pytest.approx(ref.val_loss, rel=1e-12, abs=0)
    assert res.val_bpb == pytest.approx(ref.val_bpb, rel=1e-12, abs=0)


def test_ttt_adapts_and_scores_every_target_once():
    toks = np.tile(stream(41), 8)  # repeated text: training on early chunks helps later ones
    res, sc, _ = run_ttt(toks, lr=0.5, epochs=3)
    ref = evaluate_sliding(scorer(tiny_model(), toks, L, STRIDE, B=3))
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    assert res.val_loss < ref.val_loss - 0.05
    # the first chunk is scored before any update: identical to plain sliding eval there
    ref_sc = scorer(tiny_model(), toks, L, STRIDE, B=3)
    evaluate_sliding(ref_sc)
    assert torch.equal(sc.nll[:CHUNK], ref_sc.nll[:CHUNK])


def test_perturbing_later_tokens_never_changes_earlier_scores():
    base = stream(260, seed=3)
    _, sc0, _ = run_ttt(base, lr=0.3)
    for p in (37, 40, 41, 100, 171):  # around chunk edges and inside chunks
        pert = base.copy()
        pert[p + 1 :] = (pert[p + 1 :] + 7) % 48  # change every token after position p
        _, sc1, _ = run_ttt(pert, lr=0.3)
        # target j predicts token j+1 from tokens 0..j: targets j < p only see tokens <= p
        assert torch.equal(sc1.nll[:p], sc0.nll[:p]), p
        assert not torch.equal(sc1.nll[p : base.size - 1], sc0.nll[p : base.size - 1])  # the change is real


def test_guard_refuses_unscored_tokens():
    g = ScoredStream(torch.arange(101))
    with pytest.raises(LegalityError, match="not been scored"):
        g.training_tokens(0, 10)
    g.mark_scored(0, 50)
    assert g.training_tokens(10, 50).tolist() == list(range(10, 51))  # inputs 10..49, targets 11..50
    with pytest.raises(LegalityError, match="target 50"):
        g.training_tokens(40, 51)
    with pytest.raises(LegalityError, match="scored twice"):
        g.mark_scored(49, 60)
    with pytest.raises(LegalityError, match="never scored"):
        g.assert_complete()


def test_ttt_cannot_train_on_what_it_did_not_score(monkeypatch):
    """By construction: if scoring covered less than the chunk, the training step raises."""
    real = ScoredStream.mark_scored

    def short(self, lo, hi):  # pretend the scorer covered only the first half of the chunk's windows
        real(self, lo, lo + (hi - lo) // 2)

    monkeypatch.setattr(ScoredStream, "mark_scored", short)
    with pytest.raises(LegalityError, match="has not been scored"):
        run_ttt(stream(200))


def test_last_chunk_is_never_trained_and_frozen_blocks_stay_fixed():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_ttt(stream(200), lr=0.2, freeze=1, model=model)
    after = model.state_dict()
    for k in before:
        if k.startswith("blocks.0."):
            assert torch.equal(before[k], after[k]), k
    L0 = model.num_layers
    assert torch.equal(before["qo_bank"][0], after["qo_bank"][0])  # layer 0's W_q slice
    assert torch.equal(before["qo_bank"][L0], after["qo_bank"][L0])  # layer 0's W_o slice
    assert torch.equal(before["mlp_up_bank"][0], after["mlp_up_bank"][0])
    assert not torch.equal(before["mlp_up_bank"][1], after["mlp_up_bank"][1])
    # one chunk only: nothing is trained at all
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    toks = stream(CHUNK)
    run_ttt(toks, lr=0.5, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cosine_schedule_and_plan():
    assert cosine_lr(1.0, 0, 5) == 1.0 and cosine_lr(1.0, 4, 5) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(1.0, 0, 1) == 1.0
    t = ScoreFirstTTT(ScoreFirstTTTConfig(chunk_tokens=100, batch_seqs=4))
    n_chunks, sizes = t.plan(n_targets=350, seq_len=16, world_size=1)
    assert n_chunks == 4 and sizes == [2, 4]  # 6 seqs per full chunk: batches of 4 and 2


def test_ttt_options_compose(compose):
    from pgolf.config import job_config_from_dict
    from pgolf.registry import ConfigError

    assert job_config_from_dict(compose(["ttt=phased", "model=banked"])).ttt.num_phases == 3
    job = job_config_from_dict(compose(["ttt=score_first"]))
    assert "sliding" in job.eval.modes  # the group turns the sliding eval on
    with pytest.raises(ConfigError, match="eval.modes"):
        job_config_from_dict(compose(["ttt=score_first", "eval.modes=[nonoverlap]"]))


def test_warmup_compiles_the_training_step_run_uses():
    """Warm-up's batches must have run()'s strides: otherwise the compiled step recompiles on the
    eval clock. Checked by forbidding recompiles after warm-up (aot_eager: fast, same guards)."""
    import torch._dynamo

    toks = stream(300)
    model = tiny_model()
    sc = scorer(model, toks, L, STRIDE, B=3)
    cfg = ScoreFirstTTTConfig(lr=0.05, epochs=2, chunk_tokens=CHUNK, batch_seqs=2)
    ttt = ScoreFirstTTT(cfg)
    torch._dynamo.reset()
    step = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    ttt.warmup(model, sc, step, model.cfg.vocab_size, world_size=1)
    torch._dynamo.config.error_on_recompile = True
    try:
        res = ttt.run(model, sc, step, log=lambda s: None)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert res.tokens == toks.size - 1
