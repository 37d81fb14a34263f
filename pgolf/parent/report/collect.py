"""Find the jobs of one or more sweep folders and group them by the seed-free config hash.

A job folder is any folder holding a `result.json`, a `config.json` or Hydra's
`.hydra/overrides.yaml`. Jobs that never wrote a result (killed, or still running) are kept
as `missing`/`running` so the report shows every job that was started, not only the survivors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgolf.config import config_hash
from pgolf.parent.result_file import ResultError, read_result
from pgolf.run_result import RunResult

# Overrides that do not define a configuration: seeds, where and how it ran, logging.
_NOT_CONFIG = (
    "seed", "label", "hydra", "hydra/", "launcher", "launch", "resume", "report", "wandb", "overwrite"
)  # fmt: skip


@dataclass
class Job:
    path: Path
    name: str  # relative to its sweep folder, e.g. "3"
    status: str  # ok | failed | running | missing | corrupt
    error: str = ""
    result: RunResult = field(default_factory=RunResult)
    overrides: list[str] = field(default_factory=list)
    config_hash: str | None = None
    seed: int | None = None
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and _finite(self.result.val_loss) and _finite(self.result.val_bpb)


@dataclass
class Group:
    config_hash: str
    jobs: list[Job]
    overrides: list[str]  # the configuration-defining overrides (seed and run plumbing removed)
    label: str
    desc: str = ""  # what tells this group apart from the others in the report

    @property
    def ok_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.ok]

    @property
    def failed_jobs(self) -> list[Job]:
        return [j for j in self.jobs if not j.ok]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


class Unreadable(str):
    """Why a JSON file that exists could not be used (kept apart from "absent")."""


def _read_json(path: Path) -> dict[str, Any] | Unreadable | None:
    """The file's object; None when there is no file; `Unreadable` naming the file when it is corrupt."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return Unreadable(f"{path} is corrupt ({type(e).__name__}: {e})")
    if not isinstance(data, dict):
        return Unreadable(f"{path} is corrupt (a JSON {type(data).__name__}, not an object)")
    return data


def _read_result(path: Path) -> RunResult | Unreadable | None:
    """The job's result; None when there is no file; `Unreadable` naming the file and the key."""
    if not path.is_file():
        return None
    try:
        return read_result(path)
    except ResultError as e:
        return Unreadable(f"{path} is corrupt ({e.reason})")
    except OSError as e:
        return Unreadable(f"{path} is corrupt ({type(e).__name__}: {e})")


def is_job_dir(path: Path) -> bool:
    return (
        (path / "result.json").is_file()
        or (path / "config.json").is_file()
        or (path / ".hydra" / "overrides.yaml").is_file()
    )


def find_job_dirs(root: Path) -> list[Path]:
    """Job folders under `root` (or `root` itself), not descending into a job's own folders."""
    if is_job_dir(root):
        return [root]
    found: list[Path] = []
    for child in sorted(root.iterdir(), key=_natural_key):
        if child.is_dir() and not child.name.startswith("."):
            found.extend(find_job_dirs(child))
    return found


def _natural_key(p: Path) -> tuple:
    # Job folders are Hydra job numbers: sort 2 before 10.
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def config_overrides(overrides: list[str]) -> list[str]:
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0] in _NOT_CONFIG or key.startswith("hydra/"):
            continue
        keep.append(o.lstrip("+"))
    return sorted(keep)


def load_job(path: Path, root: Path) -> Job:
    name = str(path.relative_to(root)) if path != root else path.name
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    notes: list[str] = []  # other files of the job that could not be read
    if overrides_file.is_file():
        try:
            loaded = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
            overrides = [str(o) for o in loaded] if isinstance(loaded, list) else []
        except (OSError, yaml.YAMLError) as e:
            notes.append(f"{overrides_file} is corrupt ({type(e).__name__})")
    result = _read_result(path / "result.json")
    config = _read_json(path / "config.json")
    job = Job(path=path, name=name, status="missing", overrides=overrides)
    if isinstance(config, Unreadable):
        notes.append(config)
        config = None  # the job's identity then comes from result.json and its overrides alone
    if isinstance(result, Unreadable):
        job.status = "corrupt"
        job.error = f"{result}; rerun the job (rerunning the sweep command reruns it) or delete the file"
    elif result is not None:
        job.result = result
        job.status = result.status
        job.error = result.error or ""
        job.config_hash = result.config_hash
        job.seed = result.seed
        job.label = result.label or ""
    if config is not None:
        job.config_hash = job.config_hash or config_hash(config)
        job.seed = job.seed if job.seed is not None else config.get("seed")
        job.label = job.label or str(config.get("label", ""))
    if job.status == "missing":
        job.error = "no result.json: the job was killed or is still running"
    elif job.status == "running":
        job.error = "result.json says running: the worker died before its verdict"
    elif job.status == "ok" and not job.ok:
        job.status, job.error = "failed", "result.json has no finite val_loss/val_bpb"
    if notes and not job.ok:
        job.error = "; ".join([job.error, *notes])
    return job


def collect(roots: list[Path]) -> list[Job]:
    jobs: list[Job] = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        for path in find_job_dirs(root):
            job = load_job(path, root)
            if len(roots) > 1:  # merged sweeps: say which sweep a job number belongs to
                job.name = f"{root.name}/{job.name}"
            jobs.append(job)
    return jobs


def group_jobs(jobs: list[Job]) -> list[Group]:
    """Groups in first-seen order. A job with no config hash (it failed before freezing its config)
    is grouped by its overrides so its seeds still line up."""
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        key = job.config_hash or "invalid:" + ",".join(config_overrides(job.overrides))
        by_key.setdefault(key, []).append(job)
    groups = []
    for key, members in by_key.items():
        ref = next((j for j in members if j.ok), members[0])
        groups.append(Group(key, members, config_overrides(ref.overrides), ref.label))
    _describe(groups)
    return groups


def _describe(groups: list[Group]) -> None:
    """Name each group by the overrides that differ between groups (common ones say nothing)."""
    # With one configuration nothing differs: then its own overrides say what it is.
    common = set.intersection(*(set(g.overrides) for g in groups)) if len(groups) > 1 else set()
    for g in groups:
        varying = [o for o in g.overrides if o not in common]
        parts = ([g.label] if g.label else []) + varying
        g.desc = " ".join(parts) if parts else g.config_hash[:12]
    seen: dict[str, int] = {}
    for g in groups:  # two groups that read alike (equal overrides, other code): add the hash
        seen[g.desc] = seen.get(g.desc, 0) + 1
    for g in groups:
        if seen[g.desc] > 1:
            g.desc = f"{g.desc} [{g.config_hash[:8]}]"


def select_group(groups: list[Group], selector: str) -> Group:
    """A group by hash prefix, or by overrides `k=v,k2=v2` that all appear in its overrides."""
    by_hash = [g for g in groups if g.config_hash.startswith(selector)]
    if len(by_hash) == 1:
        return by_hash[0]
    wanted = {s.strip().lstrip("+") for s in selector.split(",") if s.strip()}
    matches = [g for g in groups if wanted and wanted <= set(g.overrides)]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(f"{g.config_hash[:8]} ({g.desc})" for g in groups)
    what = "matches several configurations" if matches or len(by_hash) > 1 else "matches no configuration"
    raise ValueError(f"baseline {selector!r} {what}; choose one of: {listing}")
