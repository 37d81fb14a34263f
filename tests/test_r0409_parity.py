"""bench/models_r0409.sh hands the record script and pgolf the same recipe, setting by setting.

The bench script is sourced with a stand-in `timeout` on PATH that records, for each command it
would have run, its arguments and environment. The record's effective hyperparameters are its
defaults (RECORD_DEFAULTS, from the decoded script's Hyperparameters class) overlaid with the
environment the script hands it; pgolf's are the config composed from the pgolf command line.
Every record setting that has a pgolf key must agree, and so must what the record does without a
knob (its loader, Nesterov, the quintic NS, its init and block layout). The first run of the
benchmark (EQUALIZE=0) trained pgolf on the sequential stream while the record shuffled; the
loader row below is what catches that.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "bench" / "models_r0409.sh"

# The decoded record's Hyperparameters defaults for every setting compared below.
RECORD_DEFAULTS = {
    "SEED": "1337",
    "ITERATIONS": "20000",
    "WARMDOWN_FRAC": "0.72",
    "WARMUP_STEPS": "20",
    "TRAIN_BATCH_TOKENS": "786432",
    "TRAIN_SEQ_LEN": "2048",
    "VOCAB_SIZE": "8192",
    "NUM_LAYERS": "11",
    "XSA_LAST_N": "11",
    "MODEL_DIM": "512",
    "NUM_KV_HEADS": "4",
    "NUM_HEADS": "8",
    "MLP_MULT": "4.0",
    "SKIP_GATES_ENABLED": "1",
    "TIE_EMBEDDINGS": "1",
    "LOGIT_SOFTCAP": "30.0",
    "ROPE_BASE": "10000.0",
    "ROPE_DIMS": "16",
    "ROPE_TRAIN_SEQ_LEN": "2048",
    "LN_SCALE": "1",
    "QK_GAIN_INIT": "5.0",
    "NUM_LOOPS": "2",
    "LOOP_START": "3",
    "LOOP_END": "5",
    "ENABLE_LOOPING_AT": "0.35",
    "PARALLEL_RESIDUAL_START": "7",
    "MIN_LR": "0.0",
    "TIED_EMBED_LR": "0.03",
    "TIED_EMBED_INIT_STD": "0.005",
    "MATRIX_LR": "0.022",
    "SCALAR_LR": "0.02",
    "MUON_MOMENTUM": "0.99",
    "MUON_BACKEND_STEPS": "5",
    "MUON_MOMENTUM_WARMUP_START": "0.92",
    "MUON_MOMENTUM_WARMUP_STEPS": "1500",
    "MUON_ROW_NORMALIZE": "1",
    "BETA1": "0.9",
    "BETA2": "0.95",
    "ADAM_EPS": "1e-08",
    "GRAD_CLIP_NORM": "0.3",
    "ADAM_WD": "0.02",
    "MUON_WD": "0.095",
    "EMBED_WD": "0.085",
    "EMA_DECAY": "0.9965",
    "MAX_WALLCLOCK_SECONDS": "600",
}
FLAG, INT, FLOAT = (lambda v: bool(int(v))), int, float
# record variable -> (pgolf key, how the record parses it)
MAPPING = {
    "ITERATIONS": ("train.iterations", INT),
    "WARMDOWN_FRAC": ("optimizer.warmdown_frac", FLOAT),
    "WARMUP_STEPS": ("train.prime_steps", INT),  # both discard these steps and restore the init
    "TRAIN_BATCH_TOKENS": ("train.batch_tokens", INT),
    "TRAIN_SEQ_LEN": ("train.seq_len", INT),
    "VOCAB_SIZE": ("data.vocab_size", INT),
    "NUM_LAYERS": ("model.num_layers", INT),
    "XSA_LAST_N": ("model.xsa_last_n", INT),
    "MODEL_DIM": ("model.model_dim", INT),
    "NUM_KV_HEADS": ("model.num_kv_heads", INT),
    "NUM_HEADS": ("model.num_heads", INT),
    "MLP_MULT": ("model.mlp_mult", FLOAT),
    "SKIP_GATES_ENABLED": ("model.skip_gates_enabled", FLAG),
    "TIE_EMBEDDINGS": ("model.tie_embeddings", FLAG),
    "LOGIT_SOFTCAP": ("model.logit_softcap", FLOAT),
    "ROPE_BASE": ("model.rope_base", FLOAT),
    "ROPE_DIMS": ("model.rope_dims", INT),
    "ROPE_TRAIN_SEQ_LEN": ("model.rope_train_seq_len", INT),
    "LN_SCALE": ("model.ln_scale", FLAG),
    "QK_GAIN_INIT": ("model.qk_gain_init", FLOAT),
    "NUM_LOOPS": ("model.num_loops", INT),
    "LOOP_START": ("model.loop_start", INT),
    "LOOP_END": ("model.loop_end", INT),
    "ENABLE_LOOPING_AT": ("model.enable_looping_at", FLOAT),
    "PARALLEL_RESIDUAL_START": ("model.parallel_start_layer", INT),
    "MIN_LR": ("optimizer.min_lr", FLOAT),
    "TIED_EMBED_LR": ("optimizer.tied_embed_lr", FLOAT),
    "TIED_EMBED_INIT_STD": ("model.tied_embed_init_std", FLOAT),
    "MATRIX_LR": ("optimizer.matrix_lr", FLOAT),
    "SCALAR_LR": ("optimizer.scalar_lr", FLOAT),
    "MUON_MOMENTUM": ("optimizer.muon_momentum", FLOAT),
    "MUON_BACKEND_STEPS": ("optimizer.muon_backend_steps", INT),
    "MUON_MOMENTUM_WARMUP_START": ("optimizer.muon_momentum_warmup_start", FLOAT),
    "MUON_MOMENTUM_WARMUP_STEPS": ("optimizer.muon_momentum_warmup_steps", INT),
    "MUON_ROW_NORMALIZE": ("optimizer.row_normalize", FLAG),
    "BETA1": ("optimizer.beta1", FLOAT),
    "BETA2": ("optimizer.beta2", FLOAT),
    "ADAM_EPS": ("optimizer.adam_eps", FLOAT),
    "GRAD_CLIP_NORM": ("optimizer.grad_clip_norm", FLOAT),
    "ADAM_WD": ("optimizer.scalar_wd", FLOAT),
    "MUON_WD": ("optimizer.muon_wd", FLOAT),
    "EMBED_WD": ("optimizer.embed_wd", FLOAT),
    "EMA_DECAY": ("optimizer.ema_decay", FLOAT),
}
# What the record does with no knob, as pgolf keys.
RECORD_FIXED = {
    "data.loader": "shuffled",  # ShuffledSequenceLoader
    "model.activation": "leaky_relu2",
    "model.negative_slope": 0.5,
    "model.parallel_residual": "gptj",
    "model.resid_mix": True,
    "model.unet_skips": True,
    "model.ortho_init": True,
    "model.zero_init_proj": True,
    "model.bigram_vocab_size": 0,
    "model.ve_enabled": False,
    "model.smear_gate": "none",
    "optimizer.muon_nesterov": True,
    "optimizer.ns_coeffs": "quintic",
    "optimizer.head_wd": 0.0,
    "optimizer.wd_taper_start_frac": 1.0,
    "optimizer.swa_every": 0,
    "optimizer.late_qat_threshold": 0.0,
    "train.grad_accum_base": 8,
}
RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS_FILE"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
"""


def bench_calls(tmp_path, equalize: str) -> tuple[dict, list[str]]:
    """(environment handed to the record, pgolf's overrides) for one EQUALIZE setting."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "timeout").write_text(RECORDER)
    (fake / "timeout").chmod((fake / "timeout").stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.jsonl"
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        CALLS_FILE=str(calls),
        EQUALIZE=equalize,
        OUT=str(tmp_path / "out"),
        DATA=str(tmp_path / "data"),
        TOK=str(tmp_path / "tok.model"),
        REF_WORK=str(tmp_path / "ref_work"),
    )
    subprocess.run(
        ["bash", "-c", f'source "{SCRIPT}" && run_reference && pgolf_cmd'],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    ref, pg = [json.loads(line) for line in calls.read_text().splitlines()]
    assert ref["argv"][1] == "torchrun" and pg["argv"][1:4] == ["python3", "-m", "pgolf.run"]
    return ref["env"], pg["argv"][4:]


def get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("equalize", ["0", "1"])
def test_bench_hands_both_sides_the_same_recipe(tmp_path, compose, equalize):
    ref_env, overrides = bench_calls(tmp_path, equalize)
    record = {k: ref_env.get(k, v) for k, v in RECORD_DEFAULTS.items()}
    cfg = compose(overrides)
    diffs = []
    for var, (key, parse) in MAPPING.items():
        want, got = parse(record[var]), get(cfg, key)
        if (got != pytest.approx(want)) if isinstance(want, float) else got != want:
            diffs.append(f"{var}={record[var]} vs {key}={got!r}")
    for key, want in RECORD_FIXED.items():
        if get(cfg, key) != want:
            diffs.append(f"record: {key}={want!r}, pgolf: {get(cfg, key)!r}")
    if float(record["MAX_WALLCLOCK_SECONDS"]) <= 0 and cfg["budget"]["mode"] != "steps":
        diffs.append(
            f"record counts steps (MAX_WALLCLOCK_SECONDS=0), pgolf budget.mode={cfg['budget']['mode']}"
        )
    assert not diffs, "record vs pgolf:\n" + "\n".join(diffs)
    # Same batches: the record seeds its loader's RNG with the rank alone, pgolf with (seed, rank).
    record_rng = np.random.Generator(np.random.PCG64(int(ref_env.get("RANK", "0"))))
    pgolf_rng = np.random.Generator(np.random.PCG64([cfg["seed"], 0]))
    assert record_rng.integers(2**62, size=4).tolist() == pgolf_rng.integers(2**62, size=4).tolist()


def test_r0409_preset_trains_on_the_records_loader(compose):
    """experiment=r0409 (the 8-GPU record recipe) uses the shuffled loader, as the record does."""
    assert compose(["experiment=r0409"])["data"]["loader"] == "shuffled"


# ------------------------------------------------------------------------------------------------
# The record script itself on CPU: same init -> same forward -> same optimizer steps
# ------------------------------------------------------------------------------------------------
# The record's script is public code that pgolf never ships or downloads (CI has no network but
# the package registries), so these tests run only where someone has put it.
RECORD_MISSING = (
    "needs the 2026-04-09 record's training script, which pgolf does not ship: take openai/"
    "parameter-golf's records/track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT/"
    "train_gpt.py (as published: its lzma/base85 wrapper is decoded on import; PR #1532's script, the "
    "same but for its loader, does too), save it as "
    ".bench/ref/r0409_train_gpt.py or .refs/r0409/train_gpt.py (or set PGOLF_R0409_SCRIPT to its path) and run "
    "`python -m pytest tests/test_r0409_parity.py` (CPU, about a minute; no GPU needed)"
)


def record_script() -> Path | None:
    """$PGOLF_R0409_SCRIPT, else ref/r0409_train_gpt.py under REPO/.bench (as on the bench machines)
    or $PGOLF_BENCH_DIR, else .refs/r0409/train_gpt.py (where bench/seeds.sh keeps the seed scripts)."""
    candidates = [Path(os.environ["PGOLF_R0409_SCRIPT"])] if os.environ.get("PGOLF_R0409_SCRIPT") else []
    candidates += [REPO / ".bench" / "ref" / "r0409_train_gpt.py"]
    if os.environ.get("PGOLF_BENCH_DIR"):
        candidates.append(Path(os.environ["PGOLF_BENCH_DIR"]) / "ref" / "r0409_train_gpt.py")
    candidates.append(REPO / ".refs" / "r0409" / "train_gpt.py")
    return next((p for p in candidates if p.is_file()), None)


# The record's stack on tiny shapes: 6 layers, layers 2-3 looped twice more, GPT-J from layer 4.
TINY_ENV = dict(
    VOCAB_SIZE="64", NUM_LAYERS="6", MODEL_DIM="64", EMBEDDING_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    MLP_MULT="4", XSA_LAST_N="6", QK_GAIN_INIT="5.25", ROPE_DIMS="8", TRAIN_SEQ_LEN="16",
    ROPE_TRAIN_SEQ_LEN="16", NUM_LOOPS="2", LOOP_START="2", LOOP_END="3", PARALLEL_RESIDUAL_START="4",
    SEED="1337", ITERATIONS="6",
)  # fmt: skip


def cpu_fa3(q, k, v, causal=True, **_):
    """FA3's (B, T, H, D) interface on CPU SDPA (the shim asks for GPU kernels)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


@pytest.fixture
def record(monkeypatch):
    script = record_script()
    if script is None:
        pytest.skip(RECORD_MISSING)
    for k, v in TINY_ENV.items():
        monkeypatch.setenv(k, v)
    # The record imports FlashAttention-3's module at the top; CPU SDPA stands in for it.
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_func = cpu_fa3
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from r0409_init import load_record

    mod = load_record(script)
    mod.flash_attn_3_func = cpu_fa3
    ns = mod.zeropower_via_newtonschulz5  # @torch.compile'd in the record; its plain function on CPU
    mod.zeropower_via_newtonschulz5 = getattr(ns, "_torchdynamo_orig_callable", ns)
    return mod


def exact_rope_tables(rec) -> None:
    """The record's RoPE with fp32 inv_freq and positions, as pgolf computes it. The record's own
    `inv_freq` buffer is cast to bf16 by its `model.bfloat16()` (restore_fp32_params skips buffers),
    and its positions are then `arange(T, dtype=bf16)`: rounded to even numbers past 256, to
    multiples of 8 past 1024. That difference is documented in docs/models.md and kept out of here."""
    for block in rec.blocks:
        rot = block.attn.rotary
        rd = rot.rope_dims
        rot.inv_freq = 1.0 / rot.base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
        rot._cos_cached = rot._sin_cached = None


def twin_config(mod, rope_table_dtype: str = "float32", init_rng_order: str = "fixed"):
    """pgolf's layered model config with the record's shape and stack."""
    from pgolf.models.config import LayeredGPTConfig

    h = mod.Hyperparameters()
    cfg = LayeredGPTConfig(
        vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim, num_heads=h.num_heads,
        num_kv_heads=h.num_kv_heads, mlp_mult=h.mlp_mult, activation="leaky_relu2", negative_slope=0.5,
        logit_softcap=h.logit_softcap, rope_dims=h.rope_dims, rope_train_seq_len=h.rope_train_seq_len,
        xsa_last_n=h.xsa_last_n, qk_gain_init=h.qk_gain_init, ln_scale=True, resid_mix=True, unet_skips=True,
        skip_gates_enabled=True, parallel_residual="gptj", parallel_start_layer=h.parallel_residual_start,
        num_loops=h.num_loops, loop_start=h.loop_start, loop_end=h.loop_end,
        enable_looping_at=h.enable_looping_at, ortho_init=True, zero_init_proj=True,
        tied_embed_init_std=h.tied_embed_init_std, rope_table_dtype=rope_table_dtype,
        init_rng_order=init_rng_order,
    )  # fmt: skip
    cfg.validate("model")
    return cfg


def pgolf_twin(tmp_path, mod, rec_model, rope_table_dtype: str = "float32"):
    """pgolf's layered model with the record's shape, loaded with the record's weights via init_from."""
    from pgolf.models import attention
    from pgolf.models.convert import load_into
    from pgolf.models.gpt import GPT

    attention._BACKEND, attention._FN = None, None
    cfg = twin_config(mod, rope_table_dtype)
    torch.save(rec_model.state_dict(), tmp_path / "init.pt")
    model = GPT(cfg, banked=False)
    load_into(model, tmp_path / "init.pt", "layered")
    return model


def test_construction_rng_order_draws_the_records_init(record):
    """model.init_rng_order=construction (set by experiment=pr1532, whose model is this record's):
    seeded as the record seeds, pgolf's model holds the record's own init, value for value; the
    default order draws other weights from the same seed."""
    from r0409_init import record_init

    from pgolf.models.gpt import GPT
    from pgolf.models.layers import restore_fp32_params

    theirs = dict(record_init(record).named_parameters())
    for order in ("construction", "fixed"):
        torch.manual_seed(record.Hyperparameters().seed)
        model = GPT(twin_config(record, init_rng_order=order), banked=False).bfloat16()
        restore_fp32_params(model)
        ours = dict(model.named_parameters())
        assert ours.keys() == theirs.keys()
        differ = [n for n, p in theirs.items() if not (p.dtype == ours[n].dtype and torch.equal(p, ours[n]))]
        if order == "construction":
            assert not differ, differ
        else:
            assert "tok_emb.weight" in differ


@pytest.mark.slow
def test_bf16_rope_tables_reproduce_the_records_own(tmp_path, record):
    """`model.rope_table_dtype=bfloat16` (the sp8192_recur preset) gives the record's RoPE as it
    really runs, cast buffer and rounded positions included: logits to 1e-5 over 2 x 300 tokens
    (past 256, where bf16 positions round), loops off and on. fp32 tables must differ there."""
    from r0409_init import record_init

    rec = record_init(record)
    assert rec.blocks[0].attn.rotary.inv_freq.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in rec.named_parameters():
            base = 1.0 if name.endswith(("attn_scale", "mlp_scale")) else 5.25 if "q_gain" in name else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g) + 0.01)
    ours = pgolf_twin(tmp_path, record, rec, rope_table_dtype="bfloat16")
    exact = pgolf_twin(tmp_path, record, rec)
    # The fixture's RoPE train length is 16; at 512 the 300-token forward stays on the record's
    # cast-buffer path (past the train length it recomputes an NTK inv_freq in fp32, as pgolf does).
    for block in rec.blocks:
        block.attn.rotary.train_seq_len = 512
        block.attn.rotary._cos_cached = block.attn.rotary._sin_cached = None
    for m in (ours, exact):
        m.cfg.rope_train_seq_len = 512
    for block in rec.blocks:  # fp32 compute elsewhere; the rotary buffer stays the record's bf16
        for p in block.parameters():
            p.data = p.data.float()
    rec.tok_emb.float()
    ids = torch.randint(0, 64, (2, 300), generator=torch.Generator().manual_seed(0))
    for looping in (False, True):
        rec.looping_active = looping
        for m in (ours, exact):
            m.on_progress(1.0 if looping else 0.0)
        with torch.no_grad():
            want = rec.forward_logits(ids)
            torch.testing.assert_close(ours._logits(ids), want, rtol=1e-5, atol=1e-5)
            assert (exact._logits(ids) - want).abs().max() > 1e-4


@pytest.mark.slow
def test_pgolf_computes_the_records_forward_from_its_init(tmp_path, record):
    from r0409_init import record_init

    rec = record_init(record)
    assert rec.tok_emb.weight.dtype == torch.bfloat16  # as the record trains it
    assert rec.blocks[0].attn.rotary.inv_freq.dtype == torch.bfloat16  # ... and its RoPE frequencies
    exact_rope_tables(rec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random (the init zeroes the projections), on both sides
        for name, p in rec.named_parameters():
            # branch scales O(1) and q_gain at the record's 5.25, so no branch and no RoPE is washed out
            base = 1.0 if name.endswith(("attn_scale", "mlp_scale")) else 5.25 if "q_gain" in name else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g) + 0.01)
    ours = pgolf_twin(tmp_path, record, rec)
    rec.float()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for looping in (False, True):
        rec.looping_active = looping
        ours.on_progress(1.0 if looping else 0.0)
        with torch.no_grad():
            torch.testing.assert_close(ours._logits(ids), rec.forward_logits(ids), rtol=1e-5, atol=1e-5)


def record_schedule(h, step: int) -> tuple[float, float]:
    """(lr scale, Muon momentum) before record step `step` in step-count mode (its train_model)."""
    frac = step / max(h.iterations, 1)
    scale = max((1.0 - frac) / h.warmdown_frac, h.min_lr) if frac >= 1.0 - h.warmdown_frac else 1.0
    f = min(step / h.muon_momentum_warmup_steps, 1.0)
    return scale, (1 - f) * h.muon_momentum_warmup_start + f * h.muon_momentum


@pytest.mark.slow
def test_pgolf_takes_the_records_optimizer_steps(tmp_path, record, compose):
    """From the record's init: the record's Optimizers (Muon with MuonEq-R and WD, AdamW on embedding
    and scalars, clip 0.3) and pgolf's optimizer=muon_r0409 give the same weights step for step,
    through the warmdown and the loop switch (ITERATIONS=6: warmdown from step 2, loops from 3)."""
    from r0409_init import record_init

    from pgolf.config import from_dict
    from pgolf.optim.config import MuonConfig
    from pgolf.optim.muon import build

    h = record.Hyperparameters()
    rec = record_init(record).float()  # fp32 embedding on both sides: the comparison is exact-ish
    exact_rope_tables(rec)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # projections and gates away from zero, so every group gets a real update
        for p in rec.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ours = pgolf_twin(tmp_path, record, rec)
    cfg = from_dict(
        MuonConfig,
        compose(["experiment=none", "optimizer=muon_r0409", "optimizer.ns_cpu_fp32=false"])["optimizer"],
        "optimizer",
    )
    opt = build(cfg, ours, torch.device("cpu"), compile_ns=False)
    rec_opt = record.Optimizers(h, rec)
    data = torch.Generator().manual_seed(3)
    for step in range(h.iterations):
        ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len + 1), generator=data)
        x, y = ids[:, :-1], ids[:, 1:]
        looping = step / h.iterations >= h.enable_looping_at
        rec.looping_active = looping
        ours.on_progress(step / h.iterations)
        # Scaled so the global norm stays under the 0.3 clip: clipping multiplies by exactly 1 on both
        # sides. Clipped, the two sums of squares (another parameter order) can differ in the last
        # bit, and Newton-Schulz in bf16 turns such a bit into a visibly different update; for the
        # same reason pgolf steps from the record's own gradients (the forward is compared above).
        (1e-3 * rec(x, y)).backward()
        assert torch.nn.utils.get_total_norm([p.grad for p in rec.parameters()]) < h.grad_clip_norm
        theirs = dict(rec.named_parameters())
        for name, p in ours.named_parameters():
            p.grad = theirs[name].grad.clone()
        scale, momentum = record_schedule(h, step)
        for group in rec_opt.optimizer_muon.param_groups:
            group["momentum"] = momentum
        for o in rec_opt:
            for group in o.param_groups:
                group["lr"] = group["base_lr"] * scale
        torch.nn.utils.clip_grad_norm_(rec.parameters(), h.grad_clip_norm)
        rec_opt.step()
        opt.step(step, 0.0, h.iterations, None)
        opt.zero_grad()
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=1e-6, msg=f"step {step}: {name}")
