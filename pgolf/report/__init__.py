"""`pgolf.report`: a shim package. The sweep report lives in pgolf.parent.report; like everything
the worker never runs, it sits under pgolf.parent, and this shim, which imports from there, never
ships either (docs/architecture.md#what-ships). It stays a package so that `python -m pgolf.report`
and a console script installed as `pgolf.report.__main__:main` keep working."""

from pgolf.parent.report import build_summary, write_report

__all__ = ["build_summary", "write_report"]
