"""Hydra entry (the parent): compose -> validate -> freeze config.json -> start the worker.

    python -m pgolf.run                                   # embedded offline default
    python -m pgolf.run experiment=naive_baseline         # the challenge's baseline on FineWeb
    python -m pgolf.run model=baseline optimizer=muon hardware=gpu train.iterations=300

    python -m pgolf.run -m seed=1337,42,2025             # a sweep: outputs/sweeps/<time>/<job>/ + summary
    python -m pgolf.run resume=outputs/sweeps/<time>/1   # continue a killed job from its checkpoint

One device: the worker runs in this process. Several: `torchrun --standalone --nproc_per_node=N
-m pgolf.train <job_dir>`, so Hydra never runs inside the ranks (ECOSYSTEM §c1). In a sweep every
job's worker is a fresh subprocess, and a failed job returns inf instead of raising.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pgolf.config import GROUPS, PARENT_ONLY, config_hash, job_config_from_dict, to_dict
from pgolf.registry import ConfigError
from pgolf.results import read_json, write_json_atomic
from pgolf.slots import GpuSlots, SlotLease, register_resolvers, visible_devices

register_resolvers()  # before Hydra composes, here and in every joblib worker that imports us
# Hydra's job logging (conf/hydra/job_logging/pgolf.yaml) prints these lines and keeps them in run.log.
log = logging.getLogger("pgolf.run")

# launcher option -> (the Hydra plugin it needs, the pgolf extra that installs it)
LAUNCHER_PLUGINS = {
    "gpus": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def conf_dir() -> str:
    path = Path(os.environ.get("PGOLF_CONF", Path(__file__).resolve().parent.parent / "conf"))
    if not (path / "config.yaml").is_file():
        sys.exit(
            f"pgolf: no config.yaml in {path}; install pgolf from a checkout (pip install -e .) or set PGOLF_CONF"
        )
    return str(path)


def resolve_wandb_mode(mode: str, multirun: bool) -> str:
    """`auto` -> offline in a sweep when wandb is installed, else disabled. WANDB_MODE=disabled in
    the environment always wins, so tests and CI never start wandb."""
    env = os.environ.get("WANDB_MODE", "")
    if env == "disabled":
        return "disabled"
    if mode != "auto":
        return mode
    if env in ("offline", "online"):
        return env
    return "offline" if multirun and importlib.util.find_spec("wandb") is not None else "disabled"


def freeze(cfg: DictConfig, job_dir: Path, multirun: bool = False, default_nproc: int = 0) -> dict:
    """Validate and resolve the composed config into the dict the worker will read."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("hydra", None)
    for key in PARENT_ONLY:
        data.pop(key, None)
    data["job_dir"] = str(job_dir)
    if isinstance(data.get("wandb"), dict):
        data["wandb"]["mode"] = resolve_wandb_mode(data["wandb"].get("mode", "auto"), multirun)
    hw = data.get("hardware")
    if default_nproc and isinstance(hw, dict) and not hw.get("nproc_per_node"):
        hw["nproc_per_node"] = default_nproc  # GPU slots: "all GPUs" means the job's share
    job = job_config_from_dict(data)  # raises ConfigError naming the key; no torch import yet
    if job.hardware.name == "auto":
        from pgolf.hw.device import resolve_auto

        job.hardware = resolve_auto(job.hardware)
    from pgolf.hw.device import resolve_nproc

    job.hardware = resolve_nproc(job.hardware)
    frozen = to_dict(job)
    job_config_from_dict(frozen)  # the frozen form must load in the worker exactly as here
    return frozen


def worker_command(nproc: int, job_dir: Path) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pgolf.train", str(job_dir)]
    # --standalone picks a free rendezvous port, so parallel jobs on one node never collide.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pgolf.train",
        str(job_dir),
    ]


def launch(frozen: dict, job_dir: Path, in_process: bool = True, env: dict[str, str] | None = None) -> int:
    """Run the worker. One process in-process for a single run; sweeps always start a fresh
    process per job, so no CUDA, compile or process-group state leaks from one job into the next
    (ECOSYSTEM §e1.3) and a crashed or killed worker cannot take the sweep down with it."""
    nproc = frozen["hardware"]["nproc_per_node"]
    if frozen["data"]["name"] == "embedded":
        # Build the offline corpus once here, not racing in N ranks.
        from pgolf.components import DATA
        from pgolf.data.source import ensure_embedded

        ensure_embedded(
            DATA.get("embedded").schema(**frozen["data"]), log=logging.getLogger("pgolf.data").info
        )
    if nproc == 1 and in_process and not env:
        from pgolf.train import run_job

        try:
            run_job(job_dir)
            return 0
        except Exception:  # recorded in result.json by the worker; run_one reports it
            return 1
    from pgolf.console import run_worker  # its output lines go to this job's run.log too

    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    return run_worker(worker_command(nproc, job_dir), full_env)


def finish(job_dir: Path, code: int, multirun: bool, extra: dict | None = None) -> float:
    """Read the worker's verdict (or record why there is none) and return the sweep metric."""
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
    if extra:
        result.update(extra)
        write_json_atomic(result_path, result)
    if result.get("status") == "ok":
        b = result["bytes"]
        log.info(
            f"pgolf: val_bpb {result['val_bpb']:.6f}  val_loss {result['val_loss']:.6f}  "
            f"artifact {b['total']:,} bytes (model {b['model']:,} + code {b['code']:,}; cap {b['cap']:,})  "
            f"{result['steps']} steps, {result['ms_per_step']:.1f} ms/step  -> {result_path}"
        )
        return float(result["val_bpb"])
    log.error(f"pgolf: job failed: {result.get('error', 'unknown error')} ({result_path})")
    if not multirun:
        sys.exit(1)
    return float("inf")


def _run_job(cfg: DictConfig, job_dir: Path, multirun: bool) -> float:
    slots = cfg.get("launch") or {}
    use_slots = bool(slots.get("gpu_slots"))
    try:
        frozen = freeze(
            cfg, job_dir, multirun, default_nproc=int(slots.get("gpus_per_job", 1)) if use_slots else 0
        )
    except (ConfigError, RuntimeError) as e:
        write_json_atomic(job_dir / "result.json", {"status": "failed", "error": f"config: {e}"})
        log.error(f"pgolf: invalid config: {e}")
        if not multirun:
            sys.exit(2)
        return float("inf")
    write_json_atomic(job_dir / "config.json", frozen)
    log.debug(f"froze {job_dir / 'config.json'} (config hash {config_hash(frozen)})")
    lease: SlotLease | None = None
    if use_slots:
        slot_dir = slots.get("slot_dir") or Path(HydraConfig.get().sweep.dir) / ".gpu_slots"
        pool = GpuSlots(slot_dir, visible_devices(slots.get("devices")))
        lease = pool.acquire(frozen["hardware"]["nproc_per_node"])
        acquired = time.time()
        log.info(f"pgolf: job {job_dir.name} holds GPU slot(s) {','.join(lease.devices)}")
    try:
        code = launch(frozen, job_dir, in_process=not multirun, env=lease.env() if lease else None)
    finally:
        if lease is not None:
            lease.release()
    # Which GPUs the job held, and when: provenance, and the evidence that no GPU was shared.
    extra = (
        {"gpu_lease": {"devices": lease.devices, "acquired": acquired, "released": time.time()}}
        if lease
        else None
    )
    return finish(job_dir, code, multirun, extra)


def resume(job_dir: Path, task_overrides: list[str]) -> float:
    """Continue a killed job in its own folder from its frozen config.json and latest checkpoint."""
    others = [o for o in task_overrides if not o.startswith("resume=")]
    if others:
        sys.exit(
            f"pgolf: resume= continues a job with its frozen config.json; drop the other overrides: {' '.join(others)}"
        )
    job_dir = job_dir.resolve()
    if not (job_dir / "config.json").is_file():
        sys.exit(f"pgolf: resume={job_dir}: no config.json there; pass the folder of a job that was started")
    result_path = job_dir / "result.json"
    if result_path.is_file() and read_json(result_path).get("status") == "ok":
        log.info(f"pgolf: {job_dir} already finished (result.json status ok); nothing to resume")
        return float(read_json(result_path)["val_bpb"])
    frozen = read_json(job_dir / "config.json")
    if frozen.get("job_dir") != str(job_dir):  # the folder was moved or synced from another machine
        frozen["job_dir"] = str(job_dir)
        write_json_atomic(job_dir / "config.json", frozen)
    job_config_from_dict(frozen)
    from pgolf.checkpoint import latest_step

    step = latest_step(job_dir)
    log.info(
        f"pgolf: resuming {job_dir} from "
        + (f"its checkpoint at step {step}" if step is not None else "the start (it has no checkpoint)")
    )
    return finish(job_dir, launch(frozen, job_dir), multirun=False)


def run_one(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    if cfg.get("resume"):
        return resume(Path(str(cfg.resume)), list(hc.overrides.task))
    job_dir = Path(hc.runtime.output_dir).resolve()
    try:
        return _run_job(cfg, job_dir, multirun)
    except Exception as e:
        if not multirun:
            raise
        # Never raise into Hydra from a sweep job: the basic sweeper would re-raise it, abort the
        # remaining jobs and skip on_multirun_end, i.e. the summary (ECOSYSTEM §c2, §e1.4).
        write_json_atomic(job_dir / "result.json", {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        log.error(f"pgolf: job {job_dir.name} failed: {type(e).__name__}: {e}")
        return float("inf")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    return run_one(cfg)


def check_launcher_plugin(argv: list[str]) -> None:
    """Fail in a second, with the install command, when launcher=X needs a plugin that is missing."""
    for arg in argv:
        if arg.startswith("launcher="):
            name = arg.split("=", 1)[1]
            plugin = LAUNCHER_PLUGINS.get(name)
            if plugin and importlib.util.find_spec(plugin[0]) is None:
                sys.exit(
                    f"pgolf: launcher={name} needs the Hydra plugin {plugin[0].split('.')[-1]}; "
                    f'install it with: pip install -e ".[{plugin[1]}]"'
                )


def main() -> None:
    check_launcher_plugin(sys.argv[1:])
    _hydra_main()


__all__ = ["GROUPS", "main", "run_one"]

if __name__ == "__main__":
    main()
