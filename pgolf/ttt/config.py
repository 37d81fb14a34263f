"""Schemas of the `ttt` group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NoTTTConfig:
    """No test-time training: the artifact is scored as is."""

    name: str = "none"
