"""Two train-loss curves logged every step (`LOG_EVERY=1 bash bench/seeds.sh`), step by step.

    python bench/curves.py REFERENCE.out PGOLF.out [--windows 1-10,11-30,31-50,51-60]

One loss at one step is a single batch's loss under bf16 noise, which can move by 0.01-0.02 from
one step to the next; a curve that follows the reference shows as a mean difference near zero
over each window, with differences of both signs. Prints, per window, the mean and the largest
absolute pgolf - reference difference and the windows' mean losses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize import parse  # noqa: E402


def windows(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        lo, hi = part.split("-")
        out.append((int(lo), int(hi)))
    return out


def compare(ref: dict[int, float], new: dict[int, float], spans: list[tuple[int, int]]) -> list[str]:
    rows = ["| steps | reference mean | pgolf mean | mean diff | max abs diff |", "|---|---:|---:|---:|---:|"]
    for lo, hi in spans:
        steps = [s for s in range(lo, hi + 1) if s in ref and s in new]
        if not steps:
            raise SystemExit(f"no step in {lo}-{hi} is logged by both files: log every step (LOG_EVERY=1)")
        diffs = [new[s] - ref[s] for s in steps]
        rows.append(
            f"| {lo}-{hi} | {statistics.mean(ref[s] for s in steps):.4f} | "
            f"{statistics.mean(new[s] for s in steps):.4f} | {statistics.mean(diffs):+.4f} | "
            f"{max(map(abs, diffs)):.4f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("pgolf", type=Path)
    ap.add_argument("--windows", default="1-10,11-30,31-50,51-60")
    args = ap.parse_args()
    ref, new = (parse(p.read_text())["loss"] for p in (args.reference, args.pgolf))
    print("\n".join(compare(ref, new, windows(args.windows))))


if __name__ == "__main__":
    main()
