"""Sweep aggregation: `python -m pgolf.report <sweep_dir> [--baseline ...]` (ECOSYSTEM §c6)."""

from pgolf.report.render import build_summary, write_report

__all__ = ["build_summary", "write_report"]
