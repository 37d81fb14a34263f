"""Sweep aggregation: `python -m pgolf.report <sweep_dir> [--baseline ...]` (README.md#sweeps-and-reports)."""

from pgolf.parent.report.render import build_summary, write_report

__all__ = ["build_summary", "write_report"]
