"""The records' export family: per-row int-N schemes, GPTQ, Hessian collection, compressors, blobs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_cli, tiny_cpu_args

from pgolf.models import attention
from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.quant.compress import COMPRESSORS, available, compressor, shuffle, unshuffle
from pgolf.quant.config import GroupQuant, MixedQuantConfig
from pgolf.quant.gptq import PERCENTILE_SEARCH, gptq_codes, qmax, round_codes, row_scales
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.mixed import MixedQuant, layer_order, route, storage_order
from pgolf.registry import ConfigError

TINY = dict(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2)
LOOPS = dict(num_loops=1, loop_start=1, loop_end=2, enable_looping_at=0.0)


@pytest.fixture(autouse=True)
def _sdpa_backend(monkeypatch):
    monkeypatch.setattr(attention, "_BACKEND", None)
    monkeypatch.setattr(attention, "_FN", None)


def _matrix(kind: str, rows: int = 256, cols: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(rows, cols, generator=g) * 0.02
    # trained-like: heavy tails (Student-t, 3 dof: z / sqrt(chi2_3 / 3)) and rows of different scale
    z = torch.randn(4, rows, cols, generator=g)
    t = z[0] / (z[1:].pow(2).sum(0) / 3).sqrt() * 0.01
    return t * (0.5 + torch.rand(rows, 1, generator=g))


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("bits", [5, 6, 8])
@pytest.mark.parametrize("clip", ["sdclip", "percentile", "search"])
def test_round_to_nearest_error_bounds(kind, bits, clip):
    w = _matrix(kind)
    s = row_scales(w, bits, clip, sigmas=12.85, percentile=99.99984)
    q = round_codes(w, s, bits)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax(bits)
    recon = q.float() * s[:, None]
    inside = w.abs() <= qmax(bits) * s[:, None]  # entries the clip did not touch
    # every unclipped entry is within half a step (+ fp16 scale rounding) of its value
    assert bool(((w - recon).abs() <= 0.5 * s[:, None] * (1 + 1e-3) + 1e-12)[inside].all())
    rel = float((w - recon).pow(2).mean() / w.pow(2).mean())
    # uniform rounding noise: step^2/12 relative to the row variance, step = (clip in sigmas) / qmax;
    # SDClip fixes the clip at 12.85 sigmas, max-based clips sit near 4.5 (Gaussian) or ~20 (t3) sigmas
    span = 12.85 if clip == "sdclip" else (4.5 if kind == "random" else 20.0)
    bound = 1.2 * (span / qmax(bits)) ** 2 / 12
    if clip == "sdclip" and kind == "trained":
        bound *= 1.5  # t3 tails reach past 12.85 sigma: clipping adds to the rounding noise
    assert rel < bound, (rel, bound)


def test_search_never_worse_than_its_candidates():
    w = _matrix("trained", seed=3)
    best = row_scales(w, 6, "search", 12.85, 100.0)
    err = lambda s: float((w - round_codes(w, s, 6).float() * s[:, None]).pow(2).sum())  # noqa: E731
    for p in (99.9, 99.99, 100.0):
        assert err(best) <= err(row_scales(w, 6, "percentile", 12.85, p)) + 1e-9


def test_gptq_beats_round_to_nearest_on_a_real_hessian():
    g = torch.Generator().manual_seed(0)
    # correlated layer inputs (as in a trained network), and the output error they induce
    x = torch.randn(4096, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    w = _matrix("trained", rows=96, cols=128, seed=1)
    H = x.T @ x
    s = row_scales(w, 4, "sdclip", 12.85, 100.0)
    out_err = lambda q: float((x @ (w - q.float() * s[:, None]).T).pow(2).mean())  # noqa: E731
    rtn, gq = out_err(round_codes(w, s, 4)), out_err(gptq_codes(w, H, s, 4, block_size=32))
    assert gq < 0.8 * rtn, (gq, rtn)
    no_order = out_err(gptq_codes(w, H, s, 4, block_size=32, act_order=False))
    assert no_order < rtn


def test_gptq_survives_dead_inputs_and_singular_hessian():
    w = _matrix("random", rows=16, cols=32)
    x = torch.randn(8, 32)
    x[:, 5] = 0.0  # a dead input and rank 8 < 32
    q = gptq_codes(w, x.T @ x, row_scales(w, 6, "sdclip", 12.85, 100.0), 6)
    assert q.shape == w.shape and int(q.abs().max()) <= 31


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_compressor_round_trip(kind):
    if kind not in available():
        pytest.skip(f"{kind} not installed")
    data = bytes(range(256)) * 50 + b"pgolf" * 100
    comp, decomp = compressor(kind, 6 if kind != "zstd" else 3)
    assert decomp(comp(data)) == data and len(comp(data)) < len(data)


def test_shuffle_round_trip_and_helps_fp16():
    x = (torch.randn(20000) * 0.01).to(torch.float16).numpy().tobytes()
    assert unshuffle(shuffle(x, 2), 2) == x and shuffle(x, 2) != x
    comp, _ = compressor("zlib", 9)
    assert len(comp(shuffle(x, 2))) < len(comp(x))


def test_missing_compressor_names_the_package(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a):
        if name == "brotli":
            raise ImportError("no brotli")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(RuntimeError, match="pip install brotli"):
        compressor("brotli", 11)


def test_routing_and_config_validation():
    assert route("tok_emb.weight") == "embed" and route("lm_head.weight") == "embed"
    assert route("blocks.3.mlp.fc.weight") == "mlp" and route("blocks.0.attn.c_k.weight") == "attn"
    assert route("bigram.proj.weight") == "other"
    with pytest.raises(ConfigError, match="quant.mlp.bits"):
        MixedQuantConfig(mlp=GroupQuant(bits=9)).validate("quant")
    with pytest.raises(ConfigError, match="level=12 is out of range for brotli"):
        MixedQuantConfig(level=12).validate("quant")


def _model(banked: bool, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT((BankedGPTConfig if banked else LayeredGPTConfig)(**{**TINY, **kw}), banked=banked)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_hessians_see_banked_and_looped_layers():
    lay = _model(False, **LOOPS)
    ban = GPT(BankedGPTConfig(**TINY, **LOOPS), banked=True)
    ban.load_export_state_dict(lay.export_state_dict())
    batches = [torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    found = []
    for m in (lay, ban):
        m.set_graph_variant("loop_on")
        w = {n: t for n, t in m.export_state_dict().items() if t.ndim == 2}
        for dt in (None, torch.bfloat16):
            H, n = collect_hessians(m, w, batches, dt)
            assert n == 3 and set(H) == set(w)  # every matrix, tied embedding included
            found.append(H)
    for k in found[0]:
        torch.testing.assert_close(found[0][k], found[2][k], rtol=1e-4, atol=1e-4)  # layered == banked
    # the tied embedding's H is the final-norm output's: every row has unit RMS -> trace = tokens * dim
    assert float(found[0]["tok_emb.weight"].trace()) == pytest.approx(3 * 2 * 16 * 64, rel=1e-4)
    # layer 1 runs twice per forward with loops on (0 1 2 1 2 3): its H sums both passes
    from pgolf.quant.hessian import HessianCollector

    w = {n: t for n, t in lay.export_state_dict().items() if t.ndim == 2}
    col = HessianCollector(w)
    with col, torch.no_grad():
        lay(batches[0][:, :-1], batches[0][:, 1:])
    assert col.calls["blocks.1.attn.c_q.weight"] == 2 * col.calls["blocks.0.attn.c_q.weight"]


@pytest.mark.parametrize("banked", [False, True])
@pytest.mark.parametrize("preset", ["r0409", "r0323"])
def test_blob_round_trip_on_a_gpt(banked, preset, compose):
    from pgolf.config import from_dict

    d = compose([f"quant={preset}"])["quant"]
    cfg = from_dict(MixedQuantConfig, d, "quant")
    cfg.validate("quant")
    cfg.keep_float_max_numel = 1024  # tiny shapes: quantize the block matrices
    cfg.level = min(cfg.level, 5)  # the format, not the compressor's effort, is under test
    m = _model(banked, **LOOPS)
    q = MixedQuant(cfg)
    if cfg.needs_calibration:
        with pytest.raises(RuntimeError, match="calibrate"):
            q.export(m.export_state_dict())
        q.calibrate(m, [torch.randint(0, 64, (2, 33)) for _ in range(2)])
    state = m.export_state_dict()
    blob = q.export(state)
    back = q.load(blob)
    # every tensor comes back, stored by role then layer (storage_order), not in the model's order
    assert list(back) == sorted(state, key=storage_order) and list(back) != list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        if "resid_mix" in k or "attn_scale" in k:  # the records ship even control tensors as fp16
            assert torch.equal(back[k], v.to(torch.float16).to(v.dtype))
    m2 = _model(banked, **LOOPS)
    m2.load_export_state_dict(back)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert abs(float(m2(x, x)) - float(m(x, x))) < 0.1
    st = q.stats
    assert st["blob_bytes"] == len(blob) and set(st["groups"]) >= {"attn", "mlp"}
    if cfg.needs_calibration:
        assert st["groups"]["mlp"]["methods"] == ["gptq/sdclip"]
    json.dumps(st)  # result.json must hold it


@pytest.mark.slow
def test_trainer_gptq_run_accounts_bytes_from_disk(gptq_run):
    run = gptq_run  # SMALL_GPTQ: 2 calibration batches, every compressor's size reported
    r = json.loads((run / "result.json").read_text())
    art = run / "artifact"
    assert r["bytes"]["model"] == (art / "final_model.ptz").stat().st_size
    assert r["bytes"]["code"] == (art / "train_gpt.py").stat().st_size
    assert r["bytes"]["total"] == r["bytes"]["model"] + r["bytes"]["code"]
    assert r["quant"]["compressor"] == "brotli" and "lzma" in r["quant"]["compressors"]
    assert r["quant"]["compressors"]["brotli"] == r["bytes"]["model"] - 5  # the blob: 5-byte header + stream
    assert r["calibration_seconds"] > 0 and r["val_bpb"] < 10


@pytest.mark.slow
def test_over_cap_gptq_run_fails_with_the_numbers(tmp_path, shard_dir, tokenizer_model):
    args = tiny_cpu_args(
        shard_dir, tokenizer_model, model="layered", quant="r0409",
        **{"model.num_layers": "2", "quant.calibration.batches": "1", "budget.artifact_bytes": "5000",
           "model.num_heads": "4", "model.num_kv_heads": "2", "model.ve_layers": "[1]",
           "train.iterations": "1", "train.prime_steps": "0"},  # the cap is checked on the artifact
    )  # fmt: skip
    p = run_cli(args, tmp_path)
    assert p.returncode != 0
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert "over the budget.artifact_bytes cap of 5,000" in r["error"]
    assert f"{r['bytes']['total']:,}" in r["error"]
    assert not (tmp_path / "run" / "artifact" / "final_model.ptz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["r0409", "int8_zlib"])
def test_plan_estimate_matches_a_real_export(preset, compose):
    """The plan's estimate is within 10% of a real export of the same config's (Gaussian) weights."""
    from pgolf.components import MODELS, QUANT
    from pgolf.config import job_config_from_dict
    from pgolf.parent.plan import estimate

    over = ["experiment=none", "model=layered", "data.vocab_size=512", "model.num_layers=2",
            "model.model_dim=256", "model.num_heads=4", "model.num_kv_heads=2", "model.ve_layers=[1]", f"quant={preset}",
            "budget.artifact_bytes=100000"]  # fmt: skip
    if preset == "r0409":
        over += ["quant.compressor=lzma", "quant.level=6"]  # brotli-11 is slow on 2 CPU cores
    job = job_config_from_dict(compose(over))
    est = estimate(job)
    torch.manual_seed(0)
    model = MODELS.build(job.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # unit variance, as the plan samples
    qcfg = job.quant
    for g in ("embed", "attn", "mlp", "other"):
        if hasattr(qcfg, g):
            getattr(qcfg, g).gptq = False
    real = len(QUANT.build(qcfg).export(model.export_state_dict()))
    assert est["model_bytes"] == pytest.approx(real, rel=0.10)
    assert est["params"] == sum(p.numel() for p in model.parameters())
    assert est["fits"] is False and est["total"] == est["model_bytes"] + est["code_bytes"]
    assert 10_000 < est["code_bytes"] < 200_000


def test_record_floor_and_per_matrix_search():
    w = _matrix("random", seed=5)  # |w| << 1: the 1/qmax floor binds on every row
    s = row_scales(w, 6, "percentile", 12.85, 99.99984, floor=True)
    assert torch.allclose(s, torch.full_like(s, 1 / 31), rtol=1e-3)
    w2 = _matrix("trained", seed=6)
    per_matrix = row_scales(w2, 6, "search", 12.85, 100.0, per_row=False)
    per_row = row_scales(w2, 6, "search", 12.85, 100.0)
    # one candidate quantile serves every row of the matrix (R0323's code) ...
    same = [
        torch.allclose(per_matrix, row_scales(w2, 6, "percentile", 12.85, 100.0 * p), rtol=1e-3)
        for p in PERCENTILE_SEARCH
    ]
    assert any(same)
    # ... while the per-row search picks several, and never does worse
    assert not torch.equal(per_matrix, per_row)
    err = lambda s: float((w2 - round_codes(w2, s, 6).float() * s[:, None]).pow(2).sum())  # noqa: E731
    assert err(per_row) <= err(per_matrix)


def test_gate_int8_and_lqer_round_trip():
    torch.manual_seed(0)
    state = {
        "blocks.0.attn.attn_gate_w": torch.randn(8, 512) * 0.01,
        "blocks.0.mlp.fc.weight": _matrix("trained", rows=512, cols=256, seed=7),
        "blocks.0.mlp.proj.weight": _matrix("trained", rows=256, cols=512, seed=8),
    }
    plain = MixedQuant(MixedQuantConfig(compressor="zlib", level=6, mlp=GroupQuant(bits=4)))
    back0 = plain.load(plain.export(state))
    assert back0["blocks.0.attn.attn_gate_w"].dtype == torch.float32
    assert torch.equal(back0["blocks.0.attn.attn_gate_w"], state["blocks.0.attn.attn_gate_w"])  # fp32 control
    cfg = MixedQuantConfig(
        compressor="zlib", level=6, mlp=GroupQuant(bits=4), gate_int8=True, lqer_rank=4, lqer_top_k=1
    )
    q = MixedQuant(cfg)
    back = q.load(q.export(state))
    g, g0 = back["blocks.0.attn.attn_gate_w"], state["blocks.0.attn.attn_gate_w"]
    assert not torch.equal(g, g0) and float((g - g0).abs().max()) <= float(g0.abs().max()) / 127 * 0.51
    (name,) = q.stats["lqer"]  # top-1 by error norm gets the correction
    assert q.stats["lqer"][name]["err_after"] < q.stats["lqer"][name]["err_before"]
    err = lambda d, k: float((d[k] - state[k]).pow(2).sum())  # noqa: E731
    assert err(back, name) < err(back0, name)
    other = next(k for k in state if "mlp" in k and k != name)
    assert torch.equal(back[other], back0[other])


def test_self_generated_calibration():
    m = _model(False)
    on = GroupQuant(gptq=True)
    cfg = MixedQuantConfig(keep_float_max_numel=1024, embed=on, attn=on, mlp=on, other=on)
    cfg.calibration.source = "self"
    cfg.calibration.self_seqs, cfg.calibration.self_seq_len, cfg.calibration.self_batch = 3, 9, 2
    q = MixedQuant(cfg)
    unused = iter(())  # the training stream is never read
    info = q.calibrate(m, unused, seed=3)
    assert info["batches"] == 2 and info["hessians"] == 4 * 6 + 1  # 4 layers x 6 matrices + tied embedding
    # 3 sequences of 9 tokens -> 24 positions: trace of the unit-RMS head input is 24 * dim
    assert float(q.hessians["tok_emb.weight"].trace()) == pytest.approx(24 * 64, rel=1e-4)
    from pgolf.quant.selfgen import sample_sequences

    a = list(sample_sequences(m, 64, 3, 9, 2, 0.8, 3, torch.device("cpu")))
    b = list(sample_sequences(m, 64, 3, 9, 2, 0.8, 3, torch.device("cpu")))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and [x.shape for x in a] == [(2, 9), (1, 9)]


def test_gptq_beats_round_to_nearest_on_a_model_hessian():
    """H collected from a GPT's own activations: GPTQ lowers the layer-output error tr(D H D^T)."""
    m = _model(False, mlp_mult=4.0)
    name = "blocks.1.mlp.proj.weight"  # input: the post-activation hidden, far from isotropic
    w = m.export_state_dict()[name].detach()
    g = torch.Generator().manual_seed(0)
    H, _ = collect_hessians(m, {name: w}, [torch.randint(0, 64, (4, 65), generator=g) for _ in range(4)])
    s = row_scales(w, 4, "sdclip", 12.85, 100.0)
    out_err = lambda q: float(
        torch.trace((w - q.float() * s[:, None]) @ H[name] @ (w - q.float() * s[:, None]).T)
    )  # noqa: E731
    assert out_err(gptq_codes(w, H[name], s, 4)) < 0.9 * out_err(round_codes(w, s, 4))


def test_storage_order_groups_each_role_across_layers():
    names = [
        "tok_emb.weight",
        "blocks.0.attn.c_q.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.10.attn.c_q.weight",
        "blocks.2.attn.c_q.weight",
        "blocks.1.mlp.fc.weight",
        "skip_weights",
    ]
    assert sorted(names, key=storage_order) == [
        "blocks.0.attn.c_q.weight",
        "blocks.2.attn.c_q.weight",
        "blocks.10.attn.c_q.weight",  # numeric layers
        "blocks.0.mlp.fc.weight",
        "blocks.1.mlp.fc.weight",
        "skip_weights",
        "tok_emb.weight",
    ]


def test_storage_order_layer_stores_layer_by_layer():
    # quant.storage_order=layer (#339's zstd-22 prefers it): the blob holds layer 0's tensors, then
    # layer 1's, ...; the loader reads the header's order, so the values come back unchanged
    gen = torch.Generator().manual_seed(0)
    state = {
        n: torch.randn(64, 64, generator=gen)
        for n in ("blocks.1.attn.c_q.weight", "blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight")
    }
    by_layer = MixedQuantConfig(keep_float_max_numel=16, compressor="zlib", level=1, storage_order="layer")
    back_layer = MixedQuant.load(MixedQuant(by_layer).export(state))
    back_role = MixedQuant.load(MixedQuant(dataclasses.replace(by_layer, storage_order="role")).export(state))
    assert (
        list(back_layer)
        == sorted(state, key=layer_order)
        == [
            "blocks.0.attn.c_q.weight",
            "blocks.0.mlp.fc.weight",
            "blocks.1.attn.c_q.weight",
        ]
    )
    assert list(back_role) == sorted(state, key=storage_order) != list(back_layer)
    assert all(torch.equal(back_layer[k], back_role[k]) for k in state)
