"""python -m pgolf.report <sweep_dir> [<sweep_dir> ...] [--baseline SPEC] [--alpha 0.01] ...

Prints summary.md and writes summary.{md,csv,json} and loss_curves.png into the first folder
(or --out). Several folders are merged by config hash (e.g. seeds split across pods).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.parent.report.render import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.report", description=__doc__.split("\n\n")[1])
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (or job) folders to aggregate")
    p.add_argument(
        "--baseline",
        help="a config hash prefix or overrides (k=v,k2=v2) in these sweeps; <dir> or <dir>@<hash> of "
        "another sweep; a published val_bpb (1.2244 or bpb=1.2244) or val_loss (loss=2.07)",
    )
    p.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    p.add_argument("--min-delta-nats", type=float, default=0.005, help="required improvement (default 0.005)")
    p.add_argument("--out", type=Path, help="where to write the summary (default: the first sweep dir)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    for d in args.sweep_dirs:
        if not d.is_dir():
            print(f"pgolf.report: {d} is not a folder", file=sys.stderr)
            return 2
    try:
        summary = write_report(
            args.sweep_dirs, args.out, args.baseline, args.alpha, args.min_delta_nats, plot=not args.no_plot
        )
    except ValueError as e:
        print(f"pgolf.report: {e}", file=sys.stderr)
        return 2
    if summary["jobs"]["total"] == 0:
        print(
            f"pgolf.report: no job folders (with result.json or config.json) under {args.sweep_dirs}",
            file=sys.stderr,
        )
        return 2
    print(summary["markdown"])
    print(f"pgolf.report: wrote summary.md, summary.csv, summary.json to {args.out or args.sweep_dirs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
