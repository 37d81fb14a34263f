"""model.doc_mask in scoring and TTT: nonoverlap and sliding eval use the mask, the TTT legality
guard still holds with it, and a CPU run with the switch on trains, evaluates and logs its kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_cpu_args
from test_eval_sliding import CPU, V, scorer, tables
from test_ttt_docs import synthetic

from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.val import ByteLUT, evaluate
from pgolf.models import docmask
from pgolf.models.config import BankedGPTConfig
from pgolf.models.gpt import GPT
from pgolf.ttt.config import LoRATTTConfig, ScoreFirstTTTConfig
from pgolf.ttt.docs import find_docs
from pgolf.ttt.guard import LegalityError, ScoredStream
from pgolf.ttt.lora import LoRATTT
from pgolf.ttt.score_first import ScoreFirstTTT

BOS = 1
LENGTHS = [30, 12, 45, 7, 22, 38, 16, 9, 27, 33]


@pytest.fixture(autouse=True)
def _dense_kernel():
    docmask._DOC_BACKEND = "dense"
    yield
    docmask._DOC_BACKEND = None


def masked_model(doc_mask: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = BankedGPTConfig(
        vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0, doc_mask=doc_mask
    )
    m = GPT(cfg, banked=True).eval()
    with torch.no_grad():  # zero-initialized output projections would hide the attention path
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_nonoverlap_eval_scores_each_document_as_if_alone():
    """Masked rows of L tokens score exactly what each row's documents score on their own
    (positions restart at 0 there: RoPE is relative, so only rounding differs)."""
    toks, L = synthetic(LENGTHS, seed=5), 32
    m = masked_model()
    lut = ByteLUT(tables(), CPU)
    res = evaluate(m.token_nll, toks, L, 4, lut, CPU, torch.float32)
    nll_sum, n = 0.0, (toks.size - 1) // L * L
    x_all = torch.from_numpy(toks.astype(np.int64))
    with torch.no_grad():
        for r in range(0, n, L):
            cuts = [r] + [r + i for i in range(1, L) if toks[r + i] == BOS] + [r + L]
            for a, b in zip(cuts[:-1], cuts[1:]):
                nll_sum += m.token_nll(x_all[a:b][None], x_all[a + 1 : b + 1][None]).double().sum().item()
    assert res.tokens == n
    assert res.val_loss == pytest.approx(nll_sum / n, rel=1e-5)
    unmasked = evaluate(masked_model(doc_mask=False).token_nll, toks, L, 4, lut, CPU, torch.float32)
    assert unmasked.val_loss != pytest.approx(nll_sum / n, rel=1e-5)  # the mask is what makes it so


@pytest.mark.parametrize("doc_mask", [True, False])
def test_sliding_eval_never_lets_a_document_see_the_previous_one(doc_mask):
    """Per-target NLL of the sliding scorer (tail-only batches: the final layer runs on the last
    `stride` rows): changing document 4's body changes no target of the documents after it."""
    toks = synthetic(LENGTHS, seed=2)
    d = find_docs(toks, BOS)[4]
    pert = toks.copy()
    pert[d.start + 1 : d.start + d.length - 1] = (pert[d.start + 1 : d.start + d.length - 1] + 3 - 2) % 46 + 2
    m = masked_model(doc_mask)
    a, b = scorer(m, toks, 16, 4), scorer(m, pert, 16, 4)
    evaluate_sliding(a)
    evaluate_sliding(b)
    n = toks.size - 1
    after = slice(d.targets[1], n)  # targets predicted from the next documents' tokens only
    assert (a.count[:n] == 1).all()
    assert not torch.equal(a.nll[slice(*d.targets)], b.nll[slice(*d.targets)])
    assert torch.equal(a.nll[after], b.nll[after]) == doc_mask


def test_score_first_guard_holds_with_the_mask(monkeypatch):
    toks = synthetic(LENGTHS * 2, seed=1)
    cfg = ScoreFirstTTTConfig(lr=0.05, epochs=1, chunk_tokens=40, batch_seqs=2)
    m = masked_model()
    sc = scorer(m, toks, 16, 4, B=3)
    res = ScoreFirstTTT(cfg).run(m, sc, m, log=lambda s: None)
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    real = ScoredStream.mark_scored
    monkeypatch.setattr(ScoredStream, "mark_scored", lambda self, lo, hi: real(self, lo, lo + (hi - lo) // 2))
    m = masked_model()
    with pytest.raises(LegalityError, match="has not been scored"):
        ScoreFirstTTT(cfg).run(m, scorer(m, toks, 16, 4, B=3), m, log=lambda s: None)


def test_lora_guard_holds_with_the_mask(monkeypatch):
    toks = synthetic(LENGTHS, seed=3)
    cfg = LoRATTTConfig(rank=4, chunk_size=5, context=12, batch_docs=3, lr=0.05, targets=["q", "v", "head"])
    m = masked_model()
    sc = scorer(m, toks, 16, 16, B=2)
    res = LoRATTT(cfg).run(m, sc, m, log=lambda s: None)
    n = toks.size - 1
    assert (sc.count[:n] == 1).all() and res.tokens == n
    real = ScoredStream.mark_scored
    monkeypatch.setattr(ScoredStream, "mark_scored", lambda self, lo, hi: real(self, lo, max(lo, hi - 1)))
    m = masked_model()
    with pytest.raises(LegalityError, match="has not been scored"):
        LoRATTT(cfg).run(m, scorer(m, toks, 16, 16, B=2), m, log=lambda s: None)


# The records' packing on the tiny scale: one row per micro-batch (2048 tokens over 8 micro-batches
# = 256 = train.seq_len), documents capped at 64 tokens, sliding windows of 64.
DOC_MASK_RUN = {
    "model": "layered",
    "model.num_layers": "2",
    "model.model_dim": "64",
    "model.num_heads": "2",
    "model.num_kv_heads": "1",
    "model.bigram_vocab_size": "0",
    "model.smear_gate": "none",
    "model.ve_layers": "[1]",
    "model.ve_dim": "16",
    "model.xsa_last_n": "1",
    "model.doc_mask": "true",
    "model.doc_max_len": "64",
    "train.seq_len": "256",
    "eval.seq_len": "64",
    "eval.modes": "[nonoverlap,sliding]",
    "eval.stride": "32",
    "eval.batch_seqs": "8",
}


@pytest.mark.slow
def test_cpu_run_with_doc_mask_trains_and_evaluates(tmp_path, shard_dir, tokenizer_model):
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **DOC_MASK_RUN), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["status"] == "ok" and r["steps"] == 6
    assert r["attention_backend"] == "sdpa+doc_mask:dense"
    losses = [loss for _, loss in r["train_losses"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for mode in ("nonoverlap", "sliding"):
        assert np.isfinite(r["metrics"][mode]["val_bpb"])
    assert "doc_mask:dense" in (tmp_path / "run" / "train.log").read_text()
