"""bench/ns_forms.py, the device probe of optimizer.ns_batch, runs on a CPU too (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ns_forms_runs_on_cpu_where_the_two_forms_agree():
    """Eager on the CPU, Newton-Schulz batched and one matrix at a time are the same arithmetic
    (on the device both are compiled, and there they need not agree)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ns_forms.py"), "--experiment", "pr339", "--shrink", "8"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "pr339: 67 matrices in 5 shapes" in out
    assert "5/5 shape groups bit for bit" in out
