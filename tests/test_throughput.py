"""Throughput in every run: tokens/s, FLOPs per token and MFU in result.json and the log, and the
time of each phase (pgolf.throughput, pgolf.flops)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_cpu_args

from pgolf.config import job_config_from_dict
from pgolf.flops import train_flops_per_token
from pgolf.parent.result_file import result_from_json
from pgolf.run_result import RunResult
from pgolf.throughput import log_line, throughput

FLOPS = {False: 1.0e8, True: 1.5e8}


def test_tokens_per_second_and_mfu_follow_the_step_times():
    t = throughput(1000, 10, 2000.0, 100.0, FLOPS, looped_steps=4, peak_tflops=0.5, world_size=2)
    assert t["tokens_per_s_median"] == 10_000.0  # 1000 tokens / 0.1 s
    assert t["tokens_per_s"] == 5_000.0  # 10 steps x 1000 tokens / 2 s
    assert t["flops_per_token"] == 1.5e8  # training ended looped
    assert t["train_tflops"] == pytest.approx(1000 * (4 * 1.5e8 + 6 * 1.0e8) / 2.0 / 1e12)
    assert t["tflops_median"] == pytest.approx(10_000 * 1.5e8 / 1e12)
    assert t["peak_tflops"] == 1.0  # per device x world size
    assert t["mfu_median"] == pytest.approx(t["tflops_median"]) and t["mfu"] == pytest.approx(
        t["train_tflops"]
    )
    assert "MFU" in log_line(t)


def test_no_peak_no_mfu():
    t = throughput(1000, 10, 2000.0, 100.0, FLOPS, looped_steps=0, peak_tflops=0.0, world_size=1)
    assert "mfu" not in t and t["flops_per_token"] == 1.0e8 and "MFU" not in log_line(t)


def test_result_json_keeps_throughput():
    r = RunResult(status="ok", throughput={"tokens_per_s": 1.0})
    assert result_from_json(r.to_json()).throughput == {"tokens_per_s": 1.0}


@pytest.mark.slow
def test_run_reports_throughput_mfu_and_phases(shard_dir, tokenizer_model, tmp_path):
    """A looped model whose loops switch on half way: steps 3-5 of 6 count at the looped depth."""
    loops = {
        "model": "layered",
        "model.num_layers": "2",
        "model.num_heads": "4",
        "model.num_kv_heads": "2",
        "model.ve_layers": "[1]",
        "model.num_loops": "1",
        "model.loop_start": "0",
        "model.loop_end": "1",
        "model.enable_looping_at": "0.5",
        "hardware.peak_tflops": "0.001",
        "eval.modes": "[nonoverlap,sliding]",
        "eval.seq_len": "64",
        "eval.stride": "32",
    }
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **loops), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    t = r["throughput"]
    assert t["looped_steps"] == 3 and t["tokens_per_step"] == 2048
    cfg = job_config_from_dict(json.loads((tmp_path / "run" / "config.json").read_text())).model
    assert cfg.num_loops == 1 and cfg.ve_enabled and cfg.bigram_vocab_size  # projections counted too
    assert t["flops_per_token"] == train_flops_per_token(cfg, 64, looping=True)
    flops = 2048 * 3 * (train_flops_per_token(cfg, 64, True) + train_flops_per_token(cfg, 64, False))
    assert t["train_tflops"] == pytest.approx(flops / (r["train_ms"] / 1e3) / 1e12)
    assert t["tokens_per_s"] == pytest.approx(6 * 2048 / (r["train_ms"] / 1e3))
    assert t["mfu"] == pytest.approx(t["train_tflops"] / 0.001)
    sec = r["timings"]
    assert {"calibration", "export", "eval_nonoverlap", "eval_sliding"} <= set(sec)
    assert sec["export"] + sec["calibration"] == pytest.approx(sec["artifact"])
    assert sec["eval_nonoverlap"] + sec["eval_sliding"] <= sec["eval"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "throughput: " in log and "MFU" in log and "phases: build:" in log
