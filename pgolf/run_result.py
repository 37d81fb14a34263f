"""A job's `result.json` as one typed record: the trainer fills it in, everything else reads it.

`RunResult` names every key result.json can hold, in the order a finished run writes them. A field
left at None is not written, so a job that failed early (`{"status": "failed", "error": ...}`)
and a finished one are the same type. `to_json()` is the dict written to disk. Reading one back
(`pgolf.parent.result_file.read_result`, with every key's type checked) is the parent's and the
CLIs' job, never the worker's, so it lives under pgolf.parent and no `train_gpt.py` carries it.

Non-finite floats are written as null, and their keys listed in `non_finite`
(`pgolf.results.write_json_atomic`). Keys that this version does not know (written by another pgolf
version) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.results import write_json_atomic


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
    # a re-score (score_artifact=): the blob it scored, with its bytes and sha256
    scored_artifact: dict[str, Any] | None = None
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
