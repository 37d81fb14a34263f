"""bench/mlp_train_forms.py, the device probe of the training MLP's two kernel forms, runs on a CPU
in Triton's interpreter (a dry run: its timings mean nothing there, its comparison does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.models import kernels

REPO = Path(__file__).resolve().parents[1]


def _run_bench(hidden: int) -> subprocess.CompletedProcess:
    args = ["--device", "cpu", "--m", "70", "--d", "48", "--hidden", str(hidden), "--rep-ms", "1"]
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "mlp_train_forms.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
    )


@pytest.mark.skipif(kernels.unavailable_reason() is not None, reason="fused kernels unavailable")
def test_mlp_train_forms_runs_in_the_interpreter_where_both_forms_agree():
    pytest.importorskip("triton.tools.tensor_descriptor")
    out = _run_bench(96)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tma form: at most 0.00e+00 of an output's elements differ" in out.stdout
    assert out.stdout.count("differing elements vs pointer: pre 0 post 0 dpre 0") == 2
    # rows TMA cannot address (hidden 100: 200-byte rows) are refused, not timed as the TMA form
    bad = _run_bench(100)
    assert bad.returncode == 1 and "take the pointer form" in bad.stderr
