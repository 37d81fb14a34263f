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


@pytest.mark.skipif(kernels.unavailable_reason() is not None, reason="fused kernels unavailable")
def test_mlp_train_forms_runs_in_the_interpreter_where_both_forms_agree():
    pytest.importorskip("triton.tools.tensor_descriptor")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    args = ["--device", "cpu", "--m", "70", "--d", "48", "--hidden", "96", "--rep-ms", "1"]
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "mlp_train_forms.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tma form: at most 0.00e+00 of an output's elements differ" in out.stdout
    assert out.stdout.count("differing elements vs pointer: pre 0 post 0 dpre 0") == 2
    # rows TMA cannot address (hidden 100: 200-byte rows) are refused, not timed as the TMA form
    bad = subprocess.run(
        [sys.executable, str(REPO / "bench" / "mlp_train_forms.py"), *args[:-3], "100", "--rep-ms", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert bad.returncode == 1 and "take the pointer form" in bad.stderr
