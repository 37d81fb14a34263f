"""The catalog: every registered implementation of every config group, in one place.

Adding an implementation = a schema dataclass (light module) + a builder + one line here.
"""

from __future__ import annotations

from pgolf.data.config import EmbeddedDataConfig, ShardDataConfig
from pgolf.hw.config import AutoHardwareConfig, CpuHardwareConfig, CudaHardwareConfig
from pgolf.models.config import BankedGPTConfig, BaselineModelConfig, LayeredGPTConfig
from pgolf.optim.config import MuonConfig, ParallelMuonConfig
from pgolf.quant.config import Int8ZlibConfig, LosslessConfig, MixedQuantConfig
from pgolf.registry import Registry
from pgolf.ttt.config import LoRATTTConfig, NoTTTConfig, PhasedTTTConfig, ScoreFirstTTTConfig

DATA = Registry("data")
DATA.register("shards", ShardDataConfig, "pgolf.data.source:build_shard_source")
DATA.register("embedded", EmbeddedDataConfig, "pgolf.data.source:build_embedded_source")
# How training batches are drawn (`data.loader`; its settings are keys of every data schema).
# Builders take (data cfg, files=, seed=, rank=, world_size=, device=); each lives with its sampler,
# so a run imports, packs and counts the bytes of only the sampler it uses.
LOADERS = Registry("data", key="loader")
LOADERS.register("sequential", None, "pgolf.data.sequential:build")
LOADERS.register("doc_packing", None, "pgolf.data.doc_packing:build")
LOADERS.register("coprime", None, "pgolf.data.coprime:build")
LOADERS.register("shuffled", None, "pgolf.data.shuffled:build")
LOADERS.register("synthetic", None, "pgolf.data.synthetic:build")

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
