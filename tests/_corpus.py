"""Helpers shared by the unit tests (not fixtures: conftest.py belongs to the shared test setup)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def embedded_docs() -> tuple[str, ...]:
    """collect_documents() once per test session (it parses the whole standard library, ~3 s)."""
    from pgolf.data.embedded import collect_documents

    return tuple(collect_documents())
