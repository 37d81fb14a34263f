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

import numpy as np
import pytest
from conftest import REPO

SCRIPT = REPO / "bench" / "models_r0409.sh"

# The decoded record's Hyperparameters defaults for every setting compared below.
RECORD_DEFAULTS = {
    "SEED": "1337", "ITERATIONS": "20000", "WARMDOWN_FRAC": "0.72", "WARMUP_STEPS": "20",
    "TRAIN_BATCH_TOKENS": "786432", "TRAIN_SEQ_LEN": "2048", "VOCAB_SIZE": "8192", "NUM_LAYERS": "11",
    "XSA_LAST_N": "11", "MODEL_DIM": "512", "NUM_KV_HEADS": "4", "NUM_HEADS": "8", "MLP_MULT": "4.0",
    "SKIP_GATES_ENABLED": "1", "TIE_EMBEDDINGS": "1", "LOGIT_SOFTCAP": "30.0", "ROPE_BASE": "10000.0",
    "ROPE_DIMS": "16", "ROPE_TRAIN_SEQ_LEN": "2048", "LN_SCALE": "1", "QK_GAIN_INIT": "5.0",
    "NUM_LOOPS": "2", "LOOP_START": "3", "LOOP_END": "5", "ENABLE_LOOPING_AT": "0.35",
    "PARALLEL_RESIDUAL_START": "7", "MIN_LR": "0.0", "TIED_EMBED_LR": "0.03", "TIED_EMBED_INIT_STD": "0.005",
    "MATRIX_LR": "0.022", "SCALAR_LR": "0.02", "MUON_MOMENTUM": "0.99", "MUON_BACKEND_STEPS": "5",
    "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500", "MUON_ROW_NORMALIZE": "1",
    "BETA1": "0.9", "BETA2": "0.95", "ADAM_EPS": "1e-08", "GRAD_CLIP_NORM": "0.3", "ADAM_WD": "0.02",
    "MUON_WD": "0.095", "EMBED_WD": "0.085", "EMA_DECAY": "0.9965", "MAX_WALLCLOCK_SECONDS": "600",
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
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", CALLS_FILE=str(calls), EQUALIZE=equalize,
               OUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"), TOK=str(tmp_path / "tok.model"),
               REF_WORK=str(tmp_path / "ref_work"))
    subprocess.run(["bash", "-c", f'source "{SCRIPT}" && run_reference && pgolf_cmd'], env=env,
                   check=True, capture_output=True, text=True, timeout=60)
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
        diffs.append(f"record counts steps (MAX_WALLCLOCK_SECONDS=0), pgolf budget.mode={cfg['budget']['mode']}")
    assert not diffs, "record vs pgolf:\n" + "\n".join(diffs)
    # Same batches: the record seeds its loader's RNG with the rank alone, pgolf with (seed, rank).
    record_rng = np.random.Generator(np.random.PCG64(int(ref_env.get("RANK", "0"))))
    pgolf_rng = np.random.Generator(np.random.PCG64([cfg["seed"], 0]))
    assert record_rng.integers(2**62, size=4).tolist() == pgolf_rng.integers(2**62, size=4).tolist()


def test_r0409_preset_trains_on_the_records_loader(compose):
    """experiment=r0409 (the 8-GPU record recipe) uses the shuffled loader, as the record does."""
    assert compose(["experiment=r0409"])["data"]["loader"] == "shuffled"
