"""init_from / pgolf.models.convert: every accepted layout lands every tensor in the right place.

The record scripts need CUDA and FlashAttention 3, so their modules are not built here. Instead the
records' `final_model.pt` layouts are written out below from the records' own naming (independently
of pgolf.models.banks), filled from a pgolf model whose every tensor holds distinct random values;
loading them must reproduce each tensor by name and the logits exactly.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.models import attention
from pgolf.models.baseline import BaselineGPT
from pgolf.models.config import BankedGPTConfig, BaselineModelConfig, LayeredGPTConfig
from pgolf.models.convert import InitFromError, load_into, main
from pgolf.models.gpt import GPT

V, L = 64, 4
# The 2026-03-23 stack on tiny shapes: banks, bigram, smear, VE on two layers, U-Net skips.
R0323 = dict(
    vocab_size=V, num_layers=L, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
    activation="leaky_relu2", logit_softcap=30.0, rope_dims=8, xsa_last_n=2, ln_scale=True,
    resid_mix=True, unet_skips=True, smear_gate="v2", bigram_vocab_size=48, bigram_dim=16,
    ve_enabled=True, ve_dim=16, ve_layers=[2, 3], ortho_init=True,
)  # fmt: skip
# The 2026-04-09 stack: per-layer linears, gated skips, GPT-J parallel from layer 2, a loop.
R0409 = dict(
    vocab_size=V, num_layers=L, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=4.0,
    activation="leaky_relu2", logit_softcap=30.0, rope_dims=8, xsa_last_n=L, qk_gain_init=5.25,
    ln_scale=True, resid_mix=True, unet_skips=True, skip_gates_enabled=True, parallel_residual="gptj",
    parallel_start_layer=2, num_loops=1, loop_start=1, loop_end=2, enable_looping_at=0.0, ortho_init=True,
)  # fmt: skip
KINDS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def model(stack: dict, banked: bool, seed: int = 0) -> GPT:
    cfg = (BankedGPTConfig if banked else LayeredGPTConfig)(**stack)
    cfg.validate("model")
    torch.manual_seed(seed)
    return GPT(cfg, banked=banked)


@torch.no_grad()
def randomize(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter gets its own random values (no zeros, no ones), so a tensor that lands in the
    wrong place, or a bank slice taken in the wrong order or transposed, changes the result."""
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.copy_(0.05 * torch.randn(p.shape, generator=g) + 0.01)
    return m


def logits(m: GPT, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m._logits(ids)


def per_layer(m: GPT) -> dict[str, torch.Tensor]:
    """name -> tensor of a per-layer pgolf model, read straight from its modules."""
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def common_record_entries(sd: dict[str, torch.Tensor], stack: dict) -> dict[str, torch.Tensor]:
    """The non-matrix entries both records save, under the records' names (GPT.__init__ of each)."""
    rec = {"tok_emb.weight": sd["tok_emb.weight"].bfloat16()}  # the records' embedding is bf16
    for i in range(L):
        for name in ("attn.q_gain", "attn_scale", "mlp_scale", "resid_mix"):
            rec[f"blocks.{i}.{name}"] = sd[f"blocks.{i}.{name}"]
    rec["skip_weights"] = sd["skip_weights"]
    if stack.get("skip_gates_enabled"):
        rec["skip_gates"] = sd["skip_gates"]
    if stack.get("bigram_vocab_size"):
        rec["bigram.embed.weight"] = sd["bigram.embed.weight"].bfloat16()
        rec["bigram.proj.weight"] = sd["bigram.proj.weight"]
        rec["bigram.scale"] = sd["bigram.scale"]
    if stack.get("smear_gate") == "v2":
        rec["smear.gate"] = sd["smear.gate"]
    if stack.get("ve_enabled"):
        rec["ve_shared.embed.weight"] = sd["ve_shared.embed.weight"].bfloat16()
        rec["ve_shared.proj.weight"] = sd["ve_shared.proj.weight"]
        rec["ve_shared.scale"] = sd["ve_shared.scale"]
        for k in range(len(stack["ve_layers"])):
            rec[f"ve_layer_scales.{k}"] = sd[f"ve_layer_scales.{k}"]
    return rec


def r0323_final_model(src: GPT) -> dict[str, torch.Tensor]:
    """The 2026-03-23 record's final_model.pt of the weights in per-layer model `src`: its banks are
    qo_bank = [W_q(0..L-1); W_o(0..L-1)], kv_bank = [W_k(0..L-1); W_v(0..L-1)], mlp_up_bank = [W_up(i)],
    mlp_down_bank = [W_down(i)], each matrix (out, in); plus MTP heads that the loader must drop."""
    assert not src.banked
    sd = per_layer(src)
    layer = lambda kind: [sd[f"blocks.{i}.{kind}.weight"] for i in range(L)]  # noqa: E731
    rec = {
        "qo_bank": torch.stack(layer("attn.c_q") + layer("attn.proj")),
        "kv_bank": torch.stack(layer("attn.c_k") + layer("attn.c_v")),
        "mlp_up_bank": torch.stack(layer("mlp.fc")),
        "mlp_down_bank": torch.stack(layer("mlp.proj")),
    }
    rec.update(common_record_entries(sd, R0323))
    rec["mtp_heads.0.weight"] = torch.randn(V, 64)
    return rec


def r0409_final_model(src: GPT) -> dict[str, torch.Tensor]:
    """The 2026-04-09 record's final_model.pt of the weights in banked model `src`: per-layer
    CastedLinears c_q, c_k, c_v, proj (attention) and fc, proj (MLP), read out of the banks here."""
    assert src.banked
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    rec = {}
    for i in range(L):
        rec[f"blocks.{i}.attn.c_q.weight"] = sd["qo_bank"][i]
        rec[f"blocks.{i}.attn.proj.weight"] = sd["qo_bank"][L + i]
        rec[f"blocks.{i}.attn.c_k.weight"] = sd["kv_bank"][i]
        rec[f"blocks.{i}.attn.c_v.weight"] = sd["kv_bank"][L + i]
        rec[f"blocks.{i}.mlp.fc.weight"] = sd["mlp_up_bank"][i]
        rec[f"blocks.{i}.mlp.proj.weight"] = sd["mlp_down_bank"][i]
    rec.update(common_record_entries(sd, R0409))
    return rec


def round_embeddings(m: GPT) -> GPT:
    """The source as the record stores it: embedding tables rounded to bf16."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("embed.weight") or name == "tok_emb.weight":
                p.copy_(p.bfloat16().float())
    return m


def assert_same_weights(a: GPT, b: GPT) -> None:
    ea, eb = a.export_state_dict(), b.export_state_dict()
    assert list(ea) == list(eb)
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k


@pytest.mark.parametrize("banked", [True, False])
def test_r0323_final_model_lands_tensor_by_tensor(tmp_path, banked):
    src = round_embeddings(randomize(model(R0323, banked=False), seed=11))
    rec = r0323_final_model(src)
    # every tensor of the source model is in the record file exactly once (nothing left unmapped)
    assert sum(v.numel() for k, v in rec.items() if not k.startswith("mtp")) == sum(
        p.numel() for p in src.parameters()
    )
    torch.save(rec, tmp_path / "final_model.pt")
    dst = model(R0323, banked=banked, seed=5)
    assert not torch.equal(logits(dst), logits(src))
    layout = load_into(dst, tmp_path / "final_model.pt", "banked")
    assert layout.startswith("banked") and "mtp_heads" in layout
    assert_same_weights(dst, src)
    assert torch.equal(logits(dst), logits(src))
    if banked:  # the record's banks arrive as they are, slice for slice
        for bank in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
            assert torch.equal(getattr(dst, bank), rec[bank]), bank


@pytest.mark.parametrize("banked", [True, False])
def test_r0409_final_model_lands_tensor_by_tensor(tmp_path, banked):
    src = round_embeddings(randomize(model(R0409, banked=True), seed=12))
    rec = r0409_final_model(src)
    assert sum(v.numel() for v in rec.values()) == sum(p.numel() for p in src.parameters())
    # as saved from a torch.compile'd module: every name carries the wrapper prefix
    torch.save({f"_orig_mod.{k}": v for k, v in rec.items()}, tmp_path / "final_model.pt")
    dst = model(R0409, banked=banked, seed=6)
    layout = load_into(dst, tmp_path / "final_model.pt", "layered")
    assert layout.startswith("per-layer")
    assert_same_weights(dst, src)
    for i in range(L):
        w = dst.layer_weights(i)
        assert torch.equal(w.q, rec[f"blocks.{i}.attn.c_q.weight"]) and torch.equal(
            w.o, rec[f"blocks.{i}.attn.proj.weight"]
        )
        assert torch.equal(w.v, rec[f"blocks.{i}.attn.c_v.weight"]) and torch.equal(
            w.down, rec[f"blocks.{i}.mlp.proj.weight"]
        )
    assert torch.equal(logits(dst), logits(src))


def test_a_misordered_bank_is_caught_by_the_checks(tmp_path):
    """The checks above can fail: a bank laid out [W_o; W_q] instead of [W_q; W_o] gives other logits."""
    src = round_embeddings(randomize(model(R0323, banked=False), seed=13))
    rec = r0323_final_model(src)
    rec["qo_bank"] = torch.cat((rec["qo_bank"][L:], rec["qo_bank"][:L]))
    torch.save(rec, tmp_path / "swapped.pt")
    dst = model(R0323, banked=True, seed=5)
    load_into(dst, tmp_path / "swapped.pt")
    assert not torch.equal(dst.layer_weights(0).q, src.layer_weights(0).q)
    assert not torch.allclose(logits(dst), logits(src))


@pytest.mark.parametrize("src_banked,dst_banked", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kind", ["state_dict", "export", "checkpoint"])
def test_pgolf_formats_load_into_either_layout(tmp_path, src_banked, dst_banked, kind):
    src = randomize(model(R0323, banked=src_banked), seed=14)
    state = src.export_state_dict() if kind == "export" else src.state_dict()
    if kind == "checkpoint":  # a pgolf checkpoint: the weights are its "model" entry
        state = {"model": state, "optimizer": {}, "train": {"step": 3}}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    dst = model(R0323, banked=dst_banked, seed=7)
    load_into(dst, path)
    assert_same_weights(dst, src)
    assert torch.equal(logits(dst), logits(src))


def test_baseline_model_loads_its_own_state_dict(tmp_path):
    cfg = BaselineModelConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    src = randomize(BaselineGPT(cfg), seed=3)
    torch.save(src.state_dict(), tmp_path / "b.pt")
    dst = BaselineGPT(cfg)
    assert load_into(dst, tmp_path / "b.pt", "baseline") == "state_dict"
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({**src.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(InitFromError, match=r"x\.pt.*in the file but not in the model: extra\.weight"):
        load_into(dst, tmp_path / "x.pt", "baseline")


# ------------------------------------------------------------------------------------- errors
def _saved(tmp_path, state, name="w.pt"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_error_missing_file(tmp_path):
    with pytest.raises(InitFromError, match=r"init_from=.*nope\.pt: no such file"):
        load_into(model(R0323, True), tmp_path / "nope.pt")


def test_error_not_a_state_dict(tmp_path):
    with pytest.raises(
        InitFromError, match=r"t\.pt: expected a non-empty dict of name -> tensor, got Tensor"
    ):
        load_into(model(R0323, True), _saved(tmp_path, torch.zeros(3), "t.pt"))
    with pytest.raises(InitFromError, match=r"not name -> tensor: step"):
        load_into(model(R0323, True), _saved(tmp_path, {"step": 3}))


def test_error_unknown_and_missing_names_are_listed(tmp_path):
    src = model(R0323, banked=False)
    state = src.state_dict()
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    del state["smear.gate"], state["blocks.1.attn.c_k.weight"]
    with pytest.raises(InitFromError) as err:
        load_into(model(R0323, True), _saved(tmp_path, state, "odd.pt"), "banked")
    msg = str(err.value)
    assert "odd.pt" in msg and "model.name=banked" in msg
    assert "in the file but not in the model: blocks.0.attn.extra.weight" in msg
    assert "in the model but not in the file: blocks.1.attn.c_k.weight, smear.gate" in msg


def test_error_shape_mismatch_names_the_tensor(tmp_path):
    src = model({**R0323, "vocab_size": 2 * V}, banked=True)
    with pytest.raises(
        InitFromError, match=r"shapes differ: .*tok_emb\.weight file \(128, 64\) model \(64, 64\)"
    ):
        load_into(model(R0323, True), _saved(tmp_path, src.state_dict()))


def test_error_banks_of_another_depth(tmp_path):
    src = model({**R0323, "num_layers": 3, "ve_layers": [1, 2]}, banked=True)
    with pytest.raises(
        InitFromError, match=r"bank shapes do not fit model\.num_layers=4: qo_bank \(6, 64, 64\)"
    ):
        load_into(model(R0323, True), _saved(tmp_path, src.state_dict()))
    state = src.state_dict()
    del state["kv_bank"]
    with pytest.raises(InitFromError, match=r"needs all four banks; missing \['kv_bank'\]"):
        load_into(model(R0323, True), _saved(tmp_path, state))


@pytest.mark.parametrize(
    "key,why",
    [
        ("blocks.3.attn.vr_lambda", "VALUE_RESIDUAL"),
        ("blocks.0.attn.attn_gate.bias", "GATED_ATTENTION"),
        ("blocks.0.dtg_gate.weight", "DTG"),
        ("embed_proj.weight", "EMBEDDING_DIM"),
    ],
)
def test_error_record_features_pgolf_lacks(tmp_path, key, why):
    state = {**model(R0323, banked=True).state_dict(), key: torch.zeros(2)}
    with pytest.raises(
        InitFromError, match=rf"w\.pt: tensors of features pgolf does not implement: {key}.*{why}"
    ):
        load_into(model(R0323, True), _saved(tmp_path, state))


# ---------------------------------------------------------------------------------------- CLI
SHRUNK = [
    "data.vocab_size=64", "model.num_layers=3", "model.model_dim=64", "model.num_heads=2",
    "model.num_kv_heads=1", "model.ve_layers=[2]", "model.bigram_vocab_size=48",
]  # fmt: skip


def test_cli_converts_a_record_file_for_a_preset(tmp_path, capsys):
    from pgolf.models.convert import build_model

    src, name = build_model("banked", SHRUNK)
    assert name == "banked" and src.num_layers == 3
    randomize(src, seed=21)
    torch.save({**src.state_dict(), "mtp_heads.0.weight": torch.zeros(64, 64)}, tmp_path / "final_model.pt")
    out = tmp_path / "conv" / "init.pt"
    assert main([str(tmp_path / "final_model.pt"), "--model", "banked", "--out", str(out), *SHRUNK]) == 0
    assert "-> " in capsys.readouterr().out
    conv = torch.load(out, weights_only=True)
    assert not any("bank" in k or "mtp" in k for k in conv)
    assert all(conv[f"blocks.{i}.{k}.weight"].ndim == 2 for i in range(3) for k in KINDS)
    for k, v in src.export_state_dict().items():
        assert torch.equal(conv[k], v), k
    # and a mismatched preset is refused with the reason, exit status 2
    assert main([str(out), "--model", "banked", "--out", str(tmp_path / "bad.pt"), *SHRUNK[:-1]]) == 2
    assert "bigram" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_from_init_from_with_zero_steps(tmp_path, shard_dir, tokenizer_model):
    """`pgolf.run init_from=X train.iterations=0`: validate, export, score the loaded weights; the
    seed no longer matters, because the weights come from the file."""
    import json

    from conftest import run_cli, tiny_cpu_args

    from pgolf.models.convert import build_model

    shrink = {
        "model": "banked", "model.num_layers": "3", "model.model_dim": "64", "model.num_heads": "2",
        "model.num_kv_heads": "1", "model.ve_layers": "[2]", "model.bigram_vocab_size": "64",
    }  # fmt: skip
    src, _ = build_model(
        "banked", ["data.vocab_size=400", *(f"{k}={v}" for k, v in shrink.items() if k != "model")]
    )
    randomize(src, seed=5)
    torch.save(src.state_dict(), tmp_path / "init.pt")

    def run(name: str, seed: int, **extra: str) -> dict:
        args = tiny_cpu_args(shard_dir, tokenizer_model, **shrink, seed=str(seed), **extra)
        proc = run_cli([*args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "result.json").read_text())

    zero = {"init_from": str(tmp_path / "init.pt"), "train.iterations": "0", "train.prime_steps": "0"}
    a, b = run("a", 1, **zero), run("b", 2, **{**zero, "train.prime_steps": "2"})  # priming keeps them
    assert a["status"] == b["status"] == "ok" and a["steps"] == 0
    assert a["metrics"]["pre_quant"]["val_loss"] == b["metrics"]["pre_quant"]["val_loss"]
    assert a["val_bpb"] == b["val_bpb"]
    log = (tmp_path / "a" / "train.log").read_text()
    assert f"init_from:{tmp_path / 'init.pt'} layout:banked" in log
    assert json.loads((tmp_path / "a" / "config.json").read_text())["init_from"] == str(tmp_path / "init.pt")
    fresh = run("c", 1, **{k: v for k, v in zero.items() if k != "init_from"})
    assert fresh["metrics"]["pre_quant"]["val_loss"] != a["metrics"]["pre_quant"]["val_loss"]
