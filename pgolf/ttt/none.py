"""ttt=none: no test-time adaptation."""

from __future__ import annotations

from pgolf.ttt.config import NoTTTConfig


class NoTTT:
    enabled = False

    def __init__(self, cfg: NoTTTConfig):
        self.cfg = cfg


def build(cfg: NoTTTConfig) -> NoTTT:
    return NoTTT(cfg)
