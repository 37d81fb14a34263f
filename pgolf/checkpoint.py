"""Training checkpoints for long runs, and the resume that reaches the same result as no kill.

Layout, in the job folder:

    checkpoint/latest.json             {"step", "dir", "world_size", "fingerprint", "files"}: the commit point
    checkpoint/step_000120/rank0.pt    model (canonical per-layer names), optimizer (Adam + this rank's Muon momentum),
    checkpoint/step_000120/rank1.pt    loader position, RNG states, step, training ms, loss history

The checkpointer is given the run's stateful parts when it is built (model weights, optimizer,
loader, RNG: `training_parts`), each with `state_dict()`/`load_state_dict()`; it saves and restores
those and the trainer's own counters, and never reaches into the trainer.

Every rank writes its own file (Muon momentum and the loader position are per rank) through a temp
file and a rename; only after all ranks have written does rank 0 replace `latest.json`, and only
then are older steps deleted. A kill at any moment therefore leaves the previous checkpoint or the
new one, never half of one. The worker resumes by itself when `latest.json` exists, which is what
`python -m pgolf.run resume=<job_dir>` and a requeued SLURM job rely on.

Checkpoints are taken every `checkpoint.every_steps` steps, or every `checkpoint.every_seconds` of
training time. Time differs between ranks, so that decision travels with the trainer's lagged stop
flags (MAX over ranks) and every rank checkpoints at the same step. Saving pauses the clock, as
validation does.

`latest.json` records the size and SHA-256 of every rank's file (hashed while it is written; each
rank leaves its digest in `rankN.json` beside its file for rank 0 to collect). A resume checks them
before unpickling, so a bit flip or a truncated copy is reported by file instead of surfacing as a
torch or pickle error, or not at all. Every problem raises CheckpointError naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pgolf.checkpoint_gate import CKPT_DIR, FAULT_ENV, checkpoints_on
from pgolf.config import CheckpointConfig
from pgolf.contracts import BatchLoader, Optimizer, Stateful, TrainModel
from pgolf.results import atomic_file, read_json, write_json_atomic

LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file, what is wrong and the fix."""


def _start_afresh(ckpt_dir: Path) -> str:
    # Only the newest checkpoint is kept (older ones are deleted once it commits), so the way out of
    # a damaged one is to train the job from its start.
    return (
        f"delete {ckpt_dir} to train this job again from step 0 (python -m pgolf.run "
        f"resume={ckpt_dir.parent} then starts afresh)"
    )


def latest(job_dir: str | Path) -> dict[str, Any] | None:
    """The commit record of the job's checkpoint; None when it has none."""
    path = Path(job_dir) / CKPT_DIR / LATEST
    if not path.is_file():
        return None
    try:
        meta = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); the checkpoint's commit record is damaged: {_start_afresh(path.parent)}"
        ) from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("world_size"), int)
        and isinstance(meta.get("dir"), str)
        and meta["dir"].startswith("step_")
        and "/" not in meta["dir"]
    )
    if not ok:
        raise CheckpointError(
            f"{path}: expected {{'step': int, 'dir': 'step_NNNNNNN', 'world_size': int, ...}}, got "
            f"{json.dumps(meta)[:200]}; the checkpoint's commit record is damaged: {_start_afresh(path.parent)}"
        )
    return meta


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


class RngState:
    """Every random generator the run draws from (Python, numpy, torch, CUDA), as one part."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.device)


class ExportedWeights:
    """A model's weights under the canonical per-layer names (`export_state_dict`), so a checkpoint
    of a banked model holds no 3-D bank and loads into a layered one too. The banked export is
    views of the banks; torch.save writes each bank's storage once."""

    def __init__(self, model: TrainModel):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.export_state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_export_state_dict(state)  # strict; re-stacks the banks


def training_parts(
    model: TrainModel, optimizer: Optimizer, loader: BatchLoader, device: torch.device
) -> dict[str, Stateful]:
    """What a training checkpoint holds besides the trainer's counters, in save and load order."""
    return {
        "model": ExportedWeights(model),
        "optimizer": optimizer,
        "loader": loader,
        "rng": RngState(device),
    }


class _HashingWriter:
    """A file that hashes what torch.save writes through it: the digest costs no second read."""

    def __init__(self, f: Any):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _tensor_bytes(obj: Any) -> int:
    """The tensor payload of a (nested) state: about what torch.save writes, for a full-disk message."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_atomic(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save through a temp file and a rename (none is left behind on failure); returns the
    file's {"bytes", "sha256"}."""
    with atomic_file(path, needed=_tensor_bytes(obj), tmp_name=f".{path.name}.tmp") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
    return {"bytes": writer.bytes, "sha256": writer.sha.hexdigest()}


def _read_verified(path: Path, expected: dict[str, Any] | None, ckpt_dir: Path) -> bytes:
    """The bytes of a rank's file, checked against the size and digest latest.json recorded."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, though {ckpt_dir / LATEST} points at it (deleted, or a copy of the job "
            f"folder that missed it): {_start_afresh(ckpt_dir)}"
        )
    data = path.read_bytes()
    if expected is not None:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != expected.get("bytes") or digest != expected.get("sha256"):
            raise CheckpointError(
                f"{path}: damaged: {len(data):,} bytes with sha256 {digest[:16]}..., but it was written as "
                f"{expected.get('bytes'):,} bytes with sha256 {str(expected.get('sha256'))[:16]}... (a bit flip "
                f"on disk or a truncated copy): {_start_afresh(ckpt_dir)}"
            )
    return data


# ---------------------------------------------------------------------------------- policy
class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        job_dir: Path,
        rank: int,
        world_size: int,
        fingerprint: str,
        parts: Mapping[str, Stateful] | None = None,
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.parts = dict(parts or {})  # saved in this order, restored in this order
        self.device = device or torch.device("cpu")  # where a restore puts the tensors
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
        return checkpoints_on(self.cfg)

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
    def save(self, train_state: dict[str, Any]) -> None:
        """Every part's state and the trainer's counters (`train_state`: step, train_ms, ...)."""
        step = int(train_state["step"])
        step_dir = self.dir / f"step_{step:07d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state["train"] = train_state
        digest = _save_atomic(state, step_dir / f"rank{self.rank}.pt")
        write_json_atomic(step_dir / f"rank{self.rank}.json", digest)
        self._barrier()
        if self.rank == 0:  # the commit point: every rank's file is on disk
            meta = {
                "step": step,
                "dir": step_dir.name,
                "world_size": self.world_size,
                "fingerprint": self.fingerprint,
                "files": {
                    f"rank{r}.pt": read_json(step_dir / f"rank{r}.json") for r in range(self.world_size)
                },
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
    def restore(self) -> dict[str, Any] | None:
        """Load the latest checkpoint into the parts; returns the trainer's counters (None: no checkpoint)."""
        meta = latest(self.dir.parent)
        if meta is None:
            return None
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"the checkpoint in {self.dir} was written by {meta['world_size']} processes, this run has "
                f"{self.world_size}; resume with the job's frozen hardware.nproc_per_node"
            )
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"the checkpoint in {self.dir} belongs to another configuration or seed "
                f"({meta.get('fingerprint')} != {self.fingerprint}); delete it to start this job afresh"
            )
        path = self.dir / meta["dir"] / f"rank{self.rank}.pt"
        # Checkpoints written before digests were recorded have no "files": loaded unchecked.
        data = _read_verified(path, (meta.get("files") or {}).get(path.name), self.dir)
        try:
            state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=False)
        except Exception as e:  # a damaged zip or pickle: torch raises any of several types
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}): "
                f"{_start_afresh(self.dir)}"
            ) from None
        try:
            for name, part in self.parts.items():
                part.load_state_dict(state[name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"{path}: does not fit this job's model, optimizer or loader ({type(e).__name__}: "
                f"{str(e)[:300]}); it was written by other code or config: {_start_afresh(self.dir)}"
            ) from None
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
