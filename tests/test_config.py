"""Config groups, registries and validation: every option composes, bad input fails by name."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, REPO

from pgolf.components import OPTIMIZERS, REGISTRIES
from pgolf.config import GROUPS, check_compatibility, config_hash, job_config_from_dict, to_dict
from pgolf.parent.compose import compose_dict
from pgolf.registry import ConfigError, Entry, Registry

SHARD_ARGS = ["data.path=/some/shards", "data.tokenizer_path=/some/tok.model"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(compose, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "shards":
        overrides += SHARD_ARGS
    if group == "optimizer" and compose(overrides)["optimizer"]["name"] == "parallel_muon":
        overrides += ["model=banked"]  # Parallel Muon shards banks; test_parallel_muon checks the refusal
    composed = compose(overrides)
    job = job_config_from_dict(composed)
    assert getattr(job, group).name in REGISTRIES[group].names()
    # Every key of the option's schema is in its file, so `group.key=value` reaches it without
    # Hydra's `+` (a key missing there is refused as "not in struct").
    schema = {f.name for f in dataclasses.fields(getattr(job, group))}
    assert sorted(schema - set(composed[group])) == [], f"conf/{group}/{option}.yaml lacks these keys"


@pytest.mark.parametrize("section", ["train", "budget", "eval"])
def test_every_section_key_is_in_config_yaml(compose, section):
    composed = compose([])
    schema = {f.name for f in dataclasses.fields(getattr(job_config_from_dict(composed), section))}
    assert sorted(schema - set(composed[section])) == [], f"conf/config.yaml's {section} lacks these keys"


def test_a_plain_override_reaches_a_key_of_every_group(compose):
    job = job_config_from_dict(
        compose(
            ["model=banked", "optimizer.keep_primed_momentum=true", "model.fused_mlp_train=true"]
            + ["eval.window_rule=legacy"]
        )
    )
    assert (
        job.optimizer.keep_primed_momentum and job.model.fused_mlp_train and job.eval.window_rule == "legacy"
    )


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(compose, experiment):
    job = job_config_from_dict(compose([f"experiment={experiment}"]))
    assert job.model.vocab_size == job.data.vocab_size


def test_offline_default_is_small_and_step_based(compose):
    job = job_config_from_dict(compose())
    assert (job.data.name, job.budget.mode, job.label) == ("embedded", "steps", "offline")
    assert job.model.model_dim < 512


def test_naive_baseline_experiment_is_the_challenge_baseline(compose):
    job = job_config_from_dict(compose(["experiment=naive_baseline"]))
    m = job.model
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult) == (9, 512, 8, 4, 2)
    assert m.tie_embeddings and m.logit_softcap == 30.0 and m.qk_gain_init == 1.5
    assert (job.train.seq_len, job.train.batch_tokens) == (1024, 524_288)
    assert (job.budget.mode, job.budget.train_seconds, job.budget.artifact_bytes) == (
        "wallclock",
        600.0,
        16_000_000,
    )
    assert job.data.path.endswith("datasets/fineweb10B_sp1024") and job.data.vocab_size == 1024


def test_r0323_experiment_is_the_records_recipe(compose):
    """The 2026-03-23 record's configuration, group by group."""
    job = job_config_from_dict(compose(["experiment=r0323"]))
    check_compatibility(job)
    m, o, t = job.model, job.optimizer, job.ttt
    assert (job.model.name, o.name, job.quant.name, t.name) == (
        "banked",
        "parallel_muon",
        "mixed",
        "score_first",
    )
    assert (m.num_layers, m.mlp_mult, m.xsa_last_n, m.bigram_vocab_size, m.ve_layers) == (
        11,
        3.0,
        4,
        1536,
        [9, 10],
    )
    assert (o.matrix_lr, o.tied_embed_lr, o.muon_momentum, o.muon_wd, o.embed_wd, o.scalar_wd) == (
        0.025,
        0.035,
        0.99,
        0.04,
        0.04,
        0.04,
    )
    assert (o.grad_clip_norm, o.warmdown_iters, o.ema_decay) == (0.3, 3500, 0.997)
    assert (t.lr, t.momentum, t.epochs, t.chunk_tokens, t.batch_seqs, t.grad_clip, t.freeze_blocks) == (
        0.002,
        0.9,
        3,
        32768,
        32,
        1.0,
        0,
    )
    assert (job.train.seq_len, job.train.batch_tokens, job.data.vocab_size) == (2048, 786_432, 1024)
    assert "sliding" in job.eval.modes and job.eval.stride == 64
    assert job.quant.compressor == "lzma" and job.hardware.nproc_per_node == 8


def test_r0409_experiment_is_the_records_recipe(compose):
    """The 2026-04-09 record's configuration, group by group."""
    job = job_config_from_dict(compose(["experiment=r0409"]))
    check_compatibility(job)
    m, o, q, t = job.model, job.optimizer, job.quant, job.ttt
    assert (m.num_layers, m.mlp_mult, m.qk_gain_init, m.num_loops, m.loop_start, m.loop_end) == (
        11,
        4.0,
        5.25,
        2,
        3,
        5,
    )
    assert (m.parallel_residual, m.parallel_start_layer, m.vocab_size) == ("gptj", 7, 8192)
    assert (o.row_normalize, o.matrix_lr, o.muon_wd, o.embed_wd, o.scalar_wd) == (
        True,
        0.022,
        0.095,
        0.085,
        0.02,
    )
    assert (o.warmdown_frac, o.min_lr, o.ema_decay, o.grad_clip_norm) == (0.72, 0.0, 0.9965, 0.3)
    assert (q.compressor, q.mlp.bits, q.mlp.gptq, q.mlp.sigmas, q.embed.bits, q.embed.sigmas) == (
        "brotli",
        6,
        True,
        12.85,
        8,
        20.0,
    )
    assert (job.budget.quant_reserve_seconds, t.name, t.lr, t.epochs) == (12.0, "score_first", 0.005, 3)


def test_headline_command_composes(compose):
    """The README's headline: model=banked optimizer=parallel_muon ttt=score_first (sliding eval on)."""
    job = job_config_from_dict(compose(["model=banked", "optimizer=parallel_muon", "ttt=score_first"]))
    check_compatibility(job)
    assert (job.model.name, job.optimizer.name, job.ttt.name) == ("banked", "parallel_muon", "score_first")
    assert "sliding" in job.eval.modes


def test_cli_group_override_beats_the_default_experiment(compose):
    assert compose(["model=baseline"])["model"]["num_layers"] == 9


def test_unknown_key_names_key_and_valid_keys(compose):
    with pytest.raises(ConfigError, match=r"model\.num_layer\b.*valid keys: .*num_layers"):
        job_config_from_dict(compose(["+model.num_layer=12"]))


def test_unknown_key_suggests_the_nearest_valid_one(compose):
    with pytest.raises(
        ConfigError, match=r"unknown key model\.num_layer .*did you mean model\.num_layers\? valid"
    ):
        job_config_from_dict(compose(["+model.num_layer=12"]))
    with pytest.raises(ConfigError) as e:  # nothing near: no guess
        job_config_from_dict(compose(["+model.zzzz=1"]))
    assert "did you mean" not in str(e.value)
    from pgolf.config import did_you_mean

    assert (
        did_you_mean(["data_path"], ["name", "path", "tokenizer_path"], "data") == "did you mean data.path? "
    )
    assert did_you_mean(["epochs"], ["global_epochs", "lr"], "ttt") == "did you mean ttt.global_epochs? "
    assert did_you_mean(["lr"], ["global_lr", "eps"], "ttt") == ""  # too short to guess from


def test_mistyped_key_hints_name_the_nearest_keys_of_the_chosen_option():
    """What `pgolf.run` adds after Hydra's "Could not override" (whose own hint, a `+`, is wrong):
    the keys come from the config the group choices compose (model=banked has ve_layers, the
    default model has not), sweeps count by their first value, and keys that exist get nothing."""
    from pgolf.parent.override_hints import unknown_key_hints

    hints = unknown_key_hints(["-m", "model=banked", "model.num_layerz=3,4", "seed=1,2", "train.seqlen=9"])
    assert len(hints) == 2
    assert hints[0].startswith(
        "pgolf: model.num_layerz: 'model' has no key 'num_layerz'; did you mean model.num_layers?"
    )
    assert "ve_layers" in hints[0]  # the banked model's keys, not the default's
    assert "did you mean train.seq_len?" in hints[1]
    assert unknown_key_hints(["foo.bar=1"]) == [
        "pgolf: foo.bar: the config has no key 'foo'; its keys: " + ", ".join(sorted(compose_dict([])))
    ]
    assert unknown_key_hints(["model.num_layers=3", "+model.extra=1", "~seed"]) == []
    assert unknown_key_hints(["model=nope", "model.x=1"]) == []  # Hydra's option list stands alone


def test_unknown_root_key(compose):
    with pytest.raises(ConfigError, match=r"train\.steps"):
        job_config_from_dict(compose(["+train.steps=3"]))


def test_wrong_type_is_named(compose):
    with pytest.raises(ConfigError, match=r"model\.num_layers='abc' must be an integer"):
        job_config_from_dict(compose(["model.num_layers=abc"]))


def test_literal_lists_choices(compose):
    with pytest.raises(ConfigError, match=r"hardware\.amp_dtype='fp8'.*valid choices: 'bfloat16', 'float32'"):
        job_config_from_dict(compose(["hardware=cpu", "hardware.amp_dtype=fp8"]))
    with pytest.raises(ConfigError, match=r"budget\.mode='fast'.*'wallclock', 'steps'"):
        job_config_from_dict(compose(["budget.mode=fast"]))


def test_unknown_group_option_lists_available(compose):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="baseline"):
        compose(["model=nope"])


def test_unknown_implementation_name_lists_registered(compose):
    with pytest.raises(ConfigError, match=r"model\.name='gpt2'.*valid choices: banked, baseline, layered"):
        job_config_from_dict(compose(["model.name=gpt2"]))


def test_required_shard_path(compose):
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        job_config_from_dict(compose(["data=shards"]))


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("model.vocab_size=2048", r"model\.vocab_size=2048 differs from data\.vocab_size=1024"),
        ("model.num_heads=3", r"model_dim=128 must be divisible by model\.num_heads=3"),
        ("model.num_kv_heads=3", r"num_heads=4 must be divisible by model\.num_kv_heads=3"),
        ("hardware=cpu", None),
        ("hardware.nproc_per_node=3", r"nproc_per_node=3 must divide 8"),
        ("train.batch_tokens=1000", r"train\.batch_tokens=1000 must be a multiple"),
        ("optimizer.warmdown_frac=1.5", r"warmdown_frac=1\.5 must be in \[0, 1\]"),
        ("budget.artifact_bytes=0", r"artifact_bytes must be positive"),
    ],
)
def test_semantic_checks(compose, override, pattern):
    cfg = compose([override])
    if pattern is None:
        job_config_from_dict(cfg)
    else:
        with pytest.raises(ConfigError, match=pattern):
            job_config_from_dict(cfg)


def test_cross_group_requirement(compose, monkeypatch):
    muon = OPTIMIZERS.get("muon")
    monkeypatch.setitem(
        OPTIMIZERS._entries, "muon", Entry("muon", muon.schema, muon.builder, requires=("banks",))
    )
    with pytest.raises(ConfigError, match=r"optimizer=muon needs banks.*model=baseline"):
        job_config_from_dict(compose())


def test_registry_rejects_duplicates_and_names_choices():
    reg = Registry("thing")

    class A:
        pass

    class B:
        pass

    reg.register("a", A, "x:y")
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        reg.register("a", B, "x:y")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("b", A, "x:y")
    with pytest.raises(ConfigError, match="valid choices: a"):
        reg.get("zzz")


def test_frozen_config_round_trips(compose):
    job = job_config_from_dict(compose(["experiment=naive_baseline"]))
    again = job_config_from_dict(json.loads(json.dumps(to_dict(job))))
    assert to_dict(again) == to_dict(job)


def test_config_hash_ignores_seed_but_not_model(compose):
    a = job_config_from_dict(compose(["seed=1"]))
    b = job_config_from_dict(compose(["seed=2"]))
    c = job_config_from_dict(compose(["seed=1", "model.num_layers=3"]))
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert config_hash(a, include_seed=True) != config_hash(b, include_seed=True)


def test_validation_never_imports_torch():
    code = (
        "import sys\n"
        "from pgolf.parent.compose import compose_job\n"
        "from pgolf.registry import ConfigError\n"
        "try:\n    compose_job(['+model.nope=1'])\nexcept ConfigError:\n    pass\n"
        "assert 'torch' not in sys.modules, 'validation imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_bad_key_fails_fast_with_the_key(tmp_path):
    from conftest import run_cli

    proc = run_cli(["+model.num_layer=12"], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "model.num_layer" in proc.stderr and "num_layers" in proc.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "failed" and "model.num_layer" in result["error"]
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_mistyped_key_gets_the_nearest_key_after_hydras_error(tmp_path):
    from conftest import run_cli

    proc = run_cli(["model.num_layerz=3"], tmp_path, timeout=60)
    assert proc.returncode == 1
    assert "Could not override 'model.num_layerz'" in proc.stderr  # Hydra's own message first
    assert (
        proc.stderr.rstrip()
        .splitlines()[-1]
        .startswith(
            "pgolf: model.num_layerz: 'model' has no key 'num_layerz'; did you mean model.num_layers?"
        )
    )


def test_cli_unknown_option_lists_choices(tmp_path):
    from conftest import run_cli

    proc = run_cli(["optimizer=adamw"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "adamw" in proc.stderr and "muon" in proc.stderr


def test_readme_documents_every_group_option():
    # README or a topic page under docs/ (which the README links)
    readme = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    for group in GROUPS:
        for option in options(group):
            assert f"{group}={option}" in readme or f"`{option}`" in readme, (
                f"README does not mention {group}={option}"
            )


def test_conf_dirs_match_groups():
    assert {p.name for p in CONF.iterdir() if p.is_dir()} >= set(GROUPS)
    assert Path(CONF / "config.yaml").is_file()


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("seed=-1", r"^seed=-1 must be in 0\.\.4294967295"),
        (f"seed={2**32}", r"^seed=4294967296 must be in 0\.\.4294967295"),
        ("optimizer.matrix_lr=-0.01", r"^optimizer\.matrix_lr=-0\.01 must be >= 0"),
        ("optimizer.embed_lr=-1", r"^optimizer\.embed_lr=-1\.0 must be >= 0"),
        ("optimizer.muon_wd=-0.1", r"^optimizer\.muon_wd=-0\.1 must be >= 0"),
        ("optimizer.muon_momentum=1.0", r"^optimizer\.muon_momentum=1\.0 must be in \[0, 1\)"),
        ("optimizer.beta2=-0.5", r"^optimizer\.beta2=-0\.5 must be in \[0, 1\)"),
        ("optimizer.adam_eps=0", r"^optimizer\.adam_eps=0\.0 must be > 0"),
        ("optimizer.swa_threshold=2", r"^optimizer\.swa_threshold=2\.0 must be in \[0, 1\]"),
        ("train.iterations=-5", r"^train\.iterations=-5 must be >= 0"),
        ("train.log_every=-1", r"^train\.log_every=-1 must be >= 0"),
        ("train.prime_skip_batches=-1", r"^train\.prime_skip_batches=-1 must be >= 0 \(0 discards none\)"),
        ("train.val_batch_tokens=0", r"^train\.val_batch_tokens=0 must be >= 1"),
        ("budget.eval_seconds=-1", r"^budget\.eval_seconds=-1\.0 must be >= 0"),
        ("ttt=lora ttt.beta2=1", r"^ttt\.beta2=1\.0 must be in \[0, 1\)"),
        ("ttt=phased ttt.global_momentum=1.5", r"^ttt\.global_momentum=1\.5 must be in \[0, 1\)"),
        ("ttt=phased ttt.global_lr=-1", r"^ttt\.global_lr=-1\.0 must be >= 0"),
    ],
)
def test_nonsense_values_are_refused_by_key(compose, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        job_config_from_dict(compose(override.split()))


@pytest.mark.parametrize("override", ["seed=0", f"seed={2**32 - 1}", "optimizer.matrix_lr=0"])
def test_edge_values_are_accepted(compose, override):
    job_config_from_dict(compose([override]))


def test_cli_negative_seed_fails_before_the_worker_starts(tmp_path):
    from conftest import run_cli

    proc = run_cli(["seed=-1", "hardware=cpu"], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "seed=-1 must be in 0..4294967295" in proc.stderr
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was frozen or built


def test_plan_and_convert_report_bad_overrides_without_a_traceback(capsys):
    """The commands that compose without @hydra.main end with the message, the nearest keys and
    status 2 (pgolf.plan's 1 means "does not fit")."""
    from pgolf.models.convert import main as convert_main
    from pgolf.parent.plan import main as plan_main

    with pytest.raises(SystemExit) as e:
        plan_main(["model.num_layerz=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("pgolf.plan: Could not override 'model.num_layerz'")
    assert "did you mean model.num_layers?" in err
    with pytest.raises(SystemExit) as e:
        plan_main(["+model.num_layerz=3"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("pgolf.plan: invalid config: unknown key model.num_layerz")
    with pytest.raises(SystemExit) as e:
        convert_main(["in.pt", "--model", "banked", "--out", "out.pt", "model.num_layer=2"])
    assert e.value.code == 2 and "did you mean model.num_layers?" in capsys.readouterr().err
