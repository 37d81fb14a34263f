"""Test-only clock skew, loaded by Python at start-up from this folder on PYTHONPATH.

`PGOLF_TEST_FAST_CLOCK="<rank>:<factor>"` makes `time.perf_counter` run `factor` times fast in the
worker process whose RANK is `<rank>` (torchrun sets RANK; other processes are left alone). The
wallclock test uses it to give one rank of a 2-process run a clock that reaches the budget first:
only a stop vote shared by all ranks makes the others stop with it.
"""

from __future__ import annotations

import os
import time

_spec = os.environ.get("PGOLF_TEST_FAST_CLOCK", "")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    _factor = float(_spec.split(":")[1])
    _real = time.perf_counter
    _t0 = _real()
    time.perf_counter = lambda: _t0 + _factor * (_real() - _t0)
