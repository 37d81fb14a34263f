"""Schemas of the `model` group."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.registry import ConfigError


@dataclass
class BaselineModelConfig:
    """The challenge's naive baseline GPT (TECHNIQUES §2.1); every field is its env-var lower-cased."""

    name: str = "baseline"
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10_000.0
    qk_gain_init: float = 1.5

    def validate(self, path: str) -> None:
        if self.model_dim % self.num_heads:
            raise ConfigError(
                f"{path}.model_dim={self.model_dim} must be divisible by {path}.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{path}.num_heads={self.num_heads} must be divisible by {path}.num_kv_heads={self.num_kv_heads}"
            )
        if (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"{path}: head_dim = model_dim/num_heads must be even for RoPE")
        if self.logit_softcap <= 0:
            raise ConfigError(f"{path}.logit_softcap={self.logit_softcap} must be positive")
        for key in ("num_layers", "model_dim", "mlp_mult", "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{path}.{key} must be >= 1")
