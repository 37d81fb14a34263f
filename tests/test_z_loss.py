"""model.z_loss: PaLM's auxiliary loss on the softmax normalizer, added to the training loss only."""

from __future__ import annotations

import pytest
import torch

from pgolf.models.config import LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import mean_cross_entropy
from pgolf.registry import ConfigError

TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, logit_softcap=30.0)


def _model(z_loss: float) -> GPT:
    torch.manual_seed(0)
    model = GPT(LayeredGPTConfig(**TINY, z_loss=z_loss, zero_init_proj=False), banked=False)
    torch.nn.init.normal_(model.tok_emb.weight, std=1.0)  # logits far from 0, so log Z is too
    return model


def test_z_loss_adds_the_squared_log_normalizer_to_training_only():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    plain, zl = _model(0.0), _model(1e-2)
    logits = plain._logits(x)
    log_z = logits.float().logsumexp(-1)
    assert log_z.abs().mean() > 1  # the term has something to add
    assert torch.equal(plain(x, y), mean_cross_entropy(logits, y))  # off: the loss as before
    torch.testing.assert_close(zl(x, y), mean_cross_entropy(logits, y) + 1e-2 * log_z.square().mean())
    assert torch.equal(zl.token_nll(x, y), plain.token_nll(x, y))  # evaluation never sees it


def test_z_loss_gradient_pulls_the_normalizer_toward_one():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    grads = []
    for coef in (0.0, 1.0):
        model = _model(coef)
        model(x, y).backward()
        grads.append(model.tok_emb.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "bad, match",
    [(dict(z_loss=-1e-4), "z_loss=-0.0001 must be >= 0"), (dict(z_loss=1e-4, fused_ce=True), "fused_ce")],
)
def test_z_loss_refuses_what_it_cannot_do(bad, match):
    with pytest.raises(ConfigError, match=match):
        LayeredGPTConfig(**TINY, **bad).validate("model")
