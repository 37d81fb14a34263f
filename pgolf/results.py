"""Atomic, strict JSON writes: a reader sees the old file or the new one, never half of one, and
never a bare NaN or Infinity (which `json.dump` writes by default and strict parsers reject).

Every writer goes through a temp file beside the target and a rename. A failure (a full disk, a
kill) removes the temp file, and a full disk raises DiskFullError: one line naming the file, the
bytes it needed and the bytes free, instead of a bare `[Errno 28]`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class DiskFullError(OSError):
    """No space left on the device for a file; the message names it, the bytes needed and free."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(path: str | Path, needed: int | None) -> DiskFullError:
    free = free_bytes(path)
    need = f"{needed:,} bytes" if needed is not None else "more space"
    have = f"{free:,} bytes free" if free is not None else "free space unknown"
    err = DiskFullError(
        f"no space left on the device for {path}: it needs {need}, {have}; free some space (old "
        "outputs/ runs, checkpoint/ folders) or write elsewhere (hydra.run.dir=..., --root ...)"
    )
    err.errno = errno.ENOSPC
    return err


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an error it was raised from or during (torch.save turns a failed write into a
    RuntimeError), is a full disk or an exceeded quota."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@contextmanager
def atomic_file(
    path: str | Path, needed: int | None = None, tmp_name: str | None = None
) -> Iterator[IO[bytes]]:
    """Open a binary temp file beside `path`; on a clean exit it is synced and renamed to `path`,
    on any error it is removed (a full disk becomes DiskFullError; `needed`: the bytes it needs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full(path, needed) from None
        raise


def finite_json(data: Any, path: str = "", reasons: dict[str, str] | None = None) -> Any:
    """`data` with every non-finite float replaced by None; `reasons` (if given) collects
    {dotted key: "nan" | "inf" | "-inf"} so the reader learns what the null stood for."""
    if isinstance(data, float) and not math.isfinite(data):
        if reasons is not None:
            reasons[path or "."] = repr(data)
        return None
    if isinstance(data, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), reasons) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", reasons) for i, v in enumerate(data)]
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as strict JSON. Non-finite floats become null; for a dict, the keys they were
    under are listed in `non_finite` ({key: "nan"}), so a null val_bpb never reads as "missing"."""
    reasons: dict[str, str] = {}
    data = finite_json(data, reasons=reasons)
    if reasons and isinstance(data, dict):
        data["non_finite"] = {**data.get("non_finite", {}), **reasons}
    text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_text_atomic(path: str | Path, text: str | bytes) -> None:
    """Write text (UTF-8, newlines as given) or bytes through a temp file and a rename."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    with atomic_file(path, needed=len(data)) as f:
        f.write(data)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
