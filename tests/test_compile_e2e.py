"""torch.compile end to end on CPU: the compile path every GPU run takes, which hardware=cpu skips.

A run with hardware.compile=true goes through what a GPU run does before its clock starts: the
model, Muon's Newton-Schulz and the eval scorer compiled with fullgraph=True (a graph break is an
error), train.prime_steps real steps to compile them, then the initial weights, optimizer state and
loader restored. Inductor's CPU backend compiles C++ with the system compiler (gcc here and in CI).

Its losses must match an eager run that never primed: any priming step left in the weights, the
optimizer's momentum or the loader's position moves them by far more than compiled-vs-eager
rounding. The dynamo log must show every graph compiled during priming and none on the clock.

The model is the smallest that covers the path: one layer whose matrices are all 64 x 64, so Muon's
Newton-Schulz compiles once (each other matrix shape costs one more C++ compile). A cold compile
costs ~60 s of CPU time, almost all of it gcc.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_cpu_args

CXX = os.environ.get("CXX", "g++")  # the compiler Inductor's CPU backend calls
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which(CXX) is None,
        reason=f"torch.compile on CPU needs a C++ compiler: {CXX} is not on PATH (apt install g++, or set CXX)",
    ),
]

# Inductor's fused kernels sum in other orders than eager: measured drift is <1e-4 relative over
# the 6 steps and the val loss. Leaving out one part of the restore after priming (planted once
# each, eager, against this run) moved the largest difference to 0.23 (weights), 0.18 (optimizer
# state) and 0.072 (loader position).
REL_TOL = 2e-3
SQUARE_ONE_LAYER = {"model.num_layers": "1", "model.num_kv_heads": "4", "model.mlp_mult": "1"}
# Every frame pgolf compiles on this model: the training forward (and its backward), Muon's
# Newton-Schulz, and the eval scorer.
COMPILED_FRAMES = {"forward", "newton_schulz", "token_nll"}
TRACE = re.compile(r"torchdynamo start tracing (\w+)")


def _run(tmp_path: Path, shard_dir, tokenizer_model, name: str, **extra) -> tuple[dict, list[str]]:
    """One CLI run; its stdout and stderr as one stream of lines, in the order they were written."""
    args = tiny_cpu_args(shard_dir, tokenizer_model, **{**SQUARE_ONE_LAYER, "hardware.threads": "1", **extra})
    out = tmp_path / name
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_LOGS="dynamo")
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf.run", *args, f"hydra.run.dir={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    return json.loads((out / "result.json").read_text()), proc.stdout.splitlines()


def _line_of(lines: list[str], needle: str) -> int:
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert hits, f"no line with {needle!r} in the run's output"
    return hits[0]


def _max_rel_diff(a: dict, b: dict) -> float:
    assert [s for s, _ in a["train_losses"]] == [s for s, _ in b["train_losses"]]
    diffs = [abs(x - y) / abs(y) for (_, x), (_, y) in zip(a["train_losses"], b["train_losses"])]
    return max(diffs + [abs(a["val_loss"] - b["val_loss"]) / b["val_loss"]])


def test_compiled_run_primes_off_the_clock_and_trains_like_eager(tmp_path, shard_dir, tokenizer_model):
    on = {"hardware.compile": "true", "train.prime_steps": "2"}
    off = {"hardware.compile": "false", "train.prime_steps": "0"}
    compiled, lines = _run(tmp_path, shard_dir, tokenizer_model, "compiled", **on)
    eager, eager_lines = _run(tmp_path, shard_dir, tokenizer_model, "eager", **off)
    assert compiled["status"] == eager["status"] == "ok"
    assert not any(TRACE.search(line) for line in eager_lines)  # eager really is eager

    # Compiled: every frame traced during priming, none on the training clock (between the restore
    # and the end of training), where a compile would stall the 600 s budget.
    primed, trained = _line_of(lines, "primed 2 steps"), _line_of(lines, "trained 6 steps")
    traced = [(i, m.group(1)) for i, line in enumerate(lines) if (m := TRACE.search(line))]
    assert {name for i, name in traced if i < primed} == COMPILED_FRAMES
    on_clock = [line for i, line in enumerate(lines) if primed < i < trained and TRACE.search(line)]
    assert not on_clock, f"compiled under the training clock: {on_clock}"

    # The same training as an eager run that never primed.
    assert compiled["steps"] == eager["steps"] == 6
    assert compiled["train_losses"][-1][1] < compiled["train_losses"][0][1] - 0.5  # it trains
    assert compiled["train_losses"][0][1] == pytest.approx(eager["train_losses"][0][1], rel=1e-5)
    assert _max_rel_diff(compiled, eager) < REL_TOL
    assert compiled["val_bpb"] == pytest.approx(eager["val_bpb"], rel=REL_TOL)
