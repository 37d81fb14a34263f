"""Name -> (schema, builder) registries, one per config group (and one per choice within a group).

Config files say `name: baseline`; the registry maps that name to a dataclass schema (validated in
the Hydra parent before anything launches) and to a builder. A choice made by another key of a
group (`data.loader`) is a registry keyed by that key, whose entries have no schema of their own
(their settings are keys of the group's schema). Builders are stored as
"module:function" strings and imported only when built, so validating a config never imports
torch and fails in well under a second.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Entry:
    name: str
    schema: type | None  # None: the settings are keys of the enclosing group's schema
    builder: str  # "package.module:function"
    requires: tuple[str, ...] = ()  # capabilities the rest of the config must provide
    provides: tuple[str, ...] = ()  # capabilities this implementation offers to others

    def load_builder(self) -> Callable[..., Any]:
        module_name, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module_name), attr)


class Registry:
    def __init__(self, group: str, key: str = "name"):
        self.group = group
        self.key = key  # the config key that selects an entry: `name`, or e.g. `loader` of `data`
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        schema: type | None,
        builder: str,
        requires: tuple[str, ...] = (),
        provides: tuple[str, ...] = (),
    ) -> None:
        if name in self._entries:
            raise ValueError(f"{self.group} registry: duplicate name {name!r}")
        if schema is not None and any(e.schema is schema for e in self._entries.values()):
            raise ValueError(f"{self.group} registry: schema {schema.__name__} registered twice")
        self._entries[name] = Entry(name, schema, builder, tuple(requires), tuple(provides))

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            what = self.group if self.key == "name" else f"{self.group}.{self.key}"
            raise ConfigError(
                f"{self.group}.{self.key}={name!r} is not a registered {what} implementation; "
                f"valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def build(self, cfg: Any, **runtime: Any) -> Any:
        """The implementation `cfg.<key>` names, built from `cfg` and the runtime arguments."""
        return self.get(getattr(cfg, self.key)).load_builder()(cfg, **runtime)


def check_range(
    path: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Raise a ConfigError naming `path`=value unless low <= value <= high (or < high if high_open)."""
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if low is not None and high is not None:
        rule = f"in [{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        rule = f">= {low}"
    else:
        rule = f"{'<' if high_open else '<='} {high}"
    raise ConfigError(f"{path}={value} must be {rule}{f' ({why})' if why else ''}")
