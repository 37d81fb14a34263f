"""Hydra config -> pgolf's plain config dict, in one place.

Every entry point reads `conf/` from `conf_dir()` and turns a composed config into a plain dict
with `plain_dict` (interpolations resolved, Hydra's own node dropped), so the same overrides give
the same config whichever entry point they go through. `pgolf.run` gets its config from
`@hydra.main` (sweeps and launchers need Hydra's app); everything else (`pgolf.plan`,
`python -m pgolf.models.convert`, tests, benchmarks) composes from overrides with `compose_dict`
or `compose_job`. A module of the Hydra parent: the worker never imports it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from pgolf.config import JobConfig


def conf_dir() -> str:
    """The config tree: $PGOLF_CONF, else `conf/` of the checkout next to the package."""
    path = Path(os.environ.get("PGOLF_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (path / "config.yaml").is_file():
        sys.exit(
            f"pgolf: no config.yaml in {path}; install pgolf from a checkout (pip install -e .) or set PGOLF_CONF"
        )
    return str(path)


def plain_dict(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as a resolved plain dict, without Hydra's node (parent-only keys stay:
    `pgolf.config.job_config_from_dict` drops them)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("hydra", None)
    return data


def compose_dict(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`conf/config.yaml` with these overrides, as `python -m pgolf.run <overrides>` composes it."""
    from hydra import compose, initialize_config_dir

    from pgolf.parent.slots import register_resolvers

    register_resolvers()  # the resolvers conf/ may use, as pgolf.run registers them
    with initialize_config_dir(config_dir=str(Path(conf_dir()).resolve()), version_base="1.3"):
        return plain_dict(compose(config_name="config", overrides=list(overrides)))


def compose_job(overrides: Sequence[str] = ()) -> JobConfig:
    """`compose_dict(overrides)`, validated into a JobConfig (raises ConfigError naming the key)."""
    from pgolf.config import job_config_from_dict

    return job_config_from_dict(compose_dict(overrides))
