"""Selective +-1 pruning (quant.prune_to_fit): the fewest |q| = 1 codes, smallest
squared row scale first, that bring the real compressed blob under a decimal byte budget."""

from __future__ import annotations

import json
import lzma
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SMALL_GPTQ, run_cli, tiny_cpu_args

from pgolf.quant.config import GroupQuant, MixedQuantConfig
from pgolf.quant.gptq import round_codes, row_scales
from pgolf.quant.mixed import MixedQuant


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.c_q.weight": torch.randn(48, 64, generator=g) * 0.02,
        "blocks.0.mlp.fc.weight": torch.randn(64, 48, generator=g) * torch.linspace(0.005, 0.05, 64)[:, None],
        "blocks.0.attn_scale": torch.ones(64),
        "tok_emb.weight": torch.randn(40, 48, generator=g),
    }


def _cfg(**kw) -> MixedQuantConfig:
    g4 = GroupQuant(bits=4, clip="sdclip", sigmas=3.0)
    return MixedQuantConfig(
        compressor="lzma", level=6, keep_float_max_numel=256, embed=g4, attn=g4, mlp=g4, other=g4, **kw
    )


def _payload(blob: bytes) -> tuple[dict, bytes]:
    payload = lzma.decompress(blob[5:])
    (hlen,) = struct.unpack("<I", payload[:4])
    return json.loads(payload[4 : 4 + hlen]), payload


def _independent_order(state: dict[str, torch.Tensor], cfg: MixedQuantConfig) -> list[tuple[float, int]]:
    """(squared stored scale, offset in the codes section) of every |q| = 1 code, computed from the
    weights with the plain quantizer, in payload order; sorted stably by the scale."""
    out, offset = [], 0
    for name, w in state.items():
        if not (w.ndim == 2 and w.numel() > cfg.keep_float_max_numel):
            continue
        g = cfg.embed if "tok_emb" in name else cfg.mlp if ".mlp." in name else cfg.attn
        s = row_scales(w.float(), g.bits, g.clip, g.sigmas, g.percentile)
        q = round_codes(w.float(), s, g.bits)
        s16 = s.to(torch.float16).double()
        for r in range(q.shape[0]):
            for c in range(q.shape[1]):
                if abs(int(q[r, c])) == 1:
                    out.append((float(s16[r]) ** 2, offset + r * q.shape[1] + c))
        offset += q.numel()
    return sorted(out, key=lambda t: t[0])


@pytest.mark.parametrize("probes", [1, 3, 8])
def test_pruning_picks_the_smallest_count_that_fits_a_decimal_budget(monkeypatch, probes):
    import pgolf.quant.mixed as mixed

    monkeypatch.setattr(mixed, "PRUNE_PROBES_PER_ROUND", probes)
    state = _state()
    plain = MixedQuant(_cfg()).export(state)
    q = MixedQuant(_cfg(prune_to_fit=True))
    budget = len(plain) - 150  # bytes, decimal: no MiB anywhere
    blob = q.export(state, model_budget=budget)
    st = q.stats["prune"]
    n = st["pruned"]
    assert st["fits"] and 0 < n < st["candidates"] and len(blob) <= budget == st["budget"]
    assert st["bytes_before"] == len(plain) and st["bytes_after"] == len(blob) == q.stats["blob_bytes"]

    order = _independent_order(state, q.cfg)
    assert len(order) == st["candidates"]
    header, payload = _payload(blob)
    _, plain_payload = _payload(plain)
    start = 4 + len(json.dumps(header, separators=(",", ":")).encode())
    codes, plain_codes = payload[start:], plain_payload[start:]
    # exactly the first n codes of the independent order are zero, nothing else changed
    pruned = {off for _, off in order[:n]}
    diff = {i for i in range(header["sections"][0]) if codes[i] != plain_codes[i]}
    assert diff == pruned and all(codes[i] == 0 for i in pruned)
    assert payload[start + header["sections"][0] :] == plain_payload[start + header["sections"][0] :]
    # minimal: restoring the n-th pruned code gives a payload whose real compressed blob is over
    last = order[n - 1][1]
    one_less = bytearray(payload)
    one_less[start + last] = plain_codes[last]
    assert 5 + len(lzma.compress(bytes(one_less), preset=6)) > budget
    # and the pruned blob still loads: the pruned weights are exactly zero, the others unchanged
    w_plain, w_pruned = MixedQuant.load(plain), MixedQuant.load(blob)
    changed = sum(int((w_plain[k] != w_pruned[k]).sum()) for k in w_plain)
    assert changed == n and all((w_pruned[k][w_plain[k] != w_pruned[k]] == 0).all() for k in w_plain)


def test_pruning_is_off_by_default_and_idle_when_the_blob_fits():
    state = _state()
    assert MixedQuantConfig().prune_to_fit is False
    plain = MixedQuant(_cfg()).export(state)
    off = MixedQuant(_cfg())
    # far too small, but pruning is off: same bytes, the cap refusal is the trainer's
    assert off.export(state, model_budget=100) == plain and "prune" not in off.stats
    roomy = MixedQuant(_cfg(prune_to_fit=True))
    assert roomy.export(state, model_budget=len(plain)) == plain and "prune" not in roomy.stats


def test_pruning_that_cannot_fit_returns_the_unpruned_blob():
    state = _state()
    plain = MixedQuant(_cfg()).export(state)
    q = MixedQuant(_cfg(prune_to_fit=True))
    assert q.export(state, model_budget=200) == plain
    assert q.stats["prune"]["fits"] is False and q.stats["prune"]["pruned"] == 0


def test_prune_order_skips_gates_and_sorts_by_row_scale():
    q = MixedQuant(_cfg(prune_to_fit=True, gate_int8=True))
    state = {**_state(), "blocks.0.attn.attn_gate_w": torch.full((8, 64), 0.001)}
    header, sections = q.quantize(state)
    order = q.prune_order(sections)
    gate_idx = [i for i, e in enumerate(header["entries"]) if e[1] == "q" and e[5] == "gate"]
    assert gate_idx  # a gate was quantized, yet none of its codes are candidates
    assert len(order) == len(_independent_order(_state(), q.cfg))
    keys = np.array([k for k, _ in _independent_order(_state(), q.cfg)])
    assert np.all(np.diff(keys) >= 0)


def test_prune_flag_is_a_config_key(compose):
    from pgolf.config import job_config_from_dict

    cfg = compose(["quant=r0409", "quant.prune_to_fit=true"])
    assert job_config_from_dict(cfg).quant.prune_to_fit is True


@pytest.mark.slow
def test_trainer_prunes_to_a_decimal_cap_and_the_packed_script_reproduces(
    gptq_run, tmp_path, shard_dir, tokenizer_model
):
    """A real run: the code is written first, the blob is pruned to cap - code bytes, the log and
    result.json say how many codes went, and the packed script (brotli codec) reruns it exactly."""
    fit = json.loads((gptq_run / "result.json").read_text())  # SMALL_GPTQ within the 16 MB cap
    assert "prune" not in fit["quant"]  # on in r0409, idle when the artifact fits
    cap = fit["bytes"]["total"] - 300
    args = tiny_cpu_args(shard_dir, tokenizer_model, **SMALL_GPTQ, **{"budget.artifact_bytes": str(cap)})
    second = run_cli(args, tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    run = tmp_path / "b" / "run"
    r = json.loads((run / "result.json").read_text())
    prune = r["quant"]["prune"]
    assert r["bytes"]["total"] <= cap == r["bytes"]["cap"]
    assert prune["fits"] and prune["pruned"] > 0 and prune["budget"] == cap - r["bytes"]["code"]
    assert prune["bytes_after"] == r["bytes"]["model"] < prune["bytes_before"] == fit["bytes"]["model"]
    assert f"quant: pruned {prune['pruned']:,} of" in (run / "train.log").read_text()
    assert "brotli" in (run / "artifact" / "train_gpt.py").read_text(encoding="utf-8")
    cli = subprocess.run(
        [sys.executable, "-m", "pgolf.pack", str(run), "--out", str(tmp_path / "sub"), "--verify"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "verified: the packed script reproduces" in cli.stdout
