"""Where a record script's training step spends its time: the same report as bench/profile_train.py,
for the script itself, so pgolf and the script can be profiled over the same steps side by side.

    torchrun --standalone --nproc_per_node=1 bench/profile_ref.py --out DIR --label ref_pr1532 \
        --skip 70 --steps 10 -- .refs/pr1532/train_gpt.py

The script runs unmodified as `__main__` (its environment is its configuration, as under
bench/seeds.sh). A process-wide optimizer-step hook counts the steps of the script's matrix
optimizer (the optimizers whose class name holds `--clock`, default "Muon"): its warm-up
steps count too, so `--skip` is the warm-up steps plus the training steps to pass over (e.g.
2 x WARMUP_STEPS + 60 to land in #1532's looped phase, which starts at step 53 of 150). The profiler
then records `--steps` steps, each optimizer's step annotated as bench/profile_train.py annotates
pgolf's, writes DIR/profile_<label>.txt and .json, and ends the process: the script's export and
evals never run. bench/profile_pair.sh is the GPU command for a seed and its experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from profile_train import OPTIMIZER_RANGE, kernel_times, render  # noqa: E402


class StepProfiler:
    """Optimizer-step hooks that profile steps [skip, skip + steps) of the matrix optimizer."""

    def __init__(self, out: Path, label: str, skip: int, steps: int, top: int, clock: str = "Muon"):
        self.out, self.label, self.skip, self.steps, self.top = out, label, skip, steps, top
        self.clock = clock  # a fragment of the class name of the optimizer whose steps are counted
        self.count = 0
        self.cuda = False
        self.prof = None
        self.t0 = 0.0
        self.ranges: list = []

    def pre(self, opt, args, kwargs) -> None:
        if self.prof is not None:
            from torch.profiler import record_function

            rf = record_function(OPTIMIZER_RANGE)
            rf.__enter__()
            self.ranges.append(rf)

    def post(self, opt, args, kwargs) -> None:
        if self.ranges:
            self.ranges.pop().__exit__(None, None, None)
        if self.clock not in type(opt).__name__:
            return
        self.count += 1
        if self.count == self.skip:
            self.start()
        elif self.count == self.skip + self.steps and self.prof is not None:
            self.finish()

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        self.cuda = cuda
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def finish(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        step_ms = 1e3 * (time.perf_counter() - self.t0) / self.steps
        self.prof.__exit__(None, None, None)
        table, window = kernel_times(self.prof, self.cuda)
        device = torch.cuda.get_device_name() if self.cuda else "cpu"
        text, summary = render(self.label, device, step_ms, self.steps, table, window, self.top)
        summary.update(skip=self.skip, clock=self.clock)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"profile_{self.label}.txt").write_text(text)
        (self.out / f"profile_{self.label}.json").write_text(json.dumps(summary, indent=1))
        print(text, flush=True)
        sys.stderr.flush()
        os._exit(0)  # the profiled steps are all this run is for: no export, no eval


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--label", required=True)
    p.add_argument("--skip", type=int, required=True, help="matrix-optimizer steps before profiling")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--clock", default="Muon", help="class-name fragment of the optimizer counted")
    p.add_argument("script", type=Path)
    args = p.parse_args(argv)
    if args.skip < 1 or args.steps < 1:
        p.error("--skip and --steps must be >= 1")
    if not args.script.is_file():
        p.error(f"{args.script}: no such script")

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    prof = StepProfiler(args.out, args.label, args.skip, args.steps, args.top, args.clock)
    register_optimizer_step_pre_hook(prof.pre)
    register_optimizer_step_post_hook(prof.post)
    sys.argv = [str(args.script)]
    runpy.run_path(str(args.script), run_name="__main__")
    if prof.prof is not None:  # ended mid-profile: close the profiler (left open, teardown crashes)
        prof.prof.__exit__(None, None, None)
    print(
        f"profile_ref: the script ended after {prof.count} steps of an optimizer named *{args.clock}*,"
        f" before step {args.skip + args.steps}: nothing profiled",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
