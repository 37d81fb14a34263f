"""Schemas of the `data` group (no heavy imports: the Hydra parent validates with these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.registry import ConfigError


@dataclass
class LoaderFields:
    """How training batches are drawn from the train shards; shared by every data implementation.

    loader: `sequential` (the baseline's stream), `doc_packing` (DocumentPackingLoader, PR #1775:
    that stream with each micro-batch inside one shard, each shard read from its first BOS),
    `coprime` (PR #726 / 2026-03-29 record), `shuffled` (ShuffledSequenceLoader, 2026-04-05 on),
    `synthetic` (random tokens made on the device: for benchmarking the input pipeline only, never
    for training); docs/techniques.md#data-loaders.
    """

    loader: str = "sequential"  # a name registered in pgolf.components.LOADERS (checked there)
    prefetch: int = 0  # producer-thread queue depth in batches; 0 = assemble each batch on demand
    # threads filling that queue: 1 = one producer thread; N > 1 = one thread plans every batch in
    # order (the same batches) and N threads copy their tokens
    prefetch_threads: int = 1
    pin_memory: bool = True  # on CUDA, host batches sit in pinned memory (false: pageable)
    # coprime: the shard-mix schedule ramps over this many batches (progress = built / ramp) ...
    coprime_mix_ramp_batches: int = 1800
    # ... from max(mix_start, world) to max(mix_end, mix_start * world) shards per global batch ...
    coprime_mix_start: int = 8
    coprime_mix_end: int = 32
    # ... while the shard weights remaining_blocks**alpha flatten from alpha_start to alpha_end.
    coprime_alpha_start: float = 0.90
    coprime_alpha_end: float = 0.50
    # coprime: `run` seeds the plan from the shard names and the run seed; `paths` as PR #726 does,
    # from the train glob and shard path strings under data.path (the same for every run seed)
    coprime_seed: Literal["run", "paths"] = "run"
    # coprime: a shard whose cursor ran out weighs 1 until redrawn (`one`, 2026-03-29 record) or
    # as much as an untouched shard (`fresh`, PR #726)
    coprime_exhausted: Literal["one", "fresh"] = "one"
    # shuffled: its RNG from (run seed, rank) (`run`), or from the rank alone as the records'
    # ShuffledSequenceLoader does (`rank`: the same batches for every run seed)
    shuffled_seed: Literal["run", "rank"] = "run"

    def validate_loader(self, path: str) -> None:
        if self.prefetch < 0:
            raise ConfigError(f"{path}.prefetch={self.prefetch} must be >= 0 (0 turns prefetching off)")
        if self.prefetch_threads < 1:
            raise ConfigError(f"{path}.prefetch_threads={self.prefetch_threads} must be >= 1")
        if self.prefetch_threads > 1 and self.prefetch == 0:
            raise ConfigError(
                f"{path}.prefetch_threads={self.prefetch_threads} needs {path}.prefetch > 0: the threads fill "
                "the prefetch queue, which prefetch=0 turns off"
            )
        if self.coprime_mix_ramp_batches < 1:
            raise ConfigError(f"{path}.coprime_mix_ramp_batches must be >= 1")
        if not 1 <= self.coprime_mix_start <= self.coprime_mix_end:
            raise ConfigError(
                f"{path}.coprime_mix_start={self.coprime_mix_start} and coprime_mix_end="
                f"{self.coprime_mix_end} must satisfy 1 <= start <= end"
            )


@dataclass
class ShardDataConfig(LoaderFields):
    """Challenge-format shard directory (e.g. the published FineWeb sp1024/sp8192 exports)."""

    name: str = "shards"
    path: str = "???"  # folder holding fineweb_train_*.bin and fineweb_val_*.bin
    tokenizer_path: str = "???"  # the SentencePiece .model the shards were written with
    vocab_size: int = 1024
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"

    def validate(self, path: str) -> None:
        if not 0 < self.vocab_size < 65_536:
            raise ConfigError(f"{path}.vocab_size={self.vocab_size} must be in 1..65535 (tokens are uint16)")
        if self.train_pattern == self.val_pattern:
            raise ConfigError(f"{path}.train_pattern and {path}.val_pattern must differ")
        self.validate_loader(path)


@dataclass
class EmbeddedDataConfig(LoaderFields):
    """Offline default: English prose shipped with every Python install, tokenized on first use."""

    name: str = "embedded"
    cache_dir: str = ""  # "" -> $PGOLF_CACHE or ~/.cache/pgolf
    vocab_size: int = 1024
    val_docs: int = 40  # the first N documents (in the fixed shuffled order) are validation

    def validate(self, path: str) -> None:
        if not 260 <= self.vocab_size <= 8192:
            raise ConfigError(
                f"{path}.vocab_size={self.vocab_size} must be in 260..8192 for the embedded corpus"
            )
        if self.val_docs < 1:
            raise ConfigError(f"{path}.val_docs must be >= 1")
        self.validate_loader(path)
