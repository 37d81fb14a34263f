"""A typed key that the config does not have: the nearest real keys, after Hydra's own error.

Hydra refuses `model.num_layerz=3` with "Could not override 'model.num_layerz'. To append to your
config use +model.num_layerz=3", which names the key but suggests the wrong fix: the `+` form then
fails pgolf's validation. When a command ends in Hydra's error before any job ran, `pgolf.run`
calls `unknown_key_hints` on its arguments and prints one line per key the composed config lacks,
with the keys nearest to it. `config_errors_exit` does the same, without a traceback, for the
commands that compose without `@hydra.main` (`pgolf.plan`, the converter). Parent-only: the worker
never imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pgolf.config import did_you_mean


def _first_value(override: Any) -> str | None:
    """An override as `key=value` with a sweep's first value (`seed=1,2` -> `seed=1`); None for one
    that adds, deletes or cannot be read back."""
    from hydra.core.override_parser.types import OverrideType

    if override.type != OverrideType.CHANGE:
        return None
    if not override.is_sweep_override():
        return override.input_line
    try:
        return f"{override.key_or_group}={next(iter(override.sweep_string_iterator()))}"
    except Exception:  # a range or interval sweep of floats: no first value to compose with
        return None


def _walk(config: dict[str, Any], key: str) -> str | None:
    """None if `key` (dotted) is in `config`; else the hint for the first part that is not."""
    node: Any = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return None  # below a plain value: Hydra's own message says enough
        if part not in node:
            where = ".".join(parts[:i])
            hint = did_you_mean([part], list(node), where)
            owner = f"'{where}'" if where else "the config"
            keys = ", ".join(sorted(node))
            return f"pgolf: {key}: {owner} has no key '{part}'; {hint}its keys: {keys}"
        node = node[part]
    return None


def unknown_key_hints(argv: list[str]) -> list[str]:
    """One line per dotted override in `argv` whose key the composed config lacks (empty when every
    key exists or the arguments cannot be composed at all: Hydra's message stands alone then)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pgolf.parent.compose import compose_dict

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra has named it
        return []
    plain = [(o, _first_value(o)) for o in overrides if not o.key_or_group.startswith("hydra.")]
    # the group choices and plain values decide which keys exist; the dotted keys are under test
    choices = [line for o, line in plain if line and "." not in o.key_or_group]
    try:
        config = compose_dict(choices)
    except Exception:  # a wrong group option (Hydra lists the options) or another error
        return []
    hints = (_walk(config, o.key_or_group) for o, line in plain if line and "." in o.key_or_group)
    return [h for h in hints if h]


@contextmanager
def config_errors_exit(prog: str, overrides: Sequence[str]) -> Iterator[None]:
    """For the commands that compose without `@hydra.main` (`pgolf.plan`, the converter): a
    composition error (a mistyped key, an unknown option, bad override syntax) or a validation
    error ends the command with its message, the nearest real keys and exit status 2, as
    `pgolf.run` reports them, instead of a traceback."""
    from hydra.errors import HydraException

    from pgolf.registry import ConfigError

    try:
        yield
    except HydraException as e:
        lines = [f"{prog}: {str(e).strip()}", *unknown_key_hints(list(overrides))]
    except ConfigError as e:
        lines = [f"{prog}: invalid config: {e}"]
    else:
        return
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.exit(2)


__all__ = ["config_errors_exit", "unknown_key_hints"]
