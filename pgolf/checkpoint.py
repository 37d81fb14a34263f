"""Training checkpoints for long runs, and the resume that reaches the same result as no kill.

Layout, in the job folder:

    checkpoint/latest.json             {"step", "dir", "world_size", "fingerprint"}: the commit point
    checkpoint/step_000120/rank0.pt    model (canonical per-layer names), optimizer (Adam + this rank's Muon momentum),
    checkpoint/step_000120/rank1.pt    loader position, RNG states, step, training ms, loss history

Every rank writes its own file (Muon momentum and the loader position are per rank) through a temp
file and a rename; only after all ranks have written does rank 0 replace `latest.json`, and only
then are older steps deleted. A kill at any moment therefore leaves the previous checkpoint or the
new one, never half of one. The worker resumes by itself when `latest.json` exists, which is what
`python -m pgolf.run resume=<job_dir>` and a requeued SLURM job rely on.

Checkpoints are taken every `checkpoint.every_steps` steps, or every `checkpoint.every_seconds` of
training time. Time differs between ranks, so that decision travels with the trainer's lagged stop
flags (MAX over ranks) and every rank checkpoints at the same step. Saving pauses the clock, as
validation does.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pgolf.config import CheckpointConfig
from pgolf.results import read_json, write_json_atomic

CKPT_DIR = "checkpoint"
LATEST = "latest.json"
# Fault injection for tests and drills: the worker SIGKILLs itself right after this step (after the
# step's checkpoint, if one is due), as an OOM killer or a lost node would.
FAULT_ENV = "PGOLF_FAULT_KILL_AFTER_STEP"


def latest(job_dir: str | Path) -> dict[str, Any] | None:
    path = Path(job_dir) / CKPT_DIR / LATEST
    return read_json(path) if path.is_file() else None


def latest_step(job_dir: str | Path) -> int | None:
    meta = latest(job_dir)
    return None if meta is None else int(meta["step"])


# ------------------------------------------------------------------------------- state parts
def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors, wherever loaded
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def loader_state(loader: Any) -> dict[str, Any]:
    if hasattr(loader, "state_dict"):
        return loader.state_dict()
    stream = loader.stream  # the foundation's SequentialLoader: a TokenStream position is all it has
    return {"file_idx": stream.file_idx, "pos": stream.pos}


def load_loader_state(loader: Any, state: dict[str, Any]) -> None:
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)
        return
    from pgolf.data.shards import load_tokens

    stream = loader.stream
    stream.file_idx = state["file_idx"]
    stream.tokens = load_tokens(stream.files[stream.file_idx], mmap=True)
    stream.pos = state["pos"]


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the canonical per-layer names (`export_state_dict`) where the model has
    them, so a checkpoint of a banked model holds no 3-D bank and loads into a layered one too.
    The banked export is views of the banks; torch.save writes each bank's storage once."""
    export = getattr(model, "export_state_dict", None)
    return export() if export is not None else model.state_dict()


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load of `model_weights` output, re-stacking banks where the model has them."""
    load = getattr(model, "load_export_state_dict", None)
    if load is not None:
        load(state)
    else:
        model.load_state_dict(state, strict=True)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- policy
class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, job_dir: Path, rank: int, world_size: int, fingerprint: str):
        self.cfg = cfg
        self.dir = Path(job_dir) / CKPT_DIR
        self.rank, self.world_size = rank, world_size
        self.fingerprint = fingerprint  # the seeded config hash: a checkpoint only resumes its own job
        self.last_ms = 0.0
        self.time_flag = False  # set through `vote` from the all-reduced flag
        self.saved_step = -1
        fault = os.environ.get(FAULT_ENV, "")
        self.kill_after = int(fault) if fault.strip() else None

    @property
    def enabled(self) -> bool:
        return self.cfg.every_steps > 0 or self.cfg.every_seconds > 0

    def time_due(self, train_ms: float) -> float:
        """This rank's vote (0/1) for a time-based checkpoint; reduced with MAX across ranks."""
        every = self.cfg.every_seconds
        return float(every > 0 and train_ms - self.last_ms >= 1000.0 * every)

    def vote(self, due: bool, step: int) -> None:
        """The all-reduced time vote of `step`. On CUDA it arrives a step late, so a vote cast
        before the latest save (which already covered it) must not trigger a second save."""
        if due and step > self.saved_step:
            self.time_flag = True

    def due(self, step: int) -> bool:
        """Whether to checkpoint now that `step` steps are done; identical on every rank."""
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        return by_steps or self.time_flag

    # ------------------------------------------------------------------------------ save
    def save(self, trainer: Any, train_state: dict[str, Any]) -> None:
        step = int(train_state["step"])
        step_dir = self.dir / f"step_{step:07d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model_weights(trainer.model),
            "optimizer": trainer.opt.state_dict(),
            "loader": loader_state(trainer.loader),
            "rng": rng_state(trainer.rt.device),
            "train": train_state,
        }
        _save_atomic(state, step_dir / f"rank{self.rank}.pt")
        self._barrier()
        if self.rank == 0:  # the commit point: every rank's file is on disk
            meta = {
                "step": step,
                "dir": step_dir.name,
                "world_size": self.world_size,
                "fingerprint": self.fingerprint,
            }
            write_json_atomic(self.dir / LATEST, meta)
            for old in self.dir.glob("step_*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()  # nobody runs ahead (and could be killed) before the commit
        self.last_ms = float(train_state["train_ms"])
        self.time_flag = False
        self.saved_step = step

    def fault_point(self, step: int) -> None:
        if self.kill_after is not None and step == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------------------- restore
    def restore(self, trainer: Any) -> dict[str, Any] | None:
        """Load the latest checkpoint into the trainer's parts; returns its training state."""
        meta = latest(self.dir.parent)
        if meta is None:
            return None
        if meta["world_size"] != self.world_size:
            raise RuntimeError(
                f"the checkpoint in {self.dir} was written by {meta['world_size']} processes, this run has "
                f"{self.world_size}; resume with the job's frozen hardware.nproc_per_node"
            )
        if meta.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"the checkpoint in {self.dir} belongs to another configuration or seed "
                f"({meta.get('fingerprint')} != {self.fingerprint}); delete it to start this job afresh"
            )
        device = trainer.rt.device
        state = torch.load(
            self.dir / meta["dir"] / f"rank{self.rank}.pt", map_location=device, weights_only=False
        )
        load_model_weights(trainer.model, state["model"])
        trainer.opt.load_state_dict(state["optimizer"])
        load_loader_state(trainer.loader, state["loader"])
        set_rng_state(state["rng"], device)
        self.last_ms = float(state["train"]["train_ms"])
        self.saved_step = int(state["train"]["step"])
        return state["train"]

    def discard(self) -> None:
        """After a successful run the checkpoint has served its purpose (unless checkpoint.keep)."""
        if self.rank == 0 and not self.cfg.keep and self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
