"""Depth recurrence: which physical layers run, in which order, and where the U-Net splits.

The technique and the records that use it: docs/techniques.md#depth-recurrence.

With `num_loops = k` the segment loop_start..loop_end runs k + 1 times:
[0 .. loop_start-1] + [loop_start .. loop_end] * (k + 1) + [loop_end+1 .. L-1]. The U-Net split is
recomputed over this virtual list (first half encoder, rest decoder), so the number of skip
connections follows the looped depth. Per-layer features (LN scale, XSA, value embeddings,
parallel-residual lambdas) stay keyed by the physical index on every pass.
"""

from __future__ import annotations

from dataclasses import dataclass


def virtual_layers(num_layers: int, num_loops: int = 0, loop_start: int = 0, loop_end: int = 0) -> list[int]:
    """Physical layer index of every executed layer, in order."""
    if num_loops <= 0:
        return list(range(num_layers))
    segment = list(range(loop_start, loop_end + 1))
    return list(range(loop_start)) + segment * (num_loops + 1) + list(range(loop_end + 1, num_layers))


@dataclass(frozen=True)
class LayerPlan:
    """One graph variant's executed layers, split into U-Net encoder and decoder halves."""

    encoder: tuple[int, ...]
    decoder: tuple[int, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.encoder + self.decoder

    @property
    def num_skips(self) -> int:
        return min(len(self.encoder), len(self.decoder))


def layer_plan(num_layers: int, num_loops: int, loop_start: int, loop_end: int, looping: bool) -> LayerPlan:
    layers = virtual_layers(num_layers, num_loops if looping else 0, loop_start, loop_end)
    n_enc = len(layers) // 2
    return LayerPlan(tuple(layers[:n_enc]), tuple(layers[n_enc:]))
