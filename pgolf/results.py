"""Atomic, strict JSON writes: a reader sees the old file or the new one, never half of one, and
never a bare NaN or Infinity (which `json.dump` writes by default and strict parsers reject)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons: dict[str, str] = {}
    data = finite_json(data, reasons=reasons)
    if reasons and isinstance(data, dict):
        data["non_finite"] = {**data.get("non_finite", {}), **reasons}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_text_atomic(path: str | Path, text: str | bytes) -> None:
    """Write text (or bytes) through a temp file and a rename, like `write_json_atomic`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode("utf-8") if isinstance(text, str) else text
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
