"""pgolf.flops against an independent count: torch's FlopCounterMode over one forward (and one
forward + backward) of tiny models on CPU, with SDPA on its math kernel (plain matmuls, full T x T,
so the formula is taken with causal=1 here)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pgolf.components import MODELS
from pgolf.flops import CAUSAL, forward_flops_per_token, layer_passes, train_flops_per_token
from pgolf.models.config import BankedGPTConfig, BaselineModelConfig, LayeredGPTConfig

SHAPE = dict(vocab_size=64, model_dim=64, num_heads=4, num_kv_heads=2)
CONFIGS = {
    # the 2026-04-09 stack: loops (layers 1-2 three times), GPT-J parallel residuals, XSA everywhere
    "r0409": LayeredGPTConfig(
        **SHAPE, num_layers=4, mlp_mult=4.0, activation="leaky_relu2", xsa_last_n=4, rope_dims=8,
        ln_scale=True, resid_mix=True, unet_skips=True, skip_gates_enabled=True,
        parallel_residual="gptj", parallel_start_layer=2, num_loops=2, loop_start=1, loop_end=2,
        logit_softcap=30.0,
    ),
    # the #726 / 2026-03-23 stack: banks, BigramHash and value-embedding projections
    "pr726": BankedGPTConfig(
        **SHAPE, num_layers=4, mlp_mult=3.0, xsa_last_n=2, smear_gate="v2", bigram_vocab_size=48,
        bigram_dim=16, ve_enabled=True, ve_dim=16, ve_layers=[2, 3], unet_skips=True, resid_mix=True,
    ),
    "two_lane_dense_gate_untied": LayeredGPTConfig(
        **SHAPE, num_layers=3, parallel_residual="two_lane", parallel_start_layer=1, gated_attn=True,
        tie_embeddings=False,
    ),
    "out_gate": LayeredGPTConfig(**SHAPE, num_layers=3, attn_out_gate=True),
    "baseline": BaselineModelConfig(**SHAPE, num_layers=3),
}  # fmt: skip
B, T = 2, 32


def counted_per_token(cfg, backward: bool) -> float:
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    x, y = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model(x, y)
        if backward:
            loss.backward()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_flops_equal_the_counted_matmuls(name):
    cfg = CONFIGS[name]
    assert counted_per_token(cfg, backward=False) == forward_flops_per_token(cfg, T, causal=1.0)


@pytest.mark.parametrize("name", ["r0409", "pr726", "baseline"])
def test_training_flops_are_three_forwards(name):
    cfg = CONFIGS[name]
    assert counted_per_token(cfg, backward=True) == train_flops_per_token(cfg, T, causal=1.0)


def test_smear_v3_gate_is_counted_within_one_position():
    # its gate skips position 0 (no previous token): the formula counts every position
    cfg = LayeredGPTConfig(**SHAPE, num_layers=2, smear_gate="v3")
    got, want = counted_per_token(cfg, backward=False), forward_flops_per_token(cfg, T, causal=1.0)
    assert 0 < want - got <= 2 * cfg.gate_window / T


def test_loops_repeat_layers_and_causal_halves_attention():
    cfg = CONFIGS["r0409"]
    assert layer_passes(cfg, looping=True) == 8 and layer_passes(cfg, looping=False) == 4
    assert forward_flops_per_token(cfg, T, looping=True) > forward_flops_per_token(cfg, T, looping=False)
    full, causal = forward_flops_per_token(cfg, T, causal=1.0), forward_flops_per_token(cfg, T)
    assert full - causal == pytest.approx(4 * 64 * T * (1 - CAUSAL) * 8)


def test_document_cap_bounds_the_attention_context():
    capped = LayeredGPTConfig(**SHAPE, num_layers=2, doc_mask=True, doc_max_len=16)
    plain = LayeredGPTConfig(**SHAPE, num_layers=2)
    assert forward_flops_per_token(capped, 4096) == forward_flops_per_token(plain, 16)
