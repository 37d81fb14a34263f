"""Schemas of the `ttt` group (docs/techniques.md#test-time-training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pgolf.registry import ConfigError, check_range


@dataclass
class NoTTTConfig:
    """No test-time training: the artifact is scored as is."""

    name: str = "none"


@dataclass
class ScoreFirstTTTConfig:
    """Legal score-first chunked TTT, defaults of the 2026-03-23 record: score a chunk's sliding
    windows under inference mode, then train on the chunk; the last chunk is never trained on.
    Windows use eval.seq_len / eval.stride / eval.batch_seqs (docs/techniques.md#score-first-chunked-ttt)."""

    name: str = "score_first"
    lr: float = 0.002  # TTT_LR (0.005 in the 2026-04-06/09 records); cosine over chunks
    momentum: float = 0.9  # TTT_MOMENTUM; the SGD buffer persists across chunks
    epochs: int = 3  # TTT_EPOCHS over each chunk
    chunk_tokens: int = 32768  # TTT_CHUNK_TOKENS
    batch_seqs: int = 32  # TTT_BATCH_SEQS: training sequences (of eval.seq_len) per step and rank
    grad_clip: float = 1.0  # TTT_GRAD_CLIP (global norm; 0: off)
    freeze_blocks: int = 0  # TTT_FREEZE_BLOCKS: the first N blocks stay fixed (bank slices included)
    # false: only the frozen blocks' own parameters (`blocks.{i}.*`: gains, scales, mixes) stay
    # fixed while their matrices inside the banks keep training, as PR #726's banked script does
    freeze_bank_slices: bool = True

    def validate(self, path: str) -> None:
        if self.lr < 0 or not 0 <= self.momentum < 1 or self.epochs < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"{path}: lr >= 0, 0 <= momentum < 1, epochs >= 0 and grad_clip >= 0 are required"
            )
        if self.chunk_tokens < 1 or self.batch_seqs < 1 or self.freeze_blocks < 0:
            raise ConfigError(
                f"{path}: chunk_tokens >= 1, batch_seqs >= 1 and freeze_blocks >= 0 are required"
            )


# q/k/v: added to those projections; o: to the attention output, mlp: to the MLP output (both read
# the normalized input of their sub-block); head: to the logits
LoRATarget = Literal["q", "k", "v", "o", "mlp", "head"]


@dataclass
class LoRATTTConfig:
    """Per-document LoRA TTT: independent rank-r adapters per document of a batch, chunked
    score-then-update inside each document, adapters and AdamW state reset per batch
    (docs/techniques.md#per-document-lora-ttt)."""

    name: str = "lora"
    rank: int = 96  # TTT_LORA_RANK (80 in the 2026-04-27 record)
    alpha: float = 0.0  # output scale alpha/rank (144 from 2026-04-23); 0: unscaled (2026-04-10)
    targets: list[LoRATarget] = field(default_factory=lambda: ["q", "k", "v", "head"])
    lr: float = 1e-4  # AdamW
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 0.5
    chunk_size: int = 48  # TTT_CHUNK_SIZE (32 in the 2026-04-10 record)
    context: int = 2048  # in-document context of each chunk's window
    batch_docs: int = 64  # TTT_BATCH_SIZE: documents per batch
    bos_id: int = 1
    # Under hardware.compile: windows are padded to at most this many lengths (context, context/2,
    # ...), one compiled graph each. Fewer: less compile time at warm-up, more padded columns.
    window_buckets: int = 6
    # true: every executed pass of a looped layer gets its own adapters (the records from 2026-04-10);
    # false: a looped layer shares one set across its passes
    per_pass: bool = False
    # true: a new batch of documents keeps the A matrices as the previous batch left them and zeroes
    # only B (PR #1767, TTT_WARM_START_A); false: A is drawn afresh per batch
    warm_start_a: bool = False

    def validate(self, path: str) -> None:
        if self.rank < 1 or self.chunk_size < 1 or self.context < self.chunk_size or self.batch_docs < 1:
            raise ConfigError(
                f"{path}: rank >= 1, chunk_size >= 1, context >= chunk_size and batch_docs >= 1"
            )
        if not 1 <= self.window_buckets <= 7:  # one more may come from the model's NTK RoPE length
            raise ConfigError(
                f"{path}.window_buckets={self.window_buckets}: must be 1..7 (compiled graphs; "
                "torch._dynamo recompiles at most 8 times per function)"
            )
        if not self.targets:
            raise ConfigError(f"{path}.targets is empty; choose from q, k, v, o, mlp, head")
        if self.lr < 0 or self.alpha < 0 or self.weight_decay < 0:
            raise ConfigError(f"{path}: lr, alpha and weight_decay must be >= 0")
        for key in ("beta1", "beta2"):
            check_range(f"{path}.{key}", getattr(self, key), 0, 1, high_open=True, why="an Adam beta")


@dataclass
class PhasedTTTConfig(LoRATTTConfig):
    """Phased TTT: LoRA TTT over the length-sorted queue, pausing at prefix_docs*(p+1)//num_phases
    scored documents for global SGD of the base model on all documents scored up to that boundary
    (docs/techniques.md#phased-ttt)."""

    name: str = "phased"
    prefix_docs: int = 2000  # PHASED_TTT_PREFIX_DOCS
    num_phases: int = 3  # PHASED_TTT_NUM_PHASES
    global_lr: float = 0.001  # GLOBAL_TTT_LR, cosine over its chunks
    global_momentum: float = 0.9
    global_chunk_tokens: int = 32768
    global_seq_len: int = 2048
    global_batch_seqs: int = 32
    global_grad_clip: float = 1.0
    global_epochs: int = 1  # GLOBAL_TTT_EPOCHS: passes over each chunk's sequences
    # GLOBAL_TTT_RESPECT_DOC_BOUNDARIES: no token attends across a BOS inside global SGD's sequences
    global_doc_mask: bool = False
    # GLOBAL_TTT_WARMUP_CHUNKS / GLOBAL_TTT_WARMUP_START_LR: a linear lr warm-up over the first chunks
    # in the records' code, unused by every record (0 chunks); only 0 is accepted, since the exact
    # warm-up formula is not reproduced here
    global_warmup_chunks: int = 0
    global_warmup_start_lr: float = 0.0

    def validate(self, path: str) -> None:
        super().validate(path)
        if (
            self.prefix_docs < 1
            or self.num_phases < 1
            or self.global_seq_len < 2
            or self.global_batch_seqs < 1
        ):
            raise ConfigError(
                f"{path}: prefix_docs, num_phases, global_batch_seqs >= 1 and global_seq_len >= 2"
            )
        check_range(f"{path}.global_lr", self.global_lr, 0, why="a learning rate")
        check_range(f"{path}.global_momentum", self.global_momentum, 0, 1, high_open=True, why="a momentum")
        check_range(f"{path}.global_grad_clip", self.global_grad_clip, 0)
        if self.global_epochs < 1:
            raise ConfigError(f"{path}.global_epochs={self.global_epochs}: must be >= 1")
        if self.global_warmup_chunks != 0:
            raise ConfigError(
                f"{path}.global_warmup_chunks={self.global_warmup_chunks}: only 0 (no warm-up, as every "
                "record runs) is supported; the records' warm-up formula is not reproduced"
            )
