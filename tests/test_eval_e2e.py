"""CPU end-to-end: `python -m pgolf.run ... ttt=score_first` reports every eval mode and TTT."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_cpu_args

pytestmark = pytest.mark.slow


def test_score_first_run_reports_modes_and_final(tmp_path, shard_dir, tokenizer_model):
    args = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        ttt="score_first",
        **{"eval.stride": "16", "eval.batch_seqs": "8", "ttt.chunk_tokens": "2048", "ttt.epochs": "1"},
    )
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    m = r["metrics"]
    assert r["final_mode"] == "score_first"
    scores = {"val_loss", "val_bpb", "tokens", "bytes", "seconds", "tokens_per_s"}
    for mode in ("nonoverlap", "sliding", "score_first"):
        windowed = mode != "nonoverlap"  # the windowed scores name their eval.window_rule
        assert set(m[mode]) == scores | ({"window_rule"} if windowed else set())
        assert m[mode]["seconds"] > 0 and m[mode]["tokens_per_s"] > 0
    assert m["sliding"]["window_rule"] == m["score_first"]["window_rule"] == r["final_window_rule"] == "exact"
    assert r["val_bpb"] == m["score_first"]["val_bpb"] == m["roundtrip"]["val_bpb"]
    # sliding and TTT score the same targets: every one exactly once
    assert m["sliding"]["tokens"] == m["score_first"]["tokens"] == m["nonoverlap"]["tokens"]
    assert m["sliding"]["bytes"] == m["score_first"]["bytes"]
    # warm-up is timed apart; the eval budget counts eval + ttt
    t = r["timings"]
    assert t["eval_warmup"] > 0
    assert r["limits"]["eval_seconds"]["used"] == pytest.approx(t["eval"] + t["ttt"])
    assert r["limits"]["eval_seconds"]["used_with_warmup"] == pytest.approx(
        t["eval"] + t["ttt"] + t["eval_warmup"]
    )
    assert "eval:sliding" in proc.stdout and "ttt:score_first" in proc.stdout


def test_ttt_without_sliding_is_refused(tmp_path, shard_dir, tokenizer_model):
    args = tiny_cpu_args(shard_dir, tokenizer_model, ttt="score_first", **{"eval.modes": "[nonoverlap]"})
    proc = run_cli(args, tmp_path)
    assert proc.returncode != 0
    assert "eval.modes" in proc.stderr + proc.stdout


GPT_TINY = {
    "model": "banked",
    "model.num_layers": "2",
    "model.model_dim": "64",
    "model.num_heads": "2",
    "model.num_kv_heads": "1",
    "model.bigram_vocab_size": "64",
    "model.bigram_dim": "16",
    "model.ve_dim": "16",
    "model.ve_layers": "[1]",
    "model.xsa_last_n": "1",
}


def _result(tmp_path, shard_dir, tokenizer_model, name, **extra):
    d = tmp_path / name
    args = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{"train.iterations": "0", "train.prime_steps": "0", "eval.stride": "16", "eval.batch_seqs": "4"},
        **extra,
    )
    proc = run_cli(args, d, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((d / "run" / "result.json").read_text())


@pytest.mark.parametrize("ttt", ["score_first", "lora"])
def test_two_gloo_ranks_score_like_one(tmp_path, shard_dir, tokenizer_model, ttt):
    """Same weights (0 steps): windows, chunks and documents split over 2 ranks give the same scores."""
    extra = {"ttt": ttt, "eval.modes": "[nonoverlap,sliding]"}
    if ttt == "score_first":
        # one step per epoch and chunk in both runs (32 sequences of 64 per chunk <= ttt.batch_seqs on
        # one rank): the average of the two ranks' mean losses is then the one-rank mean. More steps
        # would differ by design: ttt.batch_seqs is per rank, as TTT_BATCH_SEQS is in the records.
        extra.update({"ttt.chunk_tokens": "2048", "ttt.epochs": "2", "ttt.lr": "0.01"})
    else:
        extra.update({"ttt.rank": "2", "ttt.chunk_size": "32", "ttt.context": "64", "ttt.batch_docs": "4"})
        extra.update(GPT_TINY)
    one = _result(tmp_path, shard_dir, tokenizer_model, "n1", **extra, **{"hardware.nproc_per_node": "1"})
    two = _result(tmp_path, shard_dir, tokenizer_model, "n2", **extra, **{"hardware.nproc_per_node": "2"})
    assert two["world_size"] == 2
    for mode in ("sliding", ttt):
        a, b = one["metrics"][mode], two["metrics"][mode]
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"]), mode
        assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-5), mode
    assert one["metrics"][ttt]["val_bpb"] != one["metrics"]["sliding"]["val_bpb"]  # TTT did something
