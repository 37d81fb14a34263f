"""result.json as a typed record: to_json writes the keys a run has always written, in their order;
pgolf.parent.result_file reads them back, checks them and names the file and the key; a
read-and-write leaves the file as it was."""

from __future__ import annotations

import json
import math

import pytest

from pgolf.parent.result_file import ResultError, read_result, result_from_json
from pgolf.results import write_json_atomic
from pgolf.run_result import ByteCounts, RunResult

FINISHED = {
    "status": "ok",
    "label": "",
    "seed": 1337,
    "config_hash": "abc",
    "config_hash_with_seed": "abcd",
    "world_size": 1,
    "versions": {"pgolf": "0.1", "torch": "2.13.0+cpu"},
    "params": 1000,
    "attention_backend": "sdpa",
    "grad_accum": 8,
    "metrics": {
        "pre_quant": {"val_loss": 4.1, "val_bpb": 2.3, "tokens": 100, "bytes": 240, "seconds": 1.0},
        "sliding": {"val_loss": 4.0, "val_bpb": 2.2, "window_rule": "exact"},
        "roundtrip": {"val_loss": 4.0, "val_bpb": 2.2, "window_rule": "exact"},
    },
    "steps": 6,
    "train_ms": 1234.5,
    "ms_per_step": 200.0,
    "ms_per_step_mean": 205.75,
    "train_losses": [[1, 6.0], [6, 5.5]],
    "peak_memory_bytes": 0,
    "stopped_by": "iterations",
    "optimizer": {"late_qat_step": None},
    "bytes": {
        "model": 900,
        "code": 100,
        "code_source_raw": 300,
        "total": 1000,
        "cap": 16_000_000,
        "within_cap": True,
    },
    "files": {"artifact/train_gpt.py": {"bytes": 100, "sha256": "00"}},
    "final_mode": "sliding",
    "final_window_rule": "exact",
    "val_loss": 4.0,
    "val_bpb": 2.2,
    "timings": {"build": 1.0, "total": 9.0},
    "val": {"dir": "/d", "files": ["v.bin"], "tokens_total": 100},
    "rules": {"pass": True, "reason": "every check held", "checks": {}},
    "limits": {"artifact_bytes": {"held": True}},
}


def test_a_finished_result_round_trips_key_for_key_in_order():
    r = result_from_json(FINISHED)
    assert r.ok and r.bytes == ByteCounts(900, 100, 300, 1000, 16_000_000, True)
    assert r.train_losses == [(1, 6.0), (6, 5.5)]
    out = json.loads(json.dumps(r.to_json()))
    assert out == FINISHED and list(out) == list(FINISHED)


def test_a_failed_result_writes_only_what_it_has():
    r = RunResult(status="failed", error="config: bad")
    assert r.to_json() == {"status": "failed", "error": "config: bad"} and not r.ok
    # a non-windowed final mode records its rule as null; without a final mode there is none
    r.final_mode = "nonoverlap"
    assert r.to_json()["final_window_rule"] is None


def test_non_finite_floats_read_back_as_written(tmp_path):
    path = tmp_path / "result.json"
    diverged = result_from_json(FINISHED)
    diverged.status, diverged.val_bpb, diverged.error = "failed", float("nan"), "diverged"
    write_json_atomic(path, diverged.to_json())
    text = path.read_text()
    assert '"val_bpb": null' in text
    r = read_result(path)
    assert math.isnan(r.val_bpb) and r.non_finite == {"val_bpb": "nan"} and not r.ok
    r.write(path)
    assert path.read_text() == text


def test_unknown_keys_are_kept(tmp_path):
    r = result_from_json({"status": "ok", "from_the_future": [1, 2]})
    assert r.extra == {"from_the_future": [1, 2]}
    assert r.to_json() == {"status": "ok", "from_the_future": [1, 2]}


@pytest.mark.parametrize(
    "data,pattern",
    [
        ([1, 2], r"job/result\.json: a JSON list, not an object"),
        ({"error": "x"}, r"job/result\.json: no 'status' key"),
        ({"status": "done"}, r"key 'status' is str 'done', expected running or ok or failed"),
        ({"status": "ok", "steps": "six"}, r"key 'steps' is str 'six', expected an integer"),
        ({"status": "ok", "steps": True}, r"key 'steps' is bool True, expected an integer"),
        ({"status": "ok", "val_bpb": None}, r"key 'val_bpb' is NoneType None, expected a number"),
        ({"status": "ok", "metrics": []}, r"key 'metrics' is list \[\], expected an object"),
        ({"status": "ok", "train_losses": [[1]]}, r"key 'train_losses' .* expected a list of \[step, loss\]"),
        (
            {"status": "ok", "bytes": {"total": "1000"}},
            r"key 'bytes\.total' is str '1000', expected an integer",
        ),
        ({"status": "ok", "bytes": {"totl": 1}}, r"key 'bytes' has unknown keys \['totl'\]"),
    ],
)
def test_bad_input_names_the_file_and_the_key(data, pattern):
    with pytest.raises(ResultError, match=pattern):
        result_from_json(data, "job/result.json")


def test_a_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"status": "ok", "val_bpb": 1.2')
    with pytest.raises(ResultError, match=r"result\.json: not valid JSON \(JSONDecodeError"):
        read_result(path)
