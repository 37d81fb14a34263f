"""Discoverability: `--help` (conf/hydra/help/pgolf.yaml), the console scripts, tab completion."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from conftest import CONF, REPO

from pgolf.config import GROUPS

SIBLINGS = ("plan", "data", "pack", "report", "train")


@pytest.fixture(scope="module")
def help_text() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf.run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _section(text: str, title: str) -> str:
    start = text.index(f"== {title}")
    end = text.find("\n==", start + 1)
    return text[start : end if end != -1 else None]


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def test_help_teaches_instead_of_dumping_the_config(help_text):
    assert help_text.startswith("pgolf: ")
    assert "Powered by Hydra" not in help_text and "batch_tokens: 524288" not in help_text  # no stock page
    assert len(help_text.splitlines()) < 140


def test_every_group_option_has_a_line_that_says_what_it_is(help_text):
    groups = _section(help_text, "Config groups")
    options = [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml")) if p.parent.name != "hydra"]
    assert len(options) > 30
    undocumented = [
        f"{g}={o}" for g, o in options if not re.search(rf"^ +{g}={o} +\S.{{15,}}$", groups, re.M)
    ]
    assert not undocumented, f"add a line for each to conf/hydra/help/pgolf.yaml: {undocumented}"


def test_every_root_key_has_a_line(help_text, compose):
    section = _section(help_text, "Root keys")
    documented = set(re.split(r"[\s/]+", section))
    cfg = compose()
    keys = _leaf_keys({k: v for k, v in cfg.items() if k not in GROUPS})
    assert {"seed", "train.seq_len", "budget.artifact_bytes", "report.alpha", "launch.slot_dir"} <= set(keys)
    missing = [k for k in keys if k not in documented]
    assert not missing, f"add a line for each to conf/hydra/help/pgolf.yaml: {missing}"


def test_help_names_the_sibling_commands_outputs_and_the_full_config(help_text):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in SIBLINGS:
        line = next(line for line in help_text.splitlines() if f"python -m pgolf.{name} " in line)
        assert f"(pgolf-{name})" in line and f"pgolf-{name}" in scripts
    assert "--cfg job" in help_text and "outputs/runs/" in help_text and "outputs/sweeps/" in help_text
    assert "--shell-completion install=bash" in help_text


def test_every_console_script_points_at_a_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {f"pgolf-{n}" for n in ("run", *SIBLINGS)} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


@pytest.mark.parametrize("name", ["plan", "data", "pack", "report"])
def test_sibling_console_scripts_answer_help(name, tmp_path):
    proc = subprocess.run(
        [str(_console_script(f"pgolf-{name}", tmp_path)), "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or "pgolf" in proc.stdout


def _console_script(name: str, tmp_path: Path) -> Path:
    """The installed script when pip put it on PATH (pip install -e .), else the same two lines pip
    writes for it, so the test runs the entry point exactly as the script does."""
    found = shutil.which(name)
    if found:
        return Path(found)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts[name].partition(":")
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
    path.chmod(0o755)
    return path


def test_pgolf_run_installs_bash_completion_that_completes_groups(tmp_path):
    script = _console_script("pgolf-run", tmp_path)
    env = dict(os.environ, PATH=f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    install = subprocess.run(
        ["pgolf-run", "--shell-completion", "install=bash"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert "hydra_bash_completion()" in install.stdout
    assert "complete -o nospace -o default -F hydra_bash_completion pgolf-run" in install.stdout
    # what bash then asks for each TAB: the matching groups and keys of pgolf's config
    line = "pgolf-run model=ti"
    query = subprocess.run(
        ["pgolf-run", "-sc", "query=bash"], capture_output=True, text=True, timeout=120,
        env=dict(env, COMP_LINE=line, COMP_POINT=str(len(line))),
    )  # fmt: skip
    assert query.stdout.split() == ["model=tiny"], query.stderr[-2000:]
