"""CI: run a real 3-job sweep the way a user does, then check that every job and the summary made it.

    python3 .ci/check_sweep.py [SWEEP_DIR] [-- extra overrides]

Runs `python3 -m pgolf.run -m seed=1,2,3 <overrides> hydra.sweep.dir=SWEEP_DIR` with the default
launcher and the default wandb mode (WANDB_MODE is removed from the environment), then checks the
exit code, that 3 jobs have result.json status ok, and that summary.{md,json} count 3 ok jobs.
Each problem is printed on its own line, naming the job, its error and the file to look at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = (1, 2, 3)


def run_sweep(sweep_dir: Path, overrides: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the default, as a user has it
    cmd = [
        sys.executable,
        "-m",
        "pgolf.run",
        "-m",
        f"seed={','.join(map(str, SEEDS))}",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    print("ci sweep:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=REPO, env=env)


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    return (data, None) if isinstance(data, dict) else (None, f"{path} is not a JSON object")


def problems(sweep_dir: Path, code: int) -> list[str]:
    found = []
    if code != 0:
        found.append(f"the sweep exited with code {code} (0 expected: every job should succeed)")
    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if len(jobs) != len(SEEDS):
        found.append(f"{len(jobs)} job folders in {sweep_dir}, {len(SEEDS)} expected")
    for job in jobs:
        result, err = _read(job / "result.json")
        if err:
            found.append(f"job {job.name}: {err}")
        elif result.get("status") != "ok":
            error = str(result.get("error", "no error recorded")).strip().splitlines() or ["?"]
            config, _ = _read(job / "config.json")  # a job that failed early has no seed in its result
            seed = result.get("seed", (config or {}).get("seed"))
            found.append(
                f"job {job.name} (seed {seed}): {result.get('status')}: {error[0][:400]} "
                f"(see {job / 'result.json'} and {job / 'train.log'})"
            )
    summary, err = _read(sweep_dir / "summary.json")
    if err:
        found.append(f"no sweep summary: {err}")
    else:
        counts = summary.get("jobs")
        if counts != {"total": len(SEEDS), "ok": len(SEEDS), "failed": 0}:
            found.append(f"summary.json counts {counts}, expected {len(SEEDS)} ok and 0 failed")
    if not (sweep_dir / "summary.md").is_file():
        found.append(f"{sweep_dir / 'summary.md'} was not written")
    return found


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    positional = argv[: argv.index("--")] if "--" in argv else argv
    sweep_dir = Path(positional[0]) if positional else Path(tempfile.mkdtemp(prefix="pgolf-ci-")) / "sweep"
    code = run_sweep(sweep_dir, extra)
    found = problems(sweep_dir, code) if sweep_dir.is_dir() else [f"the sweep made no folder {sweep_dir}"]
    for line in found:
        print(f"ci sweep FAILED: {line}", file=sys.stderr)
    if not found:
        # wandb is on by default in a sweep (offline: no account, no network): each job has its run
        jobs = sorted(sweep_dir.glob("[0-9]*"))
        without = [j.name for j in jobs if not any((j / "wandb").glob("offline-run-*"))]
        if without:
            found.append(f"no offline wandb run in job(s) {', '.join(without)} (the default sweep mode)")
            print(f"ci sweep FAILED: {found[-1]}", file=sys.stderr)
        else:
            print(f"ci sweep ok: {len(SEEDS)} jobs ok, summary and an offline wandb run each in {sweep_dir}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
