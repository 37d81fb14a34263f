"""Hydra entry (the parent): compose -> validate -> freeze config.json -> start the worker.

    python -m pgolf.run                                   # embedded offline default
    python -m pgolf.run experiment=naive_baseline         # the challenge's baseline on FineWeb
    python -m pgolf.run model=baseline optimizer=muon hardware=gpu train.iterations=300

    python -m pgolf.run -m seed=1337,42,2025             # a sweep: outputs/sweeps/<time>/<job>/ + summary
    python -m pgolf.run -m seed=1337,42,2025 hydra.sweep.dir=D   # again: resumes D, finished jobs kept
    python -m pgolf.run resume=outputs/sweeps/<time>/1   # continue a killed job from its checkpoint

One device: the worker runs in this process. Several: `torchrun --standalone --nproc_per_node=N
-m pgolf.train <job_dir>`, so Hydra never runs inside the ranks. In a sweep every
job's worker is a fresh subprocess, and a failed job returns inf instead of raising.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pgolf.config import GROUPS, PARENT_ONLY, config_hash, job_config_from_dict, to_dict
from pgolf.parent.callbacks import SWEEP, write_sweep_summary
from pgolf.parent.compose import conf_dir, plain_dict
from pgolf.parent.outdir import FolderInUse, lock_folder, set_aside
from pgolf.parent.override_hints import unknown_key_hints
from pgolf.parent.result_file import ResultError, read_result
from pgolf.parent.slots import GpuSlots, SlotLease, register_resolvers, visible_devices
from pgolf.parent.tracking import resume_job_run, start_hydra_job_run, wandb_config
from pgolf.registry import ConfigError
from pgolf.results import DiskFullError, is_disk_full, read_json, write_json_atomic
from pgolf.run_result import RunResult

register_resolvers()  # before Hydra composes, here and in every joblib worker that imports us
# Hydra's job logging (conf/hydra/job_logging/pgolf.yaml) prints these lines and keeps them in run.log.
log = logging.getLogger("pgolf.run")

# launcher option -> (the Hydra plugin it needs, the pgolf extra that installs it)
LAUNCHER_PLUGINS = {
    "gpus": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def freeze(cfg: DictConfig, job_dir: Path, multirun: bool = False, default_nproc: int = 0) -> dict:
    """Validate and resolve the composed config into the dict the worker will read."""
    data = plain_dict(cfg)
    for key in PARENT_ONLY:
        data.pop(key, None)
    data["job_dir"] = str(job_dir)
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
    and a crashed or killed worker cannot take the sweep down with it."""
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
        except KeyboardInterrupt:  # recorded as "interrupted by the user" by the worker
            return 130
        except Exception:  # recorded in result.json by the worker; run_one reports it
            return 1
    from pgolf.parent.console import run_worker  # its output lines go to this job's run.log too

    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    return run_worker(worker_command(nproc, job_dir), full_env)


def _record(result_path: Path, result: RunResult) -> None:
    """Write the verdict; if that fails (a full disk), say so in its error instead of raising."""
    try:
        result.write(result_path)
    except OSError as e:
        why = "no space left on the device" if is_disk_full(e) else str(e)
        result.error = f"{result.error or 'unknown error'}; {result_path.name} not written: {why}"


def finish(job_dir: Path, code: int, multirun: bool, gpu_lease: dict | None = None) -> float:
    """Read the worker's verdict (or record why there is none) and return the sweep metric."""
    result_path = job_dir / "result.json"
    result = read_result(result_path) if result_path.is_file() else RunResult()
    if code != 0 and result.status != "failed":
        # The worker died without writing its verdict (killed, OOM): record it for the sweep.
        rank_errors = (
            sorted((job_dir / "ranks").glob("rank*_error.txt")) if (job_dir / "ranks").is_dir() else []
        )
        detail = (
            f": {rank_errors[0].stem.split('_')[0]}: {rank_errors[0].read_text().splitlines()[0]}"
            if rank_errors
            else ""
        )
        result.status, result.error = "failed", f"worker exited with code {code}{detail}"
        result.returncode = code
        _record(result_path, result)
    if gpu_lease:
        result.gpu_lease = gpu_lease
        _record(result_path, result)
    if result.status == "ok":
        b = result.bytes
        trained = (
            f"{result.steps} steps, {result.ms_per_step:.1f} ms/step"
            if result.scored_artifact is None
            else f"a re-score of {result.scored_artifact['path']}, no training"
        )
        log.info(
            f"pgolf: val_bpb {result.val_bpb:.6f}  val_loss {result.val_loss:.6f}  "
            f"artifact {b.total:,} bytes (model {b.model:,} + code {b.code:,}; cap {b.cap:,})  "
            f"{trained}  -> {result_path}"
        )
        return float(result.val_bpb)
    log.error(f"pgolf: job failed: {result.error or 'unknown error'} ({result_path})")
    if not multirun:
        sys.exit(1)
    return float("inf")


def _earlier_result(job_dir: Path) -> tuple[RunResult | None, str]:
    """The job folder's result.json (None if absent or unreadable) and a few words on it."""
    path = job_dir / "result.json"
    if not path.is_file():
        return None, "left no result.json (killed or interrupted)"
    try:
        result = read_result(path)
    except (OSError, ResultError) as e:
        return None, f"left a corrupt result.json ({type(e).__name__}: {e})"
    return result, f"ended with status {result.status}: {(result.error or '')[:200]}"


def _reuse_or_clear(job_dir: Path, frozen: dict) -> float | None:
    """Before a sweep job runs in a folder an earlier run of this sweep used: keep a job that
    finished with this very configuration (return its val_bpb), else move the earlier attempt's
    verdict aside so it can never pass for this run's. A killed job's checkpoint stays, so the
    rerun continues from it (the trainer checks that it belongs to this configuration and seed)."""
    if not (job_dir / "result.json").exists() and not (job_dir / "config.json").exists():
        return None  # a fresh job folder
    result, how = _earlier_result(job_dir)
    want = config_hash(job_config_from_dict(frozen), include_seed=True)
    val_bpb = result.val_bpb if result is not None else None
    finished = result is not None and result.status == "ok" and val_bpb is not None and math.isfinite(val_bpb)
    if finished and result.config_hash_with_seed == want:
        log.info(
            f"pgolf: job {job_dir.name} kept: it finished earlier (val_bpb {val_bpb:.6f}, "
            f"{job_dir / 'result.json'}); not retrained",
        )
        return float(val_bpb)
    if finished:  # same overrides, other configuration: conf/ or code defaults changed since
        hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log"}  # this attempt's, already open
        others = [
            p.name for p in job_dir.iterdir() if p.name not in hydra_files and not p.name.startswith(".")
        ]
        moved = set_aside(job_dir, others)
        log.info(
            f"pgolf: job {job_dir.name}: its finished result is for another configuration "
            f"({result.config_hash_with_seed} != {want}: conf/ or code changed since); "
            f"moved it to {moved} and training again",
        )
        return None
    moved = set_aside(job_dir, ["result.json"])
    log.info(
        f"pgolf: job {job_dir.name}: running it again (the earlier attempt {how})"
        + (f"; its result.json is in {moved}" if moved else ""),
    )
    return None


def _run_job(cfg: DictConfig, job_dir: Path, multirun: bool) -> float:
    try:
        lock = lock_folder(job_dir)  # a single run already holds it (pgolf.parent.callbacks.OutputGuard)
    except FolderInUse as e:
        log.error(f"pgolf: job {job_dir.name} not run: {e}")
        if not multirun:
            sys.exit(2)
        return float("inf")
    if lock.reclaimed:
        log.info(f"pgolf: {lock.reclaimed}")
    with lock:
        return _run_locked_job(cfg, job_dir, multirun)


def _run_locked_job(cfg: DictConfig, job_dir: Path, multirun: bool) -> float:
    slots = cfg.get("launch") or {}
    use_slots = bool(slots.get("gpu_slots"))
    try:
        frozen = freeze(
            cfg, job_dir, multirun, default_nproc=int(slots.get("gpus_per_job", 1)) if use_slots else 0
        )
        wb = wandb_config(cfg.get("wandb"), multirun)
    except (ConfigError, RuntimeError) as e:
        RunResult(status="failed", error=f"config: {e}").write(job_dir / "result.json")
        log.error(f"pgolf: invalid config: {e}")
        if not multirun:
            sys.exit(2)
        return float("inf")
    if multirun:
        kept = _reuse_or_clear(job_dir, frozen)
        if kept is not None:
            return kept
    write_json_atomic(job_dir / "config.json", frozen)
    log.debug(f"froze {job_dir / 'config.json'} (config hash {config_hash(frozen)})")
    lease: SlotLease | None = None
    if use_slots:
        slot_dir = slots.get("slot_dir") or Path(HydraConfig.get().sweep.dir) / ".gpu_slots"
        pool = GpuSlots(slot_dir, visible_devices(slots.get("devices")))
        lease = pool.acquire(frozen["hardware"]["nproc_per_node"])
        acquired = time.time()
        log.info(f"pgolf: job {job_dir.name} holds GPU slot(s) {','.join(lease.devices)}")
    job_run = start_hydra_job_run(wb, job_dir, frozen, multirun)  # wandb lives here, never in the worker
    try:
        code = launch(frozen, job_dir, in_process=not multirun, env=lease.env() if lease else None)
    finally:
        if lease is not None:
            lease.release()
        if job_run is not None:
            job_run.close()
    # Which GPUs the job held, and when: provenance, and the evidence that no GPU was shared.
    gpu_lease = {"devices": lease.devices, "acquired": acquired, "released": time.time()} if lease else None
    return finish(job_dir, code, multirun, gpu_lease)


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
    earlier = read_result(result_path) if result_path.is_file() else None
    if earlier is not None and earlier.status == "ok":
        log.info(f"pgolf: {job_dir} already finished (result.json status ok); nothing to resume")
        return float(earlier.val_bpb)
    frozen = read_json(job_dir / "config.json")
    if frozen.get("job_dir") != str(job_dir):  # the folder was moved or synced from another machine
        frozen["job_dir"] = str(job_dir)
        write_json_atomic(job_dir / "config.json", frozen)
    job_config_from_dict(frozen)
    from pgolf.checkpoint import CheckpointError, latest_step

    try:
        lock = lock_folder(job_dir)
    except FolderInUse as e:
        sys.exit(f"pgolf: resume={job_dir}: {e}")
    if lock.reclaimed:
        log.info(f"pgolf: {lock.reclaimed}")
    with lock:
        try:
            step = latest_step(job_dir)
        except CheckpointError as e:
            sys.exit(f"pgolf: resume={job_dir}: {e}")
        log.info(
            f"pgolf: resuming {job_dir} from "
            + (f"its checkpoint at step {step}" if step is not None else "the start (it has no checkpoint)")
        )
        job_run = resume_job_run(job_dir, frozen)
        try:
            code = launch(frozen, job_dir)
        finally:
            if job_run is not None:
                job_run.close()
        return finish(job_dir, code, multirun=False)


def _record_interrupt(job_dir: Path) -> None:
    """Ctrl-C stopped this sweep job: say so in its result.json (the worker, killed at once by
    subprocess.call, may not have written a verdict), so the summary and a resumed sweep know."""
    result, _ = _earlier_result(job_dir)
    if result is not None and result.status == "ok":
        return  # it finished just before the interrupt
    if not (job_dir / "config.json").is_file():
        return  # interrupted before it started: nothing of it to record
    result = result or RunResult()
    result.status = "failed"
    result.error = "interrupted (Ctrl-C) before it finished; rerun the sweep command to run it again"
    result.write(job_dir / "result.json")


# Set once Hydra hands run_one a composed config: an exit before that is a composition error.
STARTED = {"job": False}


def run_one(cfg: DictConfig) -> float:
    STARTED["job"] = True
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    if cfg.get("resume"):
        return resume(Path(str(cfg.resume)), list(hc.overrides.task))
    job_dir = Path(hc.runtime.output_dir).resolve()
    try:
        return _run_job(cfg, job_dir, multirun)
    except KeyboardInterrupt:
        if multirun:
            _record_interrupt(job_dir)
        raise
    except Exception as e:
        if not multirun:
            if isinstance(e, DiskFullError):  # names the file and the bytes: a traceback adds nothing
                sys.exit(f"pgolf: {e}")
            raise
        # Never raise into Hydra from a sweep job: the basic sweeper would re-raise it, abort the
        # remaining jobs and skip on_multirun_end, i.e. the summary (README.md#sweeps-and-reports).
        RunResult(status="failed", error=f"{type(e).__name__}: {e}").write(job_dir / "result.json")
        log.error(f"pgolf: job {job_dir.name} failed: {type(e).__name__}: {e}")
        return float("inf")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    return run_one(cfg)


def plugin_installed(module: str) -> bool:
    """Whether a Hydra plugin's module imports. find_spec raises, not returns None, when the
    `hydra_plugins` namespace itself is missing: no plugin at all is installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_launcher_plugin(argv: list[str]) -> None:
    """Fail in a second, with the fix, when launcher=X needs a plugin that is missing, or (slurm) a
    machine that can submit to Slurm: submitit's executor needs `srun` on PATH and otherwise fails
    with a traceback from inside Hydra."""
    for arg in argv:
        if arg.startswith("launcher="):
            name = arg.split("=", 1)[1]
            plugin = LAUNCHER_PLUGINS.get(name)
            if plugin and not plugin_installed(plugin[0]):
                sys.exit(
                    f"pgolf: launcher={name} needs the Hydra plugin {plugin[0].split('.')[-1]}; "
                    f'install it with: pip install -e ".[{plugin[1]}]"'
                )
            if name == "slurm" and shutil.which("srun") is None:
                sys.exit(
                    "pgolf: launcher=slurm submits through Slurm, but `srun` is not on PATH here; run the "
                    "command on a node of the cluster (a login node), or use launcher=local or launcher=gpus"
                )


# Overrides whose values are free text that may hold `=` or `,` (`report.baseline=model.num_layers=9`
# once bash has removed the quotes), which Hydra's grammar would reject or split into a sweep.
FREE_TEXT_KEYS = ("report.baseline",)


def quote_free_text(argv: list[str]) -> list[str]:
    """Quote the values of FREE_TEXT_KEYS for Hydra, so `report.baseline='model.num_layers=9'`
    works as typed in a shell (the shell strips the quotes before Hydra sees the value)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in FREE_TEXT_KEYS and value and value[0] not in "'\"" and value != "null":
            arg = f"{key}='{value.replace(chr(39), chr(92) + chr(39))}'"
        out.append(arg)
    return out


def _end_of_sweep_exit() -> None:
    """After a sweep: exit non-zero when a job failed (the summary is written by then)."""
    sweep_dir = SWEEP.get("dir")
    if sweep_dir is None:
        return
    jobs = SWEEP.get("jobs")
    if jobs is None:
        sys.exit(
            f"pgolf: the sweep report was not written; rerun it with: python -m pgolf.report {sweep_dir}"
        )
    if jobs["failed"]:
        print(
            f"pgolf: {jobs['failed']} of {jobs['total']} jobs failed; see 'Failed jobs' in {sweep_dir}/summary.md. "
            "Rerun the same command to run them again (finished jobs are kept).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


def main() -> None:
    sys.argv[1:] = quote_free_text(sys.argv[1:])
    check_launcher_plugin(sys.argv[1:])
    try:
        _hydra_main()
    except KeyboardInterrupt:
        if SWEEP.get("dir") is None:
            print("pgolf: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            sys.exit(130)
        print(
            "pgolf: interrupted (Ctrl-C): writing the summary of the jobs that ended",
            file=sys.stderr,
            flush=True,
        )
        write_sweep_summary(SWEEP["config"], SWEEP["dir"], log_to_wandb=False)
        print(
            "pgolf: rerun the same command to resume the sweep (finished jobs are kept)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except SystemExit as e:
        if e.code == 1 and not STARTED["job"]:  # Hydra's own error: for a mistyped key, the nearest
            for line in unknown_key_hints(sys.argv[1:]):  # keys (its own hint is to add a `+`)
                print(line, file=sys.stderr, flush=True)
        raise
    _end_of_sweep_exit()


__all__ = ["GROUPS", "main", "run_one"]

if __name__ == "__main__":
    main()
