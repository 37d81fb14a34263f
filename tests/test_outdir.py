"""Output folders: one run at a time (a lock), no silent reuse of a folder that holds a run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_cpu_args

from pgolf.parent.outdir import LOCK_NAME, FolderInUse, earlier_run, lock_folder, set_aside

TAKE_LOCK = """
import sys
from pgolf.parent.outdir import FolderInUse, lock_folder
try:
    lock = lock_folder(sys.argv[1], command="second")
except FolderInUse as e:
    print(e)
    sys.exit(3)
print("locked", lock.reclaimed or "")
"""


def _take_in_another_process(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TAKE_LOCK, str(folder)], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_held_folder_is_refused_to_another_process_until_released(tmp_path):
    folder = tmp_path / "run"
    lock = lock_folder(folder, command="first run")
    assert lock_folder(folder) is lock  # taking it again in the owning process is harmless
    owner = json.loads((folder / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["command"] == "first run"
    other = _take_in_another_process(folder)
    assert other.returncode == 3
    assert (
        f"{folder.resolve()} is in use by pid {os.getpid()}" in other.stdout and "first run" in other.stdout
    )
    lock.release()
    assert not (folder / LOCK_NAME).exists()
    free = _take_in_another_process(folder)
    assert free.returncode == 0 and free.stdout.strip() == "locked"  # released cleanly: nothing stale
    assert not (folder / LOCK_NAME).exists()  # and that process released it at exit


def test_a_stale_lock_of_a_dead_process_is_reclaimed_with_a_message(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = _dead_pid()
    stale = {"pid": dead, "host": os.uname().nodename, "started": time.time() - 60, "command": "old run"}
    (folder / LOCK_NAME).write_text(json.dumps(stale))
    other = _take_in_another_process(folder)
    assert other.returncode == 0, other.stdout
    assert f"reclaimed the stale lock {folder.resolve() / LOCK_NAME} of pid {dead}" in other.stdout
    assert "old run" in other.stdout and "no longer running" in other.stdout


def test_a_process_killed_while_holding_the_lock_leaves_it_reclaimable(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", TAKE_LOCK + "\nimport time; time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline().startswith("locked")
    with pytest.raises(FolderInUse, match=f"in use by pid {holder.pid}"):
        lock_folder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = lock_folder(folder)  # the kernel dropped the dead process's flock
    assert lock.reclaimed and f"pid {holder.pid}" in lock.reclaimed
    lock.release()


def test_a_filesystem_without_flock_runs_without_the_lock(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = lock_folder(tmp_path / "nfs")
    assert "running without the lock" in capsys.readouterr().out
    assert json.loads((tmp_path / "nfs" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "nfs" / LOCK_NAME).exists()


def test_earlier_runs_are_described_and_set_aside(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert earlier_run(folder) is None
    (folder / "config.json").write_text("{}")
    assert not earlier_run(folder).finished and "never finished" in earlier_run(folder).text
    (folder / "result.json").write_text(json.dumps({"status": "ok", "val_bpb": 1.23456789}))
    held = earlier_run(folder)
    assert held.finished and "val_bpb 1.234568" in held.text
    (folder / "result.json").write_text("{")
    assert "corrupt" in earlier_run(folder).text
    lock = lock_folder(folder)
    moved = set_aside(folder)
    assert sorted(p.name for p in moved.iterdir()) == ["config.json", "result.json"]
    assert sorted(p.name for p in folder.iterdir()) == [".pgolf.lock", ".replaced"]
    assert set_aside(folder) is None  # nothing left to move
    lock.release()


@pytest.mark.slow
def test_two_runs_into_one_folder_never_mix(tmp_path, shard_dir, tokenizer_model):
    """A second run into a busy folder is refused without touching it; a stale lock is reclaimed;
    a folder that holds a run is only reused with overwrite=true, which moves the old files aside."""
    run = tmp_path / "run"
    first = tiny_cpu_args(shard_dir, tokenizer_model, seed="11", **{"train.iterations": "100000"})
    a = subprocess.Popen(
        [sys.executable, "-m", "pgolf.run", *first, f"hydra.run.dir={run}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "train.log").is_file():  # A owns the folder and is training
            assert a.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        hydra_files = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
        b = run_cli(
            [*tiny_cpu_args(shard_dir, tokenizer_model, seed="22"), f"hydra.run.dir={run}"],
            tmp_path,
            timeout=120,
        )
        assert b.returncode == 2
        assert f"{run} is in use by pid {a.pid}" in b.stderr and "hydra.run.dir" in b.stderr
        assert a.poll() is None  # A still runs, and its folder holds only A's files
        assert json.loads((run / "config.json").read_text())["seed"] == 11
        assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files
        log = (run / "run.log").read_text()  # B wrote nothing into A's log (its timestamps may hold "22")
        assert "is in use by" not in log and not re.search(r"seed\W{0,3}22\b", log)
    finally:
        a.kill()
        a.wait()

    second = [*tiny_cpu_args(shard_dir, tokenizer_model, seed="33"), f"hydra.run.dir={run}"]
    c = run_cli(second, tmp_path, timeout=120)
    assert c.returncode == 2
    assert f"reclaimed the stale lock {run / LOCK_NAME} of pid {a.pid}" in c.stdout
    assert f"{run} already holds a run that was started and never finished" in c.stderr
    assert f"resume={run}" in c.stderr and "overwrite=true" in c.stderr
    assert json.loads((run / "config.json").read_text())["seed"] == 11

    d = run_cli([*second, "overwrite=true"], tmp_path)
    assert d.returncode == 0, d.stderr[-3000:]
    assert json.loads((run / "result.json").read_text())["seed"] == 33
    (old,) = (run / ".replaced").iterdir()
    assert json.loads((old / "config.json").read_text())["seed"] == 11 and not (old / "result.json").exists()

    e = run_cli(second, tmp_path, timeout=120)
    assert e.returncode == 2
    assert f"{run} already holds a finished run (result.json: status ok, val_bpb" in e.stderr
    assert "resume=" not in e.stderr and "overwrite=true" in e.stderr
    assert not (run / LOCK_NAME).exists()
