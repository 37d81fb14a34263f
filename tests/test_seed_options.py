"""The options the seed experiments added (issue 15), each against an independent computation:
backout layer, the bigram projection's optimizer and init, PR #339's init order, SWA as PR #339
runs it, row-max and the records' int8 rounding, lzma extreme, PR #726's loader seed and shard
weights, and TTT's freeze of bank slices."""

from __future__ import annotations

import lzma
import math

import numpy as np
import pytest
import torch
from test_loaders import SIZES, CoprimeReference, T, data_cfg, expected_rows, run
from test_loaders import files as files  # noqa: F401  (module fixture reused here)

from pgolf.data.loader import build_loader
from pgolf.models.config import BankedGPTConfig, LayeredGPTConfig
from pgolf.models.gpt import GPT
from pgolf.optim.averaging import WeightAverager
from pgolf.optim.config import MuonConfig
from pgolf.optim.muon import OptimizerBundle
from pgolf.optim.schedules import lr_scale
from pgolf.quant.compress import compressor
from pgolf.quant.config import GroupQuant, MixedQuantConfig
from pgolf.quant.gptq import clip_then_round, round_codes, row_scales
from pgolf.registry import ConfigError

CPU = torch.device("cpu")


def tiny_layered(**kw) -> GPT:
    torch.manual_seed(0)
    args = dict(
        vocab_size=64,
        num_layers=5,
        model_dim=64,
        num_heads=2,
        num_kv_heads=1,
        mlp_mult=2.0,
        unet_skips=True,
        resid_mix=True,
        ortho_init=True,
        logit_softcap=30.0,
        bigram_vocab_size=32,
        bigram_dim=16,
        smear_gate="v2",
    )
    return GPT(LayeredGPTConfig(**{**args, **kw}), banked=False).eval()


# ---------------------------------------------------------------------------------------------
# backout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,block", [(-1, 1), (3, 2)])
def test_backout_subtracts_the_stream_after_the_named_block(layer, block):
    """backout_layer counts executed layers; PR #339's code takes h_mid after block index L // 2,
    which is backout_layer = L // 2 + 1 (with L = 5: block 2 -> 3; the default -1 is block 1)."""
    model = tiny_layered(backout=True, backout_layer=layer, backout_lambda_init=0.7)
    with torch.no_grad():  # away from the init, where zero projections make every block the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.backout_lambda.fill_(0.7)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda m, a, out, i=i: outs.__setitem__(i, out))
        for i, b in enumerate(model.blocks)
    ]
    with torch.no_grad():
        got = model._hidden(ids)
    for h in hooks:
        h.remove()
    final = outs[len(model.blocks) - 1]
    ref = torch.nn.functional.rms_norm(final - 0.7 * outs[block], (final.size(-1),))
    torch.testing.assert_close(got, ref)
    other = torch.nn.functional.rms_norm(final - 0.7 * outs[block - 1], (final.size(-1),))
    assert not torch.allclose(got, other)  # one layer off is a different function


# ---------------------------------------------------------------------------------------------
# bigram projection: optimizer role and init scale
# ---------------------------------------------------------------------------------------------


def test_bigram_proj_muon_routes_the_projection_to_muon():
    for on in (False, True):
        model = tiny_layered(bigram_proj_muon=on)
        groups = {role: [n for n, _ in ps] for role, ps in model.param_groups().items()}
        assert ("bigram.proj.weight" in groups["matrix"]) is on
        assert ("bigram.proj.weight" in groups["scalar"]) is not on
        bundle = OptimizerBundle(model, MuonConfig(), CPU, compile_ns=False)
        in_muon = any(p is model.bigram.proj.weight for p in bundle.muon.params)
        in_adam = any(
            p is model.bigram.proj.weight for o in bundle.adams for g in o.param_groups for p in g["params"]
        )
        assert (in_muon, in_adam) == (on, not on)


def test_bigram_proj_muon_needs_the_per_layer_layout():
    with pytest.raises(ConfigError, match="bigram_proj_muon"):
        BankedGPTConfig(bigram_proj_muon=True, bigram_vocab_size=32).validate("model")


def test_bigram_proj_scaled_init_is_orthogonal_over_sqrt_2l():
    shape = dict(model_dim=128, bigram_dim=64)  # OrthoInit needs both dims >= 64
    w_plain = tiny_layered(**shape).bigram.proj.weight.detach().double()  # (128, 64): orthonormal columns
    w = tiny_layered(bigram_proj_scaled_init=True, **shape).bigram.proj.weight.detach().double()
    eye = torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(w_plain.T @ w_plain, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.T @ w, eye / (2 * 5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# init_rng_order=construction: PR #339's order of random draws
# ---------------------------------------------------------------------------------------------


def pr339_init_replay(seed: int, L: int, V: int, dim: int, kv_dim: int, hidden: int, bigram: tuple[int, int]):
    """PR #339's GPT construction and `_init_weights`, written out: every nn.Embedding / nn.Linear
    draws its default init when constructed (tok_emb, bigram table and projection, then per block
    c_q, c_k, c_v, proj, fc, proj), then tok_emb ~ N(0, 0.005^2) and one pass in module order:
    `_zero_init` linears (the block projections) zero, the rest orthogonal, `*.proj` times 1/sqrt(2L).
    The bigram table and projection are zeroed by their constructor, so the projection's draw only
    moves the RNG before the pass re-draws it. Returns the drawn matrices by parameter name."""
    torch.manual_seed(seed)
    nn = torch.nn
    w = {"tok_emb.weight": nn.Embedding(V, dim).weight}
    nn.init.zeros_(nn.Embedding(*bigram).weight)
    w["bigram.proj.weight"] = nn.Linear(bigram[1], dim, bias=False).weight
    shapes = {"attn.c_q": (dim, dim), "attn.c_k": (dim, kv_dim), "attn.c_v": (dim, kv_dim)}
    shapes |= {"attn.proj": (dim, dim), "mlp.fc": (dim, hidden), "mlp.proj": (hidden, dim)}
    for i in range(L):
        for name, (n_in, n_out) in shapes.items():
            w[f"blocks.{i}.{name}.weight"] = nn.Linear(n_in, n_out, bias=False).weight
    with torch.no_grad():
        nn.init.normal_(w["tok_emb.weight"], std=0.005)
        for name, t in w.items():  # insertion order is the script's named_modules() order
            if name == "tok_emb.weight":
                continue
            if name.startswith("blocks.") and name.endswith(".proj.weight"):
                nn.init.zeros_(t)
            else:
                nn.init.orthogonal_(t, gain=1.0)
                if name.endswith(".proj.weight"):
                    t.mul_(1.0 / math.sqrt(2 * L))
    return w


def test_construction_init_order_gives_pr339s_weights_from_the_same_seed():
    # dims >= 64 everywhere (kv 64, bigram projection 64 -> 128), so every matrix is drawn orthogonal
    shape = dict(model_dim=128, num_heads=2, num_kv_heads=1, bigram_dim=64, bigram_proj_scaled_init=True)
    want = pr339_init_replay(0, L=5, V=64, dim=128, kv_dim=64, hidden=256, bigram=(32, 64))
    model = tiny_layered(init_rng_order="construction", **shape)
    got = dict(model.named_parameters())
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    # every other parameter is a constant (ones, zeros, the init scalars): no draw to compare
    assert torch.equal(got["bigram.embed.weight"], torch.zeros(32, 64))
    # the default order draws the same distributions in another order: other values, same seed
    fixed = dict(tiny_layered(**shape).named_parameters())
    assert not torch.equal(fixed["blocks.0.attn.c_q.weight"], want["blocks.0.attn.c_q.weight"])
    assert not torch.equal(fixed["tok_emb.weight"], want["tok_emb.weight"])


def test_construction_init_order_needs_the_per_layer_layout():
    with pytest.raises(ConfigError, match="init_rng_order"):
        BankedGPTConfig(init_rng_order="construction").validate("model")


# ---------------------------------------------------------------------------------------------
# SWA as PR #339 runs it
# ---------------------------------------------------------------------------------------------


def test_swa_every_200_below_half_matches_pr339_schedule():
    """Steps mode, 1000 iterations, warmdown 600: PR #339 steps, then `step += 1` and snapshots when
    scale < 0.5 and step % 200 == 0, with the scale of the step just taken."""
    cfg = MuonConfig(warmdown_iters=600, swa_every=200, swa_threshold=0.5)
    p = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.p = p
    avg = WeightAverager(model, cfg)
    iterations, snaps = 1000, []
    for step in range(iterations):
        with torch.no_grad():
            p.fill_(float(step + 1))  # the weights after optimizer step `step`
        # PR #339's lr_mul without a wallclock cap, written out
        start = iterations - 600
        scale = (iterations - step) / 600 if start <= step < iterations else 1.0
        assert lr_scale(cfg, step, 0.0, iterations, None) == pytest.approx(scale)
        avg.update(step, lr_scale(cfg, step, 0.0, iterations, None))
        if scale < 0.5 and (step + 1) % 200 == 0:
            snaps.append(step + 1)
    assert snaps == [800, 1000]
    assert avg.count == 2 and avg.first_step == 800
    torch.testing.assert_close(avg.averaged()[0], torch.full((3,), float(np.mean(snaps))))


# ---------------------------------------------------------------------------------------------
# export: row-max int6, the records' int8 rounding, lzma extreme
# ---------------------------------------------------------------------------------------------


def weights(rows=24, cols=96, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 5] = 0.4  # an outlier row
    w[7] = 0.0  # an all-zero row (the floor decides its step)
    return w


def test_rowmax_int6_matches_the_records_formula():
    w = weights()
    s = row_scales(w, 6, "rowmax", 0.0, 50.0, floor=True)  # the percentile is not used
    q = round_codes(w, s, 6)
    ref_s = (w.abs().amax(dim=1) / 31.0).clamp_min(1.0 / 31.0).to(torch.float16)
    ref_q = torch.clamp(torch.round(w / ref_s.float()[:, None]), -32, 31).to(torch.int8)
    assert torch.equal(s, ref_s.float()) and torch.equal(q, ref_q)


def records_int8(t: torch.Tensor, q: float = 0.9999984) -> tuple[torch.Tensor, torch.Tensor]:
    clip = torch.quantile(t.abs(), q, dim=1)
    clipped = torch.maximum(torch.minimum(t, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    return torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8), scale.to(
        torch.float16
    )


def test_clip_then_round_matches_the_records_int8_and_plain_rounding_does_not():
    w = weights(rows=40, cols=512, seed=3) * 40  # rows with clips around 1: floor and clamp both bite
    codes, s = clip_then_round(w, 8, 99.99984, floor=True)
    ref_q, ref_s = records_int8(w)
    assert torch.equal(codes, ref_q) and torch.equal(s, ref_s.float())
    plain = round_codes(w, row_scales(w, 8, "percentile", 0.0, 99.99984, floor=True), 8)
    assert not torch.equal(plain, ref_q)  # without the clamp the outliers round past the clip


def test_clip_then_round_is_only_for_percentile_without_gptq():
    GroupQuant(clip="percentile", clip_then_round=True).validate("q")
    for bad in (
        GroupQuant(clip="search", clip_then_round=True),
        GroupQuant(clip="percentile", gptq=True, clip_then_round=True),
    ):
        with pytest.raises(ConfigError, match="clip_then_round"):
            bad.validate("quant.embed")


def test_lzma_extreme_is_preset_9_extreme():
    data = bytes(np.random.default_rng(0).integers(0, 8, 200_000, dtype=np.uint8))
    comp, decomp = compressor("lzma", 9, extreme=True)
    blob = comp(data)
    assert blob == lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    assert decomp(blob) == data
    with pytest.raises(ConfigError, match="lzma_extreme"):
        MixedQuantConfig(compressor="zstd", level=22, lzma_extreme=True).validate("quant")


# ---------------------------------------------------------------------------------------------
# PR #726's loader: seed from the paths, run-out shards weighed as fresh
# ---------------------------------------------------------------------------------------------


def fnv(text: str) -> int:
    h = 1469598103934665603
    for b in text.encode():
        h = ((h ^ b) * 1099511628211) % 2**64
    return h


class Pr726Reference(CoprimeReference):
    """CoprimeReference with PR #726's seed (hash of pattern, paths, token counts) and its weight of
    a shard whose cursor ran out (its fresh block count, not 1)."""

    def __init__(self, pattern: str, paths: list[str], *args):
        super().__init__(*args)
        seed = fnv(pattern)
        for path, n in zip(paths, self.sizes):
            seed ^= fnv(path)
            seed ^= (n * 0x9E3779B97F4A7C15) % 2**64
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def plan(self, gns):
        # a run-out queue (empty list) weighs its fresh count: hide it from the parent's `max(len, 1)`
        for si in [s for s, q in self.queue.items() if not q]:
            del self.queue[si]
        return super().plan(gns)


@pytest.mark.parametrize("world", [1, 2])
def test_coprime_paths_seed_and_fresh_weights_match_pr726(files, world):  # noqa: F811
    folder = str(files[0].parent)
    pattern = f"{folder}/fineweb_train_*.bin"
    paths = [f"{folder}/{f.name}" for f in files]
    rows, n = 5, 40  # 40 x 5 x world windows: several cursors run out and are redrawn
    ref = Pr726Reference(pattern, paths, SIZES, 123, world, 10, 2, 4, 0.9, 0.5, [f.name for f in files])
    plans = [ref.plan(rows * world) for _ in range(n)]
    extra = dict(
        coprime_seed="paths", coprime_exhausted="fresh", path=folder, train_pattern="fineweb_train_*.bin"
    )
    for rank in range(world):
        got = run("coprime", files, n, seed=7, rank=rank, world=world, rows=rows, **extra)
        for (x, y), plan in zip(got, plans):
            ex, ey = expected_rows(plan[rank::world])
            assert torch.equal(x, ex) and torch.equal(y, ey)
    # the run seed plays no part in PR #726's plan; the default seeding differs from it
    assert all(
        torch.equal(a, b)
        for u, v in zip(
            got, run("coprime", files, n, seed=8, rank=world - 1, world=world, rows=rows, **extra)
        )
        for a, b in zip(u, v)
    )
    default = run("coprime", files, n, seed=7, rank=world - 1, world=world, rows=rows)
    assert not all(torch.equal(u[0], v[0]) for u, v in zip(got, default))


def test_fresh_weights_change_the_plan_once_a_cursor_runs_out(files, monkeypatch):  # noqa: F811
    """Both settings draw the same plan until a batch is drawn while a cursor stands run out, then
    they part. The paths seed hashes the path strings, so the shards are named relative to their
    folder: under pytest's numbered tmp folder the plan, and when a cursor first runs out, would
    change with the folder's name (and so with which tests ran before)."""
    monkeypatch.chdir(files[0].parent)
    base = dict(coprime_seed="paths", path=".", train_pattern="fineweb_train_*.bin")
    plans: dict[str, list[torch.Tensor]] = {}
    run_out: dict[str, list[bool]] = {}
    for exhausted in ("one", "fresh"):
        cfg = data_cfg("coprime", coprime_exhausted=exhausted, **base)
        plans[exhausted], run_out[exhausted] = [], []
        with build_loader(cfg, files, seed=0, rank=0, world_size=1, device=CPU) as loader:
            for _ in range(60):
                state = loader.state_dict()["sampler"]
                cursor = zip(state["live"], state["cursor"]["taken"], state["cursor"]["blocks"])
                run_out[exhausted].append(any(live and taken >= blocks for live, taken, blocks in cursor))
                plans[exhausted].append(loader.next_batch(5 * T, T, 1)[0].clone())
    assert any(run_out["one"]), "no cursor ran out: draw more batches"
    first = run_out["one"].index(True)  # the first batch drawn while a cursor stands run out
    assert first > 0 and run_out["fresh"].index(True) == first
    assert all(torch.equal(a, b) for a, b in zip(plans["one"][:first], plans["fresh"][:first]))
    assert not all(torch.equal(a, b) for a, b in zip(plans["one"][first:], plans["fresh"][first:]))


# ---------------------------------------------------------------------------------------------
# TTT: freeze_bank_slices
# ---------------------------------------------------------------------------------------------


def test_freeze_without_bank_slices_trains_the_frozen_layers_matrices():
    from pgolf.ttt.score_first import trainable

    torch.manual_seed(0)
    cfg = BankedGPTConfig(
        vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0
    )
    model = GPT(cfg, banked=True)
    own = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1.")))
    total = sum(p.numel() for p in model.parameters())
    params, masks = trainable(model, 2, bank_slices=False)
    assert not masks and sum(p.numel() for p in params) == total - own
    params, masks = trainable(model, 2, bank_slices=True)
    qo = masks[model.qo_bank].flatten().tolist()  # slots: q of layers 0..3, then o of layers 0..3
    assert qo == [0, 0, 1, 1, 0, 0, 1, 1]
    assert math.isclose(sum(p.numel() for p in params), total - own)


def test_swa_in_param_dtype_sums_bf16_in_bf16_and_needs_two_snapshots():
    """PR #339: `swa_state[name] += t` on the state dict as stored (bf16 tables stay bf16), then
    `(t / count).to(dtype)`, applied only when count > 1."""
    model = torch.nn.Module()
    model.table = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    model.vec = torch.nn.Parameter(torch.zeros(64))
    cfg = MuonConfig(swa_every=1, swa_threshold=1.0, swa_accumulate="param", swa_min_snapshots=2)
    avg = WeightAverager(model, cfg)
    g = torch.Generator().manual_seed(0)
    snaps = [torch.randn(64, generator=g) for _ in range(3)]
    ref_t, ref_v = None, None
    for k, x in enumerate(snaps):
        with torch.no_grad():
            model.table.copy_(x.to(torch.bfloat16))
            model.vec.copy_(x)
        ref_t = model.table.detach().clone() if ref_t is None else ref_t + model.table.detach()
        ref_v = model.vec.detach().clone() if ref_v is None else ref_v + model.vec.detach()
        avg.update(k, 0.5)
        if k == 0:  # one snapshot: below the minimum, nothing to apply
            assert avg.averaged() is None and not avg.summary()["applied"]
    assert "mean of 3 snapshots" in avg.apply()
    assert model.table.dtype == torch.bfloat16
    assert torch.equal(model.table.detach(), (ref_t / 3).to(torch.bfloat16))
    torch.testing.assert_close(model.vec.detach(), ref_v / 3)
    # summing in fp32 instead gives other bf16 values on some entries: the option matters
    fp32_mean = sum(s.to(torch.bfloat16).float() for s in snaps) / 3
    assert not torch.equal(fp32_mean.to(torch.bfloat16), model.table.detach())
