"""GPU slots: concurrent jobs (threads and processes, fake devices) never share a GPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pgolf.parent.slots import GpuSlots, slot_count, visible_devices


def test_threads_never_share_a_device(tmp_path):
    pool = GpuSlots(tmp_path / "slots", ["0", "1", "2"])
    holders: dict[str, int] = {}
    guard = threading.Lock()
    violations: list[str] = []
    used: list[str] = []

    def job(i: int) -> None:
        rng = random.Random(i)
        for _ in range(4):
            with pool.acquire(1, poll_s=0.002) as lease:
                (dev,) = lease.devices
                with guard:
                    if dev in holders:
                        violations.append(f"job {i} got GPU {dev} held by job {holders[dev]}")
                    holders[dev] = i
                    used.append(dev)
                time.sleep(rng.uniform(0.001, 0.01))
                with guard:
                    del holders[dev]

    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not violations
    assert len(used) == 32 and set(used) == {"0", "1", "2"}


def test_multi_gpu_jobs_take_all_or_nothing(tmp_path):
    pool = GpuSlots(tmp_path / "slots", ["0", "1", "2", "3"])
    a = pool.acquire(2)
    b = pool.acquire(2)
    assert sorted(a.devices + b.devices) == ["0", "1", "2", "3"]
    assert a.env() == {"CUDA_VISIBLE_DEVICES": ",".join(a.devices)}
    assert pool.try_acquire(1) is None  # all four are held
    a.release()
    c = pool.try_acquire(2)
    assert c is not None and sorted(c.devices) == sorted(a.devices)
    # With one GPU free and two wanted, nothing is taken (no half-held jobs that could deadlock).
    c.release()
    single = pool.acquire(1)
    assert pool.try_acquire(2) is None
    other = pool.try_acquire(1)
    assert other is not None and other.devices != single.devices
    other.release()
    single.release()
    b.release()
    with pytest.raises(TimeoutError):
        blocker = pool.acquire(4, timeout_s=5)
        try:
            pool.acquire(1, poll_s=0.01, timeout_s=0.05)
        finally:
            blocker.release()
    with pytest.raises(RuntimeError, match="needs 5 GPUs"):
        pool.acquire(5)


def _process_job(slot_dir: str, devices: list[str], marks: str, rounds: int, seed: int, start=None) -> None:
    pool = GpuSlots(slot_dir, devices)
    rng = random.Random(seed)
    if start is not None:
        start.wait(30)
    for _ in range(rounds):
        with pool.acquire(1, poll_s=0.002) as lease:
            mark = Path(marks) / f"{lease.devices[0]}.busy"
            try:  # O_EXCL: fails if another process is on this GPU right now
                fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                Path(marks, f"violation-{os.getpid()}-{time.time_ns()}").touch()
                continue
            os.close(fd)
            Path(marks, f"used-{lease.devices[0]}-{os.getpid()}-{time.time_ns()}").touch()
            time.sleep(rng.uniform(0.001, 0.01))
            mark.unlink()


def test_processes_never_share_a_device(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    ctx = mp.get_context("fork")
    # All four start their rounds together: else, on a loaded CPU, the first forked process can finish
    # its rounds before the next one runs, and only GPU 0 is ever used (seen on a 2-core CI runner).
    start = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_process_job, args=(str(tmp_path / "slots"), ["0", "1"], str(marks), 6, i, start))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = [p.name for p in marks.iterdir()]
    assert not [n for n in names if n.startswith("violation")]
    used = [n for n in names if n.startswith("used-")]
    assert len(used) == 24 and {n.split("-")[1] for n in used} == {"0", "1"}


def test_a_killed_job_frees_its_gpu(tmp_path):
    slot_dir = tmp_path / "slots"
    code = (
        "import sys, time; from pgolf.parent.slots import GpuSlots; "
        f"lease = GpuSlots({str(slot_dir)!r}, ['0']).acquire(1); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        pool = GpuSlots(slot_dir, ["0"])
        assert pool.try_acquire(1) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        lease = pool.acquire(1, poll_s=0.01, timeout_s=5)  # the kernel dropped the dead job's lock
        assert lease.devices == ["0"]
        lease.release()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_visible_devices_and_slot_count(monkeypatch):
    assert visible_devices([3, 5]) == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 6,7")
    assert visible_devices() == ["2", "6", "7"]
    assert slot_count(None, 1) == 3 and slot_count([0, 1, 2, 3], 2) == 2 and slot_count([0], 4) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="no GPU"):
        GpuSlots("/tmp/unused-slots", visible_devices())
