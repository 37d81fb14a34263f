"""Where a training step's time goes: the top kernels of an experiment's step, grouped.

    python bench/profile_train.py --out DIR [--warm 5] [--steps 20] [--variant NAME] -- OVERRIDES...

OVERRIDES are `python -m pgolf.run`'s (e.g. `experiment=r0409 hardware=gpu data.path=...`). The
script builds the run's trainer exactly as `pgolf.run` would (one process), compiles the training
graphs with the run's priming steps (undone, as in a run), runs `--warm` steps, then profiles
`--steps` optimizer steps with torch.profiler and writes `DIR/profile_<label>.txt`:

- the measured step time (wall clock between device syncs, divided by the steps) and the summed
  kernel time per step;
- the kernel time per group: GEMMs, attention, Triton/Inductor fused kernels, optimizer (every
  kernel inside the optimizer step: Newton-Schulz GEMMs, Adam, EMA, clipping), communication
  (NCCL), other (copies, memsets, cuDNN/ATen elementwise);
- the top kernels by time with calls and ms per step and their share of the step.

On CUDA the kernels are the device's (CUPTI); on CPU (for tests) the ATen ops' self times stand in
for them. A model whose graph deepens during training (depth recurrence) is profiled in its deepest
variant (`--variant` picks another: see `graph_variants()`); the r0409 stack trains most of its
steps looped. `bench/profile_train.sh` is the GPU command for the record stacks.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OPTIMIZER_RANGE = "pgolf::optimizer_step"
GROUPS = ("gemm", "attention", "triton_fused", "optimizer", "communication", "other")
# Lower-case name fragments of each group's kernels (CUDA) or ATen ops (CPU), checked in this order.
NAME_RULES = (
    ("communication", ("nccl", "c10d::", "all_reduce", "allreduce", "reduce_scatter", "all_gather")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "sdp_", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::matmul", "aten::linear", "aten::_scaled_mm", "splitk")),
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach_")),
    ("triton_fused", ("triton", "cpp_fused")),
)  # fmt: skip


def group_of(name: str) -> str:
    low = name.lower()
    for group, fragments in NAME_RULES:
        if any(f in low for f in fragments):
            return group
    return "other"


def compose_job(overrides: list[str], job_dir: Path):
    """The run's validated config, as `pgolf.run` freezes it, on one process and by steps."""
    from pgolf.config import job_config_from_dict
    from pgolf.hw.device import resolve_auto, resolve_nproc
    from pgolf.parent.compose import compose_dict
    from pgolf.parent.run import PARENT_ONLY

    # steps mode: no wallclock calibration probe; one process: this script profiles one device
    data = compose_dict([*overrides, "budget.mode=steps"])
    for key in PARENT_ONLY:
        data.pop(key, None)
    data["job_dir"] = str(job_dir)
    data["hardware"]["nproc_per_node"] = 1
    job = job_config_from_dict(data)
    if job.hardware.name == "auto":
        job.hardware = resolve_auto(job.hardware)
    job.hardware = resolve_nproc(job.hardware)
    return job


def windows_of(events, name: str, device: bool) -> list[tuple[float, float]]:
    from torch.autograd import DeviceType

    out = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.name == name and ((e.device_type != DeviceType.CPU) == device)
    ]
    return sorted(out)


def inside(windows: list[tuple[float, float]], t: float) -> bool:
    i = bisect.bisect_right(windows, (t, float("inf"))) - 1
    return i >= 0 and windows[i][0] <= t <= windows[i][1]


def kernel_times(prof, cuda: bool) -> tuple[dict[str, list[float]], bool]:
    """name -> [total us, calls, us inside the optimizer step]; and whether the optimizer's window
    was found (on CUDA: the GPU-side range of the record_function)."""
    from torch.autograd import DeviceType

    events = prof.events()
    windows = windows_of(events, OPTIMIZER_RANGE, device=cuda)
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])
    for e in events:
        if e.name == OPTIMIZER_RANGE or e.name.startswith("ProfilerStep"):
            continue
        if cuda:
            if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False):
                continue
            us = e.time_range.end - e.time_range.start
        else:
            if e.device_type != DeviceType.CPU or getattr(e, "is_user_annotation", False):
                continue
            us = e.self_cpu_time_total
        row = table[e.name]
        row[0] += us
        row[1] += 1
        if windows and inside(windows, e.time_range.start):
            row[2] += us
    return dict(table), bool(windows)


def render(
    label: str, device: str, step_ms: float, steps: int, table: dict, optimizer_window: bool, top: int
) -> tuple[str, dict]:
    per_step = {
        name: (us / 1e3 / steps, calls / steps, opt / 1e3 / steps) for name, (us, calls, opt) in table.items()
    }
    busy = sum(ms for ms, _, _ in per_step.values())
    groups = dict.fromkeys(GROUPS, 0.0)
    rows = []
    for name, (ms, calls, opt_ms) in per_step.items():
        group = group_of(name)
        if opt_ms > 0 and group != "communication":  # inside the optimizer step: Newton-Schulz, Adam, EMA
            groups["optimizer"] += opt_ms
            groups[group] += ms - opt_ms
            group = "optimizer" if opt_ms >= ms / 2 else group
        else:
            groups[group] += ms
        rows.append((ms, calls, group, name))
    rows.sort(reverse=True)
    what = "kernels" if device != "cpu" else "ATen ops (self CPU time)"
    lines = [
        f"# training-step profile: {label}",
        f"device: {device}   profiled steps: {steps}",
        f"step time: {step_ms:.2f} ms/step (wall clock between syncs)   time in {what}: {busy:.2f} ms/step "
        f"({100 * busy / step_ms if step_ms else 0:.1f}% of the step)",
        ""
        if optimizer_window
        else "note: the optimizer step's range was not seen; its kernels are grouped by name",
        "",
        "| group | ms/step | % of kernel time | % of step |",
        "|---|---:|---:|---:|",
    ]
    for g in GROUPS:
        ms = groups[g]
        lines.append(
            f"| {g} | {ms:.3f} | {100 * ms / busy if busy else 0:.1f}% | {100 * ms / step_ms if step_ms else 0:.1f}% |"
        )
    lines += [
        "",
        f"top {top} {what}:",
        "",
        "| # | ms/step | calls/step | % of step | group | name |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for i, (ms, calls, group, name) in enumerate(rows[:top], 1):
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(
            f"| {i} | {ms:.3f} | {calls:g} | {100 * ms / step_ms if step_ms else 0:.1f}% | {group} | `{short}` |"
        )
    summary = {
        "label": label,
        "device": device,
        "steps": steps,
        "step_ms": step_ms,
        "kernel_ms_per_step": busy,
        "groups_ms_per_step": groups,
        "optimizer_window": optimizer_window,
        "top": [
            {"name": n, "group": g, "ms_per_step": ms, "calls_per_step": c} for ms, c, g, n in rows[:top]
        ],
    }
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for profile_<label>.txt/.json")
    p.add_argument("--warm", type=int, default=5, help="steps after compile priming, before profiling")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps profiled")
    p.add_argument("--top", type=int, default=40, help="kernels listed")
    p.add_argument("--variant", default=None, help="graph variant to profile (default: the deepest)")
    p.add_argument("--label", default=None, help="name of the output files (default: the run's label)")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace (large)")
    p.add_argument("overrides", nargs="*", help="pgolf.run overrides")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from pgolf.trainer import Trainer

    args.out.mkdir(parents=True, exist_ok=True)
    job = compose_job(args.overrides, args.out / "run")
    label = args.label or job.label or "run"
    (args.out / "run").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(job, args.out / "run")
    try:
        trainer.build()
        trainer.prime()  # compiles every graph variant with the run's priming steps, then undoes them
        model, rt = trainer.model, trainer.rt
        variants = model.graph_variants() if hasattr(model, "graph_variants") else []
        variant = args.variant or (variants[-1] if variants else None)
        if variant is not None:
            model.set_graph_variant(variant)
        step_opt = trainer.opt.step

        def annotated_step(*a, **kw):  # a range the profiler shows on the host and the device
            with record_function(OPTIMIZER_RANGE):
                return step_opt(*a, **kw)

        trainer.opt.step = annotated_step
        for i in range(args.warm):
            trainer._train_step(i, 0.0, None)
        rt.sync()
        cuda = rt.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for i in range(args.steps):
                trainer._train_step(args.warm + i, 0.0, None)
            rt.sync()
            step_ms = 1e3 * (time.perf_counter() - t0) / max(args.steps, 1)
        table, window = kernel_times(prof, cuda)
        device = torch.cuda.get_device_name(rt.device) if cuda else "cpu"
        text, summary = render(label, device, step_ms, args.steps, table, window, args.top)
        summary.update(variant=variant, overrides=args.overrides, warm=args.warm)
        (args.out / f"profile_{label}.txt").write_text(text)
        (args.out / f"profile_{label}.json").write_text(json.dumps(summary, indent=1))
        if args.trace:
            prof.export_chrome_trace(str(args.out / f"trace_{label}.json"))
        print(text)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
