"""GPU slots for parallel sweep jobs on one node: one lock file per GPU, never two jobs on one GPU.

Hydra does not pin GPUs (README.md#sweeps-and-reports, launcher `gpus`): a parallel launcher
runs N jobs at once and every one of them would see every GPU. Each job therefore takes an
exclusive `flock` on `<slot_dir>/<gpu>.lock` for each GPU it needs and hands exactly those GPUs
to its worker through CUDA_VISIBLE_DEVICES.
The kernel drops a flock when its holder dies, so a killed job frees its GPU by itself and a
stale lock file never blocks a sweep. A job that needs k GPUs takes all k or none (and retries),
so two k-GPU jobs can never deadlock holding half each.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path


def visible_devices(explicit: Sequence[int | str] | None = None) -> list[str]:
    """The GPU ids a sweep may hand out: `explicit`, else CUDA_VISIBLE_DEVICES, else every GPU."""
    if explicit:
        return [str(d) for d in explicit]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class SlotLease:
    """GPUs held by this job until `release()` (or the end of a `with` block, or process death)."""

    def __init__(self, devices: list[str], fds: list[int]):
        self.devices = devices
        self._fds = fds

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)}

    def release(self) -> None:
        for fd in self._fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GpuSlots:
    def __init__(self, slot_dir: str | Path, devices: Sequence[str]):
        if not devices:
            raise RuntimeError(
                "launcher=gpus found no GPU to hand out; set CUDA_VISIBLE_DEVICES or launch.devices=[0,1,...]"
            )
        self.dir = Path(slot_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.devices = [str(d) for d in devices]

    def _try_lock(self, device: str) -> int | None:
        fd = os.open(self.dir / f"{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def try_acquire(self, n: int = 1) -> SlotLease | None:
        """n free GPUs now, or None (holding nothing)."""
        got: list[tuple[str, int]] = []
        for device in self.devices:
            fd = self._try_lock(device)
            if fd is not None:
                got.append((device, fd))
                if len(got) == n:
                    return SlotLease([d for d, _ in got], [f for _, f in got])
        SlotLease([], [f for _, f in got]).release()
        return None

    def acquire(self, n: int = 1, poll_s: float = 0.5, timeout_s: float | None = None) -> SlotLease:
        """Block until n GPUs are free; they stay this job's until the lease is released."""
        if n > len(self.devices):
            raise RuntimeError(
                f"a job needs {n} GPUs but the sweep hands out only {len(self.devices)} ({','.join(self.devices)})"
            )
        start = time.monotonic()
        while True:
            lease = self.try_acquire(n)
            if lease is not None:
                return lease
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"no {n} free GPU slot(s) in {self.dir} after {timeout_s:.0f}s")
            time.sleep(poll_s)


def slot_count(devices: Sequence[int | str] | None, gpus_per_job: int) -> int:
    """Parallel jobs that fit at once: the `${pgolf_slot_count:...}` resolver in conf/launcher/gpus.yaml."""
    return max(1, len(visible_devices(list(devices) if devices else None)) // max(1, int(gpus_per_job)))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("pgolf_slot_count", slot_count, replace=True)
