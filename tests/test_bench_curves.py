"""bench/curves.py compares two per-step loss logs window by window."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
SPEC = importlib.util.spec_from_file_location("curves", BENCH / "curves.py")
curves = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(curves)


def _log(losses: dict[int, float]) -> str:
    return "\n".join(
        f"step:{s}/4 train_loss:{v:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s, v in losses.items()
    )


def test_windows_report_mean_and_largest_difference():
    ref = curves.parse(_log({1: 7.0, 2: 6.0, 3: 5.0, 4: 4.0}))["loss"]
    new = curves.parse(_log({1: 7.0, 2: 6.2, 3: 4.9, 4: 4.3}))["loss"]
    rows = curves.compare(ref, new, curves.windows("1-2,3-4"))
    assert rows[2] == "| 1-2 | 6.5000 | 6.6000 | +0.1000 | 0.2000 |"
    assert rows[3] == "| 3-4 | 4.5000 | 4.6000 | +0.1000 | 0.3000 |"


def test_a_window_neither_log_covers_is_an_error_naming_the_fix():
    ref = curves.parse(_log({1: 7.0}))["loss"]
    with pytest.raises(SystemExit, match="LOG_EVERY=1"):
        curves.compare(ref, ref, [(2, 3)])
