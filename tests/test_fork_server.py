"""The tests' fork server (tests/_zygote.py): a forked run is the process `python -c` would be."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import _ZYGOTE, REPO, _run_python

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or os.environ.get("PGOLF_TEST_FORK", "1") == "0",
    reason="the fork server is off (PGOLF_TEST_FORK=0) or this platform cannot fork",
)

PROBE = (
    "import os, sys\n"
    "print(os.environ['PROBE_VALUE'], os.getcwd(), sys.path[0], sys.argv[1:], __name__)\n"
    "print('to stderr', file=sys.stderr)\n"
    "sys.exit(int(os.environ.get('PROBE_EXIT', '0')))\n"
)


def _served(script: str, env: dict, timeout: int = 600) -> tuple[subprocess.CompletedProcess, int]:
    """`python -c script a=1` as the end-to-end tests start their runs; (process, runs forked)."""
    before = _ZYGOTE.forked
    cmd = [sys.executable, "-c", script, "a=1"]
    proc = _run_python(cmd, dict(os.environ, **env), timeout)
    return proc, _ZYGOTE.forked - before


def test_a_forked_run_has_its_own_environment_argv_streams_and_exit_status():
    proc, forked = _served(PROBE, {"PROBE_VALUE": "seen", "PROBE_EXIT": "3"})
    assert forked == 1
    assert proc.returncode == 3
    assert proc.stdout == f"seen {REPO} {REPO} ['a=1'] __main__\n"
    assert proc.stderr == "to stderr\n"
    assert "PROBE_VALUE" not in os.environ  # the child's environment stayed in the child


def test_an_uncaught_exception_exits_1_with_its_traceback():
    proc, forked = _served("raise ValueError('boom')", {})
    assert forked == 1 and proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: boom" in proc.stderr


def test_a_setting_torch_reads_at_import_gets_a_process_of_its_own():
    """TORCH_LOGS is read when torch loads, so the forked server could not honour a new value."""
    env = {"PROBE_VALUE": "fresh", "TORCH_LOGS": "dynamo"}
    proc, forked = _served(PROBE, env)
    assert forked == 0 and proc.returncode == 0 and proc.stdout.startswith("fresh ")


def test_a_run_past_its_timeout_is_killed_and_the_server_serves_the_next():
    with pytest.raises(subprocess.TimeoutExpired):
        _served("import time\nprint('started', flush=True)\ntime.sleep(60)", {}, timeout=2)
    proc, forked = _served(PROBE, {"PROBE_VALUE": "next"})
    assert forked == 1 and proc.returncode == 0 and proc.stdout.startswith("next ")
