"""Banked vs per-layer layouts: same function, exact unbank/rebank, optimizer roles, Muon on banks,
the record presets' parameter counts, and the compiled graph variants."""

from __future__ import annotations

import pytest
import torch

from pgolf.components import MODELS
from pgolf.config import job_config_from_dict
from pgolf.models import attention
from pgolf.models.banks import BANKS, bank_slots, rebank, unbank
from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import restore_fp32_params
from pgolf.optim import muon as muon_module
from pgolf.optim.config import MuonConfig
from pgolf.optim.muon import OptimizerBundle
from pgolf.quant.config import Int8ZlibConfig
from pgolf.quant.int8 import Int8Zlib

V = 64
# Most features at once, so layout differences anywhere in the stack would show.
RICH = dict(
    vocab_size=V, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
    activation="leaky_relu2", rope_dims=8, rope_train_seq_len=8, xsa_last_n=2, ln_scale=True,
    resid_mix=True, unet_skips=True, skip_gates_enabled=True, smear_gate="v3", smear_bos_fix=True,
    bigram_vocab_size=48, bigram_dim=16, ve_enabled=True, ve_dim=16, ve_layers=[1, 3], ortho_init=True,
    num_loops=1, loop_start=1, loop_end=2, enable_looping_at=0.5, parallel_residual="two_lane",
    parallel_start_layer=2, sparse_attn_gate=True, backout=True, logit_softcap=30.0,
)  # fmt: skip
CANONICAL = tuple(
    f"{m}.weight" for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
)


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def pair(seed: int = 0, **kw) -> tuple[GPT, GPT]:
    """A banked and a per-layer model built from the same seed."""
    out = []
    for cls in (BankedGPTConfig, LayeredGPTConfig):
        torch.manual_seed(seed)
        out.append(GPT(cls(**{**RICH, **kw}), banked=cls.BANKED))
    return out[0], out[1]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (2, 17), generator=g)
    return x[:, :-1], x[:, 1:]


def test_same_seed_same_weights_and_export():
    banked, layered = pair()
    exported, state = banked.export_state_dict(), layered.state_dict()
    assert list(exported) == list(state)  # same keys in the same order: same artifact bytes
    for k in state:
        assert torch.equal(exported[k], state[k]), k
    assert not set(BANKS) & set(exported)
    assert all(exported[f"blocks.{i}.{c}"].ndim == 2 for i in range(4) for c in CANONICAL)
    assert layered.export_state_dict() is not None and list(layered.export_state_dict()) == list(state)


@pytest.mark.parametrize("looping", [False, True])
def test_same_weights_same_logits_and_grads(looping):
    banked, layered = pair()
    perturb(banked)
    layered.load_state_dict(banked.export_state_dict(), strict=True)
    x, y = batch()
    for m in (banked, layered):
        m.set_graph_variant("loop_on" if looping else "loop_off")
    torch.testing.assert_close(banked._logits(x), layered._logits(x), rtol=0, atol=0)
    banked(x, y).backward()
    layered(x, y).backward()
    grads_b = unbank({n: p.grad for n, p in banked.named_parameters()}, 4)
    for n, p in layered.named_parameters():
        torch.testing.assert_close(grads_b[n], p.grad, rtol=0, atol=0, msg=n)


def test_unbank_rebank_roundtrip_is_exact():
    banked, _ = pair()
    perturb(banked)
    state = banked.state_dict()
    flat = unbank(state, 4)
    back = rebank(flat, 4)
    assert sorted(back) == sorted(state)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype, k
    # slice j of each bank is the named matrix of the canonical layout (pgolf/models/banks.py)
    n = 4
    assert torch.equal(flat["blocks.1.attn.c_q.weight"], state["qo_bank"][1])
    assert torch.equal(flat["blocks.1.attn.proj.weight"], state["qo_bank"][n + 1])
    assert torch.equal(flat["blocks.2.attn.c_k.weight"], state["kv_bank"][2])
    assert torch.equal(flat["blocks.2.attn.c_v.weight"], state["kv_bank"][n + 2])
    assert torch.equal(flat["blocks.3.mlp.fc.weight"], state["mlp_up_bank"][3])
    assert torch.equal(flat["blocks.3.mlp.proj.weight"], state["mlp_down_bank"][3])
    assert sum(len(v) for v in bank_slots(4).values()) == 6 * 4
    with pytest.raises(KeyError, match="missing per-layer matrices"):
        rebank({k: v for k, v in flat.items() if k != "blocks.0.mlp.fc.weight"}, 4)


def test_load_export_state_dict_and_quant_roundtrip():
    """What the trainer does with the artifact: export -> int8 -> load into a fresh banked model."""
    banked, layered = pair()
    perturb(banked)
    quant = Int8Zlib(Int8ZlibConfig(keep_float_max_numel=4096))  # tiny model: quantize its matrices
    blob = quant.export(banked.export_state_dict())
    restored, _ = pair(seed=5)
    restored.load_export_state_dict(quant.load(blob))
    layered.load_export_state_dict(quant.load(blob))
    x, _ = batch()
    torch.testing.assert_close(restored._logits(x), layered._logits(x), rtol=0, atol=0)
    # the quantizer saw 2-D matrices: per-row int8 codes with one scale per row
    obj = quant.quantize(banked.export_state_dict())
    assert obj["quantized"]["blocks.0.mlp.fc.weight"].shape == (192, 64)
    assert obj["scales"]["blocks.0.mlp.fc.weight"].shape == (192,)
    assert quant.export(layered.export_state_dict()) == quant.export(restored.export_state_dict())


@pytest.mark.parametrize("banked", [True, False], ids=["banked", "layered"])
def test_param_groups_by_role(banked):
    model = pair()[0 if banked else 1]
    groups = model.param_groups()
    assert set(groups) == {"matrix", "scalar", "embed", "head"}
    listed = [n for ps in groups.values() for n, _ in ps]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert len(set(listed)) == len(listed)
    matrix = [n for n, _ in groups["matrix"]]
    if banked:
        assert matrix == list(BANKS) and all(p.ndim == 3 for _, p in groups["matrix"])
    else:
        assert sorted(matrix) == sorted(f"blocks.{i}.{c}" for i in range(4) for c in CANONICAL)
    embed = sorted(n for n, _ in groups["embed"])
    assert embed == ["bigram.embed.weight", "tok_emb.weight", "ve_shared.embed.weight"]
    assert groups["head"] == []
    scalar = {n for n, _ in groups["scalar"]}
    expected = """skip_weights skip_gates smear.lam smear.proj.weight bigram.proj.weight bigram.scale
        ve_shared.proj.weight ve_layer_scales.0 parallel_post_lambdas parallel_resid_lambdas backout_lambda
        blocks.0.attn.attn_gate_w blocks.0.attn.q_gain blocks.3.resid_mix blocks.3.attn_scale""".split()
    assert set(expected) <= scalar, set(expected) - scalar


def test_bf16_cast_keeps_banks_and_controls_fp32():
    banked, _ = pair()
    banked = banked.bfloat16()
    restore_fp32_params(banked)
    for name, p in banked.named_parameters():
        expect_bf16 = name in ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
        assert p.dtype == (torch.bfloat16 if expect_bf16 else torch.float32), name
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(banked(x, y))


def _fake_ns(
    G: torch.Tensor,
    steps: int,
    square_first: bool = False,
    transpose_first: bool = False,
    cpu_fp32: bool = True,
) -> torch.Tensor:
    return (G * 3.0).bfloat16()  # elementwise: identical however the matrices are batched


@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["newton-schulz", "clipped"])
def test_muon_on_banks_equals_muon_on_matrices(monkeypatch, clip):
    """Each bank slice is orthogonalized as its own matrix: three bundle steps on the banked model
    move every weight exactly as on the per-layer model, real Newton-Schulz included. With clipping
    the clip coefficient's last ulp depends on how the norm is summed (3 banks vs 12 matrices), and
    bf16 NS would amplify that ulp into ~5% of an update on these tiny matrices; so the clipped run
    uses an elementwise stand-in for NS and is compared to fp32 rounding."""
    if clip:
        monkeypatch.setattr(muon_module, "newton_schulz", _fake_ns)
    banked, layered = pair()
    perturb(banked)
    layered.load_state_dict(banked.export_state_dict())
    cfg = MuonConfig(warmdown_iters=2, grad_clip_norm=clip)
    opts = [OptimizerBundle(m, cfg, torch.device("cpu"), compile_ns=False) for m in (banked, layered)]
    assert len(opts[0].muon.matrices) == len(opts[1].muon.matrices) == 24
    assert [b is not None for b in opts[0].muon.whole_bank] == [True] * 4  # no stacking of bank slices
    start = {k: v.clone() for k, v in layered.state_dict().items()}
    for step in range(3):
        x, y = batch(seed=step)
        for m, opt in zip((banked, layered), opts):
            opt.zero_grad()
            m(x, y).backward()
            opt.step(step, 0.0, 3, None)
    after_b, after_l = banked.export_state_dict(), layered.state_dict()
    for k, v in after_l.items():
        assert not torch.equal(v, start[k]), k
        if clip:
            torch.testing.assert_close(after_b[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(after_b[k], v), k


def test_muon_rejects_other_ranks():
    with pytest.raises(ValueError, match="2-D matrices or 3-D banks"):
        muon_module.Muon([torch.nn.Parameter(torch.zeros(4))], MuonConfig(), compile_ns=False)


@pytest.mark.parametrize(
    "option,data,expected",
    [
        ("banked", "fineweb_sp1024", 26_928_220),  # R0323 log: model_params:26928220
        ("layered", "fineweb_sp1024", 26_928_220),
        ("sp8192_recur", "fineweb_sp8192", 35_944_536),  # R0409 log: model_params:35944536
    ],
)
def test_preset_parameter_counts_match_the_record_logs(compose, option, data, expected):
    job = job_config_from_dict(compose([f"model={option}", f"data={data}"]))
    m = job.model
    with torch.device("meta"):
        model = GPT(m, banked=type(m).BANKED, init=False)
    assert sum(p.numel() for p in model.parameters()) == expected
    # the same number, counted by hand from the shapes
    d, L, Vv, kv, hid = 512, 11, m.vocab_size, 256, int(m.mlp_mult * 512)
    blocks = L * (2 * d * d + 2 * kv * d + 2 * hid * d + 2 * d + 2 * d + 8)
    if option == "sp8192_recur":
        assert (Vv, hid, m.num_loops, m.qk_gain_init, m.parallel_residual) == (8192, 2048, 2, 5.25, "gptj")
        assert Vv * d + blocks + 2 * 8 * d == expected  # 8 gated skips: the looped U-Net split
    else:
        assert (Vv, hid, m.bigram_vocab_size, m.ve_layers, m.smear_gate) == (1024, 1536, 1536, [9, 10], "v2")
        bigram, ve, smear = 1536 * 128 + 128 * d + 1, Vv * 128 + 128 * kv + 1 + 2, d
        assert Vv * d + blocks + 5 * d + bigram + ve + smear == expected
    assert MODELS.get(option if option != "sp8192_recur" else "layered").schema is type(m)


def test_banked_registration_provides_banks():
    assert MODELS.get("banked").provides == ("matrices", "banks")
    assert MODELS.get("layered").provides == ("matrices",)


def test_graph_variants_are_primed_once_and_switch_without_recompiling():
    compiles: list[int] = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    banked, _ = pair()
    perturb(banked)  # at init the zero projections make every block the identity, looped or not
    compiled = torch.compile(banked, backend=backend, fullgraph=True, dynamic=False)
    x, y = batch()
    assert banked.graph_variants() == ["loop_off", "loop_on"]
    for variant in banked.graph_variants():  # what Trainer.prime does
        banked.set_graph_variant(variant)
        compiled(x, y).backward()
    primed = len(compiles)
    assert primed == 2
    losses, notes = [], []
    for frac in (0.0, 0.3, 0.5, 0.9, 1.0):  # what Trainer.train does each step
        notes.append(banked.on_progress(frac))
        losses.append(compiled(x, y).item())
    on = "graph_variant:loop_on frac:0.500 layers:[0, 1, 2, 1, 2, 3]"
    off = "graph_variant:loop_off frac:0.000 layers:[0, 1, 2, 3]"  # priming left it on
    assert notes == [off, None, on, None, None]
    assert len(compiles) == primed
    assert losses[0] == losses[1] and losses[2] == losses[3] and losses[1] != losses[2]
    always = GPT(LayeredGPTConfig(**{**RICH, "enable_looping_at": 0.0}), banked=False)
    assert always.graph_variants() == ["loop_on"] and always.looping
    assert GPT(LayeredGPTConfig(**{**RICH, "num_loops": 0}), banked=False).graph_variants() == ["static"]
    with pytest.raises(ValueError, match="unknown graph variant"):
        always.set_graph_variant("loop_off")


def test_optimizer_state_roundtrip_with_banks():
    """A resume restores Muon momentum per shape group; for banks the groups count bank slices."""
    banked, _ = pair()
    perturb(banked)
    opt = OptimizerBundle(banked, MuonConfig(), torch.device("cpu"), compile_ns=False)
    x, y = batch()
    banked(x, y).backward()
    opt.step(0, 0.0, 10, None)
    state = opt.state_dict()
    assert sorted(v.shape for v in state["muon"].values()) == sorted(
        [(8, 64, 64), (8, 32, 64), (4, 192, 64), (4, 64, 192)]
    )
    fresh = OptimizerBundle(banked, MuonConfig(), torch.device("cpu"), compile_ns=False)
    fresh.load_state_dict(state)
    for k, v in opt.muon.momentum_buffers.items():
        assert torch.equal(fresh.muon.momentum_buffers[k], v)
    state["muon"]["0"] = state["muon"]["0"][:3]
    with pytest.raises(ValueError, match="momentum for shape group 0"):
        fresh.load_state_dict(state)
