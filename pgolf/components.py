"""The catalog: every registered implementation of every config group, in one place.

Adding an implementation = a schema dataclass (light module) + a builder + one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgolf.data.config import EmbeddedDataConfig, ShardDataConfig
from pgolf.hw.config import AutoHardwareConfig, CpuHardwareConfig, CudaHardwareConfig
from pgolf.models.config import BankedGPTConfig, BaselineModelConfig, LayeredGPTConfig
from pgolf.optim.config import MuonConfig, ParallelMuonConfig
from pgolf.quant.config import Int8ZlibConfig, LosslessConfig, MixedQuantConfig
from pgolf.registry import ConfigError, Registry
from pgolf.ttt.config import LoRATTTConfig, NoTTTConfig, PhasedTTTConfig, ScoreFirstTTTConfig

if TYPE_CHECKING:
    from pgolf.config import JobConfig

DATA = Registry("data")
DATA.register("shards", ShardDataConfig, "pgolf.data.source:build_shard_source")
DATA.register("embedded", EmbeddedDataConfig, "pgolf.data.source:build_embedded_source")

MODELS = Registry("model")
MODELS.register("baseline", BaselineModelConfig, "pgolf.models.baseline:build", provides=("matrices",))
# The record GPT family: one schema's keys, two layouts (3-D parameter banks or per-layer linears).
MODELS.register("banked", BankedGPTConfig, "pgolf.models.gpt:build", provides=("matrices", "banks"))
MODELS.register("layered", LayeredGPTConfig, "pgolf.models.gpt:build", provides=("matrices",))

OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register("muon", MuonConfig, "pgolf.optim.muon:build", requires=("matrices",))
OPTIMIZERS.register(
    "parallel_muon", ParallelMuonConfig, "pgolf.optim.parallel_muon:build", requires=("matrices", "banks")
)

QUANT = Registry("quant")
QUANT.register("int8_zlib", Int8ZlibConfig, "pgolf.quant.int8:build")
QUANT.register("mixed", MixedQuantConfig, "pgolf.quant.mixed:build")
QUANT.register("lossless", LosslessConfig, "pgolf.quant.lossless:build")

TTT = Registry("ttt")
TTT.register("none", NoTTTConfig, "pgolf.ttt.none:build")
TTT.register("score_first", ScoreFirstTTTConfig, "pgolf.ttt.score_first:build")
TTT.register("lora", LoRATTTConfig, "pgolf.ttt.lora:build")
TTT.register("phased", PhasedTTTConfig, "pgolf.ttt.lora:build")

HARDWARE = Registry("hardware")
HARDWARE.register("cuda", CudaHardwareConfig, "pgolf.hw.device:build")
HARDWARE.register("cpu", CpuHardwareConfig, "pgolf.hw.device:build")
HARDWARE.register("auto", AutoHardwareConfig, "pgolf.hw.device:build")

REGISTRIES: dict[str, Registry] = {
    "data": DATA,
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "quant": QUANT,
    "ttt": TTT,
    "hardware": HARDWARE,
}


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
