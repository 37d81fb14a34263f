"""The root `eval:` section: which eval modes score the artifact, and the sliding-window shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pgolf.registry import ConfigError

EvalMode = Literal["nonoverlap", "sliding"]


@dataclass
class EvalConfig:
    # Run in this order on the artifact's weights; the last one (then TTT, when enabled) gives the
    # final val_bpb. nonoverlap: disjoint train.seq_len sequences (the challenge's root script);
    # sliding: docs/techniques.md#sliding-window-eval.
    modes: list[EvalMode] = field(default_factory=lambda: ["nonoverlap"])
    seq_len: int = 0  # EVAL_SEQ_LEN of sliding windows and TTT; 0: train.seq_len
    stride: int = 64  # EVAL_STRIDE
    batch_seqs: int = 32  # EVAL_BATCH_SEQS: windows per forward and rank (one compiled shape)
    # Which targets the sliding windows (and score-first TTT) score: `exact` (each once) or `legacy`,
    # the records' rule before the sliding-window fix (2026-03 scripts, PR #339 / #399 / #726 / #549),
    # whose short tail windows score the last `stride` targets again; only for comparing with numbers
    # published under it. result.json records the rule of each windowed score (metrics.<mode>).
    window_rule: Literal["exact", "legacy"] = "exact"
    # nonoverlap (and validation during training): the length of the disjoint sequences the val
    # stream is cut into; 0: train.seq_len. Each rank scores val_batch_tokens / (world * grad_accum)
    # tokens of them per forward.
    nonoverlap_seq_len: int = 0
    # nonoverlap: true scores each such batch as one row of batch * seq_len tokens, so documents run
    # on across the sequence boundaries inside it (only model.doc_mask cuts them), and scores only
    # whole batches of each rank's share, dropping the rest: PR #1775's eval_val (32 x 2048 = one
    # row of 65,536 on 8 GPUs). false: one row per sequence, every sequence scored.
    nonoverlap_packed: bool = False

    def validate(self, path: str) -> None:
        if not self.modes:
            raise ConfigError(f"{path}.modes is empty; list at least one of nonoverlap, sliding")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"{path}.modes={self.modes} lists a mode twice")
        if self.seq_len < 0 or self.nonoverlap_seq_len < 0 or self.stride < 1 or self.batch_seqs < 1:
            raise ConfigError(
                f"{path}: seq_len >= 0 and nonoverlap_seq_len >= 0 (0: train.seq_len), stride >= 1 and "
                "batch_seqs >= 1 are required"
            )
        if self.window_rule not in ("exact", "legacy"):
            raise ConfigError(f"{path}.window_rule={self.window_rule!r} must be exact or legacy")
        if self.seq_len and self.stride > self.seq_len:
            raise ConfigError(f"{path}.stride={self.stride} exceeds {path}.seq_len={self.seq_len}")

    def window(self, train_seq_len: int) -> int:
        return self.seq_len or train_seq_len

    def nonoverlap_len(self, train_seq_len: int) -> int:
        return self.nonoverlap_seq_len or train_seq_len
