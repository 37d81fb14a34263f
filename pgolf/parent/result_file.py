"""Reading a job's `result.json` back into a `pgolf.run_result.RunResult`, every key's type checked.

The parent (sweeps, resume, wandb), `pgolf.check`, `pgolf.submission` and the report read results;
the worker only writes one. So the checks live here, under pgolf.parent, and no packed
`train_gpt.py` carries them (docs/quant.md, what ships).

`result_from_json` turns a top-level null that `non_finite` explains (`pgolf.results.write_json_atomic`
writes non-finite floats as null) back into the float it stood for, so reading a result and
writing it again gives the same file; keys this version does not know go to `extra`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pgolf.results import read_json
from pgolf.run_result import ByteCounts, RunResult

STATUSES = ("running", "ok", "failed")


class ResultError(ValueError):
    """A result.json that is not a result; the message names the file and the key."""

    def __init__(self, source: str | Path, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = str(source), reason


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _mapping(v: Any) -> bool:
    return isinstance(v, dict)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _loss_pairs(v: Any) -> bool:
    """[[step, loss], ...]; a loss may be null (a non-finite one, written as null)."""
    return isinstance(v, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and _integer(p[0]) and (p[1] is None or _number(p[1]))
        for p in v
    )


def result_from_json(data: Any, source: str | Path = "result.json") -> RunResult:
    """A checked RunResult from a parsed result.json; ResultError names `source` and the key."""
    if not isinstance(data, dict):
        raise ResultError(source, f"a JSON {type(data).__name__}, not an object")

    def bad(key: str, want: str) -> ResultError:
        return ResultError(source, f"key {key!r} is {json_repr(data[key])}, expected {want}")

    reasons = data.get("non_finite") or {}
    if not isinstance(reasons, dict):
        raise bad("non_finite", "an object")
    known = {f.name for f in dataclasses.fields(RunResult)} - {"extra"}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            continue
        if key == "bytes":
            values[key] = _byte_counts(value, source)
            continue
        check, want = _CHECKS[key]
        if value is None and key in _FLOATS and key in reasons:
            value = float(reasons[key])  # "nan" / "inf" / "-inf": what was written as null
        elif value is None and key == "final_window_rule":
            pass
        elif not check(value):
            raise bad(key, want)
        if key == "train_losses":
            value = [(int(s), loss) for s, loss in value]
        values[key] = value
    if "status" not in data:
        raise ResultError(source, "no 'status' key; a result.json always has one")
    if values["status"] not in STATUSES:
        raise bad("status", " or ".join(STATUSES))
    extra = {k: v for k, v in data.items() if k not in known}
    return RunResult(**values, extra=extra)


def read_result(path: str | Path) -> RunResult:
    """The result.json at `path`; ResultError (naming the file) when it is not valid JSON or
    not a result. OSError when it cannot be read."""
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ResultError(path, f"not valid JSON ({type(e).__name__}: {e})") from None
    return result_from_json(data, path)


def json_repr(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _byte_counts(value: Any, source: str | Path) -> ByteCounts:
    if not isinstance(value, dict):
        raise ResultError(source, f"key 'bytes' is {json_repr(value)}, expected an object")
    names = {f.name for f in dataclasses.fields(ByteCounts)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ResultError(source, f"key 'bytes' has unknown keys {unknown}; expected some of {sorted(names)}")
    for k, v in value.items():
        check = _BYTE_CHECKS.get(k, _integer)
        if not check(v):
            want = "true or false" if check is _flag else "an integer"
            raise ResultError(source, f"key 'bytes.{k}' is {json_repr(v)}, expected {want}")
    return ByteCounts(**value)


_BYTE_CHECKS = {"within_cap": _flag}
# Each key's check and, for the message, what it expects.
_FLOATS = {
    "train_ms", "ms_per_step", "ms_per_step_mean", "calibration_seconds", "val_loss", "val_bpb"
}  # fmt: skip
_CHECKS = {
    **{k: (_text, "a string") for k in (
        "status", "label", "config_hash", "config_hash_with_seed", "attention_backend", "stopped_by",
        "final_mode", "final_window_rule", "error", "traceback",
    )},
    **{k: (_integer, "an integer") for k in (
        "seed", "world_size", "params", "grad_accum", "resumed_from_step", "steps", "peak_memory_bytes",
        "ttt_updates_stopped_at_chunk", "returncode",
    )},
    **{k: (_number, "a number") for k in _FLOATS},
    **{k: (_mapping, "an object") for k in (
        "versions", "fused_kernels", "calibration_plan", "metrics", "optimizer", "throughput", "calibration", "quant", "files",
        "scored_artifact",
        "timings", "val", "rules", "limits", "gpu_lease", "non_finite",
    )},
    "train_losses": (_loss_pairs, "a list of [step, loss] pairs"),
}  # fmt: skip
