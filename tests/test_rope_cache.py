"""The cached RoPE tables (pgolf.models.layers.RotaryTables): the same values as computing them,
never in a checkpoint, and a compiled training step that reads them instead of recomputing them."""

from __future__ import annotations

import re

import pytest
import torch

from pgolf.models import layers
from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BaselineModelConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import RotaryTables, rotary_tables

CPU = torch.device("cpu")
VARIANTS = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("table_dtype,inv_freq_dtype", VARIANTS)
@pytest.mark.parametrize("head_dim", [8, 64])
def test_cached_tables_equal_computed_ones_bit_for_bit(table_dtype, inv_freq_dtype, head_dim):
    cache = RotaryTables(head_dim, 10_000.0, table_dtype, inv_freq_dtype)
    for seq_len in (1, 7, 1024, 2048, 98_304):
        for dtype in (torch.float32, torch.bfloat16):
            want = rotary_tables(seq_len, head_dim, 10_000.0, CPU, dtype, table_dtype, inv_freq_dtype)
            got = cache(seq_len, head_dim, 10_000.0, dtype, table_dtype, inv_freq_dtype)
            for w, g in zip(want, got, strict=True):
                assert g.dtype == dtype and torch.equal(w, g), (seq_len, dtype)


def test_other_tables_are_computed_not_sliced():
    cache = RotaryTables(16, 10_000.0, positions=64)
    cache.cos = torch.full_like(cache.cos, 7.0)  # poisoned (a copy: the CPU tables are shared)
    for args in [
        (65, 16, 10_000.0, torch.float32),  # longer than the cache
        (32, 16, 12_345.0, torch.float32),  # an NTK-rescaled base
        (32, 16, 10_000.0, torch.float32, torch.bfloat16),  # another table dtype
        (32, 8, 10_000.0, torch.float32),  # other rotary dims
    ]:
        seq_len, head_dim, base, dtype, *rest = args
        got, _ = cache(*args)
        assert torch.equal(got, rotary_tables(seq_len, head_dim, base, CPU, dtype, *rest)[0]), args
    assert (cache(32, 16, 10_000.0, torch.float32)[0] == 7.0).all()  # the cache's own variant reads it


def test_tables_never_reach_a_checkpoint_and_move_with_the_model():
    cfg = LayeredGPTConfig(
        num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=64, rope_dims=8
    )
    model = GPT(cfg, False)
    assert not any("rotary" in k for k in model.state_dict())
    assert not any("rotary" in k for k in model.export_state_dict())  # what quantizers and the artifact see
    assert not any("rotary" in n for n, _ in model.named_parameters())
    # a cast of the model leaves the tables exact (each call casts them to its activations' dtype):
    # a model cast to bf16 and back, as bench/seed_parity_cpu.py's audit does, reads fp32 tables
    model.bfloat16()
    assert model.rotary.cos.dtype == torch.float32
    want = rotary_tables(64, 8, cfg.rope_base, CPU, torch.float32)
    assert all(
        torch.equal(w, g) for w, g in zip(want, model.float().rotary(64, 8, cfg.rope_base, torch.float32))
    )
    base = BaselineGPT(
        BaselineModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=64)
    )
    assert not any("rotary" in k for k in base.state_dict())


def _trig_kernels(model: torch.nn.Module, device: str) -> list[str]:
    """Names of the Inductor kernels of one compiled forward + backward that compute a cos or sin."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = model.to(device)
    ids = torch.randint(0, 64, (2, 256), device=device)
    _, codes = run_and_get_code(torch.compile(lambda: model(ids, ids).backward(), fullgraph=False))
    names = [n for code in codes for n in re.findall(r"^(\w+_fused_\w+) = async_compile", code, re.M)]
    assert names, "no kernels found in the generated code: the pattern no longer matches Inductor's output"
    return [n for n in names if re.search(r"_(cos|sin)_", n)]


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_reads_the_tables_instead_of_recomputing_them(device, monkeypatch):
    """Computed in the graph, the tables were rebuilt (pow, cos, sin) inside the kernels that read
    them, forward and backward: 31 ms of #1775's 1,274 ms step on an H100. With the cache no
    kernel computes a cos or sin; without it (every call past the cache) they come back, so the
    check can see them."""
    cfg = LayeredGPTConfig(
        num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=64, rope_dims=8,
        rope_table_dtype="bfloat16_inv_freq",
    )  # fmt: skip
    torch.manual_seed(0)
    assert _trig_kernels(GPT(cfg, False), device) == []
    monkeypatch.setattr(layers, "ROPE_CACHE_POSITIONS", 0)  # an empty cache: every call computes
    assert _trig_kernels(GPT(cfg, False), device) != []
