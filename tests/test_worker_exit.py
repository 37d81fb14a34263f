"""The worker entry (`python -m pgolf.train <job_dir>`) ends through os._exit once its output is
flushed, with 0 / 1 / 130 for success / failure / interrupt: the interpreter's own teardown met the
process group's gloo threads and now and then aborted a rank that had finished (SIGABRT)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pgolf.train as worker


class _Exited(Exception):
    def __init__(self, code: int):
        self.code = code


@pytest.mark.parametrize(
    ("outcome", "code"), [(None, 0), (RuntimeError("boom"), 1), (KeyboardInterrupt(), 130)]
)
def test_main_leaves_through_os_exit_with_the_runs_code(outcome, code, monkeypatch, capsys):
    def fake_run_job(job_dir):
        if outcome is not None:
            raise outcome

    def fake_exit(c):
        raise _Exited(c)

    monkeypatch.setattr(worker, "run_job", fake_run_job)
    monkeypatch.setattr(worker.os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["pgolf.train", "job"])
    monkeypatch.setattr("pgolf.parent.console.worker_logging", lambda: None)
    with pytest.raises(_Exited) as exited:
        worker.main()
    assert exited.value.code == code
    if outcome is not None:
        assert "pgolf.train:" in capsys.readouterr().err


def test_exit_now_flushes_what_was_printed(tmp_path):
    """os._exit skips the interpreter's flush of buffered stdout: _exit_now does it first."""
    code = "import sys, pgolf.train as w\nsys.stdout.write('last line, buffered')\nw._exit_now(3)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert out.stdout == "last line, buffered"
