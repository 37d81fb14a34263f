"""Plain-dataclass configuration shared by the Hydra parent and the Hydra-free worker.

The parent turns the composed Hydra config into a plain dict and calls `job_config_from_dict`,
which validates every key and value against the dataclass schemas (the registries say which
schema each group's `name` selects). The worker reads the same dict back from `config.json`.
Both therefore see identical validation, and the worker never imports Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pgolf.components import LOADERS, REGISTRIES
from pgolf.eval.config import EvalConfig
from pgolf.registry import ConfigError, check_range

SEED_MAX = 2**32 - 1
GROUPS = ("data", "model", "optimizer", "quant", "ttt", "hardware")


@dataclass
class TrainConfig:
    seq_len: int = 1024  # TRAIN_SEQ_LEN
    batch_tokens: int = 524_288  # TRAIN_BATCH_TOKENS, global across ranks and micro-steps
    iterations: int = 20_000  # ITERATIONS: the step count in steps mode, an upper bound otherwise
    prime_steps: int = 20  # WARMUP_STEPS: compile-priming steps, undone before the clock starts
    # Micro-batches the priming loader draws and discards before the first priming step. PR #1775's
    # script spends one on its cu_seqlens-bucket compile warm-up (no optimizer step), so its warm-up
    # steps start at the stream's 2nd micro-batch. Only optimizer.keep_primed_momentum lets this
    # reach training (through Muon's momentum); training's loader is rebuilt after priming anyway.
    prime_skip_batches: int = 0
    log_every: int = 200  # TRAIN_LOG_EVERY
    val_every: int = 0  # VAL_LOSS_EVERY (0: only at the end); pauses the training clock
    val_batch_tokens: int = 524_288  # VAL_BATCH_SIZE
    grad_accum_base: int = 8  # grad_accum = grad_accum_base // world_size (the rules use 8)

    def validate(self, path: str) -> None:
        check_range(f"{path}.seq_len", self.seq_len, 2)
        check_range(f"{path}.batch_tokens", self.batch_tokens, 1)
        check_range(f"{path}.iterations", self.iterations, 0)
        check_range(f"{path}.prime_steps", self.prime_steps, 0, why="0 skips compile priming")
        check_range(f"{path}.prime_skip_batches", self.prime_skip_batches, 0, why="0 discards none")
        check_range(f"{path}.log_every", self.log_every, 0, why="0 logs no training steps")
        check_range(f"{path}.val_every", self.val_every, 0, why="0 validates only at the end")
        check_range(f"{path}.val_batch_tokens", self.val_batch_tokens, 1)
        check_range(f"{path}.grad_accum_base", self.grad_accum_base, 1)


@dataclass
class BudgetConfig:
    mode: Literal["wallclock", "steps"] = "wallclock"
    train_seconds: float = 600.0
    quant_reserve_seconds: float = 0.0  # taken off the training clock for in-budget calibration
    eval_seconds: float = 600.0
    artifact_bytes: int = 16_000_000  # decimal cap on code bytes + compressed model bytes

    def validate(self, path: str) -> None:
        check_range(f"{path}.train_seconds", self.train_seconds, 0)
        check_range(f"{path}.quant_reserve_seconds", self.quant_reserve_seconds, 0)
        check_range(f"{path}.eval_seconds", self.eval_seconds, 0)


@dataclass
class CheckpointConfig:
    """Periodic checkpoints for long runs (`python -m pgolf.run resume=<job_dir>`); off by default."""

    every_steps: int = 0  # 0: off
    every_seconds: float = 0.0  # of training time (the clock that the budget counts); 0: off
    keep: bool = False  # keep the last checkpoint after a successful run instead of deleting it

    def validate(self, path: str) -> None:
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ConfigError(f"{path}.every_steps and {path}.every_seconds must be >= 0 (0 turns them off)")


@dataclass
class RootSettings:
    """The root keys beside the groups; validated on their own before the groups are attached."""

    seed: int = 1337
    label: str = ""
    job_dir: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init_from: str | None = None  # a state dict .pt loaded into the fresh model (pgolf.models.convert)
    # An earlier run's artifact (its job folder, or its artifact/final_model.ptz) to score under this
    # config's eval and TTT, with no priming, training or export: a re-score, never a submission.
    score_artifact: str | None = None

    def validate(self, path: str) -> None:
        # Checked here, before anything starts: numpy's seeding would refuse it only in the worker.
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(
                f"seed={self.seed} must be in 0..{SEED_MAX} (numpy and torch take unsigned 32-bit seeds); "
                "pass e.g. seed=1337"
            )


@dataclass(kw_only=True)
class JobConfig(RootSettings):
    """A whole run: the root settings plus one validated schema instance per config group."""

    data: Any
    model: Any
    optimizer: Any
    quant: Any
    ttt: Any
    hardware: Any


# Root keys that the Hydra parent consumes (resume a job, reuse a used folder, GPU slots, the sweep
# report, wandb: see pgolf.parent.tracking); they never reach a worker or config.json.
PARENT_ONLY = ("resume", "overwrite", "launch", "report", "wandb")

# ---------------------------------------------------------------------------------------------
# dict -> dataclass with strict, path-naming validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not allowed; valid choices: {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: " + "; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        if value == "???":
            raise ConfigError(f"{path} is required but was not set (pass {path}=...)")
        return value
    raise ConfigError(f"{path}: unsupported schema type {tp!r}")


def _key(path: str, name: str) -> str:
    """The dotted key a user types: `train.seq_len`, `model.num_layers`, `seed` (root: path "")."""
    return f"{path}.{name}" if path else name


def did_you_mean(unknown: list[str], names: list[str], path: str) -> str:
    """'did you mean model.num_layers? ' for the valid keys nearest to the unknown ones, else ''.
    Near: a close spelling (`num_layer`, `seqlen`), else a key inside the typed one or the typed one
    inside a key (`data_path` -> `path`, `epochs` -> `global_epochs`)."""
    import difflib  # here, not at the top: packed runs drop error texts, and this function with them

    near: list[str] = []
    for k in unknown:
        close = difflib.get_close_matches(k, names, n=2, cutoff=0.75)
        near += close or [n for n in names if min(len(n), len(k)) >= 4 and (n in k or k in n)][:2]
    return f"did you mean {' or '.join(_key(path, m) for m in dict.fromkeys(near))}? " if near else ""


def from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_key(path, k) for k in unknown)} "
            f"for {_type_name(cls)}; {did_you_mean(unknown, names, path)}valid keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], _key(path, k)) for k, v in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(_key(path, k) for k in missing)}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def job_config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Validate a resolved config dict (from Hydra or config.json) into a JobConfig."""
    data = {k: v for k, v in data.items() if k not in PARENT_ONLY}
    groups: dict[str, Any] = {}
    for group in GROUPS:
        node = data.pop(group, None)
        if not isinstance(node, dict) or "name" not in node:
            raise ConfigError(
                f"config group {group!r} is missing or has no 'name'; choose one of "
                f"{', '.join(REGISTRIES[group].names())} (e.g. {group}={REGISTRIES[group].names()[0]})"
            )
        entry = REGISTRIES[group].get(node["name"])
        groups[group] = from_dict(entry.schema, node, group)
    root = from_dict(RootSettings, data, "")
    job = JobConfig(**groups, **{f.name: getattr(root, f.name) for f in dataclasses.fields(RootSettings)})
    check_compatibility(job)
    return job


def check_compatibility(job: JobConfig) -> None:
    """Cross-group checks: each implementation's `requires` must be provided by another group."""
    provided: set[str] = set()
    for group, reg in REGISTRIES.items():
        provided.update(reg.get(getattr(job, group).name).provides)
    for group, reg in REGISTRIES.items():
        entry = reg.get(getattr(job, group).name)
        missing = [cap for cap in entry.requires if cap not in provided]
        if missing:
            raise ConfigError(
                f"{group}={entry.name} needs {', '.join(missing)}, which the chosen "
                f"model={job.model.name} / data={job.data.name} do not provide"
            )
    LOADERS.get(job.data.loader)  # a registered loader, or a ConfigError with the choices
    if job.model.vocab_size != job.data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={job.model.vocab_size} differs from data.vocab_size={job.data.vocab_size}; "
            "set model.vocab_size=${data.vocab_size} (the shipped model configs do)"
        )
    t = job.train
    if t.seq_len < 2 or t.batch_tokens < 1 or t.iterations < 0 or t.prime_steps < 0:
        raise ConfigError(
            "train.seq_len >= 2, train.batch_tokens >= 1, train.iterations and train.prime_steps >= 0"
        )
    if t.grad_accum_base < 1:
        raise ConfigError("train.grad_accum_base must be >= 1")
    if t.batch_tokens % (t.grad_accum_base * t.seq_len):
        raise ConfigError(
            f"train.batch_tokens={t.batch_tokens} must be a multiple of train.grad_accum_base*train.seq_len="
            f"{t.grad_accum_base * t.seq_len} so every world size dividing {t.grad_accum_base} gets whole sequences"
        )
    b = job.budget
    if b.mode == "wallclock" and b.train_seconds <= b.quant_reserve_seconds:
        raise ConfigError("budget.train_seconds must exceed budget.quant_reserve_seconds in wallclock mode")
    check_eval(job)
    if b.artifact_bytes <= 0:
        raise ConfigError("budget.artifact_bytes must be positive (the challenge cap is 16000000)")


def check_eval(job: JobConfig) -> None:
    """Sliding windows must fit train.seq_len when eval.seq_len defers to it; score-first TTT follows
    the records, which always report the sliding score before it (and share its windows)."""
    e = job.eval
    if e.stride > e.window(job.train.seq_len):
        raise ConfigError(
            f"eval.stride={e.stride} exceeds the window eval.seq_len={e.window(job.train.seq_len)}"
        )
    if job.ttt.name == "score_first" and "sliding" not in e.modes:
        raise ConfigError(
            f"ttt={job.ttt.name} scores with sliding windows after the sliding eval, as the records do; "
            f"add it: eval.modes=[nonoverlap,sliding] (now {e.modes})"
        )


# Keys that do not change what a run computes: excluded from the seed-free config hash, so all
# seeds (and re-runs in another folder) of one configuration share a group.
_HASH_EXCLUDED = ("seed", "job_dir", "label", "wandb", "checkpoint", *PARENT_ONLY)
# Group keys of the same kind: only what the run reports (the MFU's denominator), not what it computes.
_HASH_EXCLUDED_IN_GROUP = {"hardware": ("peak_tflops",)}


def config_hash(job: JobConfig | dict[str, Any], include_seed: bool = False) -> str:
    d = to_dict(job) if not isinstance(job, dict) else dict(job)
    for key in _HASH_EXCLUDED:
        if key == "seed" and include_seed:
            continue
        d.pop(key, None)
    for group, keys in _HASH_EXCLUDED_IN_GROUP.items():
        if isinstance(d.get(group), dict):
            d[group] = {k: v for k, v in d[group].items() if k not in keys}
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
