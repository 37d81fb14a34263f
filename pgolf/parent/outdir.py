"""Output folders that one run owns: a lock while a run writes there, and no silent reuse.

Two runs writing into one folder mix their files (one's result.json and artifact, the other's
config.json, an interleaved log), so every run and sweep holds `<folder>/.pgolf.lock` while it
writes. The lock is an flock on that file, so the kernel drops it when its owner dies, even
on SIGKILL; the file also names the owner (pid, host, command) for the message a second run gets.
A lock file whose owner is gone is reclaimed with a message. A folder that already holds a run
is only reused when the user says so (`overwrite=true`), and then the old files are moved
aside into `.replaced/<time>/`, never deleted.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = ".pgolf.lock"
REPLACED_DIR = ".replaced"
# Entries that belong to the folder's bookkeeping, not to the run that used it.
_BOOKKEEPING = (LOCK_NAME, REPLACED_DIR)


class FolderInUse(RuntimeError):
    """Another live process owns the folder."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (jiffies since boot), to tell a reused pid from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; fields before it follow ")"


def pid_alive(pid: int, proc_start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return proc_start is None or _proc_start(pid) in (None, proc_start)


def _owner_text(owner: dict[str, Any]) -> str:
    since = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, float) else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {when}: {owner.get('command', '?')})"


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class FolderLock:
    folder: Path
    fd: int
    reclaimed: str | None = None  # the message about a stale lock this one replaced

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(self.folder, None)
        try:  # remove the file first, while still holding the lock, so no one locks a dead inode
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, FolderLock] = {}  # locks this process holds, so taking one twice is harmless


def lock_folder(folder: str | Path, command: str | None = None) -> FolderLock:
    """Own `folder` (created if needed) until release() or process exit; raise FolderInUse naming
    the live owner. A lock file left by a dead process is taken over, and `reclaimed` says so."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return _HELD[folder]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without flock (some network mounts): never fail a run over the lock.
                print(f"pgolf: cannot lock {path} on this filesystem ({e}); running without the lock")
                return _own(folder, fd, None, command)
            os.close(fd)
            owner = _read_owner(path)
            raise FolderInUse(
                f"{folder} is in use by {_owner_text(owner)}: two runs in one folder would mix their "
                f"files. Wait for it to finish, or run into another folder (a new hydra.run.dir / "
                f"hydra.sweep.dir). Lock file: {path}"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous owner removed the file between our open and flock
            os.close(fd)
            continue
        previous = _read_owner(path)
        reclaimed = None
        if previous.get("pid"):
            # The flock was free, so its owner is gone (the kernel drops flocks of dead processes).
            state = (
                "no longer running"
                if previous.get("host") != socket.gethostname()
                or not pid_alive(int(previous["pid"]), previous.get("proc_start"))
                else "running, but no longer holding the lock"
            )
            reclaimed = f"reclaimed the stale lock {path} of {_owner_text(previous)}, {state}"
        return _own(folder, fd, reclaimed, command)
    raise FolderInUse(f"{folder}: could not take {path}; other processes keep replacing it")


def _own(folder: Path, fd: int, reclaimed: str | None, command: str | None) -> FolderLock:
    """Write this process into the lock file (for the message a second run gets) and hold it."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "proc_start": _proc_start(os.getpid()),
        "started": time.time(),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    lock = FolderLock(folder, fd, reclaimed)
    _HELD[folder] = lock
    return lock


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


# ------------------------------------------------------------------------------ earlier runs


@dataclass
class EarlierRun:
    text: str  # what the folder holds, in words
    finished: bool  # it wrote its verdict (ok or failed); False: killed, interrupted or corrupt


def earlier_run(folder: Path) -> EarlierRun | None:
    """The run the folder already holds, or None when it holds none."""
    result = folder / "result.json"
    if result.is_file():
        try:
            data = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return EarlierRun(f"a run whose result.json is corrupt ({type(e).__name__})", False)
        if not isinstance(data, dict):
            return EarlierRun("a run whose result.json is corrupt (not a JSON object)", False)
        status = data.get("status", "?")
        if status == "ok":
            bpb = data.get("val_bpb")
            score = f"val_bpb {bpb:.6f}" if isinstance(bpb, (int, float)) else "no val_bpb"
            return EarlierRun(f"a finished run (result.json: status ok, {score})", True)
        if status == "running":
            return EarlierRun("a run that died before its verdict (result.json: status running)", False)
        return EarlierRun(f"a run that ended with status {status} ({str(data.get('error', ''))[:200]})", True)
    if (folder / "config.json").is_file():
        return EarlierRun("a run that was started and never finished (config.json, no result.json)", False)
    return None


def foreign_entries(folder: Path) -> list[str]:
    """Everything in `folder` that is not the folder's own bookkeeping."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in _BOOKKEEPING)


def set_aside(folder: Path, names: list[str] | None = None) -> Path | None:
    """Move `names` (default: everything but the lock and earlier set-asides) of `folder` into
    `folder/.replaced/<time>/` and return that folder (None when there was nothing to move)."""
    names = foreign_entries(folder) if names is None else [n for n in names if (folder / n).exists()]
    if not names:
        return None
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    dest = folder / REPLACED_DIR / stamp
    k = 1
    while dest.exists():
        k += 1
        dest = folder / REPLACED_DIR / f"{stamp}_{k}"
    dest.mkdir(parents=True)
    for name in names:
        os.replace(folder / name, dest / name)
    return dest
