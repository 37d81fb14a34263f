"""Two training-step profiles side by side: a script's and pgolf's, as bench/profile_pair.sh writes
them (profile_<label>.json from bench/profile_ref.py and bench/profile_train.py).

    python bench/profile_compare.py OUT/profile_ref_pr1775.json OUT/profile_pgolf_pr1775.json

Prints the step times and their ratio, each kernel group's ms/step on both sides with the
difference, and each side's kernels that evaluate a cos or sin (in an Inductor kernel's name):
in a training step those are tables rebuilt from positions, work a cached buffer removes, as it
did for the RoPE tables (docs/benchmarks.md §9j). (`arange` alone is no sign: the document mask and
the loss index with it.) Only the top kernels each profile kept (`--top` when it was written) are
seen.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# Inductor names a fused kernel after the ops it holds.
REBUILT = re.compile(r"_(cos|sin)_")


def load(path: Path) -> dict:
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"{path}: not a profile written by bench/profile_train.py or profile_ref.py ({e})"
        ) from None
    missing = {"label", "step_ms", "groups_ms_per_step", "top"} - set(profile)
    if missing:
        raise SystemExit(f"{path}: missing {sorted(missing)}; write it again with bench/profile_pair.sh")
    return profile


def rebuilt_kernels(profile: dict) -> list[dict]:
    """The profile's kept kernels that evaluate a cos or sin (Inductor kernels only: a cuBLAS or
    library kernel's name says nothing of what it computes)."""
    return [k for k in profile["top"] if k["name"].startswith("triton_") and REBUILT.search(k["name"])]


def compare(ref: dict, ours: dict) -> str:
    ratio = ours["step_ms"] / ref["step_ms"]
    lines = [
        f"step: {ref['label']} {ref['step_ms']:.2f} ms, {ours['label']} {ours['step_ms']:.2f} ms: "
        f"{ratio:.3f}x ({ours['step_ms'] - ref['step_ms']:+.2f} ms)",
        "",
        f"| group | {ref['label']} | {ours['label']} | difference |",
        "|---|---:|---:|---:|",
    ]
    groups = list(dict.fromkeys([*ref["groups_ms_per_step"], *ours["groups_ms_per_step"]]))
    for g in groups:
        a, b = ref["groups_ms_per_step"].get(g, 0.0), ours["groups_ms_per_step"].get(g, 0.0)
        lines.append(f"| {g} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    for side in (ref, ours):
        rebuilt = rebuilt_kernels(side)
        total = sum(k["ms_per_step"] for k in rebuilt)
        lines += ["", f"{side['label']}: kernels that evaluate a cos or sin: {total:.3f} ms/step"]
        lines += [
            f"  {k['ms_per_step']:8.3f} ms  {k['calls_per_step']:g} calls  {k['name'][:110]}" for k in rebuilt
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="the script's profile_<label>.json")
    p.add_argument("pgolf", type=Path, help="pgolf's profile_<label>.json")
    args = p.parse_args(argv)
    print(compare(load(args.reference), load(args.pgolf)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
