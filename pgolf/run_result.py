"""A job's `result.json` as one typed record: the trainer fills it in, everything else reads it.

`RunResult` names every key result.json can hold, in the order a finished run writes them. A field
left at None is not written, so a job that failed early (`{"status": "failed", "error": ...}`)
and a finished one are the same type. `to_json()` is the dict written to disk; `from_json()` (and
`read()`, for a file) check every key's type and name the file and the key when one is wrong.

Non-finite floats are written as null, and their keys listed in `non_finite`
(`pgolf.results.write_json_atomic`); `from_json` turns such a top-level null back into the float
it stood for, so reading a result and writing it again gives the same file. Keys that this version
does not know (written by another pgolf version) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.results import read_json, write_json_atomic

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


@dataclass
class ByteCounts:
    """The artifact's bytes as counted on disk against the cap (`bytes` in result.json)."""

    model: int | None = None
    code: int | None = None
    code_source_raw: int | None = None  # the raw source the code wrapper carries, before compression
    total: int | None = None
    cap: int | None = None
    within_cap: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_BYTE_CHECKS = {"within_cap": _flag}


@dataclass
class RunResult:
    status: str = "running"  # running | ok | failed
    label: str | None = None
    seed: int | None = None
    config_hash: str | None = None  # pgolf.config.config_hash, seed left out: groups a sweep's seeds
    config_hash_with_seed: str | None = None  # identifies the job (and its checkpoint)
    world_size: int | None = None
    versions: dict[str, str] | None = None  # pgolf, python, torch, ... (and the GPU)
    params: int | None = None
    attention_backend: str | None = None
    fused_kernels: dict[str, bool] | None = None  # model.fused_* switch -> used (`auto` resolved)
    grad_accum: int | None = None
    calibration_plan: dict[str, Any] | None = None  # the GPTQ probe and the reserve it took
    resumed_from_step: int | None = None
    metrics: dict[str, dict[str, Any]] | None = None  # eval mode -> val_loss, val_bpb, tokens, ...
    steps: int | None = None
    train_ms: float | None = None
    ms_per_step: float | None = None  # median of the settled steps
    ms_per_step_mean: float | None = None
    train_losses: list[tuple[int, float]] | None = None  # (step, loss) on log steps
    peak_memory_bytes: int | None = None
    stopped_by: str | None = None  # wallclock | iterations
    optimizer: dict[str, Any] | None = None
    # tokens/s (median step, whole clock), FLOPs per token, TFLOP/s and MFU (pgolf.throughput)
    throughput: dict[str, Any] | None = None
    calibration_seconds: float | None = None
    calibration: dict[str, Any] | None = None
    bytes: ByteCounts | None = None
    quant: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] | None = None  # shipped file -> {bytes, sha256}
    final_mode: str | None = None  # the eval mode (or TTT) whose score val_bpb reports
    final_window_rule: str | None = None  # written with final_mode; null for a non-windowed mode
    ttt_updates_stopped_at_chunk: int | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    error: str | None = None
    traceback: str | None = None
    timings: dict[str, float] | None = None  # phase (and calibration, export, eval_<mode>) -> seconds
    val: dict[str, Any] | None = None  # the val split and tokenizer that were scored
    rules: dict[str, Any] | None = None  # pgolf.rules.verdict
    limits: dict[str, Any] | None = None
    returncode: int | None = None  # the worker's exit code, when it died without a verdict
    gpu_lease: dict[str, Any] | None = None  # the GPU slots a sweep job held, and when
    non_finite: dict[str, str] | None = None  # key -> "nan" | "inf" | "-inf" for each null float
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other pgolf versions, kept as read

    @property
    def ok(self) -> bool:
        """Finished, with a finite score."""
        return (
            self.status == "ok"
            and self.val_bpb is not None
            and self.val_loss is not None
            and math.isfinite(self.val_bpb)
            and math.isfinite(self.val_loss)
        )

    # ------------------------------------------------------------------------------ writing
    def to_json(self) -> dict[str, Any]:
        """The result.json dict: every field that is set, in field order, then the unknown keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if f.name == "final_window_rule":
                if self.final_mode is not None:  # null is a value here: not a windowed mode
                    out[f.name] = value
                continue
            if value is None:
                continue
            if isinstance(value, ByteCounts):
                value = value.to_json()
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        out.update(self.extra)
        return out

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    # ------------------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, data: Any, source: str | Path = "result.json") -> RunResult:
        """A checked RunResult from a parsed result.json; ResultError names `source` and the key."""
        if not isinstance(data, dict):
            raise ResultError(source, f"a JSON {type(data).__name__}, not an object")

        def bad(key: str, want: str) -> ResultError:
            return ResultError(source, f"key {key!r} is {json_repr(data[key])}, expected {want}")

        reasons = data.get("non_finite") or {}
        if not isinstance(reasons, dict):
            raise bad("non_finite", "an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
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
        return cls(**values, extra=extra)

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        """The result.json at `path`; ResultError (naming the file) when it is not valid JSON or
        not a result. OSError when it cannot be read."""
        try:
            data = read_json(path)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ResultError(path, f"not valid JSON ({type(e).__name__}: {e})") from None
        return cls.from_json(data, path)


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
        "timings", "val", "rules", "limits", "gpu_lease", "non_finite",
    )},
    "train_losses": (_loss_pairs, "a list of [step, loss] pairs"),
}  # fmt: skip
