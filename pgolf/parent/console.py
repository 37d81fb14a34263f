"""Logging between pgolf.run and its worker: the formatter and filter that conf/hydra/job_logging/pgolf.yaml
names, the relay that logs a worker subprocess's output lines into the job's logging, and the worker's
side of it.

A worker in the parent's process logs straight into Hydra's handlers. A worker subprocess (sweep jobs,
torchrun) has its own process, so pgolf.run reads its stdout and stderr line by line and logs each line
again here: a line the worker tagged (RELAY_FORMAT) under its own logger name and level, any other line
(prints, warnings, tracebacks, torchrun's own lines) under `pgolf.worker`, INFO from stdout and WARNING
from stderr. Never shipped in a run's code (pgolf.parent.pack.PARENT_PACKAGE): a packed train_gpt.py has no
parent to relay to and prints plain lines (pgolf.train.run_packed).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable

WORKER = logging.getLogger("pgolf.worker")
# A worker that pgolf.run starts (PGOLF_LOG_RELAY=1) tags each line with its level and logger; TAGGED
# reads the tags back (tests/test_logging.py checks that the two agree).
RELAY_FORMAT = "%(levelname)s:%(name)s:%(message)s"
TAGGED = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL):([\w.]+):(.*)")


def worker_logging() -> None:
    """Console logging of `python -m pgolf.train` (alone, under torchrun, or started by pgolf.run):
    plain lines on stdout, tagged for the relay under pgolf.run. PGOLF_LOG_DEBUG names the loggers
    (comma-separated, `root` for all) whose debug lines pgolf.run's hydra.verbose turned on."""
    relay = os.environ.get("PGOLF_LOG_RELAY")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format=RELAY_FORMAT if relay else "%(message)s"
    )
    for name in os.environ.get("PGOLF_LOG_DEBUG", "").split(","):
        if name:
            logging.getLogger(None if name == "root" else name).setLevel(logging.DEBUG)


class ConsoleFormatter(logging.Formatter):
    """Lines as pgolf has always printed them; debug lines (hydra.verbose) name their level and logger.
    run.log keeps Hydra's `[time][logger][LEVEL] - message` format (the `file` formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"DEBUG {record.name}: {msg}" if record.levelno <= logging.DEBUG else msg


class BelowWarning(logging.Filter):
    """stdout's share of the console: warnings and errors go to stderr (the `console_err` handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def verbose_loggers() -> str:
    """The loggers `hydra.verbose` put at DEBUG, for the worker's PGOLF_LOG_DEBUG (`root`: all)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    v = HydraConfig.get().verbose
    if v is True:
        return "root"
    if not v:
        return ""
    return ",".join([v] if isinstance(v, str) else [str(x) for x in v])


def relay(lines: Iterable[str], default_level: int) -> None:
    for line in lines:
        line = line.rstrip("\r\n")
        tagged = TAGGED.fullmatch(line)
        if tagged:
            level, name, msg = tagged.groups()
            logging.getLogger(name).log(logging.getLevelName(level), msg)
        elif line:
            WORKER.log(default_level, line)


def run_worker(cmd: list[str], env: dict[str, str]) -> int:
    """Run the worker subprocess with its output relayed into this process's logging; its exit code.
    Like subprocess.call, the worker is killed if this process is interrupted while waiting."""
    env = {**env, "PGOLF_LOG_RELAY": "1", "PGOLF_LOG_DEBUG": verbose_loggers(), "PYTHONUNBUFFERED": "1"}
    WORKER.debug("worker: %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1
    )
    readers = [
        threading.Thread(target=relay, args=(proc.stdout, logging.INFO), daemon=True),
        threading.Thread(target=relay, args=(proc.stderr, logging.WARNING), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for t in readers:  # the pipes close when the worker's process tree exits
            t.join(timeout=10)
    return code
