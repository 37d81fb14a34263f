"""Schemas of the `quant` group."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.registry import ConfigError


@dataclass
class Int8ZlibConfig:
    """Baseline export: per-row int8 with percentile clipping, small tensors as float, zlib-9."""

    name: str = "int8_zlib"
    clip_percentile: float = 99.99984
    keep_float_max_numel: int = 65_536
    zlib_level: int = 9

    def validate(self, path: str) -> None:
        if not 0.0 < self.clip_percentile <= 100.0:
            raise ConfigError(f"{path}.clip_percentile must be in (0, 100]")
        if not 0 <= self.zlib_level <= 9:
            raise ConfigError(f"{path}.zlib_level must be in 0..9")


@dataclass
class LosslessConfig:
    """No quantization: every tensor stored in its own dtype (torch.save + zlib). Far over the 16 MB
    cap for record-size models; for scoring exactly the trained (or imported) weights, e.g. when
    comparing eval code on the weights another script produced (bench/eval.sh)."""

    name: str = "lossless"
    zlib_level: int = 1

    def validate(self, path: str) -> None:
        if not 0 <= self.zlib_level <= 9:
            raise ConfigError(f"{path}.zlib_level must be in 0..9")
