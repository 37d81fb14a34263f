"""Schemas of the `data` group (no heavy imports: the Hydra parent validates with these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.registry import ConfigError


@dataclass
class ShardDataConfig:
    """Challenge-format shard directory (e.g. the published FineWeb sp1024/sp8192 exports)."""

    name: str = "shards"
    path: str = "???"  # folder holding fineweb_train_*.bin and fineweb_val_*.bin
    tokenizer_path: str = "???"  # the SentencePiece .model the shards were written with
    vocab_size: int = 1024
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    loader: Literal["sequential"] = "sequential"

    def validate(self, path: str) -> None:
        if not 0 < self.vocab_size < 65_536:
            raise ConfigError(f"{path}.vocab_size={self.vocab_size} must be in 1..65535 (tokens are uint16)")
        if self.train_pattern == self.val_pattern:
            raise ConfigError(f"{path}.train_pattern and {path}.val_pattern must differ")


@dataclass
class EmbeddedDataConfig:
    """Offline default: English prose shipped with every Python install, tokenized on first use."""

    name: str = "embedded"
    cache_dir: str = ""  # "" -> $PGOLF_CACHE or ~/.cache/pgolf
    vocab_size: int = 1024
    val_docs: int = 40  # the first N documents (in the fixed shuffled order) are validation
    loader: Literal["sequential"] = "sequential"

    def validate(self, path: str) -> None:
        if not 260 <= self.vocab_size <= 8192:
            raise ConfigError(
                f"{path}.vocab_size={self.vocab_size} must be in 260..8192 for the embedded corpus"
            )
        if self.val_docs < 1:
            raise ConfigError(f"{path}.val_docs must be >= 1")
