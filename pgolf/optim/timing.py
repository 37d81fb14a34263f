"""Optional optimizer timing with CUDA events (off by default: reading events needs a sync).

Events are only recorded on the device during the step; they are read once, in `summary()`,
after training, so even with timing on the step never waits for the GPU.
"""

from __future__ import annotations

import statistics

import torch

SETTLE_STEPS = 10  # steps skipped first: compilation, allocator warm-up, momentum buffers


class OptimizerTimer:
    """Brackets `steps` optimizer steps (after SETTLE_STEPS) and the communication waits inside them."""

    def __init__(self, steps: int):
        self.steps = steps
        self.reset()

    def reset(self) -> None:
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.waits: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = []
        self.active = False

    def begin(self, step: int) -> bool:
        if not SETTLE_STEPS <= step < SETTLE_STEPS + self.steps:
            return False
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.spans.append((start, torch.cuda.Event(enable_timing=True)))
        self.waits.append([])
        self.active = True
        return True

    def wait(self, handle) -> None:
        """Wait on a collective; while timing, record how long the compute stream stalls on it
        (the communication the overlap did not hide)."""
        if not self.active:
            handle.wait()
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        handle.wait()
        b.record()
        self.waits[-1].append((a, b))

    def end(self) -> None:
        self.spans[-1][1].record()
        self.active = False

    def summary(self) -> dict:
        if not self.spans:
            return {"steps": 0}
        torch.cuda.synchronize()
        step_ms = [a.elapsed_time(b) for a, b in self.spans]
        exposed = [sum(a.elapsed_time(b) for a, b in w) for w in self.waits]
        return {
            "steps": len(step_ms),
            "optimizer_ms_median": statistics.median(step_ms),
            "optimizer_ms_mean": statistics.fmean(step_ms),
            "exposed_comm_ms_median": statistics.median(exposed),
        }
