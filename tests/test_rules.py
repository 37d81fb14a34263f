"""Every run is a legal submission: the time guarantee, the rules verdict, failed runs, file hashes,
`pgolf.check`, the tokenizer identity and the same shipped code in-process and in a worker."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RECURRENT, run_cli, run_script, tiny_cpu_args

from pgolf.parent.check import check_run
from pgolf.parent.submission import PackError, pack
from pgolf.quant.mixed import _Within
from pgolf.results import read_json, write_json_atomic
from pgolf.rules import verdict


def _strict(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------------------- strict JSON
def test_result_json_is_strict_and_says_what_a_null_stood_for(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"val_bpb": float("nan"), "m": {"x": [1.0, float("-inf")]}})
    r = _strict(tmp_path / "r.json")
    assert r["val_bpb"] is None and r["m"]["x"] == [1.0, None]
    assert r["non_finite"] == {"val_bpb": "nan", "m.x[1]": "-inf"}


# ------------------------------------------------------------------------- calibration clock
def test_calibration_never_starts_a_batch_that_would_end_past_the_deadline():
    def slow():
        for i in range(100):
            time.sleep(0.05)
            yield i

    t0 = time.perf_counter()
    w = _Within(slow(), deadline=t0 + 0.32, batch_seconds=0.0, limit=None)
    got = list(w)
    end = time.perf_counter()
    assert w.cut and 3 <= len(got) <= 6 and end <= t0 + 0.32 + 0.02
    assert len(w.times) == len(got) and min(w.times) >= 0.05
    # a prior estimate larger than the time left: no batch at all
    w = _Within(slow(), deadline=time.perf_counter() + 0.1, batch_seconds=0.2, limit=None)
    assert list(w) == [] and w.cut
    # no deadline: the limit alone, not cut
    w = _Within(slow(), deadline=None, batch_seconds=0.0, limit=2)
    assert list(w) == [0, 1] and not w.cut


def test_calibration_times_a_batch_after_the_device_finished_it():
    """On a GPU the forward is only queued when the host moves on: the time that the deadline and
    the probe go by must come after the device's sync, or it is the launch time alone."""
    queued: list[float] = []

    def device_sync():  # the device is busy 0.05 s with each batch the host queued
        time.sleep(0.05 * len(queued))
        queued.clear()

    def instant():
        for i in range(4):
            queued.append(1.0)
            yield i

    w = _Within(instant(), deadline=None, batch_seconds=0.0, limit=None, sync=device_sync)
    assert list(w) == [0, 1, 2, 3] and min(w.times) >= 0.05
    # and the deadline sees it: 0.05 s a batch, 0.12 s left -> two batches, not all four
    w = _Within(
        instant(), deadline=time.perf_counter() + 0.12, batch_seconds=0.0, limit=None, sync=device_sync
    )
    assert list(w) == [0, 1] and w.cut


def test_a_missing_compressor_package_stops_the_run_before_it_trains(monkeypatch):
    """quant.compressor=brotli without the brotli package: the error comes when the quantizer is
    built (before priming), naming the key and the fix, not at export after the training budget."""
    import importlib

    from pgolf.components import QUANT
    from pgolf.quant.config import MixedQuantConfig

    real = importlib.import_module

    def no_brotli(name, *a, **k):
        if name == "brotli":
            raise ImportError("No module named 'brotli'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_brotli)
    with pytest.raises(
        RuntimeError, match=r"quant.compressor=brotli needs the Python package 'brotli'.*pip install brotli"
    ):
        QUANT.build(MixedQuantConfig(compressor="brotli"))
    QUANT.build(MixedQuantConfig(compressor="lzma", level=9))  # the standard library's: no package needed


# Calibration made slow on purpose: the probe's batches take PROBE_DELAY s more, the real ones
# REAL_DELAY s more, so the probe raises the 0.01 s reserve (to ~1.25 x 8 x PROBE_DELAY) but still
# underestimates the real 8 x REAL_DELAY, and only the deadline keeps training + calibration inside
# budget.train_seconds. The budget only needs room for that reserve plus a few real batches.
PROBE_DELAY, REAL_DELAY, TRAIN_SECONDS = 0.25, 1.0, 10.0
SLOW_CALIBRATION = f"""
import sys, time
import pgolf.quant.mixed as mixed
real, calls = mixed.collect_hessians, []
def slow(model, watch, batches, dtype):
    calls.append(1)
    delay = {PROBE_DELAY} if len(calls) == 1 else {REAL_DELAY}
    def paced():
        for b in batches:
            time.sleep(delay)
            yield b
    return real(model, watch, paced(), dtype)
mixed.collect_hessians = slow
from pgolf.parent.run import main
sys.argv = ["pgolf.run", *sys.argv[1:]]
main()
"""


# Which layer plan each collect_hessians call ran under: the probe (the first call) must time the
# graph training ends in, not the one it starts in (a recurrent model's loop adds layer passes).
LOOPING_AT_CALIBRATION = """
import json, os, sys
import pgolf.quant.mixed as mixed
real = mixed.collect_hessians
def spy(model, watch, batches, dtype):
    with open(os.environ["LOOPING_LOG"], "a") as f:
        f.write(json.dumps(bool(model.looping)) + "\\n")
    return real(model, watch, batches, dtype)
mixed.collect_hessians = spy
from pgolf.parent.run import main
sys.argv = ["pgolf.run", *sys.argv[1:]]
main()
"""


def test_the_calibration_probe_times_the_graph_training_ends_in(tmp_path, shard_dir, tokenizer_model):
    args = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{
            **TINY_RECURRENT,
            "quant": "int6_gptq",
            "quant.calibration.batches": "4",
            "budget.mode": "wallclock",
            "budget.train_seconds": "4",
            "train.iterations": "100000",
            "train.log_every": "0",
        },
    )
    log = tmp_path / "looping.jsonl"
    proc = run_script(LOOPING_AT_CALIBRATION, args, tmp_path / "run", env={"LOOPING_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # probe, then the real calibration: both with the loop on
    assert [json.loads(x) for x in log.read_text().split()] == [True, True]
    train_log = (tmp_path / "run" / "train.log").read_text()
    # and training still started with the loop off, switching it on halfway
    assert "graph_variant:loop_on frac:0.5" in train_log


def _slow_gptq_args(shard_dir: Path, tokenizer: Path, train_seconds: float, **extra: str) -> list[str]:
    """A wallclock GPTQ run of 8 calibration batches with a 0.01 s configured reserve (for
    SLOW_CALIBRATION: only the probe can raise the reserve)."""
    return tiny_cpu_args(
        shard_dir,
        tokenizer,
        **{
            "quant": "int6_gptq",
            "quant.calibration.batches": "8",
            "budget.mode": "wallclock",
            "budget.train_seconds": str(train_seconds),
            "budget.quant_reserve_seconds": "0.01",
            "train.iterations": "100000",
            **extra,
        },
    )


def test_a_calibration_slower_than_the_reserve_still_fits_the_training_budget(
    tmp_path, shard_dir, tokenizer_model
):
    args = _slow_gptq_args(
        shard_dir,
        tokenizer_model,
        TRAIN_SECONDS,
        **{
            "train.log_every": "0",
            # short steps: the training clock stops within a step of its cap, well inside the reserve
            "train.grad_accum_base": "1",
            "train.batch_tokens": "512",
        },
    )
    proc = run_script(SLOW_CALIBRATION, args, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _strict(tmp_path / "run" / "result.json")
    plan, cal = r["calibration_plan"], r["calibration"]
    # the probe measured >= PROBE_DELAY s/batch x 8 and raised the reserve far above the configured 0.01 s
    assert plan["configured_reserve_seconds"] == 0.01 and plan["reserve_seconds"] >= 1.25 * 8 * PROBE_DELAY
    # the real batches took over REAL_DELAY s: all 8 would not fit, so the deadline cut them short
    assert cal["cut_by_deadline"] and 0 <= cal["batches"] < 8 and cal["planned"] == 8
    used = r["train_ms"] / 1000 + r["calibration_seconds"]
    assert used <= TRAIN_SECONDS and r["rules"]["checks"]["train_seconds"]["used"] == pytest.approx(used)
    assert r["rules"]["pass"] and r["status"] == "ok"
    assert "calibration: stopped after" in (tmp_path / "run" / "train.log").read_text()


def test_a_calibration_that_leaves_no_training_time_is_refused_before_priming(
    tmp_path, shard_dir, tokenizer_model
):
    """The probe (PROBE_DELAY s a batch, 8 batches: >= 2 s) against a 1.5 s budget: the run fails
    with the fix in the message, before it spends minutes compiling on a GPU."""
    args = _slow_gptq_args(shard_dir, tokenizer_model, 1.5)
    # any training step (priming included) before the refusal fails the run with another error
    no_steps = SLOW_CALIBRATION.replace(
        "from pgolf.parent.run import main",
        "import pgolf.trainer\n"
        "def no_step(*a, **k):\n"
        "    raise AssertionError('a training step ran before the probe refused the run')\n"
        "pgolf.trainer.Trainer._train_step = no_step\n"
        "from pgolf.parent.run import main",
    )
    proc = run_script(no_steps, args, tmp_path / "run")
    assert proc.returncode == 1
    r = _strict(tmp_path / "run" / "result.json")
    assert r["status"] == "failed"
    assert (
        "leaves no training time in budget.train_seconds=1.5; lower quant.calibration.batches" in r["error"]
    )
    assert "calibration probe:" in (tmp_path / "run" / "train.log").read_text()


# ------------------------------------------------------------------------------ eval + TTT
def test_ttt_stops_updating_when_the_eval_clock_runs_short_but_scores_everything():
    from test_eval_sliding import scorer, stream, tiny_model

    from pgolf.eval.sliding import evaluate_sliding
    from pgolf.ttt.config import ScoreFirstTTTConfig
    from pgolf.ttt.score_first import ScoreFirstTTT

    toks = np.tile(stream(41), 8)
    n = toks.size - 1
    cfg = ScoreFirstTTTConfig(lr=0.5, epochs=3, chunk_tokens=40, batch_seqs=2)

    def run(deadline):
        model = tiny_model()
        sc = scorer(model, toks, 16, 4, B=3)
        ttt = ScoreFirstTTT(cfg)
        return ttt.run(model, sc, model, log=lambda s: None, deadline=deadline), sc, ttt

    # no time left: no update at all, every target scored once, exactly the plain sliding eval
    res, sc, ttt = run(time.perf_counter() - 1.0)
    ref = evaluate_sliding(scorer(tiny_model(), toks, 16, 4, B=3))
    assert ttt.stopped_at == 0 and (sc.count[:n] == 1).all() and res.tokens == n
    assert res.val_loss == pytest.approx(ref.val_loss, rel=1e-12, abs=0)
    # time enough: the same as no deadline
    free, _, _ = run(None)
    res, sc, ttt = run(time.perf_counter() + 3600)
    assert ttt.stopped_at is None and res.val_loss == free.val_loss and res.val_loss < ref.val_loss - 0.05


# -------------------------------------------------------------------------------- verdict
def _config(**budget) -> dict:
    return {
        "budget": {"train_seconds": 600, "eval_seconds": 600, "artifact_bytes": 16_000_000, **budget},
        "ttt": {"name": "score_first"},
        "model": {"vocab_size": 1024},
    }


def _result(**kw) -> dict:
    r = {
        "train_ms": 590_000.0,
        "calibration_seconds": 9.0,
        "timings": {"eval": 100.0, "ttt": 400.0, "eval_warmup": 50.0},
        "bytes": {"total": 15_999_000},
        "val_loss": 2.5,
        "val_bpb": 1.08,
        "metrics": {"roundtrip": {"tokens": 1000}},
        "val": {"tokens_total": 1010, "seq_len": 64},
    }
    return r | kw


def test_verdict_names_every_broken_rule():
    assert verdict(_result(), _config())["pass"]
    v = verdict(_result(calibration_seconds=10.5), _config())
    assert not v["pass"] and "train_seconds" in v["reason"]
    assert v["checks"]["train_seconds"]["used"] == pytest.approx(600.5)  # training + calibration
    v = verdict(_result(timings={"eval": 300.0, "ttt": 301.0}), _config())
    assert not v["pass"] and "eval_seconds" in v["reason"]
    assert not verdict(_result(bytes={"total": 16_000_001}), _config())["pass"]
    c = _config()
    c["ttt"]["name"] = "pre_eval_finetune"
    assert "not a legal score-first mode" in verdict(_result(), c)["reason"]
    for bad in (float("nan"), None, 3 * math.log(1024)):
        assert not verdict(_result(val_loss=bad), _config())["checks"]["val_bpb"]["held"]
    v = verdict(_result(metrics={"roundtrip": {"tokens": 900}}), _config())
    assert "not the whole split" in v["reason"]


def _legacy_multiplicity(n: int, L: int, stride: int, ttt: bool) -> np.ndarray:
    """How often the pre-fix records' loops score each target, written out plainly: every start
    ws = 0, stride, ... < n; a window of wlen = min(ws + L, n) - ws scores all of it at ws = 0, else
    its last min(stride, wlen) targets; score-first TTT keeps only ws = 0 and wlen >= stride."""
    times = np.zeros(n, dtype=np.int64)
    for ws in range(0, n, stride):
        wlen = min(ws + L, n) - ws
        if ttt and ws > 0 and wlen < stride:
            continue
        first = ws if ws == 0 else ws + wlen - min(stride, wlen)
        times[first : ws + wlen] += 1
    return times


@pytest.mark.parametrize("ttt", [False, True])
@pytest.mark.parametrize(("total", "L", "stride"), [(7054, 64, 32), (1 + 10 * 48, 48, 22)])
def test_a_legacy_window_run_scores_the_whole_split_but_is_no_submission(total, L, stride, ttt):
    n = (total - 1) // L * L
    times = _legacy_multiplicity(n, L, stride, ttt)
    assert times.min() >= 1 and times.sum() > n  # every target at least once, the tail again
    mode = "score_first" if ttt else "sliding"
    c = _config()
    c["eval"] = {"stride": stride}

    def judged(tokens: int, rule: str | None) -> dict:
        r = _result(
            metrics={"roundtrip": {"tokens": tokens}},
            val={"tokens_total": total, "seq_len": L},
            final_mode=mode,
            final_window_rule=rule,
        )
        return verdict(r, c)

    v = judged(int(times.sum()), "legacy")
    assert v["checks"]["val_split"]["held"] and v["checks"]["val_split"]["tokens_expected"] == times.sum()
    assert not v["checks"]["window_rule"]["held"] and not v["pass"]
    assert "eval.window_rule=legacy" in v["reason"] and "val_split" not in v["reason"]
    # a legacy count that is off either way (a window lost, or scored twice) is not the whole split
    for wrong in (times.sum() - 1, times.sum() + stride, n):
        assert not judged(int(wrong), "legacy")["checks"]["val_split"]["held"]
    # the exact rule scores each target once: the legacy count is refused there
    assert not judged(int(times.sum()), "exact")["checks"]["val_split"]["held"]
    v = judged(n, "exact")
    assert v["pass"] and v["checks"]["window_rule"] == {"rule": "exact", "held": True}


# ------------------------------------------------------------------- failed runs fail
def test_a_diverged_run_fails_with_strict_json(tmp_path, shard_dir, tokenizer_model):
    lr = {k: "1e8" for k in ("optimizer.matrix_lr", "optimizer.scalar_lr", "optimizer.embed_lr")}
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **lr, **{"train.log_every": "0"}), tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]
    r = _strict(tmp_path / "run" / "result.json")
    assert r["status"] == "failed" and ("NaN" in r["error"] or "not a legal submission" in r["error"])
    with pytest.raises(PackError, match="did not finish"):
        pack(tmp_path / "run")


# ----------------------------------------------- a finished run: check, pack, shipped code
@pytest.fixture
def finished(tiny_run) -> Path:
    return tiny_run[0] / "run"  # shared with other modules: read it, or copy it before changing it


def test_check_reverifies_a_finished_run_from_its_files(finished):
    v = check_run(finished)
    assert v["pass"] and v["skipped"] == [], v
    c = v["checks"]
    assert c["val_split"]["held"] and c["tokenizer"]["held"] and c["artifact_bytes"]["held"]
    r = read_json(finished / "result.json")
    assert r["rules"]["pass"] and set(r["files"]) == {"artifact/train_gpt.py", "artifact/final_model.ptz"}
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf.check", str(finished)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "pgolf.check: PASS" in proc.stdout


@pytest.mark.parametrize("name", ["final_model.ptz", "train_gpt.py"])
def test_one_flipped_byte_fails_check_and_pack(finished, tmp_path, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = run / "artifact" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    v = check_run(run)
    assert (
        not v["pass"]
        and f"artifact/{name}" in v["reason"]
        and "changed since the run wrote it" in v["reason"]
    )
    with pytest.raises(PackError, match="not a legal submission"):
        pack(run)
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf.check", str(run)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_shipped_code_is_byte_identical_in_process_and_in_a_worker(finished, tiny_sweep):
    from pgolf.parent.pack import unpack

    sweep, _ = tiny_sweep  # the same job as `finished`, its worker a subprocess
    worker = (sweep / "0" / "artifact" / "train_gpt.py").read_bytes()
    in_process = (finished / "artifact" / "train_gpt.py").read_bytes()
    files = unpack(worker.decode())
    assert "pgolf/train.py" in files  # the worker runs it as __main__: it must still ship
    assert "job_dir" not in json.loads(files["config.json"])
    assert worker == in_process


# -------------------------------------------------------------------------------- tokenizer
def test_a_tokenizer_that_did_not_write_the_shards_is_refused(tmp_path, shard_dir, tokenizer_model):
    import shutil

    from pgolf.data.build import train_tokenizer
    from pgolf.data.embedded import collect_documents
    from pgolf.data.shards import ShardError
    from pgolf.data.source import open_shards

    other = train_tokenizer(collect_documents()[200:320], 400, tmp_path / "other400.model")
    assert read_json(shard_dir / "manifest.json")["tokenizer"]["sha256"]
    with pytest.raises(
        ShardError, match=r"other400\.model.*is not the one that wrote the shards.*manifest\.json"
    ):
        open_shards(shard_dir, "fineweb_train_*.bin", "fineweb_val_*.bin", other, 400)
    ok = open_shards(shard_dir, "fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_model, 400)
    assert ok.warnings == []
    # a folder without a recorded hash (an older export): a warning, not an error
    bare = tmp_path / "bare"
    shutil.copytree(shard_dir, bare)
    (bare / "manifest.json").unlink()
    src = open_shards(bare, "fineweb_train_*.bin", "fineweb_val_*.bin", other, 400)
    assert len(src.warnings) == 1 and "records no tokenizer sha256" in src.warnings[0]


def test_download_records_the_tokenizer_hash_and_refuses_a_mismatch(tmp_path, tokenizer_model):
    from pgolf.data.download import DownloadError, record_tokenizer_hash
    from pgolf.results import sha256_file

    manifest = tmp_path / "manifest.json"
    body = {
        "datasets": [{"name": "fineweb10B_sp400", "tokenizer_name": "sp400"}],
        "tokenizers": [{"name": "sp400", "model_path": "tokenizers/t.model"}],
    }
    manifest.write_text(json.dumps(body))
    record_tokenizer_hash(manifest, "fineweb10B_sp400", tokenizer_model)
    assert read_json(manifest)["tokenizers"][0]["sha256"] == sha256_file(tokenizer_model)
    body["tokenizers"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(body))
    with pytest.raises(DownloadError, match="run the download again"):
        record_tokenizer_hash(manifest, "fineweb10B_sp400", tokenizer_model)


# -------------------------------------------------------------------------------- code bytes
def test_shipped_code_drops_error_text_but_keeps_exit_codes_and_the_data_messages(tmp_path):
    from pgolf.parent.pack import KEEP_MESSAGES, minify_source, shipped_sources

    src = (
        "import sys\nclass E(Exception):\n    pass\n"
        "def f(x):\n    if x == 1:\n        raise E(f'x={x} is a long explanation of the fix')\n"
        "    if x == 2:\n        raise SystemExit('usage: tool <x>')\n"
        "    if x == 3:\n        raise ValueError('a' + 'b')\n    return x\n"
    )
    small = minify_source(src, keep_messages=False)
    assert "long explanation" not in small and "raise E('')" in small and "raise ValueError('')" in small
    assert "usage: tool <x>" in small  # SystemExit('...') exits 1, SystemExit() would exit 0
    assert minify_source(src) == minify_source(
        src, keep_messages=True
    ) and "long explanation" in minify_source(src)
    ns: dict = {}
    exec(compile(small, "m", "exec"), ns)
    with pytest.raises(ns["E"]):
        ns["f"](1)
    with pytest.raises(SystemExit) as e:
        ns["f"](2)
    assert e.value.code == "usage: tool <x>" and ns["f"](4) == 4
    # what a packed run's user can get wrong (DATA_PATH, TOKENIZER_PATH) keeps its explanation
    import pgolf.data.source  # noqa: F401  (reaches the shard checks; the tree shaker keeps what is reached)
    import pgolf.train  # noqa: F401  (the packed entry point)
    from pgolf.parent.pack import imported_modules

    out = shipped_sources(imported_modules(), _full_config())
    assert (
        "pgolf/data/shards.py" in KEEP_MESSAGES
        and "is not the one that wrote the shards" in out["pgolf/data/shards.py"]
    )


def _full_config() -> dict:
    from pgolf.parent.compose import compose_dict

    cfg = compose_dict(["experiment=r0409"])
    for key in ("resume", "launch", "report"):
        cfg.pop(key, None)
    return cfg


def test_the_trimmed_config_loads_into_the_run_s_config():
    from pgolf.config import job_config_from_dict, to_dict
    from pgolf.parent.pack import shipped_config

    full = to_dict(job_config_from_dict(_full_config()))
    small = shipped_config(full)
    assert "job_dir" not in small and len(json.dumps(small)) < 0.6 * len(json.dumps(full))
    assert small["quant"]["name"] == "mixed" and small["data"] == full["data"]
    assert to_dict(job_config_from_dict(small)) == {**full, "job_dir": ""}


def test_a_trimmed_config_keeps_the_brotli_codec_of_its_model(tmp_path):
    """quant.compressor=brotli is the preset's default, so the trimmed config omits it: the codec
    must still come from the run's whole config (brotli packs the code ~2.5% smaller)."""
    pytest.importorskip("brotli")
    from pgolf.config import job_config_from_dict, to_dict
    from pgolf.parent.pack import shipped_config, write_wrapper

    full = to_dict(job_config_from_dict(_full_config()))
    assert "compressor" not in shipped_config(full)["quant"] and full["quant"]["compressor"] == "brotli"
    write_wrapper(tmp_path / "train_gpt.py", full)
    wrapper = (tmp_path / "train_gpt.py").read_text()
    assert wrapper.startswith("import brotli,") and "brotli.decompress(" in wrapper
