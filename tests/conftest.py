"""Shared fixtures: a small trained tokenizer, synthetic shard sets, Hydra compose, CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data.source import _locked  # the same file lock the embedded-corpus build takes

REPO = Path(__file__).resolve().parent.parent

# Without CUDA, the fused Triton kernels (tests/test_kernels.py) run in Triton's CPU interpreter.
# Triton picks interpreter or compiler when a kernel is decorated, i.e. when pgolf.models.kernels is
# first imported, so this is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
CONF = REPO / "conf"


# ------------------------------------------------------------------------------ pytest-xdist
# `pytest -n N` runs N worker processes. Each worker keeps to its own share of the CPUs (its
# children inherit it): on a 2-core machine two workers whose runs each start 2 torch threads would
# put 4 spinning threads on 2 cores, and a step then waits on a thread that is not running
# (observed: a tiny run's 6 steps took 17-45 s instead of 0.7 s). Session fixtures that make files
# are made once, by whichever worker asks first, in the folder all workers' temp folders share.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in a worker, else unset


def pytest_configure(config) -> None:
    if XDIST_WORKER is None or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > len(cpus):
        return  # more workers than CPUs: the scheduler shares them out
    mine = set(cpus[int(XDIST_WORKER.removeprefix("gw")) % workers :: workers])
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))  # torch sized its pool before this ran


def _shared_root(tmp_path_factory) -> Path:
    """The session's temp folder; under xdist, the one that holds every worker's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if XDIST_WORKER else base


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder of the test session that `make(folder)` fills, once however many xdist workers ask
    for it: the first one makes it while the others wait, then every one reads it. A folder that
    `make` left half-made (it raised) is made again by the next one to ask."""
    root = _shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with _locked(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def made_run_once(
    tmp_path_factory, name: str, run: Callable[[Path], subprocess.CompletedProcess]
) -> tuple[Path, subprocess.CompletedProcess]:
    """`made_once` for a command whose process the tests read too: `run(folder)` runs it (and
    asserts it went well); every worker gets the folder and the process's exit code and output."""

    def make(folder: Path) -> None:
        proc = run(folder)
        record = {
            "args": proc.args,
            "returncode": proc.returncode,
            "stdout": proc.stdout,
            "stderr": proc.stderr,
        }
        (folder / "process.json").write_text(json.dumps(record))

    folder = made_once(tmp_path_factory, name, make)
    record = json.loads((folder / "process.json").read_text())
    return folder, subprocess.CompletedProcess(**record)


SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. Numbers like 12345 are split into digits.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9: accented words fall back to bytes when the tokenizer lacks them.",
    "  Leading spaces, double  spaces and tabs\tare normalized by nmt_nfkc before encoding.",
    "Emoji \U0001f600 and CJK \u6f22\u5b57 exercise multi-byte UTF-8 sequences.",
    "Python's documentation describes modules, classes and functions in plain English prose.",
]


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> Path:
    """A 400-piece SentencePiece BPE trained with the challenge's settings (byte fallback on)."""
    from _corpus import embedded_docs

    from pgolf.data.build import train_tokenizer

    docs = list(embedded_docs()[:120]) + SAMPLE_TEXT * 3
    folder = made_once(tmp_path_factory, "tok", lambda out: train_tokenizer(docs, 400, out / "tok400.model"))
    return folder / "tok400.model"


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, tokenizer_model) -> Path:
    """Challenge-format shards (val = first 20 docs) written with `tokenizer_model`."""
    from _corpus import embedded_docs

    from pgolf.data.build import export_shards

    def make(out: Path) -> None:
        export_shards(tokenizer_model, list(embedded_docs()[:160]), out, val_docs=20, shard_tokens=60_000)

    return made_once(tmp_path_factory, "shards", make)


def wandb_isolation_env(root: Path) -> dict[str, str]:
    """wandb's own folders (settings, cache, artifacts, default run dir) under `root`, never the
    user's home. wandb itself stays as installed: a sweep logs offline, as it does for a user."""
    env = {f"WANDB_{k}_DIR": root / f"wandb_{k.lower()}" for k in ("CONFIG", "CACHE", "DATA")}
    env["WANDB_DIR"] = root / "wandb_runs"
    for path in env.values():
        path.mkdir(parents=True, exist_ok=True)  # wandb 0.19 warns on the console about a missing one
    return {k: str(v) for k, v in env.items()}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One embedded-corpus cache for the whole test session, never the user's ~/.cache.
    base = tmp_path_factory.getbasetemp()
    # under xdist, one cache for every worker (pgolf builds the embedded corpus under a file lock)
    cache = os.environ.get("PGOLF_TEST_CACHE") or str(_shared_root(tmp_path_factory) / "pgolf_cache")
    monkeypatch.setenv("PGOLF_CACHE", cache)
    for key, value in wandb_isolation_env(base).items():
        monkeypatch.setenv(key, value)
    # A developer's WANDB_MODE=online (or disabled) must not change what the tests see.
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture
def compose():
    """compose(overrides) -> resolved plain dict, through Hydra exactly as `pgolf.run` composes."""
    from pgolf.parent.compose import compose_dict

    def _compose(overrides: list[str] | None = None) -> dict:
        return compose_dict(overrides or [])

    return _compose


def worker_job(compose: Callable[[list[str]], dict], *overrides: str):
    """The JobConfig a worker gets for `overrides`: composed as `pgolf.run` does, less the keys only
    the parent reads, with a job dir."""
    from pgolf.config import job_config_from_dict
    from pgolf.parent.run import PARENT_ONLY

    d = compose(list(overrides))
    for k in PARENT_ONLY:
        d.pop(k, None)
    d["job_dir"] = "x"
    return job_config_from_dict(d)


def run_cli(
    args: list[str], tmp_path: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m pgolf.run <args>` with its run dir under tmp_path."""
    cmd = [sys.executable, "-m", "pgolf.run", *args]
    if not any(a.startswith("hydra.run.dir=") or a.startswith("hydra.sweep.dir=") for a in args):
        cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    full_env = dict(os.environ, **(env or {}))
    return _run_python(cmd, full_env, timeout)


def _run_python(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`cmd` (`python -m <module> ...` or `python -c <script> ...`) from the repository, through
    the fork server where it can take the run (tests/_zygote.py), else as a process of its own."""
    if _ZYGOTE.takes(env):
        return _ZYGOTE.run(cmd, env, timeout)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


class _ForkServer:
    """This test process's tests/_zygote.py, started on first use (PGOLF_TEST_FORK=0: never)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.lock = threading.Lock()
        self.buffer = b""
        self.forked = 0  # runs served (tests/test_fork_server.py reads it)

    def takes(self, env: dict) -> bool:
        if os.environ.get("PGOLF_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
            return False
        from _zygote import IMPORT_TIME_PREFIXES, READ_WHEN_USED

        base = self.env if self.proc is not None else dict(os.environ)
        keys = {k for k in (*env, *base) if k.startswith(IMPORT_TIME_PREFIXES)} - READ_WHEN_USED
        return all(env.get(k) == base.get(k) for k in keys)

    def _answer(self, timeout: float | None = None) -> dict | None:
        """The server's next JSON line; None if none came within `timeout` seconds. Read from the
        pipe itself: a buffered reader could hold the next line where select() cannot see it."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the tests' fork server (tests/_zygote.py) exited: {self.proc.wait()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.env, self.buffer = dict(os.environ), b""
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "_zygote.py")],
                cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            )  # fmt: skip
            assert self._answer() == {"ready": True}

    def run(self, cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
        """`cmd` = [python, -m|-c, module|script, *args], forked by the server."""
        import tempfile

        with self.lock, tempfile.TemporaryDirectory(prefix="pgolf_fork_") as tmp:
            self._start()
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            flag, target, args = cmd[1], cmd[2], cmd[3:]
            req = {"flag": flag, "target": target, "argv": [flag, *args], "cwd": str(REPO), "env": env}
            self.proc.stdin.write((json.dumps({**req, "out": str(out), "err": str(err)}) + "\n").encode())
            pid = self._answer()["pid"]
            self.forked += 1
            ended = self._answer(timeout)
            if ended is None:
                os.kill(pid, signal.SIGKILL)
                self._answer()
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(cmd, ended["returncode"], out.read_text(), err.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_ZYGOTE = _ForkServer()


def pytest_unconfigure(config) -> None:
    _ZYGOTE.stop()


def default_sigint() -> None:
    """preexec_fn of a child that a test will Ctrl-C: the default SIGINT disposition. A test runner
    started as a shell's background job (`pytest &`) inherits SIGINT ignored, and an ignored signal
    stays ignored across exec, so the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# The sp8192 stack's layered model at test size, its layer loop switching on halfway through
# training (tiny_cpu_args overrides): tests of what depends on the graph variant a run ends in.
TINY_RECURRENT = {
    "model": "sp8192_recur",
    "model.num_layers": "3",
    "model.model_dim": "64",
    "model.num_heads": "2",
    "model.num_kv_heads": "1",
    "model.mlp_mult": "2",
    "model.rope_dims": "8",
    "model.xsa_last_n": "0",
    "model.parallel_start_layer": "2",
    "model.loop_start": "1",
    "model.loop_end": "1",
    "model.enable_looping_at": "0.5",
}


def run_script(
    script: str, args: list[str], run_dir: Path, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -c script <args> hydra.run.dir=<run_dir>` from the repository: a run with a patch
    applied first (the script ends by calling pgolf.parent.run.main)."""
    cmd = [sys.executable, "-c", script, *args, f"hydra.run.dir={run_dir}"]
    return _run_python(cmd, dict(os.environ, **(env or {})), 600)


def tiny_cpu_args(shard_dir: Path, tokenizer: Path, **extra: str) -> list[str]:
    """A seconds-long CPU run on the synthetic shards."""
    args = {
        "experiment": "none",
        "data": "shards",
        "data.path": str(shard_dir),
        "data.tokenizer_path": str(tokenizer),
        "data.vocab_size": "400",
        "model": "tiny",
        "model.num_layers": "2",
        "model.model_dim": "64",
        "hardware": "cpu",
        "budget.mode": "steps",
        "train.iterations": "6",
        "train.seq_len": "64",
        "train.batch_tokens": "2048",
        "train.prime_steps": "2",
        "train.log_every": "1",
        "train.val_batch_tokens": "8192",
        "optimizer.warmdown_iters": "3",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def write_tokens(path: Path, tokens) -> None:
    from pgolf.data.shards import write_shard

    write_shard(path, np.asarray(tokens, dtype=np.uint16))


# Runs that several test modules assert on. Each end-to-end run costs seconds of process start-up
# (Python, torch, Hydra) before it trains at all, so one run serves every test that reads it.
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shard_dir, tokenizer_model) -> tuple[Path, subprocess.CompletedProcess]:
    """`tiny_cpu_args` as they are, one job whose worker runs in the parent: (tmp, process), with the
    run in tmp / "run". Readers only: a test that changes files copies the run first."""

    def run(tmp: Path) -> subprocess.CompletedProcess:
        proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model), tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return made_run_once(tmp_path_factory, "tiny_run", run)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, shard_dir, tokenizer_model) -> tuple[Path, subprocess.CompletedProcess]:
    """The same job as `tiny_run`, as a one-job sweep (`-m`): its worker is a subprocess. Verbose for
    pgolf.trainer, so the relayed debug lines can be checked too: (sweep dir, process)."""

    def run(tmp: Path) -> subprocess.CompletedProcess:
        args = ["-m", *tiny_cpu_args(shard_dir, tokenizer_model), f"hydra.sweep.dir={tmp / 'sweep'}"]
        proc = run_cli([*args, "hydra.verbose=[pgolf.trainer]"], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    tmp, proc = made_run_once(tmp_path_factory, "tiny_sweep", run)
    return tmp / "sweep", proc


# A small model=layered quant=r0409 job (GPTQ int6, brotli), priming off: seconds on CPU.
SMALL_GPTQ = {
    "model": "layered",
    "quant": "r0409",
    "model.num_layers": "2",
    "model.num_heads": "4",
    "model.num_kv_heads": "2",
    "model.ve_layers": "[1]",
    "quant.calibration.batches": "2",
    "quant.report_compressors": "true",
    "train.prime_steps": "0",
}


@pytest.fixture(scope="session")
def gptq_run(tmp_path_factory, shard_dir, tokenizer_model) -> Path:
    """SMALL_GPTQ on `tiny_cpu_args`, run once for the byte accounting and the pruning tests: its
    run folder (artifact within the cap, so nothing pruned)."""

    def make(tmp: Path) -> None:
        proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **SMALL_GPTQ), tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return made_once(tmp_path_factory, "gptq_run", make) / "run"
