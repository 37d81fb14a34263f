"""ttt=none: no test-time adaptation."""

from __future__ import annotations

from typing import Any

from pgolf.contracts import NeverStopsEarly
from pgolf.ttt.config import NoTTTConfig


class NoTTT(NeverStopsEarly):
    enabled = False  # the trainer scores with eval.modes alone

    def __init__(self, cfg: NoTTTConfig):
        self.cfg = cfg

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        pass  # no graph to compile

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ttt=none adapts nothing and scores nothing; its `enabled` is False")


def build(cfg: NoTTTConfig, compile: bool = False) -> NoTTT:
    return NoTTT(cfg)
