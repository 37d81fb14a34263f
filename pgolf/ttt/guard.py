"""The legality guard shared by every TTT mode (docs/techniques.md#test-time-training-legality).

Weight-updating code never holds the validation stream: it asks a `ScoredStream` for training
tokens, and the guard hands out only targets that have already been scored. Scoring code marks
what it scored; marking a target twice also raises (every target is scored once, in a single pass).

Target t is stream token t+1 predicted from tokens 0..t; training on targets [a, b) needs tokens
[a, b] (inputs a..b-1, targets a+1..b), all of which are then already graded or pure context.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


class LegalityError(RuntimeError):
    """A TTT update tried to use a validation target before it was scored (or one was scored twice)."""


class ScoredStream:
    def __init__(self, tokens: Tensor):
        self._tokens = tokens  # the int64 stream (shared with the scorer, on its device)
        self.n_targets = int(tokens.numel()) - 1
        self._scored = np.zeros(self.n_targets, dtype=bool)

    def mark_scored(self, lo: int, hi: int) -> None:
        """Record that targets [lo, hi) were scored (by this rank or, for a shared phase, all ranks)."""
        if not 0 <= lo <= hi <= self.n_targets:
            raise LegalityError(f"scored range [{lo}, {hi}) is outside the {self.n_targets} targets")
        if self._scored[lo:hi].any():
            first = lo + int(np.argmax(self._scored[lo:hi]))
            raise LegalityError(f"target {first} scored twice (every target must be scored exactly once)")
        self._scored[lo:hi] = True

    def is_scored(self, lo: int, hi: int) -> bool:
        return bool(self._scored[lo:hi].all())

    @property
    def scored_count(self) -> int:
        return int(self._scored.sum())

    def training_tokens(self, lo: int, hi: int) -> Tensor:
        """Tokens [lo, hi] for training on targets [lo, hi); raises unless all were scored."""
        if not 0 <= lo < hi <= self.n_targets:
            raise LegalityError(f"training range [{lo}, {hi}) is outside the {self.n_targets} targets")
        if not self._scored[lo:hi].all():
            first = lo + int(np.argmin(self._scored[lo:hi]))
            raise LegalityError(
                f"TTT tried to train on target {first}, which has not been scored yet; "
                "only already-graded validation tokens may update the weights (score first, then train)"
            )
        return self._tokens[lo : hi + 1]

    def assert_complete(self) -> None:
        missing = self.n_targets - self.scored_count
        if missing:
            raise LegalityError(f"{missing} of {self.n_targets} targets were never scored")
