"""Schemas of the `ttt` group (TECHNIQUES §2.11-2.13)."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.registry import ConfigError


@dataclass
class NoTTTConfig:
    """No test-time training: the artifact is scored as is."""

    name: str = "none"


@dataclass
class ScoreFirstTTTConfig:
    """Legal score-first chunked TTT (§2.11; R0323 defaults): score a chunk's sliding windows under
    inference mode, then train on the chunk; the last chunk is never trained on. Windows use
    eval.seq_len / eval.stride / eval.batch_seqs."""

    name: str = "score_first"
    lr: float = 0.002  # TTT_LR (0.005 in R0406/R0409); cosine over chunks
    momentum: float = 0.9  # TTT_MOMENTUM; the SGD buffer persists across chunks
    epochs: int = 3  # TTT_EPOCHS over each chunk
    chunk_tokens: int = 32768  # TTT_CHUNK_TOKENS
    batch_seqs: int = 32  # TTT_BATCH_SEQS: training sequences (of eval.seq_len) per step and rank
    grad_clip: float = 1.0  # TTT_GRAD_CLIP (global norm; 0: off)
    freeze_blocks: int = 0  # TTT_FREEZE_BLOCKS: the first N blocks stay fixed (bank slices included)

    def validate(self, path: str) -> None:
        if self.lr < 0 or not 0 <= self.momentum < 1 or self.epochs < 0 or self.grad_clip < 0:
            raise ConfigError(f"{path}: lr >= 0, 0 <= momentum < 1, epochs >= 0 and grad_clip >= 0 are required")
        if self.chunk_tokens < 1 or self.batch_seqs < 1 or self.freeze_blocks < 0:
            raise ConfigError(f"{path}: chunk_tokens >= 1, batch_seqs >= 1 and freeze_blocks >= 0 are required")
