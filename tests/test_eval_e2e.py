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
    for mode in ("nonoverlap", "sliding", "score_first"):
        assert set(m[mode]) == {"val_loss", "val_bpb", "tokens", "bytes", "seconds", "tokens_per_s"}
        assert m[mode]["seconds"] > 0 and m[mode]["tokens_per_s"] > 0
    assert r["val_bpb"] == m["score_first"]["val_bpb"] == m["roundtrip"]["val_bpb"]
    # sliding and TTT score the same targets: every one exactly once
    assert m["sliding"]["tokens"] == m["score_first"]["tokens"] == m["nonoverlap"]["tokens"]
    assert m["sliding"]["bytes"] == m["score_first"]["bytes"]
    # warm-up is timed apart; the eval budget counts eval + ttt
    t = r["timings"]
    assert t["eval_warmup"] > 0
    assert r["limits"]["eval_seconds"]["used"] == pytest.approx(t["eval"] + t["ttt"])
    assert "eval:sliding" in proc.stdout and "ttt:score_first" in proc.stdout


def test_ttt_without_sliding_is_refused(tmp_path, shard_dir, tokenizer_model):
    args = tiny_cpu_args(shard_dir, tokenizer_model, ttt="score_first", **{"eval.modes": "[nonoverlap]"})
    proc = run_cli(args, tmp_path)
    assert proc.returncode != 0
    assert "eval.modes" in proc.stderr + proc.stdout
