"""A full disk gives one clear error (the file, the bytes needed and free) and leaves no temp file,
from each atomic writer up to a whole run; Ctrl-C is recorded as an interruption in result.json."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, default_sigint, tiny_cpu_args

from pgolf import results
from pgolf.results import DiskFullError, write_json_atomic, write_text_atomic


def _no_space(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "tmp" in p.name)


@pytest.mark.parametrize("writer", ["json", "text", "bytes"])
def test_atomic_writers_name_the_file_and_leave_nothing(tmp_path, monkeypatch, writer):
    target = tmp_path / "out" / "result.json"
    write_json_atomic(target, {"old": True})
    monkeypatch.setattr(results.os, "fsync", _no_space)  # the data reached the page cache, not the disk
    with pytest.raises(DiskFullError) as e:
        if writer == "json":
            write_json_atomic(target, {"x": "y" * 1000})
        elif writer == "text":
            write_text_atomic(target, "z" * 5000)
        else:
            write_text_atomic(target, b"\0" * 7000)
    msg = str(e.value)
    needed = {"json": len(json.dumps({"x": "y" * 1000}, indent=2)) + 1, "text": 5000, "bytes": 7000}[writer]
    assert msg.startswith(f"no space left on the device for {target}: it needs {needed:,} bytes, ")
    assert "bytes free" in msg and e.value.errno == errno.ENOSPC
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, not a chain
    assert _leftovers(tmp_path) == []
    assert json.loads(target.read_text()) == {"old": True}  # the previous file is intact


def test_a_shard_write_on_a_full_disk(tmp_path, monkeypatch):
    import numpy as np

    from pgolf.data.shards import write_shard

    monkeypatch.setattr(results.os, "fsync", _no_space)
    with pytest.raises(DiskFullError, match=r"fineweb_train_000000\.bin: it needs 3,024 bytes"):
        write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000, dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_write_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save turns the failed write into a RuntimeError; it still reads as a full disk."""
    from pgolf import checkpoint

    writes = {"n": 0}
    original = checkpoint._HashingWriter.write

    def fills_up(self, data):
        writes["n"] += 1
        if writes["n"] > 3:  # a few records land, then the disk is full
            _no_space()
        return original(self, data)

    monkeypatch.setattr(checkpoint._HashingWriter, "write", fills_up)
    state = {"model": {"w": torch.zeros(1000, 100)}}  # 400,000 bytes of tensors
    step_dir = tmp_path / "checkpoint" / "step_0000002"
    step_dir.mkdir(parents=True)
    with pytest.raises(DiskFullError) as e:
        checkpoint._save_atomic(state, step_dir / "rank0.pt")
    assert f"for {step_dir / 'rank0.pt'}: it needs 400,000 bytes" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, not a chain
    assert list(step_dir.iterdir()) == []


_FULL_AT_ARTIFACT = """
import errno, os, sys
import pgolf.trainer as T

def no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

original = T.Trainer.write_artifact

def write_artifact(self):
    os.fsync = no_space  # from here on every atomic write fails, result.json included
    return original(self)

T.Trainer.write_artifact = write_artifact
sys.argv = ["pgolf.run", *sys.argv[1:]]
from pgolf.parent.run import main
main()
"""


def test_a_run_on_a_full_disk_says_so_once(tmp_path, shard_dir, tokenizer_model):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_AT_ARTIFACT, *tiny_cpu_args(shard_dir, tokenizer_model)]
        + [f"hydra.run.dir={run}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HYDRA_FULL_ERROR="1"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The code is written first (train_gpt.py), then the model: the first write names the file.
    first = run / "artifact" / "train_gpt.py"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"pgolf: DiskFullError: no space left on the device for {first}: it needs ")
    assert "bytes free" in lines[0] and "result.json not written either: no space left" in lines[0]
    assert lines[1].startswith("pgolf: job failed: ") and "result.json not written: no space left" in lines[1]
    assert _leftovers(run) == []
    assert not (run / "result.json").exists()  # it could not be written, and says so instead


def test_ctrl_c_is_recorded_as_an_interruption(tmp_path, shard_dir, tokenizer_model):
    run = tmp_path / "run"
    args = tiny_cpu_args(shard_dir, tokenizer_model, **{"train.iterations": "100000"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgolf.run", *args, f"hydra.run.dir={run}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    log = run / "train.log"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (log.is_file() and "step:3/" in log.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert "step:3/" in log.read_text(), "the run never reached step 3 within 240 s"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed wait must not leave a 100,000-step run behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["error"].startswith("interrupted by the user (Ctrl-C / SIGINT)")
    assert "pgolf: job failed: interrupted by the user" in err
    assert "Traceback" not in err, err[-3000:]


def test_a_full_disk_outside_the_atomic_writers_is_described(tmp_path):
    """A log line or any other plain write that hits a full disk is recorded in the same words."""
    from pgolf.train import describe_error

    log = tmp_path / "train.log"
    text = describe_error(OSError(errno.ENOSPC, "No space left on device", str(log)), tmp_path)
    assert text.startswith(f"DiskFullError: no space left on the device for {log}: it needs more space, ")
    assert "bytes free" in text
    wrapped = RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")  # as torch.save raises it
    assert describe_error(wrapped, tmp_path).startswith(
        f"DiskFullError: no space left on the device for {tmp_path}"
    )
    assert describe_error(ValueError("bad")) == "ValueError: bad"
