"""Hydra entry (the parent): compose -> validate -> freeze config.json -> start the worker.

    python -m pgolf.run                                   # embedded offline default
    python -m pgolf.run experiment=naive_baseline         # the challenge's baseline on FineWeb
    python -m pgolf.run model=baseline optimizer=muon hardware=gpu train.iterations=300

One device: the worker runs in this process. Several: `torchrun --standalone --nproc_per_node=N
-m pgolf.train <job_dir>`, so Hydra never runs inside the ranks (ECOSYSTEM §c1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pgolf.config import GROUPS, job_config_from_dict, to_dict
from pgolf.registry import ConfigError
from pgolf.results import read_json, write_json_atomic


def conf_dir() -> str:
    path = Path(os.environ.get("PGOLF_CONF", Path(__file__).resolve().parent.parent / "conf"))
    if not (path / "config.yaml").is_file():
        sys.exit(
            f"pgolf: no config.yaml in {path}; install pgolf from a checkout (pip install -e .) or set PGOLF_CONF"
        )
    return str(path)


def freeze(cfg: DictConfig, job_dir: Path) -> dict:
    """Validate and resolve the composed config into the dict the worker will read."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("hydra", None)
    data["job_dir"] = str(job_dir)
    job = job_config_from_dict(data)  # raises ConfigError naming the key; no torch import yet
    if job.hardware.name == "auto":
        from pgolf.hw.device import resolve_auto

        job.hardware = resolve_auto(job.hardware)
    from pgolf.hw.device import resolve_nproc

    job.hardware = resolve_nproc(job.hardware)
    frozen = to_dict(job)
    job_config_from_dict(frozen)  # the frozen form must load in the worker exactly as here
    return frozen


def launch(frozen: dict, job_dir: Path) -> int:
    nproc = frozen["hardware"]["nproc_per_node"]
    if frozen["data"]["name"] == "embedded":
        # Build the offline corpus once here, not racing in N ranks.
        from pgolf.components import DATA
        from pgolf.data.source import ensure_embedded

        ensure_embedded(DATA.get("embedded").schema(**frozen["data"]))
    if nproc == 1:
        from pgolf.train import run_job

        try:
            run_job(job_dir)
            return 0
        except Exception:  # recorded in result.json by the worker; run_one reports it
            return 1
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pgolf.train",
        str(job_dir),
    ]
    return subprocess.call(cmd, env=env)


def run_one(cfg: DictConfig) -> float:
    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        frozen = freeze(cfg, job_dir)
    except (ConfigError, RuntimeError) as e:
        write_json_atomic(job_dir / "result.json", {"status": "failed", "error": f"config: {e}"})
        print(f"pgolf: invalid config: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(2)
        return float("inf")
    write_json_atomic(job_dir / "config.json", frozen)
    code = launch(frozen, job_dir)
    result_path = job_dir / "result.json"
    result = read_json(result_path) if result_path.is_file() else {}
    if code != 0 and result.get("status") != "failed":
        # The worker died without writing its verdict (killed, OOM): record it for the sweep.
        rank_errors = (
            sorted((job_dir / "ranks").glob("rank*_error.txt")) if (job_dir / "ranks").is_dir() else []
        )
        detail = (
            f": {rank_errors[0].stem.split('_')[0]}: {rank_errors[0].read_text().splitlines()[0]}"
            if rank_errors
            else ""
        )
        result = {
            **result,
            "status": "failed",
            "error": f"worker exited with code {code}{detail}",
            "returncode": code,
        }
        write_json_atomic(result_path, result)
    if result.get("status") == "ok":
        b = result["bytes"]
        print(
            f"pgolf: val_bpb {result['val_bpb']:.6f}  val_loss {result['val_loss']:.6f}  "
            f"artifact {b['total']:,} bytes (model {b['model']:,} + code {b['code']:,}; cap {b['cap']:,})  "
            f"{result['steps']} steps, {result['ms_per_step']:.1f} ms/step  -> {result_path}"
        )
        return float(result["val_bpb"])
    print(f"pgolf: job failed: {result.get('error', 'unknown error')} ({result_path})", file=sys.stderr)
    if HydraConfig.get().mode.name == "RUN":
        sys.exit(1)
    return float("inf")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    return run_one(cfg)


def main() -> None:
    _hydra_main()


__all__ = ["GROUPS", "main", "run_one"]

if __name__ == "__main__":
    main()
